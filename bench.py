"""Benchmarks: the methods must cost what their mathematics costs, the pipeline what its training costs.

    python bench.py [--quick] [--json PATH] [--device cuda] [--resnet]   # speed rows, median of repeats after a warm-up
    python bench.py --table [--seeds 0 1 2 3 4] [--fresh-seeds 5 6 7 8 9]   # the README's synth table (trains the runs)

Speed cases and their baselines: ``kfac_fit`` vs the bare ``features.T @ features``; ``predict_mc`` /
``predict_probit`` vs the per-input ``c x c`` covariance + Cholesky that a generic library does; ``avcs`` vs
``torch.distributions.Dirichlet`` draws (which underflow for small concentrations); ``epoch_teacher`` and
``epoch_student_{none,dedier,laplace}`` (train.py's own phase loop) vs ``epoch_bare_loop`` of the same network
(forward, backward, step, nothing else), with the same ratio in multiply-adds beside the timed one;
``main_job``: ``python train.py`` end to end; ``data`` images/s through uint8 -> device -> normalise/augment; on
CUDA (or with ``--resnet``) also ``epoch_resnet18_224`` / ``epoch_resnet50_224`` and the epoch cases of a
Waterbirds-shaped run (``*_waterbirds_shape``). The table runs its train.py processes one at a time, each with
every core this process may use (never oversubscribed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

import kdlaplace as K
import train


# ── Speed: micro-benchmarks of the methods and epochs of the pipeline against a bare loop ──────────────────

def timed_rounds(cases: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time of every case over ``repeats`` rounds after one warm-up round, the cases taking turns within
    each round (synchronising CUDA): when the machine's speed drifts (a neighbour, the clock), every case of a round
    feels it alike, so the ratios between cases hold better than with each case timed in a block of its own."""
    times = {name: [] for name in cases}
    for round_index in range(repeats + 1):
        for name, fn in cases.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_index > 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    return timed_rounds({"case": fn}, repeats, device)["case"]


