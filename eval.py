"""Evaluate every exit of a trained network: calibration (MAP, temperature scaling, Laplace, and each inside the
model-internal ensemble), prediction sets (AVCS and split conformal), inputs far from the data, and the budgeted
early-exit curve.

    python eval.py runs/synth/laplace-seed0                         # the run's student.pt
    python eval.py runs/waterbirds/laplace-seed0/teacher.pt --data-root DIR --json report.json --plot figures/

Per exit (Meronen et al. 2024's table): MAP, TS (a temperature tuned on val NLL), Laplace (the KFAC last-layer
posterior fit on train, (T, sigma^2) tuned on val NLL), MIE, MIE+TS and MIE+Laplace (each exit's T or (T, sigma^2)
tuned greedily inside the ensemble), each with top-1, top-5 (c >= 5), NLPD, ECE and worst-group accuracy on test.
Sets at level alpha: Dirichlet AVCS (Jazbec et al. 2024) with the authors' thresholds and with logit offsets tuned
on val, Laplace-AVCS, and split conformal (LAC) with and without the running intersection. Far from the data: the
test images scaled by delta (Kristiadi et al. 2020), uniform noise and, on synth, unseen shapes (below 10 classes)
and colours (above 2): mean max-probability and its OOD AUROC per exit and method, and the spread of phi~^T V phi~.
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
METHODS = ("MAP", "TS", "Laplace", "MIE", "MIE+TS", "MIE+Laplace")
INPUT_SCALES = (2, 5, 10, 100)  # delta of the far-away inputs delta x
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


def ensemble_temperatures(logits_val: torch.Tensor, y_val: torch.Tensor, flops: list[int]) -> list[float]:
    """MIE+TS: exit k's temperature minimises the val NLL of the FLOP-weighted ensemble of exits <= k, earlier exits
    fixed (the greedy rule of K.tune_laplace_ensemble). ``logits_val`` (K, N, c)."""
    temperatures, weighted_sum, weight_total = [], 0.0, 0.0
    for logits, exit_flops in zip(logits_val.double(), flops):
        temperature = K.tune_temperature(logits, y_val, lambda probs: K.nlpd(
            (weighted_sum + exit_flops * probs) / (weight_total + exit_flops), y_val))
        temperatures.append(temperature)
        weighted_sum = weighted_sum + exit_flops * torch.softmax(logits / temperature, -1)  # (N, c)
        weight_total += exit_flops
    return temperatures


def support_ceiling(logits: torch.Tensor, y: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """P(z_y >= tau_t and z_y > 0) per exit (K,): the share of inputs whose label is in the Dirichlet AVCS support,
    the most that its sets can cover. ``logits`` (K, N, c)."""
    label_logits = logits.gather(-1, y[None, :, None].expand(logits.shape[0], -1, 1)).squeeze(-1)  # (K, N)
    return ((label_logits >= thresholds[:, None]) & (label_logits > 0)).double().mean(-1)


def prediction_sets(logits_val: torch.Tensor, y_val: torch.Tensor, test: tuple, y_test: torch.Tensor, probs: dict,
                    laplaces: list[K.KFACLaplace], args: argparse.Namespace, seed: int, device: torch.device) -> dict:
    """Per-exit size, coverage and nestedness on test of: the Dirichlet AVCS with the authors' thresholds (tau from
    1 upward, tuned on val; also without the running intersection) and with per-exit logit offsets tuned on val
    (tau = 1), each with its support ceiling; the Laplace-AVCS; split conformal sets of the MAP softmax (LAC) per exit
    and with the running intersection. ``test`` is predict_split's (logits (K, N, c), features); ``probs`` maps
    split -> method -> (K, N, c)."""
    thresholds = K.tune_avcs(logits_val, y_val, args.alpha, generator=K.seeded_generator(seed, device))
    log_ratios = K.dirichlet_log_ratios(test[0], thresholds, K.seeded_generator(seed, device))  # (K, N, c): one draw
    avcs = K.set_metrics(K.nested_sets(log_ratios, args.alpha, intersect=True), y_test)
    avcs_plain = K.set_metrics(K.nested_sets(log_ratios, args.alpha, intersect=False), y_test)
    offsets = K.tune_avcs(logits_val, y_val, args.alpha, "offset", generator=K.seeded_generator(seed, device))  # (K,)
    shifted_val, shifted_test = logits_val.double() + offsets[:, None, None], test[0].double() + offsets[:, None, None]
    ones = torch.ones_like(offsets)
    offset_sets = K.avcs_sets(shifted_test, ones, args.alpha, generator=K.seeded_generator(seed, device))
    laplace_sets = K.laplace_avcs_sets(laplaces, test[1], args.alpha, args.n_samples, True,
                                       K.seeded_generator(seed, device))
    conformal = {intersect: K.set_metrics(K.conformal_sets(probs["val"]["MAP"], y_val, probs["test"]["MAP"],
                                                           args.alpha, intersect), y_test) for intersect in (False, True)}
    return {"avcs": {"threshold": thresholds, **avcs, "nestedness_without_intersection": avcs_plain["nestedness"],
                     "support_ceiling": support_ceiling(test[0], y_test, thresholds),
                     "val_support_ceiling": support_ceiling(logits_val, y_val, thresholds)},
            "avcs_offset": {"offset": offsets, **K.set_metrics(offset_sets, y_test),
                            "support_ceiling": support_ceiling(shifted_test, y_test, ones),
                            "val_support_ceiling": support_ceiling(shifted_val, y_val, ones)},
            "laplace_avcs": K.set_metrics(laplace_sets, y_test),
            "conformal": conformal[False], "conformal_nested": conformal[True]}


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
    predict = lambda split, scale=1.0: K.predict_split(model, split, data.mean, data.std, device, amp=amp,  # noqa: E731
                                                       input_scale=scale)  # (logits (K, N, c), [features (N, p_k)])
    outputs = {name: predict(split) for name, split in splits.items()}
    val, test = splits["val"], splits["test"]

    # Laplace per exit: fit on train, tune on val alone (+Laplace) and greedily within the ensemble (+MIE+Laplace);
    # temperature scaling the same two ways (every random computation starts from its own K.seeded_generator(seed):
    # the figures of one exit never depend on what ran before, and the readout's equal train.py's metrics.json)
    tuned = [K.tuned_exit_laplace(model.heads[k].linear, outputs["train"][1][k], outputs["val"][1][k], val.labels,
                                  args.n_samples, seed) for k in range(n_exits)]
    tuned_mie = K.tune_laplace_ensemble(tuned, outputs["val"][1], val.labels, flops, n_samples=args.n_samples,
                                        generator=K.seeded_generator(seed, device))
    temperatures = torch.tensor([K.tune_temperature(outputs["val"][0][k], val.labels) for k in range(n_exits)])  # (K,)
    temperatures_mie = torch.tensor(ensemble_temperatures(outputs["val"][0], val.labels, flops))  # (K,)

    def method_probs(logits: torch.Tensor, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every method's predictive (K, N, c) of one pass."""
        laplace = lambda models: torch.stack([m.predict(features[k], args.n_samples,  # noqa: E731
                                                        generator=K.seeded_generator(seed, device))
                                              for k, m in enumerate(models)])  # (K, N, c)
        scaled = lambda t: torch.softmax(logits / t.to(logits)[:, None, None], -1)  # noqa: E731
        probs = {"MAP": torch.softmax(logits, -1), "TS": scaled(temperatures), "Laplace": laplace(tuned)}
        probs.update({"MIE": K.mie_ensemble(probs["MAP"], flops), "MIE+TS": K.mie_ensemble(scaled(temperatures_mie), flops),
                      "MIE+Laplace": K.mie_ensemble(laplace(tuned_mie), flops)})
        return probs

    probs = {split: method_probs(*outputs[split]) for split in ("val", "test")}
    sets = prediction_sets(outputs["val"][0], val.labels, outputs["test"], test.labels, probs, tuned, args, seed, device)
    tuned_values = [(f"{method} {name}", k, value, grid) for k in range(n_exits) for method, laplace in
                    (("Laplace", tuned[k]), ("MIE+Laplace", tuned_mie[k]))
                    for name, value, grid in (("T", laplace.temperature, K.KFACLaplace.TEMPERATURE_GRID),
                                              ("sigma^2", 1 / laplace.prior_precision, K.KFACLaplace.PRIOR_VARIANCE_GRID))]
    tuned_values += [(f"{method} T", k, float(values[k]), K.KFACLaplace.TEMPERATURE_GRID) for k in range(n_exits)
                     for method, values in (("TS", temperatures), ("MIE+TS", temperatures_mie))]
    notes = [f"exit {k}: the {what} = {value:.3g} is an end of its search range, not a minimum"
             for what, k, value, grid in tuned_values if K.at_search_end(value, grid)]
    exits = []
    for k in range(n_exits):
        exits.append({
            "exit": k, "flops": flops[k],
            "laplace": {"temperature": tuned[k].temperature, "prior_precision": tuned[k].prior_precision},
            "ts": {"temperature": float(temperatures[k]), "ensemble_temperature": float(temperatures_mie[k])},
            **{m: K.classification_metrics(probs["test"][m][k], test.labels, test.groups, data.n_groups)
               for m in METHODS},
            **{key: {name: float(values[k]) for name, values in metrics.items()} for key, metrics in sets.items()},
            "reliability": {m: [t.tolist() for t in K.reliability_bins(probs["test"][m][k], test.labels)]
                            for m in ("MAP", "TS", "Laplace")}})  # per bin: count, confidence sum, correct count
    curves = {m: budget_curve(probs["val"][m], probs["test"][m], test.labels, flops) for m in ("MAP", "MIE+Laplace")}
    far, scales = far_from_data(data, test, outputs["test"][1], probs["test"], predict, method_probs, tuned, seed)
    return {"checkpoint": str(path), "dataset": data.name, "alpha": args.alpha, "n_samples": args.n_samples,
            "seed": seed, "n_test": len(test), "notes": notes,
            "exits": exits, "budget_curve": [{"method": m, **point} for m, points in curves.items() for point in points],
            "far_from_data": far, "posterior_scale": scales}


