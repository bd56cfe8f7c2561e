"""Train a teacher, then distil it into an early-exit student whose readout re-weights the training samples.

    python train.py                                             # synth benchmark, CPU, a few minutes
    python train.py --dataset waterbirds --data-root DIR --weighting laplace

Weightings: ``none`` (plain KD) or DEDIER's weights (Tiwari et al. 2024) from kdlaplace.readout_predictive: the
readout's softmax (``dedier``), at a temperature tuned on val (``dedier-ts``), or its KFAC Laplace predictive
(``laplace``, the default; ``laplace-cv`` cross-fitted; ``laplace-ml`` by the evidence). Writes teacher.pt (unless
--teacher reuses one), student.pt, last.pt, log.jsonl and metrics.json to --out; ``--resume`` continues a run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import kdlaplace as K

WEIGHTINGS = ("none", "dedier", "dedier-ts", "laplace", "laplace-cv", "laplace-ml")
N_SAMPLES = 50  # MC samples of every Laplace predictive in training and in its summary
SEED_STRIDE = 100003  # a prime: the readout pass of (seed, epoch) draws from seed * SEED_STRIDE + epoch
CROSS_FIT_FOLDS = 5  # laplace-cv: each sample's posterior is fit on the other 4/5 of the training set
GDRO_STEP = 0.01  # group DRO's step size eta on the group weights (Sagawa et al. 2020)
MULTI_CLASS_EPOCHS = {"teacher_epochs": 30, "epochs": 40}  # synth, > 2 classes: the exits study's (results/exits.md)

# ── Defaults per dataset (``--help`` prints them) ───────────────────────────────────────────────────────────
# alpha/beta per weighting: DEDIER's published values (Tiwari et al. 2024) on Waterbirds (0.05, 4), CelebA (0.1, 3.5),
# alpha = 1, beta = 2 for the calibrated margins (untuned there); on synth the selection of `sweep.py --study table`.
CALIBRATED_MARGINS = ("dedier-ts", "laplace", "laplace-cv", "laplace-ml")
SHARED = dict(width=32, lam=1.0, temperature=3.0, alpha={"dedier": 0.05, **dict.fromkeys(CALIBRATED_MARGINS, 1.0)},
              beta={"dedier": 4.0, **dict.fromkeys(CALIBRATED_MARGINS, 2.0)})  # lam = 1 and T = 3 are DEDIER's
SYNTH_SELECTED = {"dedier": (1.0, 1.0), "dedier-ts": (1.0, 2.0), "laplace": (0.5, 2.0), "laplace-cv": (0.5, 2.0),
                  "laplace-ml": (0.5, 1.0)}  # (alpha, beta) of each weighting, selected by the table
DATASET_DEFAULTS = {  # optimisers: group DRO's recipes (Sagawa et al. 2020)
    "synth": {**SHARED, "arch": "cnn", "teacher_arch": "cnn", "pretrained": "none", "epochs": 20, "teacher_epochs": 15,
              "batch_size": 128, "lr": 0.05, "weight_decay": 5e-4, "teacher_objective": "gdro",
              "alpha": {w: alpha for w, (alpha, _) in SYNTH_SELECTED.items()},
              "beta": {w: beta for w, (_, beta) in SYNTH_SELECTED.items()}},
    "waterbirds": {**SHARED, "arch": "resnet18", "teacher_arch": "resnet50", "pretrained": "imagenet", "epochs": 100,
                   "teacher_epochs": 100, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-4, "teacher_objective": "gdro"},
    "celeba": {**SHARED, "arch": "resnet18", "teacher_arch": "resnet50", "pretrained": "imagenet", "epochs": 20,
               "teacher_epochs": 20, "batch_size": 128, "lr": 1e-4, "weight_decay": 1e-4, "teacher_objective": "gdro",
               "alpha": {**SHARED["alpha"], "dedier": 0.1}, "beta": {**SHARED["beta"], "dedier": 3.5}},
    "cifar100": {**SHARED, "arch": "resnet18-cifar", "teacher_arch": "resnet18-cifar", "pretrained": "none",
                 "epochs": 100, "teacher_epochs": 100, "batch_size": 128, "lr": 0.05, "weight_decay": 5e-4,
                 "teacher_objective": "erm"},
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The flags; those left out take the dataset's default (DATASET_DEFAULTS), which --help lists per dataset."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(name: str, help: str, **options) -> None:  # the help ends in the default, per dataset where they differ
        key = name[2:].replace("-", "_")
        values = {dataset: " ".join(f"{k}={x:g}" for k, x in d[key].items()) if isinstance(d[key], dict)
                  else str(d[key]) for dataset, d in DATASET_DEFAULTS.items() if key in d}  # {}: not a dataset's
        if len(set(values.values())) > 1:
            help += " (default: " + "; ".join(f"{dataset} {value}" for dataset, value in values.items()) + ")"
        elif values or options.get("default") is not None and options.get("action") != "store_true":
            help += f" (default: {next(iter(values.values())) if values else options['default']})"
        parser.add_argument(name, help=help, **options)

    add("--dataset", "the benchmark", default="synth", choices=K.DATASETS)
    add("--data-root", "folder of the dataset, not for synth (default: $KDLAPLACE_DATA/<dataset>, else ./data/<dataset>)")
    add("--weighting", "sample weights from the readout (module docstring)", default="laplace", choices=WEIGHTINGS)
    add("--arch", "student architecture", choices=K.ARCHITECTURES)
    add("--teacher-arch", "teacher architecture", choices=K.ARCHITECTURES)
    add("--width", "student width (arch cnn only; the teacher's is twice it)", type=int)
    add("--pretrained", "student weights: imagenet, none, or a torchvision-format state dict path")
    add("--teacher-pretrained", "teacher weights (default: --pretrained for the same arch, else the dataset's)")
    add("--teacher", "reuse this trained teacher.pt instead of training one")
    add("--teacher-objective", "erm, or gdro: group DRO with online group weights", choices=["erm", "gdro"])
    add("--epochs", "student epochs (in total, with --resume)", type=int)
    add("--teacher-epochs", "teacher epochs", type=int)
    add("--lr", "peak learning rate of the one-cycle schedule", type=float)
    add("--alpha", "exponent on the readout margin (> 0)", type=float)
    add("--beta", "scale of the weights exp(beta * margin ** alpha) (>= 0)", type=float)
    add("--readout-exit", "which student exit is the readout (0 = the first)", type=int, default=0)
    add("--synth-n-train", "synth training images (val = 1/4, test = 1/2 of it)", type=int, default=4800)
    add("--synth-classes", "synth classes, 2 to 10: shapes on land or water (2) or on a colour per class (8: the exits "
                           "study; above 2: 30 teacher, 40 student epochs)", type=int, default=2)
    add("--seed", "random seed", type=int, default=0)
    add("--device", "auto, cpu or cuda", default="auto", choices=["auto", "cpu", "cuda"])
    add("--float32", "no bf16 autocast, even where it is fast (CUDA, CPUs with AVX512-BF16 or AMX)", action="store_true")
    add("--out", "output folder (default runs/<dataset>/<weighting>-seed<seed>)")
    add("--resume", "continue from OUT/last.pt", action="store_true")
    add("--diagnostics", "log the readout's study diagnostics every epoch (sweep.py's studies): the weights' correlation "
                         "with a temperature-only softmax's, the posterior's spread per group", action="store_true")
    cfg = parser.parse_args(argv)
    defaults = {**DATASET_DEFAULTS[cfg.dataset], **(MULTI_CLASS_EPOCHS if cfg.synth_classes > 2 else {})}
    student_pretrained = cfg.pretrained  # as given, before the dataset's defaults fill it
    for name, value in defaults.items():  # fill what the user left to the dataset (alpha, beta: per weighting)
        if getattr(cfg, name, None) is None:
            setattr(cfg, name, value.get(cfg.weighting, 1.0) if isinstance(value, dict) else value)
    if cfg.teacher_pretrained is None:  # a weight file holds one architecture: shared only when they match
        same = student_pretrained is not None and cfg.arch == cfg.teacher_arch
        cfg.teacher_pretrained = student_pretrained if same else defaults["pretrained"]
    cfg.teacher_width = 2 * cfg.width
    checks = [(cfg.alpha > 0, "--alpha must be > 0"), (cfg.beta >= 0, "--beta must be >= 0"),
              (min(cfg.epochs, cfg.teacher_epochs) >= 1, "--epochs and --teacher-epochs must be >= 1"),
              (cfg.lr > 0, "--lr must be > 0"), (cfg.synth_n_train >= 16, "--synth-n-train must be >= 16"),
              (2 <= cfg.synth_classes <= len(K.SYNTH_SHAPES), f"--synth-classes must be in 2..{len(K.SYNTH_SHAPES)}"),
              (cfg.synth_classes == 2 or cfg.dataset == "synth", "--synth-classes is a flag of --dataset synth")]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    cfg.out = cfg.out or f"runs/{cfg.dataset}/{cfg.weighting}-seed{cfg.seed}"
    return cfg


# ── Networks: a fresh one; the readout's passes and its calibration ─────────────────────────────────────────
def new_model(cfg: argparse.Namespace, role: str, data: K.SpuriousDataset, device: torch.device) -> K.EarlyExitNet:
    """A fresh network for ``role`` with its own pretrained weights (--pretrained or --teacher-pretrained)."""
    arch, width, flag, value = ((cfg.arch, cfg.width, "--pretrained", cfg.pretrained) if role == "student" else
                                (cfg.teacher_arch, cfg.teacher_width, "--teacher-pretrained", cfg.teacher_pretrained))
    try:
        model = K.build_model(arch, data.n_classes, {"none": False, "imagenet": True}.get(value, value), width,
                              data.image_size)
    except (OSError, ValueError) as error:  # OSError: torch.hub cannot reach the download (an offline node)
        offline = f"; offline, pass a local torchvision-format state dict: {flag} FILE" if isinstance(error, OSError) else ""
        raise ValueError(f"{flag} {value}: cannot initialise the {role} ({arch}): {error}{offline}") from None
    return K.model_to_device(model, device, K.run_uses_bf16(vars(cfg), device))


def readout_pass(cfg: argparse.Namespace, student: K.EarlyExitNet, splits: dict, data: K.SpuriousDataset,
                 device: torch.device, split: str, float32_heads: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The readout exit's logits (N, c) and head features (N, p), float32, on one split (eval mode)."""
    logits, (features,) = K.predict_split(student, splits[split], data.mean, data.std, device, exits=[cfg.readout_exit],
                                          amp=K.run_uses_bf16(vars(cfg), device), float32_heads=float32_heads)
    return logits[0], features