def per_input_covariance_predict(laplace: K.KFACLaplace, features: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Baseline: what a generic library does per input: form ``v_n U`` (c x c), factor it, sample, average."""
    mean, scale = laplace.logit_distribution(features)
    U = laplace.factors()[0].to(features.dtype)
    out = []
    for n in range(features.shape[0]):  # the per-input loop this project avoids
        cholesky = torch.linalg.cholesky(scale[n] * U)  # (c, c)
        normal = torch.randn(n_samples, U.shape[0], dtype=features.dtype, device=features.device)  # (S, c)
        logits = mean[n] + normal @ cholesky.T  # (S, c)
        out.append(torch.softmax(logits, -1).mean(0))
    return torch.stack(out)


def speed_cases(quick: bool, device: torch.device) -> list[dict]:
    rows = []
    repeats = 3 if quick else 5
    g = torch.Generator(device=device).manual_seed(0)

    def add(case: str, sizes: str, seconds: float, items: int, baseline: float, unit: str) -> None:
        rows.append({"case": case, "device": device.type, "sizes": sizes, "seconds": seconds,
                     "throughput": items / seconds, "unit": unit, "baseline_seconds": baseline,
                     "ratio": seconds / baseline if baseline else None})

    n, p, c = (10000 if quick else 50000), 512, 100
    features = torch.randn(n, p, device=device, generator=g)
    weight, bias = 0.05 * torch.randn(c, p, device=device, generator=g), torch.randn(c, device=device, generator=g)
    baseline = timed(lambda: features.T @ features, repeats, device)
    seconds = timed(lambda: K.KFACLaplace.fit(features, weight, bias), repeats, device)
    add("kfac_fit", f"N={n} p={p} c={c}", seconds, n, baseline, "samples/s")

    laplace = K.KFACLaplace.fit(features, weight, bias)
    n_predict, n_baseline = (2000 if quick else 10000), 300
    inputs = features[:n_predict]
    baseline = timed(lambda: per_input_covariance_predict(laplace, inputs[:n_baseline], 50), 1,
                     device) * n_predict / n_baseline  # scaled from a subset: it is that slow
    for link in ("mc", "probit"):
        seconds = timed(lambda: laplace.predict(inputs, 50, link, generator=g), repeats, device)
        add(f"predict_{link}", f"N={n_predict} p={p} c={c} S=50", seconds, n_predict, baseline, "inputs/s")

    n_sets = 2000 if quick else 10000
    logits = 3 * torch.randn(4, n_sets, c, device=device, generator=g)
    thresholds = torch.ones(4, device=device)
    concentration = torch.where(logits > 1, logits, torch.full_like(logits, 1e-3))
    baseline = timed(lambda: torch.distributions.Dirichlet(concentration).sample(), repeats, device)
    seconds = timed(lambda: K.avcs_sets(logits, thresholds, generator=g), repeats, device)
    add("avcs", f"K=4 N={n_sets} c={c}", seconds, n_sets, baseline, "inputs/s")

    rows += epoch_cases(device, ["--synth-n-train", "1200" if quick else "4800"], None, 1 if quick else 5)

    for augment, size in (("flip", 32), ("pad", 32), ("crop", 32), ("crop", 224)):
        n_images = 256 if size == 224 else 4096
        images = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8)
        split = K.split_to_device(K.Split(images, torch.zeros(n_images, dtype=torch.long),
                                          torch.zeros(n_images, dtype=torch.long)), device)
        cpu_generator = torch.Generator().manual_seed(0)

        def pipeline() -> None:
            for index in torch.arange(n_images).split(128):
                K.prepare_batch(K.batch_images(split, index, device), (0.5,) * 3, (0.25,) * 3, augment,
                                cpu_generator, channels_last=K.bf16_is_fast(device))

        seconds = timed(pipeline, repeats, device)
        add("data", f"{augment} {size}x{size} batch=128", seconds, n_images, 0.0, "images/s")
    return rows


def bare_epoch(model: K.EarlyExitNet, data: K.SpuriousDataset, split: K.Split, device: torch.device, amp: bool,
               batch_size: int, targets: Optional[Callable] = None) -> Callable[[], None]:
    """The lower bound for one training epoch of ``model``: uint8 batches -> device -> normalise and augment,
    forward, cross-entropy on every exit (plus the KD term on the teacher's last exit for a student), backward,
    SGD step. No evaluation, no readout pass, no logging, no checkpoint."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(0)

    def epoch() -> None:
        model.train()
        for index in torch.randperm(len(split), generator=generator).split(batch_size):
            flips = K.random_flips(len(index), generator) if data.augment == "flip" else None
            x = K.prepare_batch(K.batch_images(split, index, device), data.mean, data.std, data.augment, generator,
                                channels_last=amp, flips=flips)
            index = index.to(device)
            y = split.labels[index]
            with K.autocast(device, amp):
                logits = model(x)
                loss = sum(F.cross_entropy(z.float(), y) for z in logits)
                if targets is not None:  # train.py's own KD targets (the teacher's last exit)
                    teacher_logits = targets(x, index, flips)
                    loss = loss + K.kd_loss(logits[-1], teacher_logits, 3.0).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return epoch


def epoch_macs(model: K.EarlyExitNet, n_train: int, n_val: int, readout_exit: Optional[int],
               target_flops: int = 0) -> tuple[int, int]:
    """Multiply-adds of one epoch: (the bare loop's, the epoch's end's). The bare loop, per training image: a
    forward over every exit and a backward of twice its multiply-adds (the gradients of the inputs and of the
    weights), plus the teacher's forward ``target_flops`` where its targets cannot be computed once for the run
    (random crops). The end of the epoch (``validate_and_reweight``): the validation pass (the last exit, and the
    readout's exit for a weighted student, ``readout_exit`` not None) and the readout's eval pass over the training
    set. The weights' own arithmetic (the c x c and p x p factors, the MC softmax: millions of operations against
    the passes' billions) is not counted. Their ratio is what the method's passes cost if every multiply-add cost
    the same, in training and in eval mode."""
    last = len(model.heads) - 1
    bare = n_train * (3 * model.pass_flops() + target_flops)
    if readout_exit is None:
        return bare, n_val * model.pass_flops([last])
    return bare, n_val * model.pass_flops([last, readout_exit]) + n_train * model.pass_flops([readout_exit])


def random_images_dataset(n_train: int, n_val: int, size: int, augment: str) -> K.SpuriousDataset:
    """Uniform uint8 images with random labels and 4 groups (2 classes x 2 attribute values): timing only."""
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> K.Split:
        labels = torch.randint(0, 2, (n,), generator=generator)
        groups = 2 * labels + torch.randint(0, 2, (n,), generator=generator)
        return K.Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator), labels,
                       groups)
    return K.SpuriousDataset("bench", split(n_train), split(n_val), split(n_val), 2, 4, ["g"] * 4, K.IMAGENET_MEAN,
                             K.IMAGENET_STD, "y", "a", augment)


