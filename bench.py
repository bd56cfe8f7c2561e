"""Benchmarks: the methods must cost what their mathematics costs, the pipeline what its training costs.

    python bench.py [--quick] [--device cuda] [--resnet]   # speed rows, median of repeats after a warm-up
    python bench.py --markdown results/bench-cpu.md         # the same rows under a results header

Rows and their baselines: ``kfac_fit`` against the bare ``features.T @ features``; ``predict_mc`` / ``predict_probit``
against the per-input ``c x c`` covariance + Cholesky that a generic library does; ``tune_laplace`` on a 100-class
head against Meronen et al.'s 10 x 10 validation grid of (T, sigma^2), with both validation NLLs; ``avcs`` against
``torch.distributions.Dirichlet`` draws; ``epoch_teacher`` and ``epoch_student_{none,dedier,laplace}`` (train.py's own
phase loop) against ``epoch_bare_loop`` of the same network (forward, backward, step), with the ratio in
multiply-adds beside the timed one and ``bound``: the epoch against the bare loop plus the method's own passes (its
``epoch_tail_*`` row: validation and, for a weighted student, the readout's pass and weights), which must stay at
most 1.10; ``main_job``: ``python train.py`` end to end. With ``--resnet`` (always on CUDA) the epoch rows of a
Waterbirds-shaped run (ResNet-18 student, ResNet-50 teacher, 224 px random images).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import kdlaplace as K
import train

MERONEN_TEMPERATURES = (0.3, 0.5, 0.7, 0.9, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0)
MERONEN_PRIOR_VARIANCES = (0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0, 4.0)


def timed_rounds(cases: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time of every case over ``repeats`` rounds after a warm-up round, the cases taking turns within a
    round (synchronising CUDA), so that a drift of the machine's speed hits every case of a round alike."""
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


def row(case: str, sizes: str, seconds: float, items: int, unit: str, baseline: Optional[float] = None,
        macs_ratio: Optional[float] = None, bound: Optional[float] = None) -> dict:
    return {"case": case, "sizes": sizes, "seconds": seconds, "throughput": f"{items / seconds:.0f} {unit}",
            "ratio": seconds / baseline if baseline else None, "macs_ratio": macs_ratio, "bound": bound}