def readout_calibration(cfg: argparse.Namespace, student: K.EarlyExitNet, splits: dict, data: K.SpuriousDataset,
                        device: torch.device) -> dict:
    """Test accuracy, NLPD and ECE of the readout exit with its softmax, its temperature-scaled softmax and its
    Laplace predictive (T and (T, sigma^2) tuned on val). Same seeding rule as eval.py: the same figures."""
    (_, train_features), (val_logits, val_features), (logits, features) = (
        readout_pass(cfg, student, splits, data, device, split) for split in ("train", "val", "test"))
    laplace = K.tuned_exit_laplace(student.heads[cfg.readout_exit].linear, train_features, val_features,
                                   splits["val"].labels, N_SAMPLES, cfg.seed)
    temperature, test = K.tune_temperature(val_logits, splits["val"].labels), splits["test"]
    predictives = {"map": torch.softmax(logits, -1), "temperature": torch.softmax(logits / temperature, -1),
                   "laplace": laplace.predict(features, N_SAMPLES, generator=K.seeded_generator(cfg.seed, device))}
    return {"exit": cfg.readout_exit, **{name: K.classification_metrics(probs, test.labels, test.groups, data.n_groups)
                                         for name, probs in predictives.items()}}


# ── Training: one phase (teacher or student), one epoch top to bottom ───────────────────────────────────────
def validate_and_reweight(cfg: argparse.Namespace, role: str, model: K.EarlyExitNet, splits: dict, data: K.SpuriousDataset,
                          device: torch.device, epoch: int) -> tuple[dict, Optional[torch.Tensor], dict]:
    """The end of an epoch: the last exit's validation metrics (model selection) and, for a weighted student, the
    next epoch's sample weights (N,) and their log fields (else None and {}): DEDIER's weights of the readout's
    predictive on train (kdlaplace.readout_predictive; head in bf16, a cheap pass), tuned on the same val pass."""
    reweight = role == "student" and cfg.weighting != "none"
    val_logits, val_features = K.predict_split(model, splits["val"], data.mean, data.std, device,
                                               exits=[-1, cfg.readout_exit] if reweight else [-1],
                                               amp=K.run_uses_bf16(vars(cfg), device))  # (K', N_val, c), K' x (N_val, p)
    metrics = data.accuracy(val_logits[0].argmax(-1), splits["val"])
    if not reweight:
        return metrics, None, {}
    val_logits, val_features = val_logits[1], val_features[1]  # the readout's (head in float32): (N_val, c), (N_val, p)
    train, val, seed = splits["train"], splits["val"], cfg.seed * SEED_STRIDE + epoch
    train_logits, train_features = readout_pass(cfg, model, splits, data, device, "train", float32_heads=False)
    linear = model.heads[cfg.readout_exit].linear
    probs, laplace, logit_std = K.readout_predictive(
        cfg.weighting, linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), train_logits,
        train_features, val_logits, val_features, val.labels, N_SAMPLES, seed, CROSS_FIT_FOLDS)  # (N, c), -, (N,)
    weights = K.dedier_weights(probs, train.labels, cfg.alpha, cfg.beta)  # (N,)
    group_means = lambda values: K.group_means(values, train.groups, data.n_groups)  # per group, None where empty
    info = {"readout_temperature": None if laplace is None else laplace.temperature,
            "readout_prior_variance": None if laplace is None else 1.0 / laplace.prior_precision,
            "upweighted_share": group_means((weights > 1).double())}
    if cfg.weighting == "dedier-ts" or cfg.diagnostics:  # the temperature-only softmax, every weighting's ablation
        temperature = K.tune_temperature(val_logits, val.labels)
        info["readout_temperature"] = temperature if cfg.weighting == "dedier-ts" else info["readout_temperature"]
    if cfg.diagnostics:  # do the weights differ from a tuned temperature's, and does phi~^T V phi~ differ by group?
        ts_weights = K.dedier_weights(torch.softmax(train_logits / temperature, -1), train.labels, cfg.alpha, cfg.beta)
        info.update(upweighted_share_all=float((weights > 1).double().mean()), posterior_logit_std=None,
                    weight_corr_temperature=K.pearson_correlation(weights, ts_weights))
        if laplace is not None:  # one variance for every input would act as one more global temperature
            variance = logit_std.double() ** 2  # (N,) proportional to phi~^T V phi~: a CV does not see the scale
            group_variance = torch.tensor([v for v in group_means(variance) if v is not None], dtype=torch.float64)
            info.update(posterior_logit_std=group_means(logit_std), posterior_logit_std_median=float(logit_std.median()),
                        posterior_variance_cv=float(variance.std() / variance.mean()),
                        posterior_variance_group_cv=float(group_variance.std() / group_variance.mean()))
    return metrics, weights, info


