"""Evaluate every exit of a trained network: calibration with and without Laplace and MIE, anytime-valid
prediction sets, and the budgeted early-exit curve.

    python eval.py runs/synth/laplace-seed0                         # the run's student.pt
    python eval.py runs/waterbirds/laplace-seed0/teacher.pt --data-root DIR --json report.json --plot figures/

Per exit (Meronen et al. 2024's table): MAP, +Laplace, +MIE, +MIE+Laplace, each with top-1, top-5 (c >= 5),
NLPD, ECE and worst-group accuracy on test; the KFAC Laplace is fit on train, (T, sigma^2) tuned on val.
Sets (Jazbec et al. 2024): Dirichlet AVCS with thresholds tuned on val, and Laplace-AVCS.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

import kdlaplace as K

BUDGET_LEVELS = [j / 20 for j in range(1, 40)]  # Meronen et al.'s budget levels q
PRINTED_LEVEL_STRIDE = 6  # the printed excerpt of the budget curve: every 6th level (the JSON holds all 39)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run folder (its student.pt is used) or a .pt checkpoint")
    parser.add_argument("--data-root", help="dataset folder (default: the run's, if it still exists, else "
                                            "$KDLAPLACE_DATA/<dataset> or ./data/<dataset>)")
    parser.add_argument("--n-samples", type=int, default=50, help="MC samples of the Laplace predictive (default: 50)")
    parser.add_argument("--alpha", type=float, default=0.05, help="miscoverage level of the sets (default: 0.05)")
    parser.add_argument("--json", help="write the tables to this JSON file")
    parser.add_argument("--plot", help="write PNG figures to this folder (needs matplotlib)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the MC samples and Dirichlet draws (default: the run's seed, so the readout's "
                             "figures equal its metrics.json)")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1:
        parser.error("--alpha must be in (0, 1)")
    if args.n_samples < 1:
        parser.error("--n-samples must be >= 1")
    return args


def resolve_checkpoint(path: Path) -> Path:
    if path.is_dir():
        path = path / "student.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (give a run folder with student.pt, or a .pt file)")
    return path


def budget_curve(probs_val: torch.Tensor, probs_test: torch.Tensor, y_test: torch.Tensor, flops: list[int]) -> list[dict]:
    """Accuracy, NLPD and ECE against expected FLOPs for each budget level (thresholds from val)."""
    flops_t = torch.tensor(flops, dtype=torch.float64, device=probs_test.device)
    curve = []
    for level in BUDGET_LEVELS:
        thresholds = K.budget_thresholds(probs_val.max(-1).values, level)
        exit_index, probs = K.early_exit(probs_test, thresholds)
        curve.append({"level": level, "expected_flops": float(flops_t[exit_index].mean()),
                      "accuracy": float((probs.argmax(-1) == y_test).double().mean()),
                      "nlpd": K.nlpd(probs, y_test), "ece": K.expected_calibration_error(probs, y_test)})
    return curve


def prediction_sets(logits_val: torch.Tensor, y_val: torch.Tensor, test: tuple, y_test: torch.Tensor,
                    laplaces: list[K.KFACLaplace], args: argparse.Namespace, seed: int, device: torch.device) -> dict:
    """Per-exit size, coverage and nestedness on test of the Dirichlet AVCS (thresholds tuned on val; also without
    the running intersection) and of the Laplace-AVCS. ``test`` is predict_split's (logits (K, N, c), features)."""
    thresholds = K.tune_avcs_thresholds(logits_val, y_val, args.alpha, generator=K.seeded_generator(seed, device))
    log_ratios = K.dirichlet_log_ratios(test[0], thresholds, K.seeded_generator(seed, device))  # (K, N, c): one draw
    avcs = K.set_metrics(K.nested_sets(log_ratios, args.alpha, intersect=True), y_test)
    avcs_plain = K.set_metrics(K.nested_sets(log_ratios, args.alpha, intersect=False), y_test)
    laplace_sets = K.laplace_avcs_sets(laplaces, test[1], args.alpha, args.n_samples, True,
                                       K.seeded_generator(seed, device))
    return {"avcs": {"threshold": thresholds, **avcs, "nestedness_without_intersection": avcs_plain["nestedness"]},
            "laplace_avcs": K.set_metrics(laplace_sets, y_test)}