def per_input_covariance_predict(laplace: K.KFACLaplace, features: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Baseline: what a generic library does per input: form ``v_n U`` (c x c), factor it, sample, average."""
    mean, scale = laplace.logit_distribution(features)
    U = laplace.factor("U").to(features.dtype)
    out = []
    for n in range(features.shape[0]):  # the per-input loop this project avoids
        normal = torch.randn(n_samples, U.shape[0], dtype=features.dtype, device=features.device)  # (S, c)
        out.append(torch.softmax(mean[n] + normal @ torch.linalg.cholesky(scale[n] * U).T, -1).mean(0))
    return torch.stack(out)


def meronen_grid_tuning(laplace: K.KFACLaplace, features: torch.Tensor, y: torch.Tensor, n_samples: int) -> float:
    """Baseline: Meronen et al.'s validation grid, every (T, sigma^2) pair's MC predictive with common draws; its
    best validation NLL."""
    normal = torch.randn(n_samples, laplace.G.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for variance in MERONEN_PRIOR_VARIANCES:
        candidate = laplace.with_hyperparameters(prior_precision=1 / variance)
        mean, scale = candidate.logit_distribution(features)  # (N, c), (N,)
        directions = (normal.to(features.device) @ torch.linalg.cholesky(candidate.factor("U")).T).to(mean.dtype)
        for temperature in MERONEN_TEMPERATURES:
            best = min(best, K.nlpd(candidate.mc_softmax_mean(mean, scale, directions, temperature), y))
    return best


def method_rows(quick: bool, device: torch.device) -> list[dict]:
    rows, repeats = [], 3 if quick else 5
    g = torch.Generator(device=device).manual_seed(0)
    n, p, c = (10000 if quick else 50000), 512, 100
    features = torch.randn(n, p, device=device, generator=g)
    weight, bias = 0.05 * torch.randn(c, p, device=device, generator=g), torch.randn(c, device=device, generator=g)
    seconds = timed_rounds({"fit": lambda: K.KFACLaplace.fit(features, weight, bias),
                            "gram": lambda: features.T @ features}, repeats, device)
    rows.append(row("kfac_fit", f"N={n} p={p} c={c}", seconds["fit"], n, "samples/s", seconds["gram"]))
    laplace, n_predict, n_baseline = K.KFACLaplace.fit(features, weight, bias), (2000 if quick else 10000), 300
    inputs = features[:n_predict]
    baseline = timed_rounds({"loop": lambda: per_input_covariance_predict(laplace, inputs[:n_baseline], 50)}, 1,
                            device)["loop"] * n_predict / n_baseline  # scaled from a subset: it is that slow
    for link in ("mc", "probit"):
        seconds = timed_rounds({link: lambda: laplace.predict(inputs, 50, link, generator=g)}, repeats, device)[link]
        rows.append(row(f"predict_{link}", f"N={n_predict} p={p} c={c} S=50", seconds, n_predict, "inputs/s", baseline))
    # a 100-class head, 85% accurate on validation: Gaussian classes around prototypes, the linear discriminant
    prototypes, sigma = torch.randn(c, 64, generator=torch.Generator().manual_seed(1)), 2.05
    labels = torch.randint(0, c, (6000,), generator=torch.Generator().manual_seed(2))
    inputs = (prototypes[labels] + sigma * torch.randn(6000, 64, generator=torch.Generator().manual_seed(3))).to(device)
    head = (2 * prototypes / sigma ** 2).to(device), (-(prototypes ** 2).sum(1) / sigma ** 2).to(device)
    head_laplace, y_val = K.KFACLaplace.fit(inputs[:1000], *head), labels[1000:].to(device)
    tune = lambda: K.tune_laplace(head_laplace, inputs[1000:], y_val, 50, generator=torch.Generator(device).manual_seed(0))  # noqa: E731
    seconds = timed_rounds({"tune": tune, "grid": lambda: meronen_grid_tuning(head_laplace, inputs[1000:], y_val, 50)},
                           1 if quick else 3, device)
    tuned = tune()
    nll = K.nlpd(tuned.predict(inputs[1000:], 50, generator=torch.Generator(device).manual_seed(0)), y_val)
    sizes = f"c=100 p=64 N=1000 val 5000 S=50; val NLL {nll:.4f}, grid's {meronen_grid_tuning(head_laplace, inputs[1000:], y_val, 50):.4f}"
    rows.append(row("tune_laplace", sizes, seconds["tune"], 1, "fits/s", seconds["grid"]))
    logits = 3 * torch.randn(4, 2000 if quick else 10000, c, device=device, generator=g)
    concentration = torch.where(logits > 1, logits, torch.full_like(logits, 1e-3))
    seconds = timed_rounds({"avcs": lambda: K.avcs_sets(logits, torch.ones(4, device=device), generator=g),
                            "dirichlet": lambda: torch.distributions.Dirichlet(concentration).sample()}, repeats, device)
    rows.append(row("avcs", f"K=4 N={logits.shape[1]} c={c}", seconds["avcs"], logits.shape[1], "inputs/s",
                    seconds["dirichlet"]))
    return rows


def bare_epoch(model: K.EarlyExitNet, data: K.SpuriousDataset, split: K.Split, device: torch.device, amp: bool,
               batch_size: int, targets: Optional[Callable] = None) -> Callable[[], None]:
    """The lower bound of one training epoch: uint8 batches -> device -> normalise and augment, forward,
    cross-entropy on every exit (plus KD on the last for a student), backward, SGD step; nothing else."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(0)

    def epoch() -> None:
        model.train()
        for index in torch.randperm(len(split), generator=generator).split(batch_size):
            flips = K.random_flips(len(index), generator) if data.augment == "flip" else None
            x = K.prepare_batch(K.batch_images(split, index, device), data.mean, data.std, data.augment, generator,
                                channels_last=amp, flips=flips)
            index = index.to(device)
            with K.autocast(device, amp):
                logits = model(x)
                loss = sum(F.cross_entropy(z.float(), split.labels[index]) for z in logits)
                if targets is not None:
                    loss = loss + K.kd_loss(logits[-1], targets(x, index, flips), 3.0).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return epoch


def epoch_macs(model: K.EarlyExitNet, n_train: int, n_val: int, readout_exit: Optional[int],
               target_flops: int = 0) -> tuple[int, int]:
    """Multiply-adds of (the bare loop, the epoch's end). The loop, per training image: a forward over every exit,
    a backward of twice that, plus the teacher's forward where its targets are not computed once (random crops).
    The end: the validation pass (last exit, and the readout's for a weighted student) and the readout's pass over
    the training set; the weights' own arithmetic is not counted."""
    last = len(model.heads) - 1
    bare = n_train * (3 * model.pass_flops() + target_flops)
    if readout_exit is None:
        return bare, n_val * model.pass_flops([last])
    return bare, n_val * model.pass_flops([last, readout_exit]) + n_train * model.pass_flops([readout_exit])


def epoch_cases(device: torch.device, flags: list[str], data: Optional[K.SpuriousDataset], repeats: int,
                suffix: str = "") -> list[dict]:
    """train.py's epochs (``train_phase``) of the run that ``flags`` configure, on ``data`` (None: the run's own)
    against the bare loop of the same network, and each epoch's end alone (``validate_and_reweight``)."""
    rows, cfg = [], train.parse_args([*flags, "--device", device.type])
    data = K.load_run_data(vars(cfg)) if data is None else data
    splits, amp, n_train, n_val = K.splits_to_device(data, device), K.run_uses_bf16(vars(cfg), device), len(data.train), len(data.val)
    torch.manual_seed(0)
    teacher, student = train.new_model(cfg, "teacher", data, device), train.new_model(cfg, "student", data, device)
    target_flops = teacher.pass_flops([-1]) if data.augment not in K.LOOKUP_AUGMENTS else 0  # else once for the run
    configs = {w: train.parse_args([*flags, "--weighting", w, "--device", device.type]) for w in ("none", "dedier", "laplace")}
    epoch = lambda cfg_w, role, model, out, targets=None: lambda: train.train_phase(  # noqa: E731
        cfg_w, role, model, data, splits, device, 1, Path(out), lambda record, epochs: None, {}, targets)
    tail = lambda cfg_w, role, model: lambda: train.validate_and_reweight(cfg_w, role, model, splits, data, device, 1)  # noqa: E731
    with tempfile.TemporaryDirectory() as out:
        seconds = timed_rounds({"bare": bare_epoch(teacher, data, splits["train"], device, amp, cfg.batch_size),
                                "epoch": epoch(cfg, "teacher", teacher, out)}, repeats, device)
    seconds["tail"] = timed_rounds({"tail": tail(cfg, "teacher", teacher)}, 3 * repeats, device)["tail"]
    bare, end = epoch_macs(teacher, n_train, n_val, None)
    name = f"{data.name} N={n_train} teacher {cfg.teacher_arch}"
    rows += [row("epoch_bare_loop" + suffix, name, seconds["bare"], n_train, "images/s", None, 1.0),
             row("epoch_teacher" + suffix, name, seconds["epoch"], n_train, "images/s", seconds["bare"],
                 (bare + end) / bare, seconds["epoch"] / (seconds["bare"] + seconds["tail"])),
             row("epoch_tail_teacher" + suffix, name + ": validation", seconds["tail"], n_train, "images/s",
                 seconds["bare"], end / bare)]
    teacher.eval()
    targets = K.teacher_targets(teacher, splits["train"], data.mean, data.std, data.augment, device, amp)
    with tempfile.TemporaryDirectory() as out:
        seconds = timed_rounds({"bare": bare_epoch(student, data, splits["train"], device, amp, cfg.batch_size, targets),
                                **{w: epoch(c, "student", student, out, targets) for w, c in configs.items()}},
                               repeats, device)
    tails = timed_rounds({w: tail(c, "student", student) for w, c in configs.items()}, 3 * repeats, device)
    name = f"{data.name} N={n_train} student {cfg.arch}"
    rows.append(row("epoch_bare_loop" + suffix, name + " + teacher targets", seconds["bare"], n_train, "images/s",
                    None, 1.0))
    for w in configs:
        bare, end = epoch_macs(student, n_train, n_val, None if w == "none" else cfg.readout_exit, target_flops)
        rows += [row(f"epoch_student_{w}" + suffix, name, seconds[w], n_train, "images/s", seconds["bare"],
                     (bare + end) / bare, seconds[w] / (seconds["bare"] + tails[w])),
                 row(f"epoch_tail_{w}" + suffix, name + ": validation, readout", tails[w], n_train, "images/s",
                     seconds["bare"], end / bare)]
    return rows


def main_job(device: torch.device) -> dict:
    """``python train.py`` (teacher, student, summary) as a user runs it, timed once."""
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        subprocess.run([sys.executable, "train.py", "--device", device.type, "--out", out], check=True,
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
    return row("main_job", "python train.py (defaults)", seconds, 3600, "runs/h")


def markdown(rows: list[dict], argv: list[str], device: torch.device, seconds: float) -> str:
    """The rows as a markdown table under the results header: command, code version, hardware, date, wall time."""
    optional = lambda value: "–" if value is None else f"{value:.3f}"  # noqa: E731
    lines = ["# Speed rows", "", f"- command: `python bench.py {' '.join(argv)}`", f"- code version: `{K.code_version()}`",
             f"- hardware: {K.hardware_name(device)}, {'bf16 autocast' if K.bf16_is_fast(device) else 'float32'}, "
             f"{torch.get_num_threads()} threads",
             f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", f"- wall time: {seconds / 60:.1f} min",
             "", "| case | sizes | median s | throughput | ratio to baseline | MACs ratio | epoch / (bare + tail) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['sizes']} | {r['seconds']:.4f} | {r['throughput']} | {optional(r['ratio'])} | "
              f"{optional(r['macs_ratio'])} | {optional(r['bound'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats, no main_job")
    parser.add_argument("--markdown", help="also write the rows to this file under a results header (results/)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the cases run (default: cpu)")
    parser.add_argument("--resnet", action="store_true", help="the Waterbirds-shaped ResNet rows on the CPU too")
    args = parser.parse_args()
    started = time.perf_counter()
    K.use_allowed_cores()
    try:
        device = K.pick_device(args.device)
    except ValueError as error:  # --device cuda on a machine without one
        parser.error(str(error))
    rows = method_rows(args.quick, device)
    rows += epoch_cases(device, ["--synth-n-train", "1200" if args.quick else "4800"], None, 1 if args.quick else 5)
    if device.type == "cuda" or args.resnet:
        n_train = 1024 if device.type == "cuda" else 256
        generator = torch.Generator().manual_seed(0)
        split = lambda n: K.Split(torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=generator),  # noqa: E731
                                  *(torch.arange(n) % 2, torch.arange(n) % 4))
        data = K.SpuriousDataset("waterbirds-shaped", split(n_train), split(n_train // 4), split(n_train // 4), 2, 4,
                                 ["g"] * 4, K.IMAGENET_MEAN, K.IMAGENET_STD, "y", "a", "crop")
        rows += epoch_cases(device, ["--arch", "resnet18", "--teacher-arch", "resnet50", "--pretrained", "none"], data,
                            2, "_waterbirds_shape")
    if not args.quick:
        rows.append(main_job(device))
    table = markdown(rows, sys.argv[1:], device, time.perf_counter() - started)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