def train_phase(cfg: argparse.Namespace, role: str, model: K.EarlyExitNet, data: K.SpuriousDataset, splits: dict,
                device: torch.device, epochs: int, out: Path, log: Callable[[dict, int], None], state: dict,
                targets: Optional[Callable] = None) -> K.EarlyExitNet:
    """Train ``role`` ("teacher", or "student" distilling ``targets``) with nesterov SGD on the one-cycle
    schedule. After every epoch: validation, the readout's new sample weights (student), OUT/<role>.pt when the
    validation worst-group accuracy improves (ties: the average), and OUT/last.pt, from which ``state`` resumes this phase."""
    train, amp = splits["train"], K.run_uses_bf16(vars(cfg), device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                                weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    generator = torch.Generator().manual_seed(cfg.seed)  # shuffling and augmentation
    progress = {"epoch": 0, "best": {"worst_group_acc": -1.0, "avg_acc": -1.0, "epoch": 0},
                "group_weights": torch.full((data.n_groups,), 1 / data.n_groups), "sample_weights": None}
    if state.get("phase") == role:  # resume where last.pt left off
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        progress = {key: state[key] for key in progress}
    progress = {key: value.to(device) if torch.is_tensor(value) else value for key, value in progress.items()}
    # one cycle (Smith 2018): the rate rises from lr/25 to lr over 15% of the steps (momentum 0.95 -> 0.85), then
    # both return on cosines, the rate to lr/25e4; a resumed run continues at its step
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.15, div_factor=25, final_div_factor=1e4,
                                                   last_epoch=progress["epoch"] * steps_per_epoch - 1)
    for epoch in range(progress["epoch"] + 1, epochs + 1):
        started = time.perf_counter()
        model.train()
        total_loss = torch.zeros((), device=device)  # summed on the device: no host sync per batch
        for index in torch.randperm(len(train), generator=generator).split(cfg.batch_size):
            flips = K.random_flips(len(index), generator) if data.augment == "flip" else None  # (B,) or None
            x = K.prepare_batch(K.batch_images(train, index, device), data.mean, data.std, data.augment, generator,
                                channels_last=amp, flips=flips)
            index = index.to(device)
            y = train.labels[index]
            with K.autocast(device, amp):
                if role == "student":  # weighted KD (+ CE); no weights in epoch 1: the readout is untrained
                    weights = None if progress["sample_weights"] is None else progress["sample_weights"][index]
                    teacher_logits, logits = targets(x, index, flips), model(x)  # (B, c), K x (B, c)
                    loss = K.student_loss(logits[-1], teacher_logits, y, weights, cfg.lam, cfg.temperature)
                else:  # cross-entropy (ERM) or group DRO
                    logits = model(x)  # K x (B, c)
                    per_sample = torch.nn.functional.cross_entropy(logits[-1].float(), y, reduction="none")  # (B,)
                    if cfg.teacher_objective == "gdro":
                        loss, progress["group_weights"] = K.group_dro_loss(per_sample, train.groups[index],
                                                                           progress["group_weights"], GDRO_STEP)
                    else:
                        loss = per_sample.mean()
                loss = loss + K.early_exit_loss(logits, y)  # the readouts learn on detached features
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]  # this step's, for the log
            schedule.step()
            total_loss += loss.detach()
        train_loss = float(total_loss) / steps_per_epoch
        if not math.isfinite(train_loss):
            raise ValueError(f"{role} training diverged at epoch {epoch} (loss {train_loss}); lower --lr")
        val_metrics, sample_weights, info = validate_and_reweight(cfg, role, model, splits, data, device, epoch)
        progress["sample_weights"] = sample_weights  # the next epoch's; None for the teacher and plain KD
        seconds = time.perf_counter() - started
        checkpoint = {"model": model.state_dict(), "model_config": model.config, "config": vars(cfg)}  # eval.py's
        score = (val_metrics["worst_group_acc"], val_metrics["avg_acc"])
        if score > (progress["best"]["worst_group_acc"], progress["best"]["avg_acc"]):
            progress["best"] = {"worst_group_acc": score[0], "avg_acc": score[1], "epoch": epoch}
            K.atomic_save({**checkpoint, "best": progress["best"]}, out / f"{role}.pt")
        log({"phase": role, "epoch": epoch, "seconds": round(seconds, 3), "train_loss": train_loss,
             "val_avg_acc": val_metrics["avg_acc"], "val_worst_group_acc": val_metrics["worst_group_acc"],
             "images_per_s": round(len(train) / seconds, 1), "lr": lr, "reweighted": sample_weights is not None,
             **info}, epochs)
        progress["epoch"] = epoch  # last.pt: where --resume continues (an atomic write: never half a file)
        K.atomic_save({**checkpoint, "phase": role, "optimizer": optimizer.state_dict(),
                       "generator": generator.get_state(), **progress}, out / "last.pt")
    model.load_state_dict(K.load_checkpoint(out / f"{role}.pt")["model"])
    print(f"{role}: best validation worst-group accuracy {progress['best']['worst_group_acc']:.3f} "
          f"at epoch {progress['best']['epoch']}")
    return model