def report(args: argparse.Namespace) -> dict:
    path = resolve_checkpoint(Path(args.checkpoint))
    checkpoint = K.load_checkpoint(path)
    if "config" not in checkpoint:
        raise ValueError(f"{path} has no run configuration (it was not written by train.py)")
    config = dict(checkpoint["config"])  # the run's flags: the same data and precision as training
    if args.data_root:
        config["data_root"] = args.data_root
    elif config.get("data_root") and not Path(config["data_root"]).expanduser().is_dir():  # the run moved
        config["data_root"] = None  # the default rule
    seed = config["seed"] if args.seed is None else args.seed
    K.use_allowed_cores()
    device = K.pick_device(args.device)
    data = K.load_run_data(config)
    if checkpoint["model_config"]["n_classes"] != data.n_classes:
        raise ValueError(f"{path} has {checkpoint['model_config']['n_classes']} classes; {data.name} has {data.n_classes}")
    amp = K.run_uses_bf16(config, device)
    model = K.model_to_device(K.model_from_checkpoint(checkpoint), device, amp)
    n_exits, flops = len(model.heads), model.exit_flops
    splits = K.splits_to_device(data, device)
    outputs = {name: K.predict_split(model, split, data.mean, data.std, device, amp=amp)
               for name, split in splits.items()}  # name -> (logits (K, N, c), [features (N, p_k)])
    val, test = splits["val"], splits["test"]

    # Laplace per exit: fit on train, tune on val alone (+Laplace) and greedily within the ensemble (+MIE+Laplace)
    # (every random computation starts from its own K.seeded_generator(seed): the figures of one exit never depend
    # on what ran before, and the readout's equal train.py's metrics.json)
    tuned = [K.tuned_exit_laplace(model.heads[k].linear, outputs["train"][1][k], outputs["val"][1][k], val.labels,
                                  args.n_samples, seed) for k in range(n_exits)]
    tuned_mie = K.tune_laplace_ensemble(tuned, outputs["val"][1], val.labels, flops, n_samples=args.n_samples,
                                        generator=K.seeded_generator(seed, device))

    def laplace_probs(models: list[K.KFACLaplace], split: str) -> torch.Tensor:
        return torch.stack([m.predict(outputs[split][1][k], args.n_samples, generator=K.seeded_generator(seed, device))
                            for k, m in enumerate(models)])  # (K, N, c)

    probs = {split: {"MAP": torch.softmax(outputs[split][0], -1), "Laplace": laplace_probs(tuned, split),
                     "MIE+Laplace": K.mie_ensemble(laplace_probs(tuned_mie, split), flops)} for split in ("val", "test")}
    for split in ("val", "test"):
        probs[split]["MIE"] = K.mie_ensemble(probs[split]["MAP"], flops)
    methods = ["MAP", "Laplace", "MIE", "MIE+Laplace"]

    sets = prediction_sets(outputs["val"][0], val.labels, outputs["test"], test.labels, tuned, args, seed, device)
    exits = []
    for k in range(n_exits):
        exits.append({
            "exit": k, "flops": flops[k],
            "laplace": {"temperature": tuned[k].temperature, "prior_precision": tuned[k].prior_precision},
            **{m: K.classification_metrics(probs["test"][m][k], test.labels, test.groups, data.n_groups)
               for m in methods},
            **{key: {name: float(values[k]) for name, values in metrics.items()} for key, metrics in sets.items()},
            "reliability": {m: [t.tolist() for t in K.reliability_bins(probs["test"][m][k], test.labels)]
                            for m in ("MAP", "Laplace")}})  # per bin: count, confidence sum, correct count
    curves = {m: budget_curve(probs["val"][m], probs["test"][m], test.labels, flops) for m in ("MAP", "MIE+Laplace")}
    return {"checkpoint": str(path), "dataset": data.name, "alpha": args.alpha, "n_samples": args.n_samples,
            "seed": seed, "n_test": len(test),
            "exits": exits, "budget_curve": [{"method": m, **point} for m, points in curves.items() for point in points]}


