"""Speed rows: each method against the naive baseline it replaces; train.py's epochs against a bare loop of the same
network, in time and in multiply-adds, and against it plus the epoch's own passes (``epoch_tail_*``): at most 1.10."""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

import kdlaplace as K
import train


def timed_rounds(cases: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time of every case over ``repeats`` rounds after a warm-up round."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # CUDA kernels run asynchronously
    times = {name: [] for name in cases}
    for _ in range(repeats + 1):
        for name, fn in cases.items():  # taking turns: a drift of the machine's speed hits every case alike
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def row(case: str, sizes: str, seconds: float, items: int, unit: str, baseline: Optional[float] = None,
        macs_ratio: Optional[float] = None, bound: Optional[float] = None) -> dict:
    """One row of the table: the case's time and throughput, its time over the baseline's, the epoch columns."""
    return {"case": case, "sizes": sizes, "seconds": seconds, "throughput": f"{items / seconds:.0f} {unit}",
            "ratio": seconds / baseline if baseline else None, "macs_ratio": macs_ratio, "bound": bound}


def per_input_covariance_predict(laplace: K.KFACLaplace, features: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Baseline: what a generic library does per input: form ``v_n U`` (c x c), factor it, sample, average."""
    mean, scale = laplace.logit_distribution(features)
    U = laplace.factor("U").to(features.dtype)
    return torch.stack([torch.softmax(mean[n] + torch.randn(n_samples, len(U), dtype=U.dtype, device=U.device) @
                                      torch.linalg.cholesky(scale[n] * U).T, -1).mean(0) for n in range(len(features))])


def meronen_grid_tuning(laplace: K.KFACLaplace, features: torch.Tensor, y: torch.Tensor, n_samples: int) -> float:
    """Baseline: the best validation NLL of Meronen et al.'s 10 x 10 grid of (T, sigma^2), common MC draws."""
    normal = torch.randn(n_samples, laplace.G.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    nlls = []
    for variance in (0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0, 4.0):
        candidate = laplace.with_hyperparameters(prior_precision=1 / variance)
        mean, scale = candidate.logit_distribution(features)  # (N, c), (N,)
        directions = (normal.to(features.device) @ torch.linalg.cholesky(candidate.factor("U")).T).to(mean.dtype)
        nlls += [K.nlpd(candidate.mc_softmax_mean(mean, scale, directions, temperature), y)
                 for temperature in (0.3, 0.5, 0.7, 0.9, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0)]
    return min(nlls)


def method_rows(quick: bool, device: torch.device) -> list[dict]:
    """kdlaplace's methods against their naive baselines."""
    rows, repeats, g = [], 3 if quick else 5, torch.Generator(device=device).manual_seed(0)
    n, p, c = (10000 if quick else 50000), 512, 100
    features = torch.randn(n, p, device=device, generator=g)
    weight, bias = 0.05 * torch.randn(c, p, device=device, generator=g), torch.randn(c, device=device, generator=g)
    seconds = timed_rounds({"fit": lambda: K.KFACLaplace.fit(features, weight, bias),
                            "gram": lambda: features.T @ features}, repeats, device)
    rows.append(row("kfac_fit", f"N={n} p={p} c={c}", seconds["fit"], n, "samples/s", seconds["gram"]))
    laplace, inputs, n_baseline = K.KFACLaplace.fit(features, weight, bias), features[:2000 if quick else 10000], 300
    baseline = timed_rounds({"loop": lambda: per_input_covariance_predict(laplace, inputs[:n_baseline], 50)}, 1,
                            device)["loop"] * len(inputs) / n_baseline  # scaled from a subset: it is that slow
    for link in ("mc", "probit"):
        seconds = timed_rounds({link: lambda: laplace.predict(inputs, 50, link, generator=g)}, repeats, device)[link]
        rows.append(row(f"predict_{link}", f"N={len(inputs)} p={p} c={c} S=50", seconds, len(inputs), "inputs/s",
                        baseline))
    # a 100-class head, 88% accurate on validation: Gaussian classes around prototypes, the linear discriminant
    prototypes, sigma = torch.randn(c, 64, generator=torch.Generator().manual_seed(1)), 2.05
    labels = torch.randint(0, c, (6000,), generator=torch.Generator().manual_seed(2))
    inputs = (prototypes[labels] + sigma * torch.randn(6000, 64, generator=torch.Generator().manual_seed(3))).to(device)
    head = (2 * prototypes / sigma ** 2).to(device), (-(prototypes ** 2).sum(1) / sigma ** 2).to(device)
    head_laplace, x_val, y_val = K.KFACLaplace.fit(inputs[:1000], *head), inputs[1000:], labels[1000:].to(device)
    tune = lambda: K.tune_laplace(head_laplace, x_val, y_val, 50, generator=torch.Generator(device).manual_seed(0))  # noqa: E731
    grid = lambda: meronen_grid_tuning(head_laplace, x_val, y_val, 50)  # noqa: E731
    seconds = timed_rounds({"tune": tune, "grid": grid}, 1 if quick else 3, device)
    nll = K.nlpd(tune().predict(x_val, 50, generator=torch.Generator(device).manual_seed(0)), y_val)
    rows.append(row("tune_laplace", f"c=100 p=64 N=1000 val 5000 S=50; val NLL {nll:.4f}, grid's {grid():.4f}",
                    seconds["tune"], 1, "fits/s", seconds["grid"]))
    logits = 3 * torch.randn(4, 2000 if quick else 10000, c, device=device, generator=g)
    concentration = torch.where(logits > 1, logits, torch.full_like(logits, 1e-3))
    seconds = timed_rounds({"avcs": lambda: K.avcs_sets(logits, torch.ones(4, device=device), generator=g),
                            "dirichlet": lambda: torch.distributions.Dirichlet(concentration).sample()}, repeats, device)
    return rows + [row("avcs", f"K=4 N={logits.shape[1]} c={c}", seconds["avcs"], logits.shape[1], "inputs/s",
                       seconds["dirichlet"])]


def bare_epoch(model: K.EarlyExitNet, data: K.SpuriousDataset, split: K.Split, device: torch.device, amp: bool,
               batch_size: int, targets: Optional[Callable] = None) -> None:
    """The lower bound of a training epoch (a fresh optimizer and generator, as in each train.train_phase call):
    batches, forward, CE on every exit (+ KD), backward, SGD; nothing else."""
    optimizer, generator = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), torch.Generator().manual_seed(0)
    model.train()
    for index in torch.randperm(len(split), generator=generator).split(batch_size):
        flips = K.random_flips(len(index), generator) if data.augment == "flip" else None
        x = K.prepare_batch(K.batch_images(split, index, device), data.mean, data.std, data.augment, generator,
                            channels_last=amp, flips=flips)
        index = index.to(device)
        with K.autocast(device, amp):
            logits = model(x)
            kd = 0 if targets is None else K.kd_loss(logits[-1], targets(x, index, flips), 3.0).mean()
            loss = kd + sum(torch.nn.functional.cross_entropy(z.float(), split.labels[index]) for z in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def epoch_cases(device: torch.device, flags: list[str], data: Optional[K.SpuriousDataset], repeats: int) -> list[dict]:
    """train.py's epochs of the run that ``flags`` configure (on ``data``, else its own) against the bare loop."""
    config = lambda *more: train.parse_args([*flags, *more, "--device", device.type])  # noqa: E731
    cfg = config()
    data = K.load_run_data(vars(cfg)) if data is None else data
    splits, amp, n_train = K.splits_to_device(data, device), K.run_uses_bf16(vars(cfg), device), len(data.train)
    torch.manual_seed(0)
    teacher, student = (train.new_model(cfg, role, data, device) for role in ("teacher", "student"))
    students = {w: config("--weighting", w) for w in ("none", "dedier", "laplace")}
    rows, targets, target_flops = [], None, 0
    for role, model, configs in (("teacher", teacher, {"teacher": cfg}), ("student", student, students)):
        if role == "student":  # the teacher's rows trained it; random crops put its forward in the student's loop
            targets = K.teacher_targets(teacher, splits["train"], data.mean, data.std, data.augment, device, amp)
            target_flops = teacher.pass_flops([-1]) if data.augment not in K.LOOKUP_AUGMENTS else 0
        with tempfile.TemporaryDirectory() as out:  # the epoch (train_phase) and its end alone (validate_and_reweight)
            runs = {w: partial(train.train_phase, c, role, model, data, splits, device, 1, Path(out),
                               lambda record, epochs: None, {}, targets) for w, c in configs.items()}
            seconds = timed_rounds({"bare": partial(bare_epoch, model, data, splits["train"], device, amp,
                                                    cfg.batch_size, targets), **runs}, repeats, device)
        tails = timed_rounds({w: partial(train.validate_and_reweight, c, role, model, splits, data, device, 1)
                              for w, c in configs.items()}, 3 * repeats, device)
        name = f"{data.name} N={n_train} {role} {cfg.teacher_arch if role == 'teacher' else cfg.arch}"
        rows.append(row("epoch_bare_loop", name + (" + teacher targets" if targets else ""),
                        seconds["bare"], n_train, "images/s", None, 1.0))
        bare = n_train * (3 * model.pass_flops() + target_flops)  # multiply-adds: a backward is twice the forward
        for w in configs:  # the end: validation, a weighted student's readout passes (not its weights' arithmetic)
            readout = [] if w in ("teacher", "none") else [cfg.readout_exit]
            end = len(data.val) * model.pass_flops([-1, *readout]) + n_train * sum(model.pass_flops([k]) for k in readout)
            case, tail = ("teacher", ": validation") if role == "teacher" else (f"student_{w}", ": validation, readout")
            rows += [row(f"epoch_{case}", name, seconds[w], n_train, "images/s", seconds["bare"],
                         (bare + end) / bare, seconds[w] / (seconds["bare"] + tails[w])),
                     row(f"epoch_tail_{w}", name + tail, tails[w], n_train, "images/s", seconds["bare"], end / bare)]
    return rows


def markdown(rows: list[dict], argv: list[str], device: torch.device, seconds: float) -> str:
    """The rows as a markdown table under the results header: command, code version, hardware, date, wall time."""
    cell = lambda value: "–" if value is None else f"{value:.3f}"  # noqa: E731
    return "\n".join([
        "# Speed rows", "", f"- command: `python bench.py {' '.join(argv)}`", f"- code version: `{K.code_version()}`",
        f"- hardware: {K.hardware_name(device)}, {'bf16 autocast' if K.bf16_is_fast(device) else 'float32'}, "
        f"{torch.get_num_threads()} threads",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", f"- wall time: {seconds / 60:.1f} min", "",
        "| case | sizes | median s | throughput | ratio to baseline | MACs ratio | epoch / (bare + tail) |",
        "|---|---|---|---|---|---|---|",
        *(f"| {r['case']} | {r['sizes']} | {r['seconds']:.4f} | {r['throughput']} | {cell(r['ratio'])} | "
          f"{cell(r['macs_ratio'])} | {cell(r['bound'])} |" for r in rows)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats, no main_job")
    parser.add_argument("--markdown", help="also write the rows to this file under a results header (results/)")
    parser.add_argument("--device", default="cpu", choices=["cpu"] + ["cuda"] * torch.cuda.is_available(),
                        help="cpu, or cuda where CUDA is available")
    parser.add_argument("--resnet", action="store_true", help="the Waterbirds-shaped ResNet rows on the CPU too")
    args = parser.parse_args()
    started, _ = time.perf_counter(), K.use_allowed_cores()
    device = torch.device(args.device)
    rows = method_rows(args.quick, device)
    rows += epoch_cases(device, ["--synth-n-train", "1200" if args.quick else "4800"], None, 1 if args.quick else 5)
    if device.type == "cuda" or args.resnet:  # ResNet-18 student, ResNet-50 teacher, random 224 px images
        n, generator = (1024 if device.type == "cuda" else 256), torch.Generator().manual_seed(0)
        split = lambda m: K.Split(torch.randint(0, 256, (m, 3, 224, 224), dtype=torch.uint8, generator=generator),  # noqa: E731
                                  torch.arange(m) % 2, torch.arange(m) % 4)
        data = K.SpuriousDataset("waterbirds-shaped", split(n), split(n // 4), split(n // 4), 2, 4, ["g"] * 4,
                                 K.IMAGENET_MEAN, K.IMAGENET_STD, "y", "a", "crop")
        rows += epoch_cases(device, ["--arch", "resnet18", "--teacher-arch", "resnet50", "--pretrained", "none"], data, 2)
    if not args.quick:  # main_job: python train.py (teacher, student, summary) as a user runs it, timed once
        with tempfile.TemporaryDirectory() as out:
            job_started = time.perf_counter()
            subprocess.run([sys.executable, "train.py", "--device", device.type, "--out", out], check=True,
                           stdout=subprocess.DEVNULL)
            rows.append(row("main_job", "python train.py (defaults)", time.perf_counter() - job_started, 3600, "runs/h"))
    table = markdown(rows, sys.argv[1:], device, time.perf_counter() - started)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
