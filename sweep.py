"""The evidence runner: studies of many train.py runs, and their tables (OUT/<study>.md under a header).

A study's train.py runs (listed by its function <study>_runs, e.g. data_size_runs) come in two stages, the teachers,
then the students that distil them; a run writes only OUT/<run>, is done once it has a metrics.json and resumes from
a last.pt. The studies (synth): table (the (alpha, beta) selection), lr, budget, data-size, exits (8 classes, eval.py).

    python sweep.py --study table --jobs 8 --runs-per-gpu 4  # 8 runs at a time, 4 on each GPU
    python sweep.py --study data-size --jobs 2               # on a 2-core CPU: 2 runs of one thread each
    python sweep.py --study table --print-commands teachers  # one command per line, for GNU parallel or Slurm
    python sweep.py --study budget -- --device cuda          # flags after -- go to every train.py command
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections import Counter, namedtuple
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean, median, stdev
from typing import Optional, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
WEIGHTINGS = ("none", "dedier", "dedier-ts", "laplace", "laplace-cv", "laplace-ml")
TUNED_WEIGHTINGS = WEIGHTINGS[1:]
GRID_ALPHAS, GRID_BETAS = (0.05, 0.5, 1.0), (1.0, 2.0, 4.0)
PAPER_ALPHA_BETA = (0.05, 4.0)  # DEDIER's published Waterbirds setting: a point of the grid with its own row
TABLE_EPOCHS = 12  # the students of the table and the lr study (the teacher keeps its 15 epochs)
LEARNING_RATES = (0.05, 0.02, 0.01)  # the first is train.py's: there the lr study's runs are the table's
BUDGET_WEIGHTINGS = ("none", "dedier", "dedier-ts", "laplace")
DATA_SIZES = (600, 1200, 2400, 4800)
DATA_SIZE_WEIGHTINGS = ("none", "dedier", "dedier-ts", "laplace", "laplace-ml")
EXIT_CLASSES = 8  # the multi-class synth benchmark of the exit-level methods: shapes 8 and 9 stay unseen
EXIT_ALPHAS = (0.05, 0.1)
EXIT_METHODS = ("MAP", "TS", "Laplace", "MIE", "MIE+TS", "MIE+Laplace")  # eval.py's
SET_KINDS = (("Dirichlet AVCS", "avcs"), ("AVCS, offset b", "avcs_offset"), ("Laplace-AVCS", "laplace_avcs"),
             ("split conformal", "conformal"), ("conformal, nested", "conformal_nested"))
# the edges of Meronen et al. (2024)'s validation grids: a tuned value on or beyond them is one those grids censor
GRID_EDGES = {"readout_temperature": (0.3, 3.0), "readout_prior_variance": (0.5, 4.0)}


# ── Runs ─────────────────────────────────────────────────────────────────────────────────────────────────

# one train.py run: its folder's name, its flags (less --out, --teacher), the run whose teacher.pt it distils (or None)
Run = namedtuple("Run", "name flags teacher", defaults=(None,))


def run_flags(**flags) -> tuple[str, ...]:
    """train.py flags after --diagnostics (the tables read the readout's diagnostics): seed=3 -> --seed 3."""
    return ("--diagnostics",) + tuple(part for name, value in flags.items() for part in (
        f"--{name.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)))


def grid_name(weighting: str, alpha: float, beta: float) -> str:
    """The run name of a grid point without its seed: grid_name("dedier", 0.5, 1.0) == "dedier_a0.5_b1"."""
    return f"{weighting}_a{alpha:g}_b{beta:g}"


GRID = {w: [grid_name(w, a, b) for a in GRID_ALPHAS for b in GRID_BETAS] for w in TUNED_WEIGHTINGS}


def point_flags(point: str) -> dict:
    """train.py's weighting, alpha and beta of a grid point (a grid_name), or of plain KD ("none")."""
    weighting, *ab = point.split("_")
    return {"weighting": weighting, **({"alpha": float(ab[0][1:]), "beta": float(ab[1][1:])} if ab else {})}


def lr_name(point: str, lr: float) -> str:
    """A point's run name at rate ``lr``: the point's own at train.py's rate, else with "-lr<lr>" appended."""
    return point if lr == LEARNING_RATES[0] else f"{point}-lr{lr:g}"


def table_run(point: str, seed: int, lr: Optional[float] = None) -> Run:
    """A 12-epoch run of a point (at rate ``lr`` if given) distilling the seed's plain-KD run, or that run itself."""
    rate = {} if lr is None else {"lr": lr}  # no --lr flag: train.py's default rate
    name = f"{point if lr is None else lr_name(point, lr)}-seed{seed}"
    return Run(name, run_flags(**point_flags(point), epochs=TABLE_EPOCHS, **rate, seed=seed),
               None if name == f"none-seed{seed}" else f"none-seed{seed}")


def table_runs(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[Run]:
    """Plain KD per seed; the ERM teacher (1-epoch student) and the grid per selection seed; the selection per fresh seed."""
    runs = []
    for s in [*seeds, *fresh_seeds]:
        runs.append(table_run("none", s))
        if s in seeds:
            runs.append(Run(f"erm-seed{s}", run_flags(weighting="none", teacher_objective="erm", epochs=1, seed=s)))
    selected = select_grid_points(seeds, root) if fresh_seeds else {}
    return (runs + [table_run(point, s) for s in seeds for w in TUNED_WEIGHTINGS for point in GRID[w]]
            + [table_run(point, s) for s in fresh_seeds for point in selected.values()])


def budget_runs(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[Run]:
    return [Run(f"{w}-seed{s}", run_flags(weighting=w, seed=s), None if w == "none" else f"none-seed{s}")
            for s in seeds for w in BUDGET_WEIGHTINGS]


def lr_runs(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[Run]:
    """The table's plain KD, then each selected point at every rate (selection seeds) and at its rate (fresh seeds)."""
    plain = [table_run("none", s) for s in [*seeds, *fresh_seeds]]
    points = {"none": "none", **complete_selection(seeds, root)}
    if len(points) == 1:  # the table's selection does not exist yet
        return plain
    rates = select_rates(seeds, root, points)
    chosen = [(s, p, lr) for s in seeds for p in points.values() for lr in LEARNING_RATES]
    chosen += [(s, points[w], lr) for s in fresh_seeds for w, lr in rates.items()]
    return plain + [table_run(p, s, lr) for s, p, lr in chosen if lr_name(p, lr) != "none"]  # not plain KD again


def data_size_runs(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path,
                   sizes: Sequence[int] = DATA_SIZES) -> list[Run]:
    return [Run(f"{w}-n{n}-seed{s}", run_flags(weighting=w, synth_n_train=n, seed=s),
                None if w == "none" else f"none-n{n}-seed{s}") for n in sizes for s in seeds for w in DATA_SIZE_WEIGHTINGS]


def exits_runs(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[Run]:
    return [Run(f"c{EXIT_CLASSES}-seed{s}", run_flags(synth_classes=EXIT_CLASSES, seed=s)) for s in seeds]


# ── Reading the runs, and the statistics of their tables ─────────────────────────────────────────────────

def load_run(root: Path, name: str) -> Optional[dict]:
    """A finished run's metrics.json, its student epochs ("student_epochs") and the reweighted ones ("epochs")."""
    if not (root / name / "metrics.json").is_file():
        return None
    run = json.loads((root / name / "metrics.json").read_text())
    records = [json.loads(line) for line in (root / name / "log.jsonl").read_text().splitlines()]
    run["student_epochs"] = [r for r in records if r["phase"] == "student"]
    run["epochs"] = [r for r in run["student_epochs"] if "upweighted_share" in r]
    return run


def on_seeds(root: Path, point: str, seeds: Sequence[int]) -> list[dict]:
    return [run for s in seeds if (run := load_run(root, f"{point}-seed{s}")) is not None]


def score(runs: Sequence[dict], key: str = "worst_group_acc", split: str = "test", role: str = "student") -> list:
    return [r[role][split][key] for r in runs]


def paired(runs: Sequence[dict], base: Sequence[dict]) -> list[float]:
    """Test worst-group accuracy of each run minus that of the ``base`` run of its seed."""
    base_of_seed = {r["seed"]: r["student"]["test"]["worst_group_acc"] for r in base}
    return [r["student"]["test"]["worst_group_acc"] - base_of_seed[r["seed"]] for r in runs if r["seed"] in base_of_seed]


def weighting_label(weighting: str, runs: list[dict]) -> str:
    """The weighting with the (alpha, beta) its runs record, e.g. "dedier-ts (0.5, 1)", if they agree."""
    points = {(r["alpha"], r["beta"]) for r in runs if "alpha" in r}
    if weighting == "none" or len(points) != 1:
        return weighting
    alpha, beta = points.pop()
    return f"{weighting} ({alpha:g}, {beta:g})"


def val_score(runs: list[dict]) -> tuple[float, float]:
    """Mean validation worst-group accuracy of the selected checkpoints, ties by mean validation accuracy."""
    return mean(score(runs, split="val")), mean(score(runs, "avg_acc", "val"))


def best_finished(candidates: dict, seeds: Sequence[int], root: Path) -> dict:
    """key -> the name in ``candidates[key]`` with the best val_score over ``seeds``, where all their runs have finished."""
    runs = {name: on_seeds(root, name, seeds) for names in candidates.values() for name in names}
    return {key: max(names, key=lambda name: val_score(runs[name])) for key, names in candidates.items()
            if all(len(runs[name]) == len(seeds) for name in names)}


def select_grid_points(seeds: Sequence[int], root: Path) -> dict:
    """weighting -> its best grid point on ``seeds``, for each weighting whose grid has finished there."""
    return best_finished(GRID, seeds, root)


def complete_selection(seeds: Sequence[int], root: Path) -> dict:
    """select_grid_points once every weighting has its point (what the lr study runs at), else {}."""
    selected = select_grid_points(seeds, root)
    return selected if len(selected) == len(TUNED_WEIGHTINGS) else {}


def select_rates(seeds: Sequence[int], root: Path, points: dict) -> dict:
    """weighting -> its best rate at ``points[weighting]`` on ``seeds``, for each one whose rates have finished."""
    rate_of = {w: {lr_name(point, lr): lr for lr in LEARNING_RATES} for w, point in points.items()}  # name -> rate
    return {w: rate_of[w][name] for w, name in best_finished(rate_of, seeds, root).items()}


def cell(values: Sequence[Optional[float]], scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± sd' of the values that exist (times ``scale``), '–' when none does."""
    values = [v for v in values if v is not None]
    spread = f" ± {scale * stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{scale * mean(values):.{digits}f}{spread}" if values else "–"


def mean_of(values: Sequence[Optional[float]], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    return f"{mean(values):.{digits}f}" if values else "–"


def per_seed(values: Sequence[float]) -> str:
    return " ".join(f"{100 * v:.0f}" for v in values)


def bootstrap_interval(values: Sequence[float], level: float = 0.95, resamples: int = 10000) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: the (1 -+ level)/2 quantiles of ``resamples`` resamples' means."""
    values = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(0).integers(0, len(values), size=(resamples, len(values)))  # (R, n), fixed seed
    means = values[draws].mean(axis=1)  # (R,)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def t_two_sided_probability(theta: float, degrees: int) -> float:
    """Exact P(|T| <= sqrt(nu) tan theta) of Student's t, nu = ``degrees`` (Abramowitz & Stegun 26.7.3-4): s S for even
    nu, 2/pi (theta + s c S) for odd; s, c = sin, cos theta, S = sum_{k < nu//2} prod_{j <= k} c^2 (2j-1+nu%2) / (2j+nu%2)."""
    odd, s, c = degrees % 2, math.sin(theta), math.cos(theta)
    S = sum(math.prod(c * c * (2 * j - 1 + odd) / (2 * j + odd) for j in range(1, k + 1)) for k in range(degrees // 2))
    return 2 / math.pi * (theta + s * c * S) if odd else s * S


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean, mean -+ t_{(1+level)/2, n-1} sd / sqrt(n), t = sqrt(nu) tan theta: theta bisected
    in (0, pi/2) to where t_two_sided_probability(theta, nu) reaches ``level``."""
    nu, low, high = len(values) - 1, 0.0, math.pi / 2
    for _ in range(60):
        theta = (low + high) / 2
        if t_two_sided_probability(theta, nu) < level:
            low = theta
        else:
            high = theta
    half = math.sqrt(nu) * math.tan((low + high) / 2) * stdev(values) / math.sqrt(len(values))
    return mean(values) - half, mean(values) + half


PAIRED_COLUMNS = "won / lost | 95% bootstrap | 95% t | sign-flip p"
PAIRED_NOTE = "won / lost by any margin; 95% percentile-bootstrap and t intervals of the mean; exact two-sided sign-flip p"


def paired_cells(differences: Sequence[float]) -> list[str]:
    """Paired differences in points: mean ± sd, median, won / lost, bootstrap and t intervals, and the exact sign-flip
    p of a mean 0: the share of the 2^n sign patterns whose |mean| is at least the observed one."""
    points = [100 * d for d in differences]
    if len(points) < 2:
        return ["–"] * 6
    values, (low, high), (t_low, t_high) = np.asarray(points), bootstrap_interval(points), t_interval(points)
    signs = 1 - 2 * ((np.arange(2 ** len(points))[:, None] >> np.arange(len(points))) & 1)  # (2^n, n) of +-1
    flip_p = (np.abs((signs * values).mean(1)) >= abs(values.mean()) - 1e-12).mean()
    return [f"{mean(points):+.1f} ± {stdev(points):.1f}", f"{median(points):+.1f}",
            f"{sum(p > 0 for p in points)} / {sum(p < 0 for p in points)}", f"[{low:+.1f}, {high:+.1f}]",
            f"[{t_low:+.1f}, {t_high:+.1f}]", f"{flip_p:.3f}"]


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's score interval of a binomial proportion: (p + z²/2n -+ z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p, z2 = successes / trials, z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return centre - half, centre + half


def epoch_median(run: dict, key: str, index: Optional[int] = None) -> Optional[float]:
    """Median over a run's reweighted epochs of a logged diagnostic (entry ``index`` of a per-group list)."""
    logged = [e[key] if index is None else e[key][index] for e in run["epochs"] if e.get(key) is not None]
    values = [v for v in logged if v is not None]
    return median(values) if values else None


def seed_text(seeds: Sequence[int]) -> str:
    """'5–9' for consecutive seeds, else '0 2 7'."""
    consecutive = len(seeds) > 1 and list(seeds) == list(range(seeds[0], seeds[-1] + 1))
    return f"{seeds[0]}–{seeds[-1]}" if consecutive else " ".join(map(str, seeds))


def section(note: str, columns: str) -> list[str]:
    """A blank line, a table's note, a blank line, its head (columns joined by " | ") and separator."""
    return ["", note, "", f"| {columns} |", "|" + "---|" * (columns.count(" | ") + 1)]


def row(*cells: object) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def summary(runs: Sequence[dict], role: str = "student") -> list[str]:
    """Test average and worst-group accuracy (mean ± sd), the worst-group median and per seed."""
    worst = score(runs, role=role)
    return [cell(score(runs, "avg_acc", role=role)), cell(worst), f"{100 * median(worst):.1f}", per_seed(worst)]


def readout_eces(runs: Sequence[dict]) -> list[str]:
    """The student readout's test ECE cells: softmax, temperature-scaled softmax, Laplace predictive."""
    return [cell([r["student"]["readout"][kind]["ece"] for r in runs]) for kind in ("map", "temperature", "laplace")]


# ── The tables of each study ─────────────────────────────────────────────────────────────────────────────

def table_lines(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[str]:
    """The selection: main rows, grid, posterior, fresh seeds, the ERM teacher, when students leave the shortcut."""
    def epoch_mean(rs: list[dict], key: str) -> str:  # per run the mean over its reweighted epochs; mean ± sd over runs
        return cell([mean(e[key] for e in r["epochs"]) if r["epochs"] and r["epochs"][0].get(key) is not None else None
                     for r in rs], 1.0, 3)
    if not (selected := select_grid_points(seeds, root)):
        return ["No weighting's grid has finished on every selection seed: no selection yet."]
    runs = lambda point, on=seeds: on_seeds(root, point, on)
    ab = lambda point: "(α={alpha:g}, β={beta:g})".format(**point_flags(point))

    def entry(point: str) -> str:  # "val / test" worst-group means once every seed has run, bold when selected
        rs = runs(point)
        text = f"{100 * val_score(rs)[0]:.1f} / {100 * mean(score(rs)):.1f}" if len(rs) == len(seeds) else "–"
        return f"**{text}**" if point in selected.values() else text
    paper, every = grid_name("dedier", *PAPER_ALPHA_BETA), [*seeds, *fresh_seeds]
    lines = section(f"Seeds {seed_text(seeds)}, the selection's seeds. Test-set %, mean ± sd over seeds; posterior logit "
                    "std: median over the training inputs, averaged over the reweighted epochs.", "weighting | val "
                    "worst-group | student avg | student worst-group | readout ECE softmax | readout ECE temperature | "
                    "readout ECE Laplace | posterior logit std | corr with T-softmax weights | per seed")[1:]
    for label, rs in [(label, runs(p)) for label, p in [("none", "none"), (f"dedier, paper {ab(paper)}", paper),
                                                        *((f"{w}, tuned {ab(p)}", p) for w, p in selected.items())]]:
        lines.append(row(label, cell(score(rs, split="val")), cell(score(rs, "avg_acc")), cell(score(rs)),
                         *readout_eces(rs), epoch_mean(rs, "posterior_logit_std_median"),
                         epoch_mean(rs, "weight_corr_temperature"), per_seed(score(rs))))
    if unfinished := [w for w in TUNED_WEIGHTINGS if w not in selected]:
        lines += ["", f"Not selected yet (grid unfinished on the selection seeds): {', '.join(unfinished)}."]
    lines += section("Selection grid: validation / test worst-group accuracy (%), mean over the seeds (– until every "
                     "seed's run of the point has finished); the selected point in bold.",
                     "α | β | " + " | ".join(TUNED_WEIGHTINGS))
    lines += [row(f"{a:g}", f"{b:g}", *(entry(grid_name(w, a, b)) for w in TUNED_WEIGHTINGS))
              for a in GRID_ALPHAS for b in GRID_BETAS]
    lines += section("The readout's posterior on the training inputs, selected runs (mean over the reweighted epochs, then "
                     "over seeds): tuned T and σ², and the posterior std of the temperature-scaled logits per group.",
                     "weighting | T | σ² | logit std g0 | g1 | g2 | g3")
    for w, epochs in [(w, [e for r in runs(p) for e in r["epochs"]]) for w, p in selected.items() if w.startswith("laplace")]:
        lines.append(row(w, mean_of([e["readout_temperature"] for e in epochs], 2),
                         mean_of([e["readout_prior_variance"] for e in epochs], 3),
                         *(mean_of([e["posterior_logit_std"][g] for e in epochs]) for g in range(4))))
    if fresh_seeds:
        lines += section(f"Fresh seeds {seed_text(fresh_seeds)}: the points selected on seeds {seed_text(seeds)}, run again "
                         "on seeds no selection has seen (the validation column pools every seed: the default weighting's "
                         f"criterion).", f"weighting | val worst-group, seeds {seed_text(every)} | student avg | student "
                         "worst-group | per seed")
        lines += [row(label, cell(score(runs(p, every), split="val")), cell(score(runs(p, fresh_seeds), "avg_acc")),
                      cell(score(runs(p, fresh_seeds))), per_seed(score(runs(p, fresh_seeds))))
                  for label, p in [("none", "none"), *selected.items()]]
    lines += section("The shortcut: the seeds' teachers with group DRO and with ERM (same model selection).",
                     "teacher objective | test avg | test worst-group")
    lines += [row(objective, cell(score(runs(p), "avg_acc", role="teacher")), cell(score(runs(p), role="teacher")))
              for objective, p in (("group DRO", "none"), ("ERM", "erm"))]
    curves = [[e["val_worst_group_acc"] for e in r["student_epochs"]]
              for point in ["none", *(p for w in TUNED_WEIGHTINGS for p in GRID[w])] for r in runs(point)]
    first = [next((epoch for epoch, acc in enumerate(curve, 1) if acc >= 0.5), None) for curve in curves]
    counts = ", ".join(f"{epoch}: {first.count(epoch)}" for epoch in sorted(set(first) - {None}))
    return lines + ["", f"Selection seeds' student runs at validation worst-group 0 after epoch 1: "
                        f"{sum(c[0] == 0 for c in curves)} of {len(curves)}; first epoch at 50% or more: {counts}, "
                        f"never: {first.count(None)}."]


def budget_lines(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[str]:
    """BUDGET_WEIGHTINGS at their defaults: test worst-group accuracy and its paired difference from plain KD."""
    lines = section(f"Test worst-group accuracy (%), seeds {seed_text(seeds)}; paired: the weighting minus plain KD on "
                    f"the same seed and teacher (points; {PAIRED_NOTE}).", "weighting | student avg | worst-group | "
                    f"median | per seed | minus plain KD | median | {PAIRED_COLUMNS}")[1:]
    return lines + [row(weighting_label(w, rs), *summary(rs), *(["–"] * 6 if w == "none" else paired_cells(paired(
        rs, on_seeds(root, "none", seeds))))) for w in BUDGET_WEIGHTINGS if (rs := on_seeds(root, w, seeds))]


def lr_lines(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[str]:
    """Each weighting's rate selected on the selection seeds, its test figures there and on fresh seeds, paired."""
    if len(points := {"none": "none", **complete_selection(seeds, root)}) == 1:
        return ["The table's selection does not exist yet: `python sweep.py --study table` first."]
    runs = lambda w, lr, on=seeds: on_seeds(root, lr_name(points[w], lr), on)
    selected = select_rates(seeds, root, points)
    plain = runs("none", selected["none"], fresh_seeds) if "none" in selected else []
    lines = section(f"Rate selected on seeds {seed_text(seeds)}' validation worst-group accuracy; test worst-group (%) at "
                    f"that rate on those seeds and on fresh seeds {seed_text(fresh_seeds)}; paired: minus plain KD at its "
                    "selected rate, same seed and teacher.", "weighting | val worst-group per rate | lr selected | "
                    "selection seeds | fresh seeds | fresh, per seed | fresh minus plain KD | median")[1:]
    for w, lr in [(w, selected.get(w)) for w in WEIGHTINGS]:
        label = w if w == "none" else "{} ({alpha:g}, {beta:g})".format(w, **point_flags(points[w]))
        fresh = runs(w, lr, fresh_seeds) if lr else []
        differences = [100 * d for d in paired(fresh, plain)]
        lines.append(row(label, *["–"] * 7) if lr is None else row(
            label, ", ".join(f"{rate:g}: {100 * val_score(runs(w, rate))[0]:.1f}" for rate in LEARNING_RATES if runs(w, rate)),
            f"{lr:g}", cell(score(runs(w, lr))), cell(score(fresh)), per_seed(score(fresh)),
            *(["–"] * 2 if w == "none" or not differences else [cell(differences, 1.0), f"{median(differences):+.1f}"])))
    return lines


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
    """Per training-set size: test figures, the posterior on the training inputs, paired differences, the prediction."""
    def over(rs: list[dict], key: str, index: Optional[int] = None, digits: int = 3) -> str:  # mean of run medians
        return mean_of([epoch_median(r, key, index) for r in rs], digits)
    runs = {(w, n): on_seeds(root, f"{w}-n{n}", seeds) for w in DATA_SIZE_WEIGHTINGS for n in sizes}
    lines = [DATA_SIZE_PREDICTION, *section("Students: test %, mean ± sd over seeds; median; per seed. Readout test ECE "
             "(%) with its softmax / temperature-scaled softmax / Laplace predictive.", "N train | weighting | avg | "
             "worst-group | median | per seed | readout ECE softmax / T / Laplace")]
    for n in sizes:  # the teacher every student of a size distils (trained by the plain-KD run), then the students
        if runs["none", n]:
            lines.append(row(n, "teacher (group DRO)", *summary(runs["none", n], "teacher"), "–"))
        lines += [row(n, weighting_label(w, rs), *summary(rs), " / ".join(readout_eces(rs)))
                  for w in DATA_SIZE_WEIGHTINGS if (rs := runs[w, n])]
    lines += section("The readout on the training inputs, where the weights are computed (per run the median over its "
                     "reweighted epochs, then the mean over seeds): the posterior std of the temperature-scaled logits per "
                     "group (g1 and g2 are the minority groups), the coefficient of variation of the posterior variance "
                     "φ̃ᵀVφ̃ across inputs and between the group means, the correlation of the weights with the "
                     "temperature-only softmax's (its lowest epoch over all runs in brackets), and the share of up-weighted"
                     " samples (all / g1 / g2).", "N train | weighting | logit std g0 | g1 | g2 | g3 | CV of φ̃ᵀVφ̃ | "
                     "between groups | corr with T-softmax weights | up-weighted share")
    for n, w, rs in [(n, w, runs[w, n]) for n in sizes for w in DATA_SIZE_WEIGHTINGS[1:] if runs[w, n]]:
        posterior = [over(rs, "posterior_logit_std", g) for g in range(4)] + [
            over(rs, key, digits=2) for key in ("posterior_variance_cv", "posterior_variance_group_cv")]
        correlations = [e["weight_corr_temperature"] for r in rs for e in r["epochs"]
                        if e.get("weight_corr_temperature") is not None]
        correlation = f"{over(rs, 'weight_corr_temperature', digits=4)} ({min(correlations):.4f})" if correlations else "–"
        lines.append(row(n, w, *(posterior if w.startswith("laplace") else ["–"] * 6), correlation, " / ".join(
            [over(rs, "upweighted_share_all")] + [over(rs, "upweighted_share", g) for g in (1, 2)])))
    lines += section("Paired worst-group differences from dedier-ts (the temperature-scaled softmax, same seed and "
                     f"teacher), in points: mean ± sd, median, {PAIRED_NOTE}.",
                     f"N train | comparison | mean ± sd | median | {PAIRED_COLUMNS}")
    lines += [row(n, f"{w} − dedier-ts", *paired_cells(paired(runs[w, n], runs["dedier-ts", n])))
              for n in sizes for w in ("laplace", "laplace-ml")]
    if not (sizes := [n for n in sizes if runs["laplace", n]]):  # the measurement against the prediction above
        return lines
    import kdlaplace as K  # torch: only where tables are written
    std = {n: mean(epoch_median(r, "posterior_logit_std_median") for r in runs["laplace", n]) for n in sizes}
    largest = max(sizes)
    lines += section("Measured against the prediction (laplace): the median posterior logit std on the training inputs "
                     f"(mean over seeds) and its ratio to N = {largest}'s, beside the ratios 1/√N and 1/N^(1/4) predict; "
                     "the median tuned T and σ² over all reweighted epochs, and the share of those epochs whose choice "
                     "lies on or beyond the edges of Meronen et al.'s grids (T 0.3–3.0, σ² 0.5–4.0), which would have "
                     "censored it, and the share at an end of the ranges the runs searched (T 0.01–100, σ² 1e-4–1e4): "
                     "there the search stopped at the range, not at a minimum.", f"N train | logit std | ratio to N = "
                     f"{largest} | (N/{largest})^(-1/2) | (N/{largest})^(-1/4) | lowest weight correlation, any epoch | "
                     "between-group CV of φ̃ᵀVφ̃ | median T dedier-ts / laplace, σ² | beyond the grids: T dedier-ts / "
                     "laplace, σ² | at the range ends: T dedier-ts / laplace, σ²")
    for n in sizes:
        tuned = {w: [e for r in runs[w, n] for e in r["epochs"] if e.get("readout_temperature") is not None]
                 for w in ("dedier-ts", "laplace")}  # the reweighted epochs that tuned the readout
        chosen = [(tuned["dedier-ts"], "readout_temperature"), (tuned["laplace"], "readout_temperature"),
                  (tuned["laplace"], "readout_prior_variance")]
        medians = [median(e[key] for e in epochs) if epochs else math.nan for epochs, key in chosen]
        beyond = [sum(not GRID_EDGES[key][0] < e[key] < GRID_EDGES[key][1] for e in epochs) / len(epochs) if epochs
                  else math.nan for epochs, key in chosen]
        ranges = (K.KFACLaplace.TEMPERATURE_GRID, K.KFACLaplace.TEMPERATURE_GRID, K.KFACLaplace.PRIOR_VARIANCE_GRID)
        at_end = [sum(K.at_search_end(e[key], grid) for e in epochs) / len(epochs) if epochs else math.nan
                  for (epochs, key), grid in zip(chosen, ranges)]
        lowest = min(e["weight_corr_temperature"] for e in tuned["laplace"] if e.get("weight_corr_temperature") is not None)
        lines.append(row(n, f"{std[n]:.3f}", f"{std[n] / std[largest]:.2f}", f"{(n / largest) ** -0.5:.2f}",
                         f"{(n / largest) ** -0.25:.2f}", f"{lowest:.4f}",
                         over(runs["laplace", n], "posterior_variance_group_cv", digits=2),
                         "{:.2f} / {:.2f}, {:.3g}".format(*medians),
                         "{:.0f}% / {:.0f}%, {:.0f}%".format(*(100 * b for b in beyond)),
                         "{:.0f}% / {:.0f}%, {:.0f}%".format(*(100 * a for a in at_end))))
    return lines


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


def exits_lines(seeds: Sequence[int], fresh_seeds: Sequence[int], root: Path) -> list[str]:
    """eval.py's per-exit figures (its reports cached as OUT/<run>/exits-<alpha>.json), and what holds of them."""
    def t_cell(values: list[float], scale: float = 100.0, d: int = 1) -> str:  # "mean [95% t interval]", scaled
        scaled = [scale * v for v in values]
        low, high = t_interval(scaled)
        return f"{mean(scaled):+.{d}f} [{low:+.{d}f}, {high:+.{d}f}]"
    import eval as evaluate  # torch and the model code: only where tables are written
    import kdlaplace as K
    done = [root / run.name for run in exits_runs(seeds, fresh_seeds, root) if (root / run.name / "metrics.json").is_file()]
    for folder, alpha in [(f, a) for a in EXIT_ALPHAS for f in done if not (f / f"exits-{a:g}.json").is_file()]:
        report = evaluate.report(evaluate.parse_args([str(folder), "--alpha", str(alpha), "--device", "cpu"]))
        (folder / f"exits-{alpha:g}.json").write_text(json.dumps(report))
    reports = {a: [json.loads((f / f"exits-{a:g}.json").read_text()) for f in done] for a in EXIT_ALPHAS}
    if not (runs := reports[EXIT_ALPHAS[0]]):
        return [EXITS_PREDICTION, "", "No run has finished."]
    exits, claims = range(len(runs[0]["exits"])), []
    at = lambda k, part, key="ece": [r["exits"][k][part][key] for r in runs]  # per seed: exit k's part[key]
    gap = lambda k, first, second: [a - b for a, b in zip(at(k, first), at(k, second))]
    listed = lambda ks: ", ".join(map(str, ks)) if ks else "none"
    spread = lambda values, d=".3g": f"{median(values):{d}} [{min(values):{d}}, {max(values):{d}}]"

    def resolved(values: list[float]) -> int:  # +1 when the 95% t interval lies above 0, -1 below, 0 when it holds 0
        low, high = t_interval(values)
        return (low > 0) - (high < 0)
    lines = [EXITS_PREDICTION, *section(f"Test %, mean ± sd over {len(runs)} seeds ({EXIT_CLASSES} classes). TS: each "
             "exit's softmax at a temperature tuned on val NLL; Laplace: each exit's KFAC last-layer posterior, (T, σ²) "
             "tuned on val NLL; MIE: the FLOP-weighted mean of exits 0..k; MIE+TS, MIE+Laplace: each exit's T or (T, σ²)"
             " tuned greedily inside the ensemble.", "exit | GFLOPs | method | top-1 | top-5 | NLPD | ECE")]
    lines += [row(k, f"{runs[0]['exits'][k]['flops'] / 1e9:.4f}", m, cell(at(k, m, "top1")), cell(at(k, m, "top5")),
                  cell(at(k, m, "nlpd"), 1.0, 3), cell(at(k, m))) for k in exits for m in EXIT_METHODS]
    lines += section("Calibration in distribution: mean confidence − accuracy on test (points, mean ± sd; > 0 is "
                     "overconfident); the tuned temperatures and the Laplace's σ², median [lowest, highest] over the seeds, "
                     "with how many seeds' Laplace (T or σ²) sits at an end of its search range (T 0.01–100, σ² 1e-4–1e4); "
                     "and ECE Laplace − TS paired by seed (points, mean [95% t interval]).", "exit | conf − acc MAP | TS | "
                     "Laplace | TS's T | Laplace T | Laplace σ² | at a range end | ECE Laplace − TS")
    for k in exits:
        bins = {m: [[sum(column) for column in seed] for seed in at(k, "reliability", m)]
                for m in ("MAP", "TS", "Laplace")}  # per seed: count, confidence sum, correct count
        temperatures = at(k, "laplace", "temperature")
        variances = [1.0 / precision for precision in at(k, "laplace", "prior_precision")]
        at_end = sum(K.at_search_end(t, K.KFACLaplace.TEMPERATURE_GRID)
                     or K.at_search_end(v, K.KFACLaplace.PRIOR_VARIANCE_GRID) for t, v in zip(temperatures, variances))
        lines.append(row(k, *(cell([(confidence - correct) / count for count, confidence, correct in bins[m]]) for m in bins),
                         spread(at(k, "ts", "temperature"), ".2f"), spread(temperatures, ".2f"),
                         spread(variances), f"{at_end} of {len(runs)}", t_cell(gap(k, "Laplace", "TS"))))
    for first, second in (("Laplace", "TS"), ("MIE+Laplace", "MIE+TS"), ("MIE+Laplace", "Laplace")):
        verdicts = [resolved(gap(k, first, second)) for k in exits]  # per exit: -1 lower, 1 higher, 0 unresolved
        where = {verdict: listed([k for k in exits if verdicts[k] == verdict]) for verdict in (-1, 0, 1)}
        claims.append(f"ECE, {first} against {second}: lower at exits {where[-1]}, higher at {where[1]}, no resolved "
                      f"difference at {where[0]} (95% t interval over seeds).")
    for alpha, alpha_runs in reports.items():
        lines += section(f"Prediction sets at α = {alpha:g}, tuned on val and measured on test. Setting: the Dirichlet AVCS "
                         "threshold τ (from 1 upward, the authors' tuning) or logit offset b (τ = 1); coverage pooled over "
                         "the seeds with its Wilson 95% interval (inputs independent), per seed, and the t 95% interval over"
                         " the seeds; nestedness |∩_{s≤t} C_s| / |C_t|; ceiling: the share of test (val) inputs whose label "
                         "is in the AVCS support, the most its sets can cover.", "exit | sets | setting | size | coverage | "
                         "Wilson 95% | per seed | t 95% over seeds | nestedness | ceiling test (val)")
        covered = {(k, kind): [r["exits"][k][kind]["coverage"] for r in alpha_runs] for k in exits for _, kind in SET_KINDS}
        trials = [r["n_test"] for r in alpha_runs]
        pooled = {key: sum(c * n for c, n in zip(values, trials)) for key, values in covered.items()}  # covered inputs
        for k, (label, kind) in [(k, kinds) for k in exits for kinds in SET_KINDS]:
            sets, successes = [r["exits"][k][kind] for r in alpha_runs], round(pooled[k, kind])
            t_low, t_high = t_interval(covered[k, kind]) if len(alpha_runs) > 1 else [covered[k, kind][0]] * 2
            setting = next((key for key in ("threshold", "offset") if key in sets[0]), None)
            lines.append(row(k, label, mean_of([s[setting] for s in sets], 2) if setting else "–",
                             mean_of([s["size"] for s in sets], 2), f"{successes / sum(trials):.3f}",
                             "[{:.3f}, {:.3f}]".format(*wilson_interval(successes, sum(trials))),
                             " ".join(f"{c:.2f}" for c in covered[k, kind]), f"[{t_low:.3f}, {t_high:.3f}]",
                             mean_of([s["nestedness"] for s in sets], 3), f"{mean(s['support_ceiling'] for s in sets):.3f} "
                             f"({mean(s['val_support_ceiling'] for s in sets):.3f})" if "support_ceiling" in sets[0] else "–"))
        claims += [f"α = {alpha:g}, {label}: pooled coverage ≥ 1 − α at exits "
                   f"{listed([k for k in exits if pooled[k, kind] / sum(trials) >= 1 - alpha])}; mean size "
                   + " → ".join(f"{mean(r['exits'][k][kind]['size'] for r in alpha_runs):.2f}" for k in exits) + "."
                   for label, kind in SET_KINDS]
    far = lambda *key: [e for r in runs for e in r["far_from_data"] if (e["inputs"], e["exit"], e["method"]) == key]
    scale = lambda *key: [e["median"] for r in runs for e in r["posterior_scale"] if (e["inputs"], e["exit"]) == key]
    for quantity, title in (("mean_max_confidence", "Mean max-probability on inputs far from the data"),
                            ("auroc", "OOD AUROC of the max-probability (in-distribution = test; 0.5 = chance)")):
        auroc = quantity == "auroc"  # its table adds the posterior's scale, and its rows add claims
        lines += section(f"{title}, mean over seeds; the Laplace − TS difference paired by seed, mean [95% t interval]"
                         + ("; the posterior's φ̃ᵀVφ̃ on these inputs over the test images', median over the seeds of the "
                            "ratio of medians." if auroc else "."), "inputs | exit | " + " | ".join(EXIT_METHODS)
                         + " | Laplace − TS" + (" | φ̃ᵀVφ̃ ratio" if auroc else ""))
        for inputs, k in [(i, k) for i in dict.fromkeys(e["inputs"] for r in runs for e in r["far_from_data"]) for k in exits]:
            values = {m: [e[quantity] for e in far(inputs, k, m)] for m in EXIT_METHODS}  # per seed
            difference = [a - b for a, b in zip(values["Laplace"], values["TS"])]
            cells = [inputs, k, *(f"{mean(values[m]):.3f}" for m in EXIT_METHODS), t_cell(difference, 1.0, 3)]
            if auroc:
                ratio = median([a / b for a, b in zip(scale(inputs, k), scale("test", k))])  # phi~^T V phi~ medians
                cells.append(f"{ratio:.3g}")
                verdict = {1: "above", -1: "below", 0: "not resolved from"}[resolved(difference)]
                claims.append(f"{inputs}, exit {k}: the Laplace's AUROC is {verdict} TS's ({t_cell(difference, 1.0, 3)}); "
                              f"φ̃ᵀVφ̃ {ratio:.3g}× the test images'.")
            lines.append(row(*cells))
    lines += section("Budgeted early exit (thresholds on val; test accuracy and ECE %, mean over seeds, against the "
                     "expected GFLOPs per input); every sixth budget level.", "level q | MAP GFLOPs | MAP accuracy | MAP "
                     "ECE | MIE+Laplace GFLOPs | accuracy | ECE")
    curves = {m: [[p for p in r["budget_curve"] if p["method"] == m] for r in runs] for m in ("MAP", "MIE+Laplace")}
    for index in range(0, len(curves["MAP"][0]), 6):
        points = {m: [curve[index] for curve in curves[m]] for m in curves}
        lines.append(row(f"{curves['MAP'][0][index]['level']:.2f}", *(f for m in curves for f in (
            f"{mean(p['expected_flops'] for p in points[m]) / 1e9:.4f}", f"{100 * mean(p['accuracy'] for p in points[m]):.1f}",
            f"{100 * mean(p['ece'] for p in points[m]):.1f}"))))
    return lines + ["", "What holds here (computed from the tables above):", ""] + [f"- {claim}" for claim in claims]


# runs(seeds, fresh_seeds, root) and lines(seeds, fresh_seeds, root) (data-size's take sizes); folder: default --out
Study = namedtuple("Study", "runs lines title seeds fresh_seeds folder", defaults=((), None))
STUDIES = {
    "table": Study(table_runs, table_lines, "The (α, β) selection of every weighting at 12 student epochs",
                   (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)),
    "budget": Study(budget_runs, budget_lines, "Plain KD, dedier, dedier-ts and laplace at their synth defaults (20 student epochs)",
                    tuple(range(10))),
    "lr": Study(lr_runs, lr_lines, "The learning rate of every weighting at 12 student epochs",
                (0, 1, 2, 3, 4), (5, 6, 7, 8, 9), folder="table"),  # it shares the table's runs at lr 0.05
    "data-size": Study(data_size_runs, data_size_lines, "The readout's posterior against a tuned temperature as the "
                       "training set shrinks", tuple(range(10))),
    "exits": Study(exits_runs, exits_lines, f"The exit-level methods on the {EXIT_CLASSES}-class synth benchmark",
                   (0, 1, 2, 3, 4)),
}


# ── Commands, the slot pool, the results file ────────────────────────────────────────────────────────────

def command(run: Run, root: Path, extra: Sequence[str], python: str = "python") -> list[str]:
    """The train.py command of a run, with --resume when its folder holds an interrupted run."""
    folder, teacher = root / run.name, ["--teacher", str(root / run.teacher / "teacher.pt")] if run.teacher else []
    resume = ["--resume"] if (folder / "last.pt").is_file() and not (folder / "metrics.json").is_file() else []
    return [python, "train.py", *run.flags, *teacher, "--out", str(folder), *extra, *resume]


def shard(runs: list[Run], spec: Optional[str]) -> list[Run]:
    """The I-th of N disjoint shares (``spec`` "I/N", 1 <= I <= N): every N-th run from the I-th."""
    return runs if spec is None else runs[int(spec.split("/")[0]) - 1::int(spec.split("/")[1])]


def slot_resources(jobs: int, runs_per_gpu: int, gpus: list[str]) -> list[dict]:
    """Per slot a disjoint share of the cores and GPU slot // runs_per_gpu; exits when --jobs asks for more."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if jobs > len(cores):
        sys.exit(f"sweep.py: error: --jobs {jobs}: more runs than the {len(cores)} cores this process may use would "
                 "share cores; give at most one run per core")
    if gpus and jobs > len(gpus) * runs_per_gpu:
        sys.exit(f"sweep.py: error: --jobs {jobs} needs {jobs} slots, but {len(gpus)} GPUs x --runs-per-gpu "
                 f"{runs_per_gpu} give {len(gpus) * runs_per_gpu}")
    return [{"cores": cores[slot * len(cores) // jobs:(slot + 1) * len(cores) // jobs],
             "gpu": gpus[slot // runs_per_gpu] if gpus else None} for slot in range(jobs)]


def visible_gpus(extra: Sequence[str]) -> list[str]:
    """The GPUs the runs may use (as CUDA_VISIBLE_DEVICES names them); none when the runs are told --device cpu."""
    if "cpu" in [value for flag, value in zip(extra, extra[1:]) if flag == "--device"]:
        return []
    import torch  # only here: printing commands or writing tables needs no torch
    listed = [gpu for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu.strip()]
    return listed[:torch.cuda.device_count()] if listed else [str(i) for i in range(torch.cuda.device_count())]


def launch(runs: list[Run], root: Path, extra: Sequence[str], slots: list[dict]) -> list[str]:
    """Run the unfinished runs, one per slot at a time pinned to its cores (and GPU); returns the failures, a line each."""
    runs = [run for run in runs if not (root / run.name / "metrics.json").is_file()]
    missing = [run for run in runs if run.teacher and not (root / run.teacher / "teacher.pt").is_file()]
    failures = [f"{run.name}: no teacher {root / run.teacher / 'teacher.pt'} (its run failed or has not run)"
                for run in missing]
    waiting, free, running = [run for run in runs if run not in missing], list(range(len(slots))), {}
    total = len(waiting)
    while waiting or running:
        while waiting and free:
            run, slot = waiting.pop(0), free.pop(0)
            cores, gpu, log = slots[slot]["cores"], slots[slot]["gpu"], root / run.name / "train.log"
            env = {**os.environ, "OMP_NUM_THREADS": str(len(cores)), "MKL_NUM_THREADS": str(len(cores)),
                   **({} if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu})}
            log.parent.mkdir(parents=True, exist_ok=True)
            args, out = command(run, root, extra, sys.executable), open(log, "a")
            print(shlex.join(args), file=out, flush=True)
            pin = (lambda: os.sched_setaffinity(0, cores)) if hasattr(os, "sched_setaffinity") else None
            process = subprocess.Popen(args, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=pin)
            running[process.pid] = (process, run, slot, out, log, time.perf_counter())  # a Popen let go would reap it
            print(f"[{total - len(waiting)}/{total}] {run.name} "
                  f"({f'GPU {gpu}' if gpu is not None else 'cores ' + ','.join(map(str, cores))})", flush=True)
        pid, status = os.wait()
        if pid in running:
            process, run, slot, out, log, started = running.pop(pid)
            out.close()
            free.append(slot)
            if code := os.waitstatus_to_exitcode(status):
                tail = log.read_text().strip().splitlines()[-1:]
                failures.append(f"{run.name}: exit {code}: {tail[0] if tail else ''} (log: {log})")
            print(f"    {run.name} {'FAILED' if code else 'done'} in {time.perf_counter() - started:.0f} s", flush=True)
    return failures


def header(title: str, runs: list[Run], root: Path, argv: Sequence[str], sweep_seconds: Optional[float]) -> list[str]:
    """The results file's header: command, code versions, hardware, date, wall time, how many runs have finished."""
    def tally(values) -> str:  # "value (n runs)" per distinct value, the commonest first
        return ", ".join(f"{value} ({n} runs)" for value, n in Counter(values).most_common())
    import kdlaplace as K  # torch: only where tables are written
    metrics = [m for run in runs if (m := load_run(root, run.name)) is not None]
    hardware = tally(f"{m.get('hardware')}, {'bf16 autocast' if m.get('bf16') else 'float32'}, {m.get('threads')} "
                     "threads" for m in metrics)
    wall = "tables only" if sweep_seconds is None else f"{sweep_seconds / 60:.1f} min for this command"
    return [f"# {title}", "", f"- command: `{shlex.join(['python', 'sweep.py', *argv])}`",
            f"- code version: `{K.code_version()}` (the runs: "
            f"{tally(m.get('code_version', 'unknown') for m in metrics) or 'none yet'})",
            f"- hardware of the runs: {hardware or 'none yet'}",
            f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- wall time: {wall}; the finished runs' train.py processes took "
            f"{sum(m.get('wall_seconds') or 0.0 for m in metrics) / 60:.1f} min in all",
            f"- runs finished: {len(metrics)} of {len(runs)} (folders under `{root}`)", ""]


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The sweep's flags, and the train.py flags after ``--``."""
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--study", required=True, choices=list(STUDIES), help="which study")
    add("--seeds", type=int, nargs="+", help="seeds (default: the study's; for table and lr the selection seeds)")
    add("--fresh-seeds", type=int, nargs="*", help="table and lr: seeds that only test the selection (default 5..9)")
    add("--out", help="run folders and the tables (default runs/<study>; runs/table for lr, which shares its runs)")
    add("--jobs", type=int, default=1,
        help="runs at a time, each on a share of the cores; on GPUs see --runs-per-gpu (default 1)")
    add("--runs-per-gpu", type=int, default=1, help="runs packed onto one GPU (default 1)")
    add("--print-commands", choices=["teachers", "students"], help="print a stage's unfinished runs, run nothing")
    add("--shard", help="I/N: only the I-th of N disjoint shares of each stage (1 <= I <= N)")
    add("--tables", action="store_true", help="write the tables from the runs that exist, run nothing")
    add("--sizes", type=int, nargs="+", help=f"data-size: --synth-n-train values (default: {' '.join(map(str, DATA_SIZES))})")
    args = parser.parse_args(own)
    study = STUDIES[args.study]
    args.seeds = list(study.seeds) if args.seeds is None else args.seeds
    args.fresh_seeds = list(study.fresh_seeds) if args.fresh_seeds is None else args.fresh_seeds
    args.out = Path(args.out or f"runs/{study.folder or args.study}")
    both, parts = sorted(set(args.fresh_seeds) & set(args.seeds)), ("1/1" if args.shard is None else args.shard).split("/")
    for bad, message in ((args.fresh_seeds and not study.fresh_seeds,
                          f"--fresh-seeds: the {args.study} study has no selection to test"),
                         (both, f"--fresh-seeds must not repeat a seed of --seeds (both have {both})"),
                         (args.sizes is not None and args.study != "data-size", "--sizes is a flag of --study data-size"),
                         (args.jobs < 1 or args.runs_per_gpu < 1, "--jobs and --runs-per-gpu must be >= 1"),
                         (len(parts) != 2 or not all(p.isdigit() for p in parts) or not 1 <= int(parts[0]) <= int(parts[1]),
                          f"--shard {args.shard}: expected I/N with 1 <= I <= N, e.g. 2/8")):
        if bad:
            parser.error(message)
    return args, extra


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    study, root, started, failures = STUDIES[args.study], args.out, time.perf_counter(), []
    sizes = {"sizes": args.sizes} if args.sizes else {}  # data-size at these sizes only

    def stages() -> tuple[list[Run], list[Run]]:  # the teacher runs, then the student runs
        runs = study.runs(args.seeds, args.fresh_seeds, root, **sizes)
        return [run for run in runs if run.teacher is None], [run for run in runs if run.teacher is not None]
    if args.print_commands:
        for run in shard(stages()[args.print_commands == "students"], args.shard):
            if not (root / run.name / "metrics.json").is_file():
                print(shlex.join(command(run, root, extra)))
        if args.study in ("table", "lr") and args.fresh_seeds and not complete_selection(args.seeds, root):
            waiting = "a weighting's fresh-seed students wait for its" if args.study == "table" else \
                "the lr study's students wait for the table's"
            print(f"sweep.py: {waiting} selection: print them again once the grid's runs have finished", file=sys.stderr)
        return
    if not args.tables:
        slots, launched = slot_resources(args.jobs, args.runs_per_gpu, visible_gpus(extra)), None
        failures += launch(shard(stages()[0], args.shard), root, extra, slots)
        while launched != (students := shard(stages()[1], args.shard)):  # again once a selection adds runs (table)
            failures += launch(students, root, extra, slots)
            launched = students
    lines = header(study.title, [run for stage in stages() for run in stage], root, argv,
                   None if args.tables else time.perf_counter() - started)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{args.study}.md").write_text("\n".join(lines + study.lines(args.seeds, args.fresh_seeds, root, **sizes)) + "\n")
    print(f"wrote {root / f'{args.study}.md'}")
    if failures:
        sys.exit("sweep.py: failed runs:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the runs got the signal too: each keeps its last.pt and resumes from it
        sys.exit("\nsweep.py: interrupted; the same command continues the sweep")