def print_report(result: dict) -> None:
    print(f"{result['checkpoint']} on {result['dataset']} test")
    has_top5 = "top5" in result["exits"][0]["MAP"]
    columns = ["top1"] + (["top5"] if has_top5 else []) + ["nlpd", "ece", "worst_group_acc"]
    print(f"\n{'exit':>4s} {'GFLOPs':>8s} {'method':12s} " + " ".join(f"{c:>15s}" for c in columns))
    for e in result["exits"]:
        for m in ("MAP", "Laplace", "MIE", "MIE+Laplace"):
            print(f"{e['exit']:4d} {e['flops'] / 1e9:8.4f} {m:12s} " + " ".join(f"{e[m][c]:15.4f}" for c in columns))
    print(f"\nprediction sets, alpha = {result['alpha']} (size, coverage, nestedness; nestedness w/o intersection)")
    print(f"{'exit':>4s} {'tau':>6s} {'AVCS size':>10s} {'cov':>7s} {'nest':>7s} {'nest*':>7s}   "
          f"{'Laplace-AVCS size':>18s} {'cov':>7s} {'nest':>7s}")
    for e in result["exits"]:
        a, la = e["avcs"], e["laplace_avcs"]
        print(f"{e['exit']:4d} {a['threshold']:6.2f} {a['size']:10.3f} {a['coverage']:7.3f} {a['nestedness']:7.3f} "
              f"{a['nestedness_without_intersection']:7.3f}   {la['size']:18.3f} {la['coverage']:7.3f} {la['nestedness']:7.3f}")
    print("\nbudgeted early exit (MIE+Laplace): expected GFLOPs -> accuracy, NLPD, ECE")
    for point in [p for p in result["budget_curve"] if p["method"] == "MIE+Laplace"][::PRINTED_LEVEL_STRIDE]:
        print(f"  q={point['level']:.2f}  {point['expected_flops'] / 1e9:8.4f}  {point['accuracy']:.4f}  "
              f"{point['nlpd']:.4f}  {point['ece']:.4f}")


def plot_report(result: dict, folder: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("eval.py: --plot needs matplotlib: pip install matplotlib (the tables above are complete without it)",
              file=sys.stderr)
        return
    folder.mkdir(parents=True, exist_ok=True)
    exits = result["exits"]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    x = [e["exit"] for e in exits]
    for name, key in (("AVCS", "avcs"), ("Laplace-AVCS", "laplace_avcs")):
        axes[0].plot(x, [e[key]["size"] for e in exits], "o-", label=name)
        axes[1].plot(x, [e[key]["coverage"] for e in exits], "o-", label=name)
    axes[1].axhline(1 - result["alpha"], color="grey", linestyle="--", label="1 - alpha")
    axes[0].set(xlabel="exit", ylabel="mean set size")
    axes[1].set(xlabel="exit", ylabel="coverage")
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(folder / "sets.png", dpi=120)
    figure, axes = plt.subplots(1, len(exits), figsize=(3 * len(exits), 3.2), squeeze=False)
    for axis, e in zip(axes[0], exits):
        for method, bins in e["reliability"].items():
            counts, confidence, correct = (torch.tensor(v) for v in bins)
            filled = counts > 0
            axis.plot(confidence[filled] / counts[filled], correct[filled] / counts[filled], "o-", label=method)
        axis.plot([0, 1], [0, 1], color="grey", linestyle="--")
        axis.set(title=f"exit {e['exit']}", xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(folder / "reliability.png", dpi=120)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for method in ("MAP", "MIE+Laplace"):
        points = [p for p in result["budget_curve"] if p["method"] == method]
        axis.plot([p["expected_flops"] / 1e9 for p in points], [p["accuracy"] for p in points], ".-", label=method)
    axis.set(xlabel="expected GFLOPs per input", ylabel="test accuracy")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "budget.png", dpi=120)
    plt.close("all")
    print(f"wrote {folder}/reliability.png, sets.png, budget.png")


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    try:
        result = report(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, FileNotFoundError) as error:
        print(f"eval.py: error: {error}", file=sys.stderr)
        sys.exit(1)
    print_report(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot_report(result, Path(args.plot))


if __name__ == "__main__":
    main()