def far_from_data(data: K.SpuriousDataset, test: K.Split, test_features: list[torch.Tensor], test_probs: dict,
                  predict, method_probs, laplaces: list[K.KFACLaplace], seed: int) -> tuple[list[dict], list[dict]]:
    """Rows {inputs, exit, method, mean_max_confidence, auroc} for each kind of input far from the data (the test
    images scaled by delta, uniform noise, and on synth unseen shapes and colours where make_synth_far_inputs makes
    them; AUROC of the max probability, in-distribution = test), and rows {inputs, exit, median, q10, q90} of the
    posterior's phi~^T V phi~ (test too)."""
    generator = torch.Generator().manual_seed(seed)
    kinds = {f"test x{delta}": (test, delta) for delta in INPUT_SCALES}
    images = {"uniform noise": torch.randint(0, 256, tuple(test.images.shape), generator=generator, dtype=torch.uint8)}
    if data.name == "synth":
        images.update(K.make_synth_far_inputs(len(test), data.image_size, data.n_classes, seed))
    zeros = torch.zeros(len(test), dtype=torch.long)
    kinds.update({name: (K.Split(x, zeros, zeros), 1.0) for name, x in images.items()})
    quantiles = torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64)

    def scale_rows(name: str, features: list[torch.Tensor]) -> list[dict]:
        rows = []
        for k, laplace in enumerate(laplaces):
            median, low, high = torch.quantile(laplace.logit_distribution(features[k].double())[1].cpu(), quantiles).tolist()
            rows.append({"inputs": name, "exit": k, "median": median, "q10": low, "q90": high})
        return rows

    far, scales = [], scale_rows("test", test_features)
    for name, (split, delta) in kinds.items():
        logits, features = predict(K.split_to_device(split, test_features[0].device), delta)
        far_probs = method_probs(logits, features)
        for method in METHODS:
            confidence_in, confidence_out = test_probs[method].max(-1).values, far_probs[method].max(-1).values  # (K, N)
            far += [{"inputs": name, "exit": k, "method": method, "mean_max_confidence": float(confidence_out[k].mean()),
                     "auroc": K.auroc(confidence_in[k], confidence_out[k])} for k in range(len(laplaces))]
        scales += scale_rows(name, features)
    return far, scales