def epoch_cases(device: torch.device, flags: list[str], data: Optional[K.SpuriousDataset], repeats: int,
                suffix: str = "") -> list[dict]:
    """Pipeline epochs (train.py's own ``train_phase``: model selection on val, readout pass, weights, checkpoints)
    of the run that train.py ``flags`` configure, on ``data`` (None: that run's own data), as a ratio to the bare
    loop of the same network: ``epoch_bare_loop`` (teacher and student), ``epoch_teacher``,
    ``epoch_student_none``, ``epoch_student_dedier``, ``epoch_student_laplace``; and ``epoch_tail_<weighting>``,
    the end of a student epoch alone (``validate_and_reweight``: the validation pass, the readout's pass over the
    training set and its weights) as a share of the bare epoch. Every row also has ``macs_ratio``, the same ratio
    in multiply-adds (:func:`epoch_macs`). Case names end with ``suffix``."""
    rows = []
    cfg = train.parse_args([*flags, "--device", device.type])
    data = K.load_run_data(vars(cfg)) if data is None else data
    splits = K.splits_to_device(data, device)
    amp = K.run_uses_bf16(vars(cfg), device)
    torch.manual_seed(0)
    teacher = train.new_model(cfg, "teacher", data, device)
    target_flops = teacher.pass_flops([-1]) if train.targets_every_batch(data) else 0  # else once for the run
    n_train, n_val = len(data.train), len(data.val)

    def add(case: str, network: str, seconds: float, baseline: Optional[float], macs: tuple[int, int]) -> None:
        rows.append({"case": case + suffix, "device": device.type, "sizes": f"{data.name} N={n_train} {network}",
                     "seconds": seconds, "throughput": n_train / seconds, "unit": "images/s",
                     "baseline_seconds": baseline, "ratio": seconds / baseline if baseline else None,
                     "macs_ratio": macs[1] / macs[0]})

    def phase_epoch(cfg: train.Config, role: str, model: K.EarlyExitNet, out: str,
                    targets: Optional[Callable] = None) -> Callable[[], object]:
        return lambda: train.train_phase(cfg, role, model, data, splits, device, 1, Path(out),
                                         lambda record, epochs: None, {}, targets)

    with tempfile.TemporaryDirectory() as out:
        seconds = timed_rounds({"bare": bare_epoch(teacher, data, splits["train"], device, amp, cfg.batch_size),
                                "teacher": phase_epoch(cfg, "teacher", teacher, out)}, repeats, device)
    bare, tail = epoch_macs(teacher, n_train, n_val, None)
    teacher_name = f"teacher {cfg.teacher_arch}" + (f" w={cfg.teacher_width}" if cfg.teacher_arch == "cnn" else "")
    add("epoch_bare_loop", teacher_name, seconds["bare"], None, (bare, bare))
    add("epoch_teacher", teacher_name, seconds["teacher"], seconds["bare"], (bare, bare + tail))
    teacher.eval()
    student = train.new_model(cfg, "student", data, device)
    student_name = f"student {cfg.arch}" + (f" w={cfg.width}" if cfg.arch == "cnn" else "")
    targets = train.teacher_targets(cfg, teacher, splits, data, device)
    weightings = ("none", "dedier", "laplace")  # the readout's weights are computed at the end of the epoch
    configs = {weighting: train.parse_args([*flags, "--weighting", weighting, "--device", device.type])
               for weighting in weightings}

    def tail_of_epoch(cfg_w: train.Config) -> Callable[[], object]:  # what an epoch does after its training loop
        return lambda: train.validate_and_reweight(cfg_w, "student", student, splits, data, device, 1)
    with tempfile.TemporaryDirectory() as out:
        cases = {"bare": bare_epoch(student, data, splits["train"], device, amp, cfg.batch_size, targets)}
        for weighting in weightings:
            cases[weighting] = phase_epoch(configs[weighting], "student", student, out, targets)
        seconds = timed_rounds(cases, repeats, device)
        tails = {weighting: tail_of_epoch(configs[weighting]) for weighting in weightings}
        tail_seconds = timed_rounds(tails, 3 * repeats, device)  # short calls: more of them
    macs = {weighting: epoch_macs(student, n_train, n_val, None if weighting == "none" else cfg.readout_exit,
                                  target_flops) for weighting in weightings}
    bare = macs["none"][0]
    add("epoch_bare_loop", f"{student_name} + teacher targets", seconds["bare"], None, (bare, bare))
    for weighting in weightings:
        add(f"epoch_student_{weighting}", student_name, seconds[weighting], seconds["bare"],
            (bare, bare + macs[weighting][1]))
    for weighting in weightings:  # ratio: the tail's share of the bare epoch
        add(f"epoch_tail_{weighting}", f"{student_name}: validation, readout", tail_seconds[weighting],
            seconds["bare"], macs[weighting])
    return rows


