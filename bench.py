"""Benchmarks: the methods must cost what their mathematics costs, the pipeline what its training costs.

    python bench.py [--quick] [--json PATH] [--device cuda] [--resnet]   # speed rows, median of repeats after a warm-up
    python bench.py --markdown results/bench-cpu.md                       # the same rows under a results header

Speed cases and their baselines: ``kfac_fit`` vs the bare ``features.T @ features``; ``predict_mc`` /
``predict_probit`` vs the per-input ``c x c`` covariance + Cholesky that a generic library does; ``avcs`` vs
``torch.distributions.Dirichlet`` draws (which underflow for small concentrations); ``epoch_teacher`` and
``epoch_student_{none,dedier,laplace}`` (train.py's own phase loop) vs ``epoch_bare_loop`` of the same network
(forward, backward, step, nothing else), with the same ratio in multiply-adds beside the timed one;
``main_job``: ``python train.py`` end to end; ``data`` images/s through uint8 -> device -> normalise/augment; on
CUDA (or with ``--resnet``) also ``epoch_resnet18_224`` / ``epoch_resnet50_224`` and the epoch cases of a
Waterbirds-shaped run (``*_waterbirds_shape``). Every pipeline epoch row also gives ``bound_ratio``: the epoch
against the bare loop plus the method's own passes (its ``epoch_tail_*`` row: validation and, for a weighted
student, the readout's pass and weights), the ratio that must stay at most 1.10. The studies of many train.py runs
are sweep.py's.
"""
from __future__ import annotations

import argparse
import json
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
    U = laplace.factor("U").to(features.dtype)
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
    target_flops = teacher.pass_flops([-1]) if data.augment not in K.LOOKUP_AUGMENTS else 0  # else once for the run
    n_train, n_val = len(data.train), len(data.val)

    def add(case: str, network: str, seconds: float, baseline: Optional[float], macs: tuple[int, int],
            bare_and_tail: Optional[float] = None) -> None:
        rows.append({"case": case + suffix, "device": device.type, "sizes": f"{data.name} N={n_train} {network}",
                     "seconds": seconds, "throughput": n_train / seconds, "unit": "images/s",
                     "baseline_seconds": baseline, "ratio": seconds / baseline if baseline else None,
                     "macs_ratio": macs[1] / macs[0],
                     "bound_ratio": seconds / bare_and_tail if bare_and_tail else None})

    def phase_epoch(cfg: argparse.Namespace, role: str, model: K.EarlyExitNet, out: str,
                    targets: Optional[Callable] = None) -> Callable[[], object]:
        return lambda: train.train_phase(cfg, role, model, data, splits, device, 1, Path(out),
                                         lambda record, epochs: None, {}, targets)

    with tempfile.TemporaryDirectory() as out:
        seconds = timed_rounds({"bare": bare_epoch(teacher, data, splits["train"], device, amp, cfg.batch_size),
                                "teacher": phase_epoch(cfg, "teacher", teacher, out)}, repeats, device)
    seconds["tail"] = timed(lambda: train.validate_and_reweight(cfg, "teacher", teacher, splits, data, device, 1),
                            3 * repeats, device)
    bare, tail = epoch_macs(teacher, n_train, n_val, None)
    teacher_name = f"teacher {cfg.teacher_arch}" + (f" w={cfg.teacher_width}" if cfg.teacher_arch == "cnn" else "")
    add("epoch_bare_loop", teacher_name, seconds["bare"], None, (bare, bare))
    add("epoch_teacher", teacher_name, seconds["teacher"], seconds["bare"], (bare, bare + tail),
        seconds["bare"] + seconds["tail"])
    add("epoch_tail_teacher", f"{teacher_name}: validation", seconds["tail"], seconds["bare"], (bare, tail))
    teacher.eval()
    student = train.new_model(cfg, "student", data, device)
    student_name = f"student {cfg.arch}" + (f" w={cfg.width}" if cfg.arch == "cnn" else "")
    targets = K.teacher_targets(teacher, splits["train"], data.mean, data.std, data.augment, device, amp)
    weightings = ("none", "dedier", "laplace")  # the readout's weights are computed at the end of the epoch
    configs = {weighting: train.parse_args([*flags, "--weighting", weighting, "--device", device.type])
               for weighting in weightings}

    def tail_of_epoch(cfg_w: argparse.Namespace) -> Callable[[], object]:  # what an epoch does after its training loop
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
            (bare, bare + macs[weighting][1]), seconds["bare"] + tail_seconds[weighting])
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
    flags = ["--arch", "resnet18", "--teacher-arch", "resnet50", "--pretrained", "none"]
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
            "throughput": 3600 / seconds, "unit": "runs/h", "baseline_seconds": None, "ratio": None}


def print_rows(rows: list[dict]) -> None:
    print(f"{'case':36s} {'device':6s} {'sizes':46s} {'median s':>10s} {'throughput':>22s} {'baseline s':>11s} "
          f"{'ratio':>8s} {'MACs':>6s} {'bound':>6s}")
    for r in rows:
        ratio = f"{r['ratio']:8.3f}" if r["ratio"] is not None else f"{'-':>8s}"
        baseline = f"{r['baseline_seconds']:11.4f}" if r["baseline_seconds"] else f"{'-':>11s}"
        macs = f"{r['macs_ratio']:6.3f}" if "macs_ratio" in r else f"{'-':>6s}"
        bound = f"{r['bound_ratio']:6.3f}" if r.get("bound_ratio") is not None else f"{'-':>6s}"
        print(f"{r['case']:36s} {r['device']:6s} {r['sizes']:46s} {r['seconds']:10.4f} "
              f"{r['throughput']:12.0f} {r['unit']:>9s} {baseline} {ratio} {macs} {bound}")


# ── Entry point: the speed rows, or the table ───────────────────────────────────────────────────────────

def markdown(rows: list[dict], argv: list[str], device: torch.device, seconds: float) -> str:
    """The rows as a markdown table under the results header: command, code version, hardware, date, wall time."""
    amp = K.bf16_is_fast(device)
    lines = ["# Speed rows", "", f"- command: `python bench.py {' '.join(argv)}`",
             f"- code version: `{K.code_version()}`",
             f"- hardware: {K.hardware_name(device)}, {'bf16 autocast' if amp else 'float32'}, "
             f"{torch.get_num_threads()} threads",
             f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", f"- wall time: {seconds / 60:.1f} min",
             "", "| case | sizes | median s | throughput | ratio to baseline | MACs ratio | epoch / (bare + tail) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        optional = lambda key, digits: f"{r[key]:.{digits}f}" if r.get(key) is not None else "–"
        lines.append(f"| {r['case']} | {r['sizes']} | {r['seconds']:.4f} | {r['throughput']:.0f} {r['unit']} | "
                     f"{optional('ratio', 3)} | {optional('macs_ratio', 3)} | {optional('bound_ratio', 3)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats, no main_job")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--markdown", help="write the rows as a markdown table with its header (results/)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the cases run (default: cpu)")
    parser.add_argument("--resnet", action="store_true",
                        help="on the CPU too, the ResNet cases at 224 px (always on CUDA; about 8 min on 2 cores)")
    args = parser.parse_args()
    started = time.perf_counter()
    K.use_allowed_cores()
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
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, sys.argv[1:], device, time.perf_counter() - started))


if __name__ == "__main__":
    main()