def print_report(result: dict) -> None:
    print(f"{result['checkpoint']} on {result['dataset']} test")
    has_top5 = "top5" in result["exits"][0]["MAP"]
    columns = ["top1"] + (["top5"] if has_top5 else []) + ["nlpd", "ece", "worst_group_acc"]
    print(f"\n{'exit':>4s} {'GFLOPs':>8s} {'method':12s} " + " ".join(f"{c:>15s}" for c in columns))
    for e in result["exits"]:
        for m in METHODS:
            print(f"{e['exit']:4d} {e['flops'] / 1e9:8.4f} {m:12s} " + " ".join(f"{e[m][c]:15.4f}" for c in columns))
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"\nprediction sets, alpha = {result['alpha']}: size, coverage, nestedness per exit (AVCS: tau from 1 "
          f"upward; AVCS+b: logit offset b, tau = 1; ceiling: P(z_y >= tau, z_y > 0); conformal: LAC, nested: with "
          f"the running intersection)")
    kinds = (("AVCS", "avcs"), ("AVCS+b", "avcs_offset"), ("Laplace-AVCS", "laplace_avcs"), ("conformal", "conformal"),
             ("conformal nested", "conformal_nested"))
    print(f"{'exit':>4s} {'sets':17s} {'setting':>8s} {'size':>7s} {'cov':>7s} {'nest':>7s} {'ceiling':>8s}")
    for e in result["exits"]:
        for label, key in kinds:
            sets = e[key]
            setting = sets.get("threshold", sets.get("offset"))
            print(f"{e['exit']:4d} {label:17s} {'' if setting is None else f'{setting:8.2f}':>8s} {sets['size']:7.3f} "
                  f"{sets['coverage']:7.3f} {sets['nestedness']:7.3f} "
                  f"{'' if 'support_ceiling' not in sets else format(sets['support_ceiling'], '8.3f'):>8s}")
    print("\nfar from the data: mean max-probability / OOD AUROC (max probability; in-distribution = test)")
    print(f"{'inputs':16s} {'exit':>4s} " + " ".join(f"{m:>14s}" for m in METHODS) + f" {'phi~Vphi~ median':>17s}")
    scale = {(r["inputs"], r["exit"]): r["median"] for r in result["posterior_scale"]}
    rows = {(r["inputs"], r["exit"], r["method"]): r for r in result["far_from_data"]}
    for inputs, k in dict.fromkeys((r["inputs"], r["exit"]) for r in result["far_from_data"]):
        cells = [f"{rows[inputs, k, m]['mean_max_confidence']:.3f}/{rows[inputs, k, m]['auroc']:.3f}" for m in METHODS]
        print(f"{inputs:16s} {k:4d} " + " ".join(f"{c:>14s}" for c in cells)
              + f" {scale[inputs, k]:10.3g} ({scale[inputs, k] / scale['test', k]:.3g}x)")
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
    for name, key in (("AVCS", "avcs"), ("AVCS+b", "avcs_offset"), ("Laplace-AVCS", "laplace_avcs"),
                      ("conformal", "conformal")):
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
