"""The evidence runner: studies of many train.py runs, and the tables they give.

    python sweep.py --study budget                          # every run under runs/budget/, then runs/budget/budget.md
    python sweep.py --study table --jobs 8                  # 8 runs at a time, one per GPU (CUDA_VISIBLE_DEVICES)
    python sweep.py --study table --jobs 8 --runs-per-gpu 4 # 2 GPUs with 4 small runs each
    python sweep.py --study data-size --jobs 2              # on a 2-core CPU: 2 runs of one thread each
    python sweep.py --study table --print-commands teachers # one command per line, for GNU parallel or Slurm
    python sweep.py --study budget -- --device cuda         # flags after -- go to every train.py command

A sweep is a list of plain ``python train.py ...`` commands in two stages: the teacher runs (each trains its seed's
teacher, and a student with it), then the student runs, which reuse those teachers (``--teacher RUN/teacher.pt``).
Every run writes only its own folder ``OUT/<run>``, so launchers over the same sweep never clobber each other. A
run with a ``metrics.json`` is done and skipped; one with a ``last.pt`` and no ``metrics.json`` was interrupted and
continues with train.py's ``--resume``. The tables (``OUT/<study>.md``) are written from whatever runs exist, under
a header with the command, the code version, the hardware, the date and the wall time.

Studies (synth; every run through train.py's public flags):
  table      the (alpha, beta) selection of every weighting on seeds 0-4 (12 student epochs), its selected points on
             fresh seeds 5-9, and the ERM teacher that shows the shortcut
  budget     plain KD, DEDIER, dedier-ts and Laplace at their defaults (20 student epochs), seeds 0-9
  lr         plain KD and every weighting at the table's selected (alpha, beta) with lr 0.05, 0.02 and 0.01 at 12
             epochs, in the table's folder (at 0.05 its runs are the table's); the rate selected on seeds 0-4, tested
             on fresh seeds 5-9. It needs the table's grid finished.
  data-size  --synth-n-train 600, 1200, 2400 and 4800 (val and test scale with it), the defaults otherwise: where
             could the readout's posterior matter?
  exits      the default pipeline on the 8-class synth benchmark (--synth-classes 8: 30 teacher and 40 student
             epochs), seeds 0-4, and eval.py's per-exit figures at alpha 0.05 and 0.1: TS, Laplace, MIE, AVCS and
             conformal sets, inputs far from the data, budgeted exits
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent


# ── Runs and studies ─────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class Run:
    """One train.py run: its folder name under --out, its flags (without --out and --teacher) and the teacher run
    whose teacher.pt it distils (None: it trains its own teacher)."""
    name: str
    flags: tuple[str, ...]
    teacher: Optional[str] = None


def run_flags(**flags) -> tuple[str, ...]:
    """train.py flags from keywords, after ``--diagnostics`` (the tables read the readout's diagnostics):
    ``run_flags(seed=3)`` -> ``("--diagnostics", "--seed", "3")``."""
    return ("--diagnostics",) + tuple(part for name, value in flags.items() for part in (
        f"--{name.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)))


WEIGHTINGS = ("none", "dedier", "dedier-ts", "laplace", "laplace-cv", "laplace-ml")
TUNED_WEIGHTINGS = WEIGHTINGS[1:]
GRID_ALPHAS = (0.05, 0.5, 1.0)
GRID_BETAS = (1.0, 2.0, 4.0)
PAPER_ALPHA_BETA = (0.05, 4.0)  # DEDIER's published Waterbirds setting: a point of the grid with its own row
TABLE_EPOCHS = 12  # the students of the table and the lr study (the teacher keeps its 15 epochs)
LEARNING_RATES = (0.05, 0.02, 0.01)
BUDGET_WEIGHTINGS = ("none", "dedier", "dedier-ts", "laplace")
DATA_SIZES = (600, 1200, 2400, 4800)
DATA_SIZE_WEIGHTINGS = ("none", "dedier", "dedier-ts", "laplace", "laplace-ml")


def grid_name(weighting: str, alpha: float, beta: float) -> str:
    return f"{weighting}_a{alpha:g}_b{beta:g}"


def point_flags(point: str) -> dict:
    """train.py's weighting, alpha and beta of a grid point (a grid_name), or of plain KD ("none")."""
    if point == "none":
        return {"weighting": "none"}
    weighting, alpha, beta = point.split("_")
    return {"weighting": weighting, "alpha": float(alpha[1:]), "beta": float(beta[1:])}


def grid_run(point: str, seed: int) -> Run:
    """The table's run of grid point ``point`` at ``seed``, distilling the teacher of that seed's plain-KD run."""
    return Run(f"{point}-seed{seed}", run_flags(**point_flags(point), epochs=TABLE_EPOCHS, seed=seed), f"none-seed{seed}")


def table_runs(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[Run]:
    """Per seed, the teacher run "none" (plain KD) and the ERM teacher; per selection seed every grid point of
    every weighting; per fresh seed each weighting's selected point, once its grid has finished on the selection seeds."""
    runs = []
    for seed in [*seeds, *fresh_seeds]:
        runs.append(Run(f"none-seed{seed}", run_flags(weighting="none", epochs=TABLE_EPOCHS, seed=seed)))
        if seed in seeds:  # a 1-epoch student: its teacher, ERM-trained, is what the run is for
            runs.append(Run(f"erm-seed{seed}", run_flags(weighting="none", teacher_objective="erm", epochs=1, seed=seed)))
    for seed in seeds:
        runs += [grid_run(grid_name(w, a, b), seed) for w in TUNED_WEIGHTINGS for a in GRID_ALPHAS for b in GRID_BETAS]
    selected = select_grid_points(seeds, root) if fresh_seeds else {}
    runs += [grid_run(point, seed) for seed in fresh_seeds for point in selected.values()]
    return runs


def budget_runs(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[Run]:
    """Per seed plain KD (it trains the teacher) and each weighting of BUDGET_WEIGHTINGS at train.py's defaults."""
    return [Run(f"{w}-seed{seed}", run_flags(weighting=w, seed=seed), None if w == "none" else f"none-seed{seed}")
            for seed in seeds for w in BUDGET_WEIGHTINGS]


def lr_name(point: str, lr: float) -> str:
    """The lr study's run name (without its seed) of a grid point (or "none") at rate ``lr``: at the first rate
    (train.py's) the table's own run of that point."""
    return point if lr == LEARNING_RATES[0] else f"{point}-lr{lr:g}"


def lr_runs(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[Run]:
    """In the table's folder: its plain-KD runs (the teachers) and, once its selection exists, plain KD and every
    weighting at its selected point at every rate on the selection seeds, then on the fresh seeds at the rate
    selected there, distilling the same teachers (at the first rate the runs are the table's)."""
    runs = [Run(f"none-seed{seed}", run_flags(weighting="none", epochs=TABLE_EPOCHS, seed=seed))
            for seed in [*seeds, *fresh_seeds]]
    points = {"none": "none", **complete_selection(seeds, root)}
    if len(points) == 1:
        return runs
    run = lambda point, lr, seed: Run(f"{lr_name(point, lr)}-seed{seed}", run_flags(
        **point_flags(point), epochs=TABLE_EPOCHS, lr=lr, seed=seed), f"none-seed{seed}")
    runs += [run(point, lr, seed) for seed in seeds for point in points.values() for lr in LEARNING_RATES
             if lr_name(point, lr) != "none"]
    rates = select_rates(seeds, root, points)
    return runs + [run(points[w], lr, seed) for seed in fresh_seeds for w, lr in rates.items()
                   if lr_name(points[w], lr) != "none"]


def data_size_runs(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path,
                   sizes: Sequence[int] = DATA_SIZES) -> list[Run]:
    """Per size and seed plain KD (it trains the teacher) and each weighting of DATA_SIZE_WEIGHTINGS at its
    defaults."""
    return [Run(f"{w}-n{n}-seed{seed}", run_flags(weighting=w, synth_n_train=n, seed=seed),
                None if w == "none" else f"none-n{n}-seed{seed}")
            for n in sizes for seed in seeds for w in DATA_SIZE_WEIGHTINGS]


# ── Reading the runs ─────────────────────────────────────────────────────────────────────────────────────

def load_run(root: Path, name: str) -> Optional[dict]:
    """A finished run's metrics.json with its student epochs from log.jsonl under "student_epochs" and the
    reweighted ones among them under "epochs"; None when the run has not finished."""
    folder = root / name
    if not (folder / "metrics.json").is_file():
        return None
    metrics = json.loads((folder / "metrics.json").read_text())
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    metrics["student_epochs"] = [r for r in records if r["phase"] == "student"]
    metrics["epochs"] = [r for r in metrics["student_epochs"] if "upweighted_share" in r]
    return metrics


def finished(root: Path, names: Sequence[str]) -> list[dict]:
    """The finished runs among ``names``."""
    return [run for run in (load_run(root, name) for name in names) if run is not None]


def worst_group_on_test(run: dict) -> float:
    return run["student"]["test"]["worst_group_acc"]


def weighting_label(weighting: str, runs: list[dict]) -> str:
    """The weighting with the (alpha, beta) its runs used, as their metrics.json records it (the dataset's defaults
    unless a flag set them), e.g. "dedier-ts (0.5, 1)"; the bare name for plain KD or when runs disagree."""
    points = {(r["alpha"], r["beta"]) for r in runs if "alpha" in r}
    if weighting == "none" or len(points) != 1:
        return weighting
    (alpha, beta), = points
    return f"{weighting} ({alpha:g}, {beta:g})"


def val_score(runs: list[dict]) -> tuple[float, float]:
    """Mean validation worst-group accuracy of the selected checkpoints, ties by mean validation accuracy."""
    return (statistics.mean(r["student"]["val"]["worst_group_acc"] for r in runs),
            statistics.mean(r["student"]["val"]["avg_acc"] for r in runs))


def best_finished(names: Sequence[str], seeds: Sequence[int], root: Path) -> Optional[str]:
    """The run name (without seed) among ``names`` with the best ``val_score`` over ``seeds``; None until every one
    of their runs on those seeds has finished."""
    runs = {name: finished(root, [f"{name}-seed{s}" for s in seeds]) for name in names}
    if any(len(r) < len(seeds) for r in runs.values()):
        return None
    return max(names, key=lambda name: val_score(runs[name]))


def select_grid_points(seeds: Sequence[int], root: Path) -> dict:
    """weighting -> the grid point (run name without seed) with the best ``val_score`` over ``seeds``, for every
    weighting whose grid runs of those seeds have all finished (its fresh-seed runs need not wait for the others)."""
    best = {w: best_finished([grid_name(w, a, b) for a in GRID_ALPHAS for b in GRID_BETAS], seeds, root)
            for w in TUNED_WEIGHTINGS}
    return {w: point for w, point in best.items() if point is not None}


def complete_selection(seeds: Sequence[int], root: Path) -> dict:
    """``select_grid_points`` once every weighting has its selection (what the lr study runs at), else {}."""
    selected = select_grid_points(seeds, root)
    return selected if len(selected) == len(TUNED_WEIGHTINGS) else {}


def select_rates(seeds: Sequence[int], root: Path, points: dict) -> dict:
    """weighting -> the rate with the best ``val_score`` over ``seeds`` of its runs at ``points[weighting]``, for
    every weighting whose runs at every rate have finished on those seeds."""
    rates = {}
    for w, point in points.items():
        rate_of = {lr_name(point, lr): lr for lr in LEARNING_RATES}
        if (best := best_finished(list(rate_of), seeds, root)) is not None:
            rates[w] = rate_of[best]
    return rates


def cell(values: Sequence[Optional[float]], scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± standard deviation' of the values that exist (times ``scale``), '–' when none does."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    spread = f" ± {scale * statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{scale * statistics.mean(values):.{digits}f}{spread}"


def per_seed(values: Sequence[float]) -> str:
    return " ".join(f"{100 * v:.0f}" for v in values)


def bootstrap_interval(values: Sequence[float], level: float = 0.95, resamples: int = 10000) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: the (1 - level)/2 and (1 + level)/2 quantiles of the means of
    ``resamples`` resamples with replacement (fixed seed, so a table reproduces)."""
    values = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(0).integers(0, len(values), size=(resamples, len(values)))  # (R, n)
    means = values[draws].mean(axis=1)  # (R,)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def t_quantile(probability: float, degrees: int) -> float:
    """The ``probability`` quantile of Student's t with ``degrees`` degrees of freedom (probability > 1/2): the CDF
    ``1/2 + int_0^x f``, ``f(t) = Gamma((nu+1)/2) / (sqrt(nu pi) Gamma(nu/2)) (1 + t^2/nu)^(-(nu+1)/2)``, by Simpson's
    rule on 4000 intervals, inverted by bisection."""
    log_norm = math.lgamma((degrees + 1) / 2) - math.lgamma(degrees / 2) - 0.5 * math.log(degrees * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 4001)
        f = np.exp(log_norm - (degrees + 1) / 2 * np.log1p(t * t / degrees))
        return 0.5 + (x / 12000) * (f[0] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum() + f[-1])

    low, high = 0.0, 1000.0
    for _ in range(60):
        low, high = ((low + high) / 2, high) if cdf((low + high) / 2) < probability else (low, (low + high) / 2)
    return (low + high) / 2


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean: ``mean -+ t_{(1+level)/2, n-1} sd / sqrt(n)`` (normal errors assumed)."""
    half = t_quantile((1 + level) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return statistics.mean(values) - half, statistics.mean(values) + half


def sign_flip_p(differences: Sequence[float]) -> float:
    """Exact two-sided sign-flip (paired permutation) p-value of a mean difference of 0: the share of the 2^n sign
    patterns whose |mean| is at least the observed one (the observed pattern counts). Exact under symmetry about 0."""
    values = np.asarray(differences, dtype=np.float64)
    signs = 1 - 2 * ((np.arange(2 ** len(values))[:, None] >> np.arange(len(values))) & 1)  # (2^n, n) of +-1
    flipped = np.abs((signs * values).mean(1))  # (2^n,)
    return float((flipped >= abs(values.mean()) - 1e-12).mean())


def paired_cells(differences: Sequence[float]) -> list[str]:
    """Paired differences in points: mean ± sd, median, won / lost (exact ties in neither), 95% percentile-bootstrap
    and t intervals of the mean, exact sign-flip p."""
    points = [100 * d for d in differences]
    if len(points) < 2:
        return ["–"] * 6
    low, high = bootstrap_interval(points)
    t_low, t_high = t_interval(points)
    return [f"{statistics.mean(points):+.1f} ± {statistics.stdev(points):.1f}", f"{statistics.median(points):+.1f}",
            f"{sum(p > 0 for p in points)} / {sum(p < 0 for p in points)}", f"[{low:+.1f}, {high:+.1f}]",
            f"[{t_low:+.1f}, {t_high:+.1f}]", f"{sign_flip_p(points):.3f}"]


PAIRED_COLUMNS = "won / lost | 95% bootstrap | 95% t | sign-flip p"
PAIRED_NOTE = ("won / lost by any margin; 95% percentile-bootstrap and t intervals of the mean; exact two-sided "
               "sign-flip p")


def epoch_median(run: dict, key: str, index: Optional[int] = None) -> Optional[float]:
    """Median over a run's reweighted epochs of a logged diagnostic (entry ``index`` of a per-group list)."""
    values = [e[key] if index is None else e[key][index] for e in run["epochs"] if e.get(key) is not None]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def mean_of(values: Sequence[Optional[float]], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.{digits}f}" if values else "–"


# ── The tables of each study ─────────────────────────────────────────────────────────────────────────────

def table_lines(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[str]:
    """The selection table: the main rows, the grid, the posterior's size, the selected points on fresh seeds,
    the ERM teacher, and when the students leave the shortcut."""
    selected = select_grid_points(seeds, root)
    if not selected:
        return ["No weighting's grid has finished on every selection seed: no selection yet."]
    runs = lambda point, seed_list: finished(root, [f"{point}-seed{s}" for s in seed_list])
    rows = [("none", "none"), (f"dedier, paper (α={PAPER_ALPHA_BETA[0]:g}, β={PAPER_ALPHA_BETA[1]:g})",
                               grid_name("dedier", *PAPER_ALPHA_BETA))]
    rows += [(f"{w}, tuned (α={name.split('_')[1][1:]}, β={name.split('_')[2][1:]})", name) for w, name in selected.items()]
    unfinished = [w for w in TUNED_WEIGHTINGS if w not in selected]
    lines = [f"Seeds {seed_text(seeds)}, the selection's seeds. Test-set %, mean ± sd over seeds; posterior logit std: "
             "median over the training inputs, averaged over the reweighted epochs.", "",
             "| weighting | val worst-group | student avg | student worst-group | readout ECE softmax | "
             "readout ECE temperature | readout ECE Laplace | posterior logit std | corr with T-softmax weights | per seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, point in rows:
        rs = runs(point, seeds)
        epoch_mean = lambda key: [statistics.mean(e[key] for e in r["epochs"]) if r["epochs"] and
                                  r["epochs"][0].get(key) is not None else None for r in rs]
        lines.append(f"| {label} | " + " | ".join([
            cell([r["student"]["val"]["worst_group_acc"] for r in rs]), cell([r["student"]["test"]["avg_acc"] for r in rs]),
            cell([worst_group_on_test(r) for r in rs]),
            *(cell([r["student"]["readout"][kind]["ece"] for r in rs]) for kind in ("map", "temperature", "laplace")),
            cell(epoch_mean("posterior_logit_std_median"), 1.0, 3), cell(epoch_mean("weight_corr_temperature"), 1.0, 3),
            per_seed([worst_group_on_test(r) for r in rs])]) + " |")
    if unfinished:
        lines += ["", f"Not selected yet (grid unfinished on the selection seeds): {', '.join(unfinished)}."]
    lines += ["", "Selection grid: validation / test worst-group accuracy (%), mean over the seeds (– until every "
                  "seed's run of the point has finished); the selected point in bold.", "",
              "| α | β | " + " | ".join(TUNED_WEIGHTINGS) + " |", "|---|---|" + "---|" * len(TUNED_WEIGHTINGS)]
    for a in GRID_ALPHAS:
        for b in GRID_BETAS:
            entries = []
            for w in TUNED_WEIGHTINGS:
                rs = runs(grid_name(w, a, b), seeds)
                entry = f"{100 * val_score(rs)[0]:.1f} / {100 * statistics.mean(map(worst_group_on_test, rs)):.1f}" \
                    if len(rs) == len(seeds) else "–"
                entries.append(f"**{entry}**" if grid_name(w, a, b) == selected.get(w) else entry)
            lines.append(f"| {a:g} | {b:g} | " + " | ".join(entries) + " |")
    lines += ["", "The readout's posterior on the training inputs, selected runs (mean over the reweighted epochs, "
                  "then over seeds): tuned T and σ², and the posterior std of the temperature-scaled logits per group.",
              "", "| weighting | T | σ² | logit std g0 | g1 | g2 | g3 |", "|---|---|---|---|---|---|---|"]
    for w in [w for w in selected if w.startswith("laplace")]:
        epochs = [e for r in runs(selected[w], seeds) for e in r["epochs"]]
        stds = [mean_of([e["posterior_logit_std"][g] for e in epochs]) for g in range(4)]
        lines.append(f"| {w} | {mean_of([e['readout_temperature'] for e in epochs], 2)} | "
                     f"{mean_of([e['readout_prior_variance'] for e in epochs], 3)} | " + " | ".join(stds) + " |")
    if fresh_seeds:
        lines += ["", f"Fresh seeds {seed_text(fresh_seeds)}: the points selected on seeds {seed_text(seeds)}, run "
                      "again on seeds no selection has seen (the validation column pools every seed: the default "
                      "weighting's criterion).", "",
                  f"| weighting | val worst-group, seeds {seed_text([*seeds, *fresh_seeds])} | student avg | "
                  "student worst-group | per seed |", "|---|---|---|---|---|"]
        for label, point in [("none", "none"), *selected.items()]:
            fresh, every = runs(point, fresh_seeds), runs(point, [*seeds, *fresh_seeds])
            lines.append(f"| {label} | {cell([r['student']['val']['worst_group_acc'] for r in every])} | "
                         f"{cell([r['student']['test']['avg_acc'] for r in fresh])} | "
                         f"{cell([worst_group_on_test(r) for r in fresh])} | {per_seed([worst_group_on_test(r) for r in fresh])} |")
    lines += ["", "The shortcut: the seeds' teachers with group DRO and with ERM (same model selection).", "",
              "| teacher objective | test avg | test worst-group |", "|---|---|---|"]
    for objective, point in (("group DRO", "none"), ("ERM", "erm")):
        teachers = [r["teacher"]["test"] for r in runs(point, seeds)]
        lines.append(f"| {objective} | {cell([t['avg_acc'] for t in teachers])} | "
                     f"{cell([t['worst_group_acc'] for t in teachers])} |")
    students = [r for point in ["none", *(grid_name(w, a, b) for w in TUNED_WEIGHTINGS for a in GRID_ALPHAS
                                          for b in GRID_BETAS)] for r in runs(point, seeds)]
    curves = [[e["val_worst_group_acc"] for e in r["student_epochs"]] for r in students]
    first = [next((epoch for epoch, acc in enumerate(curve, 1) if acc >= 0.5), None) for curve in curves]
    counts = ", ".join(f"{epoch}: {first.count(epoch)}" for epoch in sorted(set(first) - {None}))
    return lines + ["", f"Selection seeds' student runs at validation worst-group 0 after epoch 1: "
                        f"{sum(c[0] == 0 for c in curves)} of {len(curves)}; first epoch at 50% or more: {counts}, "
                        f"never: {first.count(None)}."]


def budget_lines(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[str]:
    """Each weighting at its defaults (20 student epochs): test worst-group accuracy and its paired difference
    from plain KD."""
    runs = {w: {s: load_run(root, f"{w}-seed{s}") for s in seeds} for w in BUDGET_WEIGHTINGS}
    lines = [f"Test worst-group accuracy (%), seeds {seed_text(seeds)}; paired: the weighting minus plain KD on "
             f"the same seed and teacher (points; {PAIRED_NOTE}).",
             "", f"| weighting | student avg | worst-group | median | per seed | minus plain KD | median | {PAIRED_COLUMNS} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in BUDGET_WEIGHTINGS:
        rs = [r for r in runs[w].values() if r is not None]
        if not rs:
            continue
        paired = [worst_group_on_test(runs[w][s]) - worst_group_on_test(runs["none"][s]) for s in seeds
                  if runs[w][s] is not None and runs["none"][s] is not None]
        worst = list(map(worst_group_on_test, rs))
        lines.append(f"| {weighting_label(w, rs)} | {cell([r['student']['test']['avg_acc'] for r in rs])} | {cell(worst)} | "
                     f"{100 * statistics.median(worst):.1f} | {per_seed(worst)} | "
                     + " | ".join(["–"] * 6 if w == "none" else paired_cells(paired)) + " |")
    return lines


def lr_lines(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[str]:
    """Every weighting's rate selected on the selection seeds' validation worst-group; its test figures there and
    on the fresh seeds, with the paired difference from plain KD at plain KD's own selected rate. Each weighting
    runs at the table's selected (alpha, beta)."""
    points = {"none": "none", **complete_selection(seeds, root)}
    if len(points) == 1:
        return ["The table's selection does not exist yet: `python sweep.py --study table` first."]
    runs = lambda w, lr, seed_list: finished(root, [f"{lr_name(points[w], lr)}-seed{s}" for s in seed_list])
    selected = select_rates(seeds, root, points)
    lines = [f"Rate selected on seeds {seed_text(seeds)}' validation worst-group accuracy; test worst-group (%) at "
             f"that rate on those seeds and on fresh seeds {seed_text(fresh_seeds)}; paired: minus plain KD at its "
             "selected rate, same seed and teacher.", "",
             "| weighting | val worst-group per rate | lr selected | selection seeds | fresh seeds | fresh, per seed | "
             "fresh minus plain KD | median |", "|---|---|---|---|---|---|---|---|"]
    plain = {r["seed"]: r for r in runs("none", selected["none"], fresh_seeds)} if "none" in selected else {}
    for w in WEIGHTINGS:
        lr, flags = selected.get(w), point_flags(points[w])
        label = w if w == "none" else f"{w} ({flags['alpha']:g}, {flags['beta']:g})"
        per_rate = ", ".join(f"{rate:g}: {100 * val_score(runs(w, rate, seeds))[0]:.1f}"
                             for rate in LEARNING_RATES if runs(w, rate, seeds))
        if lr is None:
            lines.append(f"| {label} | – | – | – | – | – | – | – |")
            continue
        fresh = runs(w, lr, fresh_seeds)
        paired = [100 * (worst_group_on_test(r) - worst_group_on_test(plain[r["seed"]])) for r in fresh if r["seed"] in plain]
        lines.append(f"| {label} | {per_rate} | {lr:g} | {cell(list(map(worst_group_on_test, runs(w, lr, seeds))))} | "
                     f"{cell(list(map(worst_group_on_test, fresh)))} | {per_seed(list(map(worst_group_on_test, fresh)))} | "
                     + ("– | –" if w == "none" or not paired else f"{cell(paired, 1.0)} | {statistics.median(paired):+.1f}")
                     + " |")
    return lines


# the edges of Meronen et al. (2024)'s validation grids: a tuned value on or beyond them is one those grids censor
GRID_EDGES = {"T": (0.3, 3.0), "sigma2": (0.5, 4.0)}


def beyond_grid(value: float, which: str) -> bool:
    """Whether a tuned T (``which`` "T") or σ² ("sigma2") lies on or beyond the edges of Meronen et al.'s grid."""
    low, high = GRID_EDGES[which]
    return not low < value < high


DATA_SIZE_PREDICTION = """\
Prediction, written before the runs. The readout's posterior covariance of the logits is (φ̃ᵀVφ̃)·U with
U = (√N G + √τ I)⁻¹ and V = (√N A + √τ I)⁻¹, so at a fixed fit its standard deviation falls like 1/√N: from the
median 0.10 measured at N = 4800, about 0.14 at 2400, 0.20 at 1200 and 0.28 at 600 (the tuned T and σ² and the
fit itself move with N, so within a factor 1.5). The posterior can change which samples are up-weighted only
through the spread of φ̃ᵀVφ̃ across inputs (a variance equal for every input is one more global temperature);
with two classes it rescales an input's logit gap by 1/√(1 + π/8·v/T²), which at a logit std of 0.28 is 3% or
less. So the Laplace weights should still correlate 0.99 or more with the temperature-only softmax's at every
size, and the paired worst-group difference laplace − dedier-ts should stay centred on 0 within the seed noise.
What would contradict this: a correlation below about 0.95 at the small sizes, with the minority groups' variance
well above the majority's (between-group CV of φ̃ᵀVφ̃ above 0.5), and a paired difference whose bootstrap
interval excludes 0."""


def data_size_lines(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path,
                    sizes: Sequence[int] = DATA_SIZES) -> list[str]:
    """Per training-set size: the students' test figures, the readout posterior's size and spread on the training
    inputs, the weights' agreement with the temperature-only softmax, the paired worst-group differences from
    dedier-ts, and the readout's test calibration."""
    runs = {(w, n): finished(root, [f"{w}-n{n}-seed{s}" for s in seeds]) for w in DATA_SIZE_WEIGHTINGS for n in sizes}
    lines = [DATA_SIZE_PREDICTION, "", "Students: test %, mean ± sd over seeds; median; per seed. Readout test ECE (%) "
             "with its softmax / temperature-scaled softmax / Laplace predictive.", "",
             "| N train | weighting | avg | worst-group | median | per seed | readout ECE softmax / T / Laplace |",
             "|---|---|---|---|---|---|---|"]
    for n in sizes:
        teachers = [r["teacher"]["test"] for r in runs["none", n]]
        if teachers:  # the teacher every student of this size distils (trained by the plain-KD run)
            lines.append(f"| {n} | teacher (group DRO) | {cell([t['avg_acc'] for t in teachers])} | "
                         f"{cell([t['worst_group_acc'] for t in teachers])} | "
                         f"{100 * statistics.median(t['worst_group_acc'] for t in teachers):.1f} | "
                         f"{per_seed([t['worst_group_acc'] for t in teachers])} | – |")
        for w in DATA_SIZE_WEIGHTINGS:
            rs = runs[w, n]
            if not rs:
                continue
            ece = " / ".join(cell([r["student"]["readout"][kind]["ece"] for r in rs]) for kind in ("map", "temperature", "laplace"))
            lines.append(f"| {n} | {weighting_label(w, rs)} | {cell([r['student']['test']['avg_acc'] for r in rs])} | "
                         f"{cell(list(map(worst_group_on_test, rs)))} | {100 * statistics.median(map(worst_group_on_test, rs)):.1f} | "
                         f"{per_seed(list(map(worst_group_on_test, rs)))} | {ece} |")
    lines += ["", "The readout on the training inputs, where the weights are computed (per run the median over its "
                  "reweighted epochs, then the mean over seeds): the posterior std of the temperature-scaled logits "
                  "per group (g1 and g2 are the minority groups), the coefficient of variation of the posterior "
                  "variance φ̃ᵀVφ̃ across inputs and between the group means, the correlation of the weights with "
                  "the temperature-only softmax's (its lowest epoch over all runs in brackets), and the share of "
                  "up-weighted samples (all / g1 / g2).", "",
              "| N train | weighting | logit std g0 | g1 | g2 | g3 | CV of φ̃ᵀVφ̃ | between groups | corr with T-softmax "
              "weights | up-weighted share |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        for w in DATA_SIZE_WEIGHTINGS[1:]:
            rs = runs[w, n]
            if not rs:
                continue
            laplace = w.startswith("laplace")
            median_over_runs = lambda key, index=None, digits=3: mean_of([epoch_median(r, key, index) for r in rs], digits)
            stds = [median_over_runs("posterior_logit_std", g) if laplace else "–" for g in range(4)]
            spread = [median_over_runs(key, digits=2) if laplace else "–"
                      for key in ("posterior_variance_cv", "posterior_variance_group_cv")]
            correlations = [e["weight_corr_temperature"] for r in rs for e in r["epochs"]
                            if e.get("weight_corr_temperature") is not None]
            correlation = (f"{median_over_runs('weight_corr_temperature', digits=4)} ({min(correlations):.4f})"
                           if correlations else "–")
            shares = [median_over_runs("upweighted_share_all")] + [median_over_runs("upweighted_share", g) for g in (1, 2)]
            lines.append(f"| {n} | {w} | " + " | ".join([*stds, *spread, correlation, " / ".join(shares)]) + " |")
    lines += ["", "Paired worst-group differences from dedier-ts (the temperature-scaled softmax, same seed and "
                  f"teacher), in points: mean ± sd, median, {PAIRED_NOTE}.", "",
              f"| N train | comparison | mean ± sd | median | {PAIRED_COLUMNS} |", "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        base = {r["seed"]: r for r in runs["dedier-ts", n]}
        for w in ("laplace", "laplace-ml"):
            paired = [worst_group_on_test(r) - worst_group_on_test(base[r["seed"]]) for r in runs[w, n] if r["seed"] in base]
            lines.append(f"| {n} | {w} − dedier-ts | " + " | ".join(paired_cells(paired)) + " |")
    # the measurement against the prediction above, computed from these runs
    sizes = [n for n in sizes if runs["laplace", n]]
    if not sizes:
        return lines
    std = {n: statistics.mean(epoch_median(r, "posterior_logit_std_median") for r in runs["laplace", n]) for n in sizes}
    largest = max(sizes)
    lines += ["", "Measured against the prediction (laplace): the median posterior logit std on the training inputs "
                  f"(mean over seeds) and its ratio to N = {largest}'s, beside the ratios 1/√N and 1/N^(1/4) predict; "
                  "the median tuned T and σ² over all reweighted epochs, and the share of those epochs whose choice "
                  "lies on or beyond the edges of Meronen et al.'s grids (T 0.3–3.0, σ² 0.5–4.0), which would have "
                  "censored it.", "", f"| N train | logit std | ratio to N = {largest} | (N/{largest})^(-1/2) | "
                  f"(N/{largest})^(-1/4) | lowest weight correlation, any epoch | between-group CV of φ̃ᵀVφ̃ | "
                  "median T dedier-ts / laplace, σ² | beyond the grids: T dedier-ts / laplace, σ² |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        epochs = [e for r in runs["laplace", n] for e in r["epochs"] if e.get("readout_temperature") is not None]
        ts_epochs = [e for r in runs["dedier-ts", n] for e in r["epochs"] if e.get("readout_temperature") is not None]
        lowest = min(e["weight_corr_temperature"] for e in epochs if e.get("weight_corr_temperature") is not None)
        medians = [statistics.median(e[key] for e in chosen) if chosen else math.nan
                   for chosen, key in ((ts_epochs, "readout_temperature"), (epochs, "readout_temperature"),
                                       (epochs, "readout_prior_variance"))]
        beyond = [sum(beyond_grid(e[key], which) for e in chosen) / len(chosen) if chosen else math.nan
                  for chosen, key, which in ((ts_epochs, "readout_temperature", "T"), (epochs, "readout_temperature", "T"),
                                             (epochs, "readout_prior_variance", "sigma2"))]
        lines.append(f"| {n} | {std[n]:.3f} | {std[n] / std[largest]:.2f} | {(n / largest) ** -0.5:.2f} | "
                     f"{(n / largest) ** -0.25:.2f} | {lowest:.4f} | "
                     f"{mean_of([epoch_median(r, 'posterior_variance_group_cv') for r in runs['laplace', n]], 2)} | "
                     f"{medians[0]:.2f} / {medians[1]:.2f}, {medians[2]:.3g} | "
                     f"{100 * beyond[0]:.0f}% / {100 * beyond[1]:.0f}%, {100 * beyond[2]:.0f}% |")
    return lines


EXIT_CLASSES = 8  # the multi-class synth benchmark of the exit-level methods: shapes 8 and 9 stay unseen
EXIT_ALPHAS = (0.05, 0.1)
EXIT_METHODS = ("MAP", "TS", "Laplace", "MIE", "MIE+TS", "MIE+Laplace")  # eval.py's
SET_KINDS = (("Dirichlet AVCS", "avcs"), ("AVCS, offset b", "avcs_offset"), ("Laplace-AVCS", "laplace_avcs"),
             ("split conformal", "conformal"), ("conformal, nested", "conformal_nested"))

EXITS_PREDICTION = """\
Prediction, written before the runs. In distribution, the exit Laplace lowers ECE by what a tuned temperature does:
TS and Laplace agree within the seed spread at every exit (the Laplace picked σ² at its search's floor, where it is a
temperature, at exit 0 of the median seed before). Split conformal sets cover ≥ 1 − α at every exit (their
guarantee), the nested ones slightly less at later exits; the Dirichlet AVCS with a tuned logit offset reaches
1 − α on val and close to it on test, with larger sets than conformal's; the Laplace-AVCS sets with per-input draws
still keep most labels. Far from the data: on the test images scaled by δ ≥ 10, φ̃ᵀVφ̃ grows like δ² and the
Laplace's max-probability falls below TS's, with a higher OOD AUROC (Kristiadi et al. 2020); on uniform noise,
unseen shapes and unseen colours φ̃ᵀVφ̃ stays within a factor of 2 of the test images' and the Laplace's AUROC equals
TS's within the seed spread."""


def exits_runs(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[Run]:
    """Per seed one run of the default pipeline on the multi-class synth benchmark (it trains its teacher)."""
    return [Run(f"c{EXIT_CLASSES}-seed{seed}", run_flags(synth_classes=EXIT_CLASSES, seed=seed)) for seed in seeds]


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's score interval of a binomial proportion (95% for the default z)."""
    p, z2 = successes / trials, z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return centre - half, centre + half


def exit_list(exits: Sequence) -> str:
    return ", ".join(map(str, exits)) if exits else "none"


def exit_reports(root: Path, names: Sequence[str]) -> dict[float, list[dict]]:
    """eval.py's report of every finished run's student, per alpha (cached next to the run as exits-<alpha>.json)."""
    import eval as evaluate  # torch and the model code: only when the exits tables are written
    reports = {}
    for alpha in EXIT_ALPHAS:
        reports[alpha] = []
        for name in names:
            if not (root / name / "metrics.json").is_file():
                continue
            cache = root / name / f"exits-{alpha:g}.json"
            if not cache.is_file():
                args = evaluate.parse_args([str(root / name), "--alpha", str(alpha), "--device", "cpu"])
                cache.write_text(json.dumps(evaluate.report(args)))
            reports[alpha].append(json.loads(cache.read_text()))
    return reports


def paired_t(differences: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """'mean [95% t interval]' of paired differences (times ``scale``)."""
    values = [scale * d for d in differences]
    low, high = t_interval(values)
    return f"{statistics.mean(values):+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def resolved(differences: Sequence[float]) -> int:
    """+1 when the 95% t interval of the mean difference lies above 0, -1 below, 0 when it holds 0."""
    low, high = t_interval(differences)
    return 1 if low > 0 else -1 if high < 0 else 0


def spread(values: Sequence[float], digits: str = ".3g") -> str:
    return f"{statistics.median(values):{digits}} [{min(values):{digits}}, {max(values):{digits}}]"


def exits_lines(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[str]:
    """eval.py's figures on the multi-class benchmark: per exit and method top-1, top-5, NLPD and ECE; the tuned
    temperatures and priors; each kind of prediction set's size, coverage (pooled with a Wilson interval, per seed,
    and a t interval over seeds) and nestedness at each alpha; inputs far from the data; the budgeted-exit curve;
    and what holds, computed from these tables."""
    reports = exit_reports(root, [run.name for run in exits_runs(seeds, fresh_seeds, root)])
    runs = reports[EXIT_ALPHAS[0]]
    lines = [EXITS_PREDICTION, ""]
    if not runs:
        return lines + ["No run has finished."]
    n_exits, mean = len(runs[0]["exits"]), statistics.mean
    at = lambda k, method, key: [r["exits"][k][method][key] for r in runs]  # noqa: E731  per seed
    lines += [f"Test %, mean ± sd over {len(runs)} seeds ({EXIT_CLASSES} classes). TS: each exit's softmax at a "
              "temperature tuned on val NLL; Laplace: each exit's KFAC last-layer posterior, (T, σ²) tuned on val NLL; "
              "MIE: the FLOP-weighted mean of exits 0..k; MIE+TS, MIE+Laplace: each exit's T or (T, σ²) tuned "
              "greedily inside the ensemble.", "",
              "| exit | GFLOPs | method | top-1 | top-5 | NLPD | ECE |", "|---|---|---|---|---|---|---|"]
    for k in range(n_exits):
        for method in EXIT_METHODS:
            lines.append(f"| {k} | {runs[0]['exits'][k]['flops'] / 1e9:.4f} | {method} | {cell(at(k, method, 'top1'))} | "
                         f"{cell(at(k, method, 'top5'))} | {cell(at(k, method, 'nlpd'), 1.0, 3)} | "
                         f"{cell(at(k, method, 'ece'))} |")

    def confidence_gap(k: int, method: str) -> list[float]:  # mean confidence - accuracy on test, per seed
        bins = [[sum(column) for column in r["exits"][k]["reliability"][method]] for r in runs]  # count, conf, correct
        return [(confidence - correct) / count for count, confidence, correct in bins]

    import kdlaplace as K  # loaded by exit_reports already
    lines += ["", "Calibration in distribution: mean confidence − accuracy on test (points, mean ± sd; > 0 is "
                  "overconfident); the tuned temperatures and the Laplace's σ², median [lowest, highest] over the seeds, "
                  "with how many seeds' Laplace (T or σ²) sits at an end of its search range (T 0.01–100, σ² 1e-4–1e4); "
                  "and ECE Laplace − TS paired by seed (points, mean [95% t interval]).", "",
              "| exit | conf − acc MAP | TS | Laplace | TS's T | Laplace T | Laplace σ² | at a range end | "
              "ECE Laplace − TS |", "|---|---|---|---|---|---|---|---|---|"]
    for k in range(n_exits):
        temperatures = [r["exits"][k]["laplace"]["temperature"] for r in runs]
        variances = [1.0 / r["exits"][k]["laplace"]["prior_precision"] for r in runs]
        at_end = sum(K.at_search_end(t, K.KFACLaplace.TEMPERATURE_GRID)
                     or K.at_search_end(v, K.KFACLaplace.PRIOR_VARIANCE_GRID) for t, v in zip(temperatures, variances))
        ece_gap = [a - b for a, b in zip(at(k, "Laplace", "ece"), at(k, "TS", "ece"))]
        lines.append(f"| {k} | {cell(confidence_gap(k, 'MAP'))} | {cell(confidence_gap(k, 'TS'))} | "
                     f"{cell(confidence_gap(k, 'Laplace'))} | {spread([r['exits'][k]['ts']['temperature'] for r in runs], '.2f')} | "
                     f"{spread(temperatures, '.2f')} | {spread(variances)} | {at_end} of {len(runs)} | {paired_t(ece_gap)} |")
    claims = []
    for first, second in (("Laplace", "TS"), ("MIE+Laplace", "MIE+TS"), ("MIE+Laplace", "Laplace")):
        verdicts = [resolved([a - b for a, b in zip(at(k, first, "ece"), at(k, second, "ece"))]) for k in range(n_exits)]
        claims.append(f"ECE, {first} against {second}: lower at exits {exit_list([k for k, v in enumerate(verdicts) if v < 0])}, "
                      f"higher at {exit_list([k for k, v in enumerate(verdicts) if v > 0])}, no resolved difference at "
                      f"{exit_list([k for k, v in enumerate(verdicts) if v == 0])} (95% t interval over seeds).")
    for alpha in EXIT_ALPHAS:
        alpha_runs = reports[alpha]
        lines += ["", f"Prediction sets at α = {alpha:g}, tuned on val and measured on test. Setting: the Dirichlet "
                      "AVCS threshold τ (from 1 upward, the authors' tuning) or logit offset b (τ = 1); coverage pooled "
                      "over the seeds with its Wilson 95% interval (inputs independent), per seed, and the t 95% interval "
                      "over the seeds; nestedness |∩_{s≤t} C_s| / |C_t|; ceiling: the share of test (val) inputs whose "
                      "label is in the AVCS support, the most its sets can cover.", "",
                  "| exit | sets | setting | size | coverage | Wilson 95% | per seed | t 95% over seeds | nestedness | "
                  "ceiling test (val) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for k in range(n_exits):
            for label, kind in SET_KINDS:
                sets = [r["exits"][k][kind] for r in alpha_runs]
                covered, trials = [s["coverage"] for s in sets], [r["n_test"] for r in alpha_runs]
                successes = round(sum(c * n for c, n in zip(covered, trials)))
                low, high = wilson_interval(successes, sum(trials))
                t_low, t_high = t_interval(covered) if len(covered) > 1 else (covered[0], covered[0])
                setting = next((key for key in ("threshold", "offset") if key in sets[0]), None)
                ceiling = (f"{mean(s['support_ceiling'] for s in sets):.3f} ({mean(s['val_support_ceiling'] for s in sets):.3f})"
                           if "support_ceiling" in sets[0] else "–")
                lines.append(f"| {k} | {label} | {mean_of([s[setting] for s in sets], 2) if setting else '–'} | "
                             f"{mean_of([s['size'] for s in sets], 2)} | {successes / sum(trials):.3f} | "
                             f"[{low:.3f}, {high:.3f}] | {' '.join(f'{c:.2f}' for c in covered)} | "
                             f"[{t_low:.3f}, {t_high:.3f}] | {mean_of([s['nestedness'] for s in sets], 3)} | {ceiling} |")
        for label, kind in SET_KINDS:
            reach = [k for k in range(n_exits) if sum(r["exits"][k][kind]["coverage"] * r["n_test"] for r in alpha_runs)
                     / sum(r["n_test"] for r in alpha_runs) >= 1 - alpha]
            sizes = [mean(r["exits"][k][kind]["size"] for r in alpha_runs) for k in range(n_exits)]
            claims.append(f"α = {alpha:g}, {label}: pooled coverage ≥ 1 − α at exits {exit_list(reach)}; mean size "
                          f"{' → '.join(f'{v:.2f}' for v in sizes)}.")
    far = {}  # (inputs, exit, method) -> per-seed rows
    for r in runs:
        for row in r["far_from_data"]:
            far.setdefault((row["inputs"], row["exit"], row["method"]), []).append(row)
    scale = {}  # (inputs, exit) -> per-seed median of phi~^T V phi~
    for r in runs:
        for row in r["posterior_scale"]:
            scale.setdefault((row["inputs"], row["exit"]), []).append(row["median"])
    kinds = list(dict.fromkeys(key[0] for key in far))
    for quantity, title in (("mean_max_confidence", "Mean max-probability on inputs far from the data"),
                            ("auroc", "OOD AUROC of the max-probability (in-distribution = test; 0.5 = chance)")):
        lines += ["", f"{title}, mean over seeds; the Laplace − TS difference paired by seed, mean [95% t interval]"
                      + ("; the posterior's φ̃ᵀVφ̃ on these inputs over the test images', median over the seeds of the "
                         "ratio of medians." if quantity == "auroc" else "."), "",
                  "| inputs | exit | " + " | ".join(EXIT_METHODS) + " | Laplace − TS |"
                  + (" φ̃ᵀVφ̃ ratio |" if quantity == "auroc" else ""),
                  "|---|---|" + "---|" * (len(EXIT_METHODS) + 1 + (quantity == "auroc"))]
        for inputs in kinds:
            for k in range(n_exits):
                values = {m: [row[quantity] for row in far[inputs, k, m]] for m in EXIT_METHODS}
                gap = [a - b for a, b in zip(values["Laplace"], values["TS"])]
                row = f"| {inputs} | {k} | " + " | ".join(f"{mean(values[m]):.3f}" for m in EXIT_METHODS) + \
                    f" | {paired_t(gap, 1.0, 3)} |"
                if quantity == "auroc":
                    ratios = [a / b for a, b in zip(scale[inputs, k], scale["test", k])]
                    row += f" {statistics.median(ratios):.3g} |"
                    verdict = resolved(gap)
                    claims.append(f"{inputs}, exit {k}: the Laplace's AUROC is "
                                  f"{('above', 'below', 'not resolved from')[(1, -1, 0).index(verdict)]} TS's "
                                  f"({paired_t(gap, 1.0, 3)}); φ̃ᵀVφ̃ {statistics.median(ratios):.3g}× the test images'.")
                lines.append(row)
    lines += ["", "Budgeted early exit (thresholds on val; test accuracy and ECE %, mean over seeds, against the "
                  "expected GFLOPs per input); every sixth budget level.", "",
              "| level q | MAP GFLOPs | MAP accuracy | MAP ECE | MIE+Laplace GFLOPs | accuracy | ECE |",
              "|---|---|---|---|---|---|---|"]
    curves = {m: [[p for p in r["budget_curve"] if p["method"] == m] for r in runs] for m in ("MAP", "MIE+Laplace")}
    for index in range(0, len(curves["MAP"][0]), 6):
        row = [f"{curves['MAP'][0][index]['level']:.2f}"]
        for method in ("MAP", "MIE+Laplace"):
            points = [curve[index] for curve in curves[method]]
            row += [f"{mean(p['expected_flops'] for p in points) / 1e9:.4f}",
                    f"{100 * mean(p['accuracy'] for p in points):.1f}", f"{100 * mean(p['ece'] for p in points):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines + ["", "What holds here (computed from the tables above):", ""] + [f"- {claim}" for claim in claims]


@dataclass(frozen=True)
class Study:
    runs: Callable[[Sequence[int], Sequence[int], Path], list[Run]]
    lines: Callable[[Sequence[int], Sequence[int], Path], list[str]]
    title: str
    seeds: tuple[int, ...]
    fresh_seeds: tuple[int, ...] = ()
    folder: Optional[str] = None  # the default --out under runs/ (default: the study's name)


STUDIES = {
    "table": Study(table_runs, table_lines, "The (α, β) selection of every weighting at 12 student epochs",
                   (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)),
    "budget": Study(budget_runs, budget_lines, "Every weighting at its synth defaults (20 student epochs)",
                    tuple(range(10))),
    "lr": Study(lr_runs, lr_lines, "The learning rate of every weighting at 12 student epochs",
                (0, 1, 2, 3, 4), (5, 6, 7, 8, 9), folder="table"),  # it shares the table's runs at lr 0.05
    "data-size": Study(data_size_runs, data_size_lines, "The readout's posterior against a tuned temperature as the "
                       "training set shrinks", tuple(range(10))),
    "exits": Study(exits_runs, exits_lines, f"The exit-level methods on the {EXIT_CLASSES}-class synth benchmark",
                   (0, 1, 2, 3, 4)),
}


# ── Commands and the slot pool ───────────────────────────────────────────────────────────────────────────

def command(run: Run, root: Path, extra: Sequence[str], python: str = "python") -> list[str]:
    """The train.py command of a run, with ``--resume`` when its folder holds an interrupted run."""
    folder = root / run.name
    teacher = ["--teacher", str(root / run.teacher / "teacher.pt")] if run.teacher else []
    resume = ["--resume"] if (folder / "last.pt").is_file() and not (folder / "metrics.json").is_file() else []
    return [python, "train.py", *run.flags, *teacher, "--out", str(folder), *extra, *resume]


def shard(runs: list[Run], spec: Optional[str]) -> list[Run]:
    """The I-th of N disjoint shares (``spec`` "I/N", 1 <= I <= N): every N-th run from the I-th."""
    if spec is None:
        return runs
    index, count = (int(part) for part in spec.split("/"))
    return runs[index - 1::count]


def slot_resources(jobs: int, runs_per_gpu: int, gpus: list[str]) -> list[dict]:
    """Per slot of the pool: its share of this process's cores (disjoint, so no two runs' threads share a core)
    and its GPU (slot i on GPU i // runs_per_gpu, the DomainBed launcher's CUDA_VISIBLE_DEVICES pinning)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return [{"cores": cores[slot * len(cores) // jobs:(slot + 1) * len(cores) // jobs],
             "gpu": gpus[slot // runs_per_gpu] if gpus else None} for slot in range(jobs)]


def visible_gpus(extra: Sequence[str]) -> list[str]:
    """The GPUs the runs may use (ids as CUDA_VISIBLE_DEVICES names them); none when the runs are told
    ``--device cpu``."""
    if "cpu" in [value for flag, value in zip(extra, extra[1:]) if flag == "--device"]:
        return []
    import torch  # only here: printing commands or writing tables needs no torch
    count = torch.cuda.device_count()
    listed = [gpu for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu.strip()]
    return listed[:count] if listed else [str(index) for index in range(count)]


def launch(runs: list[Run], root: Path, extra: Sequence[str], slots: list[dict]) -> list[str]:
    """Run ``runs`` through the slot pool, one train.py process per slot at a time, each pinned to its slot's cores
    (and GPU); a run's output goes to OUT/<run>/train.log. Skips runs with a metrics.json and runs whose teacher
    is missing. Returns the failures, one line each."""
    failures, waiting = [], []
    for run in runs:
        if (root / run.name / "metrics.json").is_file():
            continue
        if run.teacher and not (root / run.teacher / "teacher.pt").is_file():
            failures.append(f"{run.name}: no teacher {root / run.teacher / 'teacher.pt'} (its run failed or has not run)")
            continue
        waiting.append(run)
    free, running, total = list(range(len(slots))), {}, len(waiting)
    while waiting or running:
        while waiting and free:
            run, slot = waiting.pop(0), free.pop(0)
            cores, gpu = slots[slot]["cores"], slots[slot]["gpu"]
            env = {**os.environ, "OMP_NUM_THREADS": str(len(cores)), "MKL_NUM_THREADS": str(len(cores))}
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            (root / run.name).mkdir(parents=True, exist_ok=True)
            log = open(root / run.name / "train.log", "a")
            args = command(run, root, extra, sys.executable)
            log.write(shlex.join(args) + "\n")
            log.flush()
            pin = (lambda: os.sched_setaffinity(0, cores)) if hasattr(os, "sched_setaffinity") else None
            process = subprocess.Popen(args, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)
            running[process.pid] = (process, run, slot, log, time.perf_counter())
            where = f"GPU {gpu}" if gpu is not None else f"cores {','.join(map(str, cores))}"
            print(f"[{total - len(waiting)}/{total}] {run.name} ({where})", flush=True)
        pid, status = os.wait()
        if pid not in running:
            continue
        process, run, slot, log, started = running.pop(pid)
        log.close()
        free.append(slot)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            tail = (root / run.name / "train.log").read_text().strip().splitlines()[-1:]
            failures.append(f"{run.name}: exit {code}: {tail[0] if tail else ''} (log: {root / run.name / 'train.log'})")
        print(f"    {run.name} {'done' if code == 0 else 'FAILED'} in {time.perf_counter() - started:.0f} s", flush=True)
    return failures


# ── Tables under a header ────────────────────────────────────────────────────────────────────────────────

def seed_text(seeds: Sequence[int]) -> str:
    """'5–9' for consecutive seeds, else '0 2 7'."""
    seeds = list(seeds)
    if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return " ".join(map(str, seeds))


def header(title: str, runs: list[Run], root: Path, argv: Sequence[str], sweep_seconds: Optional[float]) -> list[str]:
    """The results file's header: command, code version, the hardware and code versions the runs record, date,
    wall time (this invocation's, and the runs' own), and how many runs have finished."""
    import kdlaplace as K  # torch: only where tables are written
    metrics = finished(root, [run.name for run in runs])
    tally = lambda values: ", ".join(f"{value} ({n} runs)" for value, n in Counter(values).most_common())
    versions = tally(m.get("code_version", "unknown") for m in metrics)
    hardware = tally(f"{m.get('hardware')}, {'bf16 autocast' if m.get('bf16') else 'float32'}, {m.get('threads')} "
                     "threads" for m in metrics)
    run_seconds = sum(m.get("wall_seconds") or 0.0 for m in metrics)
    wall = f"{sweep_seconds / 60:.1f} min for this command" if sweep_seconds is not None else "tables only"
    return [f"# {title}", "",
            f"- command: `{shlex.join(['python', 'sweep.py', *argv])}`",
            f"- code version: `{K.code_version()}` (the runs: {versions or 'none yet'})",
            f"- hardware of the runs: {hardware or 'none yet'}",
            f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- wall time: {wall}; the finished runs' train.py processes took {run_seconds / 60:.1f} min in all",
            f"- runs finished: {len(metrics)} of {len(runs)} (folders under `{root}`)", ""]


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The sweep's flags, and the train.py flags after ``--``."""
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, choices=list(STUDIES), help="which study")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the study's; for table and lr the "
                        "selection seeds)")
    parser.add_argument("--fresh-seeds", type=int, nargs="*", help="table and lr: seeds that only test the "
                        "selection (default 5..9)")
    parser.add_argument("--out", help="run folders and the tables (default runs/<study>)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time: each on its own GPU (see "
                        "--runs-per-gpu) and its own share of the cores (default 1)")
    parser.add_argument("--runs-per-gpu", type=int, default=1, help="runs packed onto one GPU (default 1)")
    parser.add_argument("--print-commands", choices=["teachers", "students"],
                        help="print the unfinished runs of a stage, one command per line, and run nothing")
    parser.add_argument("--shard", help="I/N: only the I-th of N disjoint shares of each stage (1 <= I <= N)")
    parser.add_argument("--tables", action="store_true", help="write the tables from the runs that exist, run nothing")
    parser.add_argument("--sizes", type=int, nargs="+", help="data-size: the --synth-n-train values (default "
                        f"{' '.join(map(str, DATA_SIZES))})")
    args = parser.parse_args(own)
    study = STUDIES[args.study]
    args.seeds = args.seeds if args.seeds is not None else list(study.seeds)
    args.fresh_seeds = args.fresh_seeds if args.fresh_seeds is not None else list(study.fresh_seeds)
    args.out = Path(args.out or f"runs/{study.folder or args.study}")
    if args.fresh_seeds and not study.fresh_seeds:
        parser.error(f"--fresh-seeds: the {args.study} study has no selection to test")
    if set(args.fresh_seeds) & set(args.seeds):
        parser.error(f"--fresh-seeds must not repeat a seed of --seeds (both have {sorted(set(args.fresh_seeds) & set(args.seeds))})")
    if args.sizes is not None and args.study != "data-size":
        parser.error("--sizes is a flag of --study data-size")
    if args.jobs < 1 or args.runs_per_gpu < 1:
        parser.error("--jobs and --runs-per-gpu must be >= 1")
    if args.shard is not None:
        parts = args.shard.split("/")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 1 <= int(parts[0]) <= int(parts[1]):
            parser.error(f"--shard {args.shard}: expected I/N with 1 <= I <= N, e.g. 2/8")
    return args, extra


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    study, root = STUDIES[args.study], args.out
    if args.sizes:  # the data-size study's runs and tables at these sizes only
        study = replace(study, runs=partial(data_size_runs, sizes=args.sizes),
                        lines=partial(data_size_lines, sizes=args.sizes))
    stages = lambda: [[run for run in study.runs(args.seeds, args.fresh_seeds, root) if run.teacher is None],
                      [run for run in study.runs(args.seeds, args.fresh_seeds, root) if run.teacher is not None]]
    if args.print_commands:
        stage = shard(stages()[args.print_commands == "students"], args.shard)
        for run in stage:
            if not (root / run.name / "metrics.json").is_file():
                print(shlex.join(command(run, root, extra)))
        if args.study in ("table", "lr") and args.fresh_seeds and not complete_selection(args.seeds, root):
            waiting = "a weighting's fresh-seed students wait for its" if args.study == "table" else \
                "the lr study's students wait for the table's"
            print(f"sweep.py: {waiting} selection: print them again once the grid's runs have finished", file=sys.stderr)
        return
    started, failures = time.perf_counter(), []
    if not args.tables:
        gpus = visible_gpus(extra)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if args.jobs > cores:
            sys.exit(f"sweep.py: error: --jobs {args.jobs}: more runs than the {cores} cores this process may use "
                     "would share cores; give at most one run per core")
        if gpus and args.jobs > len(gpus) * args.runs_per_gpu:
            sys.exit(f"sweep.py: error: --jobs {args.jobs} needs {args.jobs} slots, but {len(gpus)} GPUs x "
                     f"--runs-per-gpu {args.runs_per_gpu} give {len(gpus) * args.runs_per_gpu}")
        slots = slot_resources(args.jobs, args.runs_per_gpu, gpus)
        failures += launch(shard(stages()[0], args.shard), root, extra, slots)
        launched = None
        while launched != (students := shard(stages()[1], args.shard)):  # again once a selection adds runs (table)
            failures += launch(students, root, extra, slots)
            launched = students
    runs = [run for stage in stages() for run in stage]
    lines = header(study.title, runs, root, argv, None if args.tables else time.perf_counter() - started)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{args.study}.md").write_text("\n".join(lines + study.lines(args.seeds, args.fresh_seeds, root)) + "\n")
    print(f"wrote {root / f'{args.study}.md'}")
    if failures:
        sys.exit("sweep.py: failed runs:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the runs got the signal too: each keeps its last.pt and resumes from it
        sys.exit("\nsweep.py: interrupted; the same command continues the sweep")
