"""``scoredensity classify DIR``: the diffusion classifier of a class-conditional run on its held-out split:
accuracy, expected calibration error and the confusion matrix (printed and saved as a PNG)."""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

from ._common import (
    add_device_arguments,
    add_threads_argument,
    apply_threads,
    estimator_options,
    load_run_checked,
    net_kind,
    prepare_out_dir,
    resolve_device,
    supported_kwargs,
    warn_if_unfinished,
)

NAME = "classify"
HELP = "classify a run's held-out split with its class-conditional model (density formula per class)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``scoredensity classify``."""
    p.add_argument("run_dir", metavar="DIR", help="run folder written by 'scoredensity train --conditional'")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--n", type=int, default=None, help="first N points of the split (default all)")
    p.add_argument("--budget", type=int, default=None, help="model evaluations per example (default 64 per class)")
    p.add_argument("--weighting", choices=["formula", "uniform"], default="formula")
    p.add_argument("--no-eliminate", action="store_true", help="spend the whole budget on every class")
    p.add_argument("--seed", type=int, default=0, help="estimator seed")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--out", default=None, help="confusion-matrix PNG (default DIR/confusion_<split>.png)")
    add_device_arguments(p)
    add_threads_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Classify; print accuracy, ECE and the confusion matrix; save the PNG. Returns the exit code."""

    from ..apps.classifier import classify, confusion_matrix, expected_calibration_error
    from ..demo import ProgressLog

    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.budget is not None and args.budget < 1:
        raise ValueError(f"--budget must be >= 1, got {args.budget}")
    device = resolve_device(args.device)
    opts = estimator_options(args)
    if args.out:
        prepare_out_dir(Path(args.out).parent)
    model, config, ds = load_run_checked(args.run_dir, ema=not args.raw)
    warn_if_unfinished(config, args.run_dir)
    apply_threads(args, net_kind(config))
    model = model.to(device)
    k = int(config["net"].get("num_classes", 0) or 0)
    if k <= 0:
        raise ValueError(
            f"{args.run_dir}: the model is unconditional; train it with `scoredensity train --conditional` on "
            "labelled data to classify"
        )
    x = ds.x_test if args.split == "test" else ds.x_train
    y = ds.y_test if args.split == "test" else ds.y_train
    if y is None:
        raise ValueError(f"{ds.name!r} has no labels for its {args.split} split")
    if args.n is not None:
        x, y = x[: args.n], y[: args.n]
    bad = (y < 0) | (y >= k)
    if bad.any():
        raise ValueError(
            f"labels {sorted(set(y[bad].tolist()))[:10]} of the {args.split} split are outside the model's trained "
            f"classes 0..{k - 1}"
        )
    xm = ds.to_model(x, dequantize=False) if ds.discrete else ds.to_model(x)  # bin centres for discrete data
    tr = config["train"]
    budget = args.budget or 64 * k
    mb = opts.pop("max_batch", None)
    if mb is not None:  # the classifier may still call it chunk_size (rows per network call)
        opts["max_batch" if "max_batch" in inspect.signature(classify).parameters else "chunk_size"] = mb
    opts = supported_kwargs(classify, opts, "classify")
    log = ProgressLog("classify")  # plain lines when stderr is a log (not a terminal): start, every 10 s, done
    t_start = time.perf_counter()
    log(f"{len(y)} {args.split} examples x {k} classes, budget {budget} evaluations per example, on {device}")
    with log.every(lambda: f"classifying, {time.perf_counter() - t_start:.0f} s elapsed"):
        res = classify(
            model,
            xm.to(device),
            list(range(k)),
            weighting=args.weighting,
            budget=budget,
            eliminate=not args.no_eliminate,
            lam_min=tr.get("lam_min", -20.0),
            lam_max=tr.get("lam_max", 20.0),
            seed=args.seed,
            **opts,
        )
    log(f"done in {time.perf_counter() - t_start:.1f} s, {float(res.nfe.mean()):.0f} evaluations per example")
    acc = res.accuracy(y)
    ece = expected_calibration_error(res.probabilities(), y, res.classes)
    cm = confusion_matrix(y, res.prediction, res.classes)
    png = Path(args.out) if args.out else Path(args.run_dir) / f"confusion_{args.split}.png"
    _plot_confusion(cm, res.classes, png, f"{ds.name} {args.split}: accuracy {acc:.3f}, ECE {ece:.3f}")
    out = {
        "run_dir": str(args.run_dir),
        "split": args.split,
        "n": len(y),
        "weighting": args.weighting,
        "accuracy": acc,
        "ece": ece,
        "nfe_per_example": float(res.nfe.mean()),
        "budget": budget,
        "confusion": cm.tolist(),
        "png": str(png),
        "step": config.get("step"),
        "device": str(device),
        "precision": args.precision,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{ds.name} ({args.split}, n={len(y)}, {args.weighting} weighting, {out['nfe_per_example']:.0f} NFE/example)")
    print(f"  accuracy {acc:.4f}   expected calibration error {ece:.4f}")
    print("  confusion matrix (rows: true, columns: predicted)")
    w = max(4, len(str(int(cm.max()))) + 1)
    print("    " + "".join(f"{c:>{w}}" for c in res.classes))
    for c, row in zip(res.classes, cm.tolist(), strict=True):
        print(f"  {c:>2}" + "".join(f"{v:>{w}}" for v in row))
    print(f"wrote {png}")
    return 0


def _plot_confusion(cm, classes, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(classes), 1 + 0.45 * len(classes)))
    ax.imshow(cm.numpy(), cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            v = int(cm[i, j])
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="w" if v > cm.max() / 2 else "k")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    ax.title.set_fontsize(8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