# ── The pipeline ────────────────────────────────────────────────────────────────────────────────────────────
def run(cfg: argparse.Namespace) -> dict:
    started, out = time.perf_counter(), Path(cfg.out)
    if cfg.resume and not (out / "last.pt").is_file():
        raise FileNotFoundError(f"--resume: no {out / 'last.pt'} to resume from (run without --resume first)")
    state = K.load_checkpoint(out / "last.pt", dataset=cfg.dataset, synth_classes=cfg.synth_classes, arch=cfg.arch,
                              teacher_arch=cfg.teacher_arch, weighting=cfg.weighting) if cfg.resume else {}
    torch.manual_seed(cfg.seed)
    K.use_allowed_cores()
    device = K.pick_device(cfg.device)
    amp = K.run_uses_bf16(vars(cfg), device)  # bf16 autocast and channels_last
    data = K.load_run_data(vars(cfg))
    splits = K.splits_to_device(data, device)
    student = new_model(cfg, "student", data, device)
    if not 0 <= cfg.readout_exit < len(student.heads) - 1:
        raise ValueError(f"--readout-exit {cfg.readout_exit}: the student's early exits are 0..{len(student.heads) - 2} "
                         "(the last exit cannot be the readout)")
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        (out / "log.jsonl").unlink(missing_ok=True)
    elif (out / "log.jsonl").is_file():  # a kill between an epoch's log line and its last.pt: keep what last.pt saw
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        kept = [r for r in records if r["phase"] != state["phase"] or r["epoch"] <= state["epoch"]]
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    print(f"{data.name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images, "
          f"{data.n_classes} classes, {data.n_groups} groups; device {device}, {torch.get_num_threads()} threads"
          f"{' (bf16 autocast)' if amp else ''}; out {out}")

    def log(record: dict, epochs: int) -> None:  # one line of log.jsonl; printed with the readout's T, s2, shares
        with open(out / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        line = (f"{record['phase']} epoch {record['epoch']:3d}/{epochs}  loss {record['train_loss']:.4f}  val avg "
                f"{record['val_avg_acc']:.3f}  worst-group {record['val_worst_group_acc']:.3f}  {record['seconds']:.1f}s")
        if "upweighted_share" in record:
            T, s2 = record["readout_temperature"], record["readout_prior_variance"]
            line += "  | T {} s2 {}  up ".format(*("-" if value is None else f"{value:.3g}" for value in (T, s2)))
            line += "/".join("-" if share is None else f"{share:.2f}" for share in record["upweighted_share"])
            if T and K.at_search_end(T, K.KFACLaplace.TEMPERATURE_GRID):
                line += "  (T at an end of its search range: 100, a readout near chance; 0.01, every wrong sample exp(beta))"
        print(line, flush=True)

    # 1. Teacher: reused, or trained here (ERM or group DRO on the last exit), or resumed
    if cfg.teacher or state.get("phase") == "student":
        saved = K.load_checkpoint(cfg.teacher or out / "teacher.pt", dataset=cfg.dataset,
                                  synth_classes=cfg.synth_classes)  # any architecture
        teacher = K.model_to_device(K.model_from_checkpoint(saved), device, amp)
    else:
        teacher = train_phase(cfg, "teacher", new_model(cfg, "teacher", data, device), data, splits, device,
                              cfg.teacher_epochs, out, log, state)
    targets = K.teacher_targets(teacher, splits["train"], data.mean, data.std, data.augment, device, amp)
    # 2. Student: weighted KD on the last exit, readouts trained on the side, weights refreshed every epoch
    student = train_phase(cfg, "student", student, data, splits, device, cfg.epochs, out, log, state, targets)

    # 3. Summary on the test split: the last exits' accuracies, the readout's calibration
    def test_accuracy(model: K.EarlyExitNet) -> dict:  # of the last exit
        logits = K.predict_split(model, splits["test"], data.mean, data.std, device, exits=[-1], amp=amp)[0]  # (1, N, c)
        return data.accuracy(logits[0].argmax(-1), splits["test"])

    metrics = {"dataset": data.name, "weighting": cfg.weighting, "alpha": cfg.alpha, "beta": cfg.beta, "seed": cfg.seed,
               "teacher": {"test": test_accuracy(teacher)},
               "student": {"test": test_accuracy(student), "val": K.load_checkpoint(out / "student.pt")["best"],
                           "readout": readout_calibration(cfg, student, splits, data, device)}}
    # what produced the run, for the tables that read it (wall time: of this process, after --resume its part)
    metrics.update(code_version=K.code_version(), hardware=K.hardware_name(device), bf16=amp,
                   threads=torch.get_num_threads(), wall_seconds=round(time.perf_counter() - started, 1))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"\n{'test':8s} {'avg acc':>8s} {'worst-group':>12s}  " + "  ".join(f"{g:>14s}" for g in data.group_names))
    for role, m in (("teacher", metrics["teacher"]["test"]), ("student", metrics["student"]["test"])):
        print(f"{role:8s} {m['avg_acc']:8.3f} {m['worst_group_acc']:12.3f}  "
              + "  ".join(f"{a:14.3f}" if a is not None else f"{'-':>14s}" for a in m["group_acc"]))
    readout = metrics["student"]["readout"]
    print(f"student readout (exit {readout['exit']}) test ECE: softmax {readout['map']['ece']:.4f}, temperature-scaled "
          f"{readout['temperature']['ece']:.4f}, Laplace {readout['laplace']['ece']:.4f}\nwrote {out}/metrics.json")
    return metrics


def main(argv: Optional[list[str]] = None) -> None:
    cfg = parse_args(argv)
    try:
        run(cfg)
    except KeyboardInterrupt:
        print(f"\ntrain.py: interrupted; continue with --resume (out {cfg.out})", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
