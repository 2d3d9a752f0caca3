"""The diffusion classifier (issue 7, part 2): accuracy against model evaluations per example, with and without
common random numbers (CRN), antithetic z and adaptive elimination, formula vs uniform weights.

* Mixtures with their exact class-conditional eps (classes = components), where the Bayes classifier is the
  ceiling: ``overlap3`` (three overlapping 2-D components, Bayes accuracy about 0.88) and ``ring8-wide`` (the
  ring of 8 with standard deviation 0.9 instead of 0.35, eight overlapping classes).
* Digits with a class-conditional MLP trained by ``scoredensity train --conditional`` (label dropout 0.1),
  classified at the bin centres of the test split.

Reference line on the same split: scikit-learn's ``LogisticRegression`` (fitted on the training split).

Run: python benchmarks/classifier.py [--quick] [--digits-run DIR] [--out bench_out/classifier]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from scoredensity.apps.classifier import (
    MixtureClassConditional,
    bayes_log_posterior,
    classify,
    expected_calibration_error,
)
from scoredensity.mixtures import GaussianMixture, mixture_preset

CONFIGS = {
    "formula, CRN + antithetic + elimination (default)": dict(),
    "formula, CRN + antithetic": dict(eliminate=False),
    "formula, CRN, no antithetic": dict(eliminate=False, antithetic=False),
    "formula, independent draws per class": dict(eliminate=False, common_random_numbers=False),
    "uniform weights, CRN + antithetic": dict(weighting="uniform", eliminate=False),
    "uniform weights, independent draws (literature)": dict(
        weighting="uniform", eliminate=False, common_random_numbers=False, antithetic=False
    ),
}


def overlap3() -> GaussianMixture:
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]], dtype=torch.float64)
    covs = torch.tensor(
        [[[0.5, 0.2], [0.2, 0.4]], [[0.3, 0.0], [0.0, 0.6]], [[0.4, 0.0], [0.0, 0.4]]], dtype=torch.float64
    )
    return GaussianMixture(means, covs, torch.tensor([0.4, 0.35, 0.25], dtype=torch.float64))


def ring8_wide() -> GaussianMixture:
    r = mixture_preset("ring8")
    return GaussianMixture(r.means, 0.81 * torch.eye(2, dtype=torch.float64).expand(8, 2, 2).clone(), r.weights)


def logistic_reference(xtr, ytr, xte, yte) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=5000).fit(xtr.flatten(1).numpy(), ytr.numpy())
    return float(clf.score(xte.flatten(1).numpy(), yte.numpy()))


def sweep(model, x, y, classes, log_prior, per_class_budgets, bayes_pred=None, configs=CONFIGS):
    rows = []
    for name, kw in configs.items():
        for per in per_class_budgets:
            budget = per * len(classes)
            t0 = time.perf_counter()
            rs = min(32, per)  # one round must fit in the budget
            res = classify(model, x, classes, log_prior=log_prior, budget=budget, round_size=rs, **kw)
            secs = time.perf_counter() - t0
            row = {
                "config": name,
                "budget_per_class": per,
                "nfe": float(res.nfe.mean()),
                "accuracy": res.accuracy(y),
                "ece": expected_calibration_error(res.probabilities(), y, res.classes),
                "seconds": secs,
            }
            if bayes_pred is not None:
                row["agree_bayes"] = float((res.prediction == bayes_pred).double().mean())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows, bayes: bool) -> list[str]:
    head = "| configuration | budget/class | NFE/example | accuracy | " + ("agreement with Bayes | " if bayes else "")
    head += "ECE | s |"
    lines = [head, "|" + "---|" * (6 + bayes)]
    for r in rows:
        agree = f"{r['agree_bayes']:.4f} | " if bayes else ""
        lines.append(
            f"| {r['config']} | {r['budget_per_class']} | {r['nfe']:.0f} | {r['accuracy']:.4f} | {agree}"
            f"{r['ece']:.4f} | {r['seconds']:.1f} |"
        )
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items(), strict=True):
        paired = res.get("bayes") is not None  # mixtures: agreement with the Bayes decisions (a paired measure)
        key = "agree_bayes" if paired else "accuracy"
        for cfg in CONFIGS:
            rs = [r for r in res["rows"] if r["config"] == cfg]
            if rs:
                ax.plot([r["nfe"] for r in rs], [r[key] for r in rs], "o-", label=cfg, ms=3)
        if not paired:
            ax.axhline(res["logistic"], color="grey", ls=":", label="LogisticRegression")
        ylabel = "agreement with the Bayes classifier" if paired else "accuracy"
        title = f"{name} (Bayes acc. {res['bayes']:.3f}, logistic {res['logistic']:.3f})" if paired else name
        ax.set(xscale="log", xlabel="model evaluations per example", ylabel=ylabel, title=title)
        ax.title.set_fontsize(9)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_digits(run_dir: Path, steps: int) -> None:
    cmd = [sys.executable, "-m", "scoredensity", "train", "--data", "digits", "--net", "mlp", "--conditional"]
    cmd += ["--steps", str(steps), "--out", str(run_dir), "--threads", "1", "--no-progress", "--eval-n", "0"]
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench_out/classifier")
    ap.add_argument("--digits-run", default=None, help="a conditional digits run to reuse (else one is trained)")
    ap.add_argument("--digits-steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", default=None, help="only redraw the figure from a bench_classifier.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), out / "classifier_accuracy.png")
        return
    out.mkdir(parents=True, exist_ok=True)
    n = 500 if args.quick else 2000
    budgets = (16, 64) if args.quick else (16, 32, 64, 128, 256)
    results = {}
    for name, gm in (("overlap3", overlap3()), ("ring8-wide", ring8_wide())):
        g = torch.Generator().manual_seed(args.seed)
        xtr, ytr = gm.sample(n, generator=g, return_labels=True)
        x, y = gm.sample(n, generator=g, return_labels=True)
        bayes = bayes_log_posterior(gm, x).argmax(1)
        classes = list(range(gm.num_components))
        rows = sweep(MixtureClassConditional(gm), x, y, classes, gm.weights.log(), budgets, bayes)
        results[name] = {
            "rows": rows,
            "bayes": float((bayes == y).double().mean()),
            "logistic": logistic_reference(xtr, ytr, x, y),
            "n": n,
        }
    # digits with a trained class-conditional network
    from scoredensity.checkpoint import load_run

    run_dir = Path(args.digits_run) if args.digits_run else out / "_classifier_digits_run"
    if not args.digits_run:
        train_digits(run_dir, 300 if args.quick else args.digits_steps)
    model, config, ds = load_run(run_dir)
    xte = ds.to_model(ds.x_test, dequantize=False)
    xtr = ds.to_model(ds.x_train, dequantize=False)
    if args.quick:
        xte, yte = xte[:100], ds.y_test[:100]
    else:
        yte = ds.y_test
    tr = config["train"]
    digit_cfgs = {k: {**v, "lam_min": tr["lam_min"], "lam_max": tr["lam_max"]} for k, v in CONFIGS.items()}
    rows = sweep(model, xte, yte, list(range(10)), None, (8, 32) if args.quick else (8, 16, 32, 64), None, digit_cfgs)
    results["digits"] = {
        "rows": rows,
        "bayes": None,
        "logistic": logistic_reference(xtr, ds.y_train, xte, yte),
        "n": len(yte),
        "run": str(run_dir),
        "train_steps": config["step"],
    }
    png = out / "classifier_accuracy.png"
    plot(results, png)
    md = [
        "## Diffusion classifier (`benchmarks/classifier.py`)",
        "",
        f"Command: `python benchmarks/classifier.py{' --quick' if args.quick else ''}` "
        f"(digits: a class-conditional MLP trained for {config['step']} steps by `scoredensity train --data digits "
        f"--net mlp --conditional --steps {config['step']} --threads 1` (seed 0, the defaults otherwise), passed as "
        "`--digits-run DIR` or trained by the script; classified at the bin centres of the 359 test images).",
        "",
        "Each class's `log p(x|y)` by the density formula (log-SNR in [-20, 20] for the mixtures, the training "
        "range for digits; a shared pilot fits the log-SNR proposal), rounds of 32 evaluations per class (16 at a "
        "budget of 16 per class). *CRN*: the same (t, z) for every class of an example; *antithetic*: each node at "
        "z and -z; *elimination*: a class more than 4 paired standard errors behind the leader is dropped (checked "
        "after every round). *Uniform weights*: the class score is minus the unweighted mean denoising error over "
        "uniformly drawn steps of DDPM's linear schedule (Li et al. 2023). NFE/example includes the pilot. ECE: "
        "expected calibration error, 15 bins.",
        "",
    ]
    for name, res in results.items():
        ref = f"Bayes accuracy {res['bayes']:.4f}, " if res["bayes"] is not None else ""
        md += [
            f"### {name} (n = {res['n']} test points; {ref}LogisticRegression {res['logistic']:.4f})",
            "",
            *table(res["rows"], res["bayes"] is not None),
            "",
        ]
    md += [f"![accuracy against evaluations]({png.name})", ""]
    (out / "bench_classifier.md").write_text("\n".join(md) + "\n")
    (out / "bench_classifier.json").write_text(json.dumps(results, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