def resnet_epoch_cases(device: torch.device) -> list[dict]:
    """Images/s of one training epoch of a ResNet-18 and a ResNet-50 early-exit network at 224 px on a device-resident
    uint8 dataset (bf16 autocast and channels_last where they are fast): the Waterbirds / CelebA regime."""
    rows = []
    n_images = 512
    data = random_images_dataset(n_images, n_images, 224, "crop")
    split = K.split_to_device(data.train, device)
    amp = K.bf16_is_fast(device)
    for arch in ("resnet18", "resnet50"):
        model = K.build_model(arch, 2).to(device, memory_format=torch.channels_last if amp else torch.preserve_format)
        seconds = timed(bare_epoch(model, data, split, device, amp, 64), 2, device)
        rows.append({"case": f"epoch_{arch}_224", "device": device.type, "sizes": f"N={n_images} batch=64 bf16={amp}",
                     "seconds": seconds, "throughput": n_images / seconds, "unit": "images/s",
                     "baseline_seconds": None, "ratio": None})
    return rows


def resnet_pipeline_cases(device: torch.device) -> list[dict]:
    """The epoch cases of a Waterbirds-shaped run (ResNet-18 student, ResNet-50 teacher whose targets are computed
    on every batch of random crops, 224 px, batch 64, a validation set of a quarter of the training set's size as
    Waterbirds' 1199 / 4795) on random images: the pipeline's overhead in the real datasets' regime. Names end
    with ``_waterbirds_shape``."""
    n_train = 1024 if device.type == "cuda" else 256
    flags = ["--arch", "resnet18", "--teacher-arch", "resnet50", "--pretrained", "none", "--batch-size", "64"]
    data = random_images_dataset(n_train, n_train // 4, 224, "crop")
    return epoch_cases(device, flags, data, 2, "_waterbirds_shape")


def main_job(device: torch.device) -> dict:
    """``python train.py`` (teacher, student, summary) as a user runs it, timed once."""
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        subprocess.run([sys.executable, "train.py", "--device", device.type, "--out", out], check=True,
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
    return {"case": "main_job", "device": device.type, "sizes": "python train.py (defaults)", "seconds": seconds,
            "throughput": 1 / seconds, "unit": "runs/s", "baseline_seconds": None, "ratio": None}


def print_rows(rows: list[dict]) -> None:
    print(f"{'case':36s} {'device':6s} {'sizes':46s} {'median s':>10s} {'throughput':>22s} {'baseline s':>11s} "
          f"{'ratio':>8s} {'MACs':>6s}")
    for r in rows:
        ratio = f"{r['ratio']:8.3f}" if r["ratio"] is not None else f"{'-':>8s}"
        baseline = f"{r['baseline_seconds']:11.4f}" if r["baseline_seconds"] else f"{'-':>11s}"
        macs = f"{r['macs_ratio']:6.3f}" if "macs_ratio" in r else f"{'-':>6s}"
        print(f"{r['case']:36s} {r['device']:6s} {r['sizes']:46s} {r['seconds']:10.4f} "
              f"{r['throughput']:12.0f} {r['unit']:>9s} {baseline} {ratio} {macs}")


# ── The evidence table: an experiment runner that loops over train.py ─────────────────────────────────────
# Every weighting gets the same selection protocol: the (alpha, beta) of the grid with the best validation
# worst-group accuracy (mean over the seeds; ties by validation average accuracy), every run with the same seeds,
# epochs and teacher. The paper's (0.05, 4) is a point of the grid and stays in the table as its own row.

GRID_ALPHAS = (0.05, 0.5, 1.0)
GRID_BETAS = (1.0, 2.0, 4.0)
PAPER_ALPHA_BETA = (0.05, 4.0)  # DEDIER's published Waterbirds setting
TUNED_WEIGHTINGS = ("dedier", "dedier-ts", "laplace", "laplace-cv", "laplace-ml")
TABLE_FLAGS = ["--epochs", "12"]  # every student of the table (the teacher keeps its 15 epochs): 2 h on 2 cores
SHORTCUT_CHECK = ["--weighting", "none", "--teacher-objective", "erm", "--epochs", "1"]  # the ERM teacher counts


def grid_name(weighting: str, alpha: float, beta: float) -> str:
    return f"{weighting}_a{alpha:g}_b{beta:g}"


def table_runs() -> list[tuple[str, list[str]]]:
    """(run name, train.py flags) of one seed; "none" comes first: it trains the teacher every other run reuses."""
    runs = [("none", ["--weighting", "none", *TABLE_FLAGS])]
    runs += [(grid_name(w, a, b), ["--weighting", w, "--alpha", f"{a:g}", "--beta", f"{b:g}", *TABLE_FLAGS])
             for w in TUNED_WEIGHTINGS for a in GRID_ALPHAS for b in GRID_BETAS]
    return runs + [("erm", SHORTCUT_CHECK)]


def fresh_seed_runs(selected: dict) -> list[tuple[str, list[str]]]:
    """(run name, train.py flags) of a fresh seed: "none" (it trains the teacher) and each weighting's selected
    point, nothing else."""
    return [(name, flags) for name, flags in table_runs() if name == "none" or name in selected.values()]


def run_once(root: Path, seed: int, name: str, flags: list[str]) -> None:
    """One train.py process for (run, seed) unless its metrics.json exists; its wall time goes next to it."""
    out = root / f"{name}-seed{seed}"
    if (out / "metrics.json").exists():
        return
    teacher = [] if name in ("none", "erm") else ["--teacher", str(root / f"none-seed{seed}" / "teacher.pt")]
    command = [sys.executable, "train.py", *flags, *teacher, "--seed", str(seed), "--out", str(out)]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    (out / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")


def run_table(seeds: list[int], root: Path, fresh_seeds: Sequence[int] = ()) -> None:
    """Run every (seed, run) of the grid, select each weighting's point on ``seeds``, run the selected points on
    ``fresh_seeds`` (test figures that no selection has seen), then write the table. One train.py process at a
    time; runs that have a metrics.json are skipped."""
    for seed in seeds:
        for name, flags in table_runs():
            run_once(root, seed, name, flags)
    selected = select_runs(seeds, root)
    for seed in fresh_seeds:
        for name, flags in fresh_seed_runs(selected):
            run_once(root, seed, name, flags)
    table = summarize_table(seeds, root, fresh_seeds)
    print(table)
    (root / "table.md").write_text(table + "\n")


def load_run(root: Path, name: str, seed: int) -> dict:
    """A table run's metrics.json, with its student epochs from log.jsonl under "student_epochs" and the weighted
    ones among them under "epochs"."""
    folder = root / f"{name}-seed{seed}"
    metrics = json.loads((folder / "metrics.json").read_text())
    epochs = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    metrics["student_epochs"] = [r for r in epochs if r["phase"] == "student"]
    metrics["epochs"] = [r for r in metrics["student_epochs"] if "mean_weight" in r]
    return metrics


def grid_lines(seeds: list[int], root: Path, selected: dict) -> list[str]:
    """The selection grid: mean validation / test worst-group accuracy of every (alpha, beta) and weighting,
    the selected point in bold."""
    lines = ["", "Selection grid: validation / test worst-group accuracy (%), mean over seeds", "",
             "| α | β | " + " | ".join(TUNED_WEIGHTINGS) + " |", "|---|---|" + "---|" * len(TUNED_WEIGHTINGS)]
    for a in GRID_ALPHAS:
        for b in GRID_BETAS:
            entries = []
            for weighting in TUNED_WEIGHTINGS:
                runs = [load_run(root, grid_name(weighting, a, b), s) for s in seeds]
                entry = (f"{100 * statistics.mean(r['student']['val']['worst_group_acc'] for r in runs):.1f} / "
                         f"{100 * statistics.mean(r['student']['test']['worst_group_acc'] for r in runs):.1f}")
                entries.append(f"**{entry}**" if grid_name(weighting, a, b) == selected[weighting] else entry)
            lines.append(f"| {a:g} | {b:g} | " + " | ".join(entries) + " |")
    return lines


def cell(values: list[Optional[float]], scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± standard deviation' of the values that exist (times ``scale``), '–' when none does."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    spread = f" ± {scale * statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{scale * statistics.mean(values):.{digits}f}{spread}"


def select_runs(seeds: list[int], root: Path) -> dict:
    """weighting -> the run name of the grid point with the best mean validation worst-group accuracy (ties: the
    best mean validation average accuracy)."""
    def val_score(name: str) -> tuple[float, float]:
        runs = [load_run(root, name, s) for s in seeds]
        return (statistics.mean(r["student"]["val"]["worst_group_acc"] for r in runs),
                statistics.mean(r["student"]["val"]["avg_acc"] for r in runs))
    return {weighting: max((grid_name(weighting, a, b) for a in GRID_ALPHAS for b in GRID_BETAS), key=val_score)
            for weighting in TUNED_WEIGHTINGS}


def main_table_lines(seeds: list[int], root: Path, selected: dict) -> list[str]:
    """The main table (one row per weighting: plain KD, the paper's point, every tuned weighting) and the student's
    test worst-group accuracy per seed."""
    rows = [("none", "none"), (f"dedier, paper (α={PAPER_ALPHA_BETA[0]:g}, β={PAPER_ALPHA_BETA[1]:g})",
                               grid_name("dedier", *PAPER_ALPHA_BETA))]
    for weighting, name in selected.items():
        alpha, beta = (part[1:] for part in name.split("_")[1:])
        rows.append((f"{weighting}, tuned (α={alpha}, β={beta})", name))
    lines = ["| weighting | val worst-group | student avg | student worst-group | readout ECE softmax | "
             "readout ECE temperature | readout ECE Laplace | posterior logit std | corr with T-softmax weights |",
             "|---|---|---|---|---|---|---|---|---|"]
    per_seed = []
    for label, name in rows:
        runs = [load_run(root, name, s) for s in seeds]
        epoch_mean = lambda key: [statistics.mean(e[key] for e in r["epochs"]) if r["epochs"] and
                                  r["epochs"][0].get(key) is not None else None for r in runs]
        values = [cell([r["student"]["val"]["worst_group_acc"] for r in runs]),
                  cell([r["student"]["test"]["avg_acc"] for r in runs]),
                  cell([r["student"]["test"]["worst_group_acc"] for r in runs]),
                  *(cell([r["student"]["readout"][kind]["ece"] for r in runs]) for kind in ("map", "temperature", "laplace")),
                  cell(epoch_mean("posterior_logit_std_median"), 1.0, 3), cell(epoch_mean("weight_corr_temperature"), 1.0, 3)]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
        per_seed.append(f"{label}: " + " ".join(f"{100 * r['student']['test']['worst_group_acc']:.0f}" for r in runs))
    return lines + ["", "student test worst-group accuracy per seed (%): " + "; ".join(per_seed)]


def posterior_lines(seeds: list[int], root: Path, selected: dict) -> list[str]:
    """The readout posterior's tuned T, sigma^2 and logit standard deviation per group, for the Laplace weightings."""
    lines = ["", "Posterior of the readout on the training inputs (selected runs; mean over the weighted epochs, then "
                 "over seeds): tuned T and sigma^2, and the posterior standard deviation of the temperature-scaled "
                 "logits per group", "", "| weighting | T | σ² | logit std g0 | g1 | g2 | g3 |", "|---|---|---|---|---|---|---|"]
    for weighting in [w for w in TUNED_WEIGHTINGS if w.startswith("laplace")]:
        epochs = [e for s in seeds for e in load_run(root, selected[weighting], s)["epochs"]]
        stds = [statistics.mean(e["posterior_logit_std"][g] for e in epochs if e["posterior_logit_std"][g] is not None)
                for g in range(len(epochs[0]["posterior_logit_std"]))]
        lines.append(f"| {weighting} | {statistics.mean(e['readout_temperature'] for e in epochs):.2f} | "
                     f"{statistics.mean(e['readout_prior_variance'] for e in epochs):.3g} | "
                     + " | ".join(f"{v:.3f}" for v in stds) + " |")
    return lines


def cross_fit_lines(seeds: list[int], root: Path, selected: dict) -> list[str]:
    """Cross-fitting's effect on the same trained students: the selected laplace-cv runs' readouts (student.pt, float32
    heads) with the in-sample and the cross-fitted posterior logit std per group, (T, sigma^2) tuned as in training."""
    device = torch.device("cpu")
    stds = {"in-sample": [], "cross-fitted": []}  # per seed: (n_groups,) group means
    for seed in seeds:
        checkpoint = K.load_checkpoint(root / f"{selected['laplace-cv']}-seed{seed}" / "student.pt")
        config, readout_exit = checkpoint["config"], checkpoint["config"]["readout_exit"]
        data, amp = K.load_run_data(config), K.run_uses_bf16(config, device)
        model = K.model_to_device(K.model_from_checkpoint(checkpoint), device, amp)  # as eval.py loads it
        features = {name: K.predict_split(model, split, data.mean, data.std, device, exits=[readout_exit],
                                          amp=amp)[1][0]
                    for name, split in (("train", data.train), ("val", data.val))}  # (N, p) float32 each
        laplace = K.tuned_exit_laplace(model.heads[readout_exit].linear, features["train"], features["val"],
                                       data.val.labels, train.N_SAMPLES, seed)
        _, cross_fitted = K.cross_fitted_laplace_predict(laplace, features["train"], train.CROSS_FIT_FOLDS,
                                                         train.N_SAMPLES, K.seeded_generator(seed, device))
        for name, std in (("in-sample", laplace.logit_std(features["train"])), ("cross-fitted", cross_fitted)):
            stds[name].append(K.group_means(std, data.train.groups, data.n_groups))
    lines = ["", "Cross-fitting on the same students (the selected laplace-cv runs' best checkpoints): posterior "
                 "standard deviation of the readout's temperature-scaled logits per group, mean over seeds", "",
             "| posterior | " + " | ".join(f"g{g}" for g in range(len(stds["in-sample"][0]))) + " |",
             "|---|" + "---|" * len(stds["in-sample"][0])]
    for name, per_seed in stds.items():
        lines.append(f"| {name} | " + " | ".join(f"{statistics.mean(v):.3f}" for v in zip(*per_seed)) + " |")
    ratios = [c / i for ins, cro in zip(stds["in-sample"], stds["cross-fitted"]) for i, c in zip(ins, cro)]
    return lines + ["", f"cross-fitted / in-sample, every seed and group: {min(ratios):.3f} to {max(ratios):.3f}"]


def fresh_seed_lines(seeds: list[int], fresh_seeds: Sequence[int], root: Path, selected: dict) -> list[str]:
    """The selected points on the fresh seeds: their test figures, free of the selection's optimism, and the
    validation worst-group accuracy over all seeds (the criterion that picks train.py's default weighting)."""
    def seed_range(values: Sequence[int]) -> str:  # "5–9" for consecutive seeds, else "5 7"
        consecutive = len(values) > 1 and list(values) == list(range(min(values), max(values) + 1))
        return f"{min(values)}–{max(values)}" if consecutive else " ".join(map(str, values))
    lines = ["", f"Fresh seeds {seed_range(fresh_seeds)}: the points selected on seeds {seed_range(seeds)}, run again "
                 "on seeds that no selection has seen", "",
             f"| weighting | val worst-group, seeds {seed_range([*seeds, *fresh_seeds])} | student avg | "
             "student worst-group | per seed |", "|---|---|---|---|---|"]
    for label, name in [("none", "none"), *selected.items()]:
        fresh = [load_run(root, name, s)["student"] for s in fresh_seeds]
        every_val = [load_run(root, name, s)["student"]["val"]["worst_group_acc"] for s in [*seeds, *fresh_seeds]]
        lines.append(f"| {label} | {cell(every_val)} | {cell([r['test']['avg_acc'] for r in fresh])} | "
                     f"{cell([r['test']['worst_group_acc'] for r in fresh])} | "
                     + " ".join(f"{100 * r['test']['worst_group_acc']:.0f}" for r in fresh) + " |")
    return lines


def escape_lines(runs: list[tuple[str, int]], root: Path) -> list[str]:
    """When the students get off the shortcut: how many student runs have validation worst-group accuracy 0 after
    their first epoch, and the first epoch at which each reaches 50% (from log.jsonl)."""
    curves = [[e["val_worst_group_acc"] for e in load_run(root, name, s)["student_epochs"]]
              for name, s in runs if name != "erm"]  # an ERM run's 1-epoch student is there for its teacher
    first = [next((epoch for epoch, acc in enumerate(curve, 1) if acc >= 0.5), None) for curve in curves]
    counts = {epoch: first.count(epoch) for epoch in sorted(set(first) - {None})}
    return ["", f"student runs at validation worst-group 0 after epoch 1: {sum(c[0] == 0 for c in curves)} of "
                f"{len(curves)}; first epoch at 50% or more: "
                + ", ".join(f"{epoch}: {n}" for epoch, n in counts.items()) + f", never: {first.count(None)}"]


def summarize_table(seeds: list[int], root: Path, fresh_seeds: Sequence[int] = ()) -> str:
    """The markdown tables of the README from the runs' metrics.json and log.jsonl: the main table, the selection
    grid, the posterior's size, cross-fitting on the same students, the selected points on fresh seeds, the ERM vs
    group DRO teacher, when the students leave the shortcut, and the run time."""
    selected = select_runs(seeds, root)
    teachers = {objective: [load_run(root, name, s)["teacher"]["test"] for s in seeds]
                for objective, name in (("group DRO", "none"), ("ERM", "erm"))}
    shortcut = ["", "| teacher objective | test avg | test worst-group |", "|---|---|---|"] + [
        f"| {objective} | {cell([m['avg_acc'] for m in runs])} | {cell([m['worst_group_acc'] for m in runs])} |"
        for objective, runs in teachers.items()]
    runs = [(name, s) for s in seeds for name, _ in table_runs()]
    runs += [(name, s) for s in fresh_seeds for name, _ in fresh_seed_runs(selected)]
    wall = sum(float(path.read_text()) for name, s in runs
               for path in [root / f"{name}-seed{s}" / "wall_seconds.txt"] if path.exists())
    footer = escape_lines(runs, root) + [
        "", f"{len(runs)} runs, {wall / 60:.0f} min of train.py in all (wall time of the runs, one at a time)"]
    fresh = fresh_seed_lines(seeds, fresh_seeds, root, selected) if fresh_seeds else []
    cross_fit = cross_fit_lines(seeds, root, selected) if "laplace-cv" in selected else []
    return "\n".join(main_table_lines(seeds, root, selected) + grid_lines(seeds, root, selected)
                     + posterior_lines(seeds, root, selected) + cross_fit + fresh + shortcut + footer)


# ── Entry point: the speed rows, or the table ───────────────────────────────────────────────────────────

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats, no main_job")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the cases run (default: cpu)")
    parser.add_argument("--resnet", action="store_true",
                        help="on the CPU too, the ResNet cases at 224 px (always on CUDA; about 8 min on 2 cores)")
    parser.add_argument("--table", action="store_true", help="run the synth benchmark table instead")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="seeds of --table: every grid point runs on each; the selection reads them")
    parser.add_argument("--fresh-seeds", type=int, nargs="*", default=[5, 6, 7, 8, 9],
                        help="seeds of --table on which only the selected points run again (default 5..9; none: skip)")
    parser.add_argument("--out", default="runs/table", help="run folder of --table (default: runs/table)")
    args = parser.parse_args()
    if set(args.fresh_seeds) & set(args.seeds):
        both = sorted(set(args.fresh_seeds) & set(args.seeds))
        parser.error(f"--fresh-seeds must not repeat a seed of --seeds (both have {both})")
    K.use_allowed_cores()
    if args.table:
        run_table(args.seeds, Path(args.out), args.fresh_seeds)
        return
    try:
        device = K.pick_device(args.device)
    except ValueError as error:  # --device cuda on a machine without one
        parser.error(str(error))
    rows = speed_cases(args.quick, device)
    if device.type == "cuda" or args.resnet:
        rows += resnet_epoch_cases(device) + resnet_pipeline_cases(device)
    if not args.quick:
        rows.append(main_job(device))
    print_rows(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
