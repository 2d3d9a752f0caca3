"""The diffusion classifier (issue 7, part 2): accuracy against model evaluations per example, with and without
common random numbers (CRN), antithetic z and adaptive elimination, formula vs uniform weights, over several seeds.

* Mixtures with their exact class-conditional eps (classes = components), where the Bayes classifier is the
  ceiling: ``overlap3`` (three overlapping 2-D components, Bayes accuracy about 0.86) and ``ring8-wide`` (the
  ring of 8 with standard deviation 0.9 instead of 0.35, eight overlapping classes). Per seed: new training and
  test points and new classifier randomness.
* Digits with a class-conditional MLP trained by ``scoredensity train --conditional`` (label dropout 0.1),
  classified at the bin centres of the test split. Per seed: a model trained with ``--seed SEED`` (a new
  train/test split and a new initialisation) and new classifier randomness; ``--digits-runs`` reuses given runs.

Reference line on the same split: scikit-learn's ``LogisticRegression`` (fitted on the training split).
Comparisons between configurations are paired: the same points and seeds for both, the difference taken per seed,
then its mean ± standard error over the seeds.

Run: python benchmarks/classifier.py [--quick] [--seeds 0 1 2] [--digits-runs DIR ...] [--write FILE]
(``--seeds 0 1 2 --write docs/bench_classifier.md``: about 10 CPU-minutes at one thread, the training of three
digits models included; 30 minutes wall on a shared 2-core machine under a load average of 8.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fragment import mean_se, paired_diff, provenance, write  # noqa: E402

from scoredensity.apps.classifier import (  # noqa: E402
    MixtureClassConditional,
    bayes_log_posterior,
    classify,
    expected_calibration_error,
)
from scoredensity.mixtures import GaussianMixture, mixture_preset  # noqa: E402

DEFAULT = "formula, CRN + antithetic + elimination (default)"
FULL = "formula, CRN + antithetic"
NO_ANTI = "formula, CRN, no antithetic"
INDEP = "formula, independent draws per class"
UNIFORM = "uniform weights, CRN + antithetic"
LITERATURE = "uniform weights, independent draws (literature)"
CONFIGS = {
    DEFAULT: dict(),
    FULL: dict(eliminate=False),
    NO_ANTI: dict(eliminate=False, antithetic=False),
    INDEP: dict(eliminate=False, common_random_numbers=False),
    UNIFORM: dict(weighting="uniform", eliminate=False),
    LITERATURE: dict(weighting="uniform", eliminate=False, common_random_numbers=False, antithetic=False),
}
DEFAULT_PER_CLASS = 64  # `scoredensity classify`'s default budget for 10 classes (640), per class


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


def sweep(model, x, y, classes, log_prior, per_class_budgets, seed, bayes_pred=None, extra=None):
    rows = []
    for name, kw in CONFIGS.items():
        for per in per_class_budgets:
            budget = per * len(classes)
            t0 = time.perf_counter()
            rs = min(32, per)  # one round must fit in the budget
            res = classify(
                model, x, classes, log_prior=log_prior, budget=budget, round_size=rs, seed=seed, **kw, **(extra or {})
            )
            row = {
                "seed": seed,
                "config": name,
                "budget_per_class": per,
                "nfe": float(res.nfe.mean()),
                "accuracy": res.accuracy(y),
                "ece": expected_calibration_error(res.probabilities(), y, res.classes),
                "seconds": time.perf_counter() - t0,
            }
            if bayes_pred is not None:
                row["agree_bayes"] = float((res.prediction == bayes_pred).double().mean())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def train_digits(run_dir: Path, steps: int, seed: int) -> None:
    cmd = [sys.executable, "-m", "scoredensity", "train", "--data", "digits", "--net", "mlp", "--conditional"]
    cmd += ["--steps", str(steps), "--seed", str(seed), "--out", str(run_dir), "--threads", "1"]
    cmd += ["--no-progress", "--eval-n", "0"]
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


# ------------------------------------------------------------------------------------------- aggregation
class Results:
    """Rows of every (data set, seed, configuration, budget); values per seed in seed order."""

    def __init__(self, rows: dict[str, list[dict]], seeds: list[int]):
        self.rows, self.seeds = rows, seeds

    def budgets(self, ds: str) -> list[int]:
        return sorted({r["budget_per_class"] for r in self.rows[ds]})

    def values(self, ds: str, config: str, per: int, key: str) -> list[float]:
        by_seed = {r["seed"]: r[key] for r in self.rows[ds] if r["config"] == config and r["budget_per_class"] == per}
        return [by_seed[s] for s in self.seeds]

    def mean(self, ds, config, per, key) -> float:
        return mean_se(self.values(ds, config, per, key))[0]

    def ms(self, ds, config, per, key, digits=4) -> str:
        """Mean ± se over the seeds (no sign)."""
        return fmt(self.values(ds, config, per, key), digits)

    def diff(self, ds, a, pa, b, pb, key, digits=4) -> str:
        """Paired difference a - b over the seeds, mean ± se, with the per-seed differences."""
        va, vb = self.values(ds, a, pa, key), self.values(ds, b, pb, key)
        m, se = paired_diff(va, vb)
        per_seed = ", ".join(f"{x - y:+.{digits}f}" for x, y in zip(va, vb, strict=True))
        s = f"{m:+.{digits}f}" if math.isnan(se) else f"{m:+.{digits}f} ± {se:.{digits}f}"
        return f"{s} [per seed {per_seed}]" if len(va) > 1 else f"{s} (one seed)"


def fmt(values, digits: int = 4) -> str:
    """Mean ± se of `values` (no sign; the mean alone for one value)."""
    m, se = mean_se(values)
    return f"{m:.{digits}f}" if math.isnan(se) else f"{m:.{digits}f} ± {se:.{digits}f}"


def within_2se(a, b) -> bool:
    """Whether the paired mean difference a - b is within two standard errors of zero (or exactly zero)."""
    m, se = paired_diff(a, b)
    return m == 0 or (not math.isnan(se) and abs(m) <= 2 * se)


def pct(v: float, digits: int = 1) -> str:
    return f"{100 * v:.{digits}f}%"


def table(res: Results, ds: str, bayes: bool) -> list[str]:
    head = "| configuration | budget/class | NFE/example | accuracy | " + ("agreement with Bayes | " if bayes else "")
    head += "ECE | s (wall) |"
    lines = [head, "|" + "---|" * (6 + bayes)]
    for cfg in CONFIGS:
        for per in res.budgets(ds):
            agree = f"{res.ms(ds, cfg, per, 'agree_bayes')} | " if bayes else ""
            lines.append(
                f"| {cfg} | {per} | {res.mean(ds, cfg, per, 'nfe'):.0f} | {res.ms(ds, cfg, per, 'accuracy')} | "
                f"{agree}{res.ms(ds, cfg, per, 'ece')} | {res.mean(ds, cfg, per, 'seconds'):.1f} |"
            )
    return lines


def findings(res: Results, refs: dict) -> list[str]:
    """The findings, every number computed from the rows."""
    k = len(res.seeds)
    o, w, dg = "overlap3", "ring8-wide", "digits"
    bo, bd, bw = res.budgets(o), res.budgets(dg), res.budgets(w)
    lo, hi, dlo = bo[0], bo[-1], bd[0]
    dflt = DEFAULT_PER_CLASS
    ag, acc, ece = "agree_bayes", "accuracy", "ece"
    out = [
        "- **Common random numbers plus antithetic z make the formula classifier cheap** (formula weights, the whole "
        "budget spent; paired differences CRN + antithetic minus the other):",
        f"  - `{o}`, {lo} evaluations per class: agreement with Bayes {res.ms(o, FULL, lo, ag)} with CRN + "
        f"antithetic, {res.ms(o, INDEP, lo, ag)} with independent draws per class; difference "
        f"{res.diff(o, FULL, lo, INDEP, lo, ag)}.",
        f"  - `{o}`: independent draws at {hi} per class reach {res.ms(o, INDEP, hi, ag)}; CRN + antithetic at {lo} "
        f"per class minus independent draws at {hi}: {res.diff(o, FULL, lo, INDEP, hi, ag)}.",
        f"  - `{o}`, {lo} per class: CRN without antithetic z {res.ms(o, NO_ANTI, lo, ag)}; antithetic z on top of "
        f"CRN adds {res.diff(o, FULL, lo, NO_ANTI, lo, ag)}.",
        f"  - digits accuracy at {dlo} per class: {res.ms(dg, FULL, dlo, acc)} with CRN + antithetic, "
        f"{res.ms(dg, INDEP, dlo, acc)} with independent draws; difference {res.diff(dg, FULL, dlo, INDEP, dlo, acc)}.",
        f"  - digits accuracy at {dflt} per class: {res.ms(dg, FULL, dflt, acc)} against "
        f"{res.ms(dg, INDEP, dflt, acc)}; difference {res.diff(dg, FULL, dflt, INDEP, dflt, acc)}.",
        "- **Adaptive elimination spends the budget on the close points** (evaluations per example: means over "
        "seeds, pilot included; paired differences with elimination minus without):",
    ]
    for ds, key, label in ((o, ag, "agreement with Bayes"), (dg, acc, "accuracy")):
        for per in sorted({dflt, res.budgets(ds)[-1]}):
            ne, nf = res.mean(ds, DEFAULT, per, "nfe"), res.mean(ds, FULL, per, "nfe")
            out.append(
                f"  - `{ds}`, {per} per class: {ne:.0f} evaluations per example with elimination, {nf:.0f} without "
                f"({nf / ne:.1f}x more); {label} {res.ms(ds, DEFAULT, per, key)} against {res.ms(ds, FULL, per, key)}"
                f"; difference {res.diff(ds, DEFAULT, per, FULL, per, key)}."
            )
    eces = {
        "formula": [res.mean(ds, c, p, ece) for ds in res.rows for c in (DEFAULT, FULL) for p in res.budgets(ds)],
        "uniform": [res.mean(ds, c, p, ece) for ds in res.rows for c in (UNIFORM, LITERATURE) for p in res.budgets(ds)],
    }
    dis = [1 - res.mean(o, UNIFORM, p, ag) for p in bo]
    out += [
        "- **Formula vs uniform weights.** The unweighted denoising error (uniform DDPM steps, as in the "
        "diffusion-classifier literature) is not a log-likelihood (paired differences uniform minus formula, both "
        "CRN + antithetic z, the whole budget spent):",
        f"  - `{o}`: uniform weights disagree with the Bayes decisions on {pct(min(dis))}-{pct(max(dis))} of the "
        f"points at every budget (means over seeds). At {dflt} per class, agreement difference "
        f"{res.diff(o, UNIFORM, dflt, FULL, dflt, ag)}, accuracy difference "
        f"{res.diff(o, UNIFORM, dflt, FULL, dflt, acc)}.",
        f"  - Calibration: ECE {min(eces['uniform']):.2f}-{max(eces['uniform']):.2f} for uniform weights (either draw "
        f"scheme) against {min(eces['formula']):.3f}-{max(eces['formula']):.3f} for the formula with CRN + "
        "antithetic z (with or without elimination), over the three data sets and every budget (means over seeds).",
        f"  - digits at {dflt} per class: accuracy difference {res.diff(dg, UNIFORM, dflt, FULL, dflt, acc)}, ECE "
        f"difference {res.diff(dg, UNIFORM, dflt, FULL, dflt, ece)}"
        + (
            ": on digits the weighting changes the calibration; the accuracy difference is within two standard "
            "errors of zero."
            if within_2se(res.values(dg, UNIFORM, dflt, acc), res.values(dg, FULL, dflt, acc))
            else "."
        ),
    ]
    full_ag = [v for p in bw for c in (DEFAULT, FULL, UNIFORM) for v in res.values(w, c, p, ag)]
    out.append(
        f"- **`{w}`** has equal isotropic covariances and equal weights: the difference of two classes' integrands is "
        "then affine in z, so CRN + antithetic z remove all the z-noise of the log-odds (only the log-SNR sampling "
        f"noise is left). Agreement with Bayes {min(full_ag):.4f}-{max(full_ag):.4f} over every budget and seed for "
        "the formula with or without elimination and for uniform weights (which order the classes like the exact "
        f"log-odds here but are miscalibrated), against {res.ms(w, INDEP, bw[0], ag)} for independent draws at "
        f"{bw[0]} per class. A special case, shown because it explains why antithetic draws help so much elsewhere: "
        "the odd part of the log-odds noise is the largest part."
    )
    lg = refs[dg]["logistic"]
    va = res.values(dg, DEFAULT, dflt, acc)
    d, se = paired_diff(va, lg)
    per_seed = ", ".join(f"{v:.4f}" for v in va)
    out.append(
        f"- **Digits** ({refs[dg]['n']} test images per seed, 10 classes; {k} seed{'s' if k > 1 else ''}): the "
        f"default classifier (formula, CRN + antithetic + elimination, {dflt} evaluations per class, `scoredensity "
        f"classify`'s default budget; {res.mean(dg, DEFAULT, dflt, 'nfe'):.0f} evaluations per example) has accuracy "
        f"{res.ms(dg, DEFAULT, dflt, acc)} [per seed {per_seed}] and ECE {res.ms(dg, DEFAULT, dflt, ece)}, against "
        f"{fmt(lg)} for `LogisticRegression` on the same test images (paired difference "
        + (f"{d:+.4f}" if math.isnan(se) else f"{d:+.4f} ± {se:.4f}")
        + f"). Uniform weights with CRN + antithetic z at the same budget: accuracy {res.ms(dg, UNIFORM, dflt, acc)}, "
        f"ECE {res.ms(dg, UNIFORM, dflt, ece)}."
    )
    return out


def plot(res: Results, refs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res.rows)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, ds in zip(axes[0], names, strict=True):
        paired = refs[ds].get("bayes") is not None  # mixtures: agreement with the Bayes decisions (a paired measure)
        key = "agree_bayes" if paired else "accuracy"
        for cfg in CONFIGS:
            stats = [mean_se(res.values(ds, cfg, p, key)) for p in res.budgets(ds)]
            nfe = [res.mean(ds, cfg, p, "nfe") for p in res.budgets(ds)]
            err = [0.0 if math.isnan(s) else s for _, s in stats]
            ax.errorbar(nfe, [m for m, _ in stats], yerr=err, fmt="o-", label=cfg, ms=3, capsize=2)
        m_lg = mean_se(refs[ds]["logistic"])[0]
        if not paired:
            ax.axhline(m_lg, color="grey", ls=":", label="LogisticRegression")
        ylabel = "agreement with the Bayes classifier" if paired else "accuracy"
        k = len(res.seeds)
        title = f"{ds}, mean ± se over {k} seed(s)"
        if paired:
            title += f" (Bayes acc. {mean_se(refs[ds]['bayes'])[0]:.3f}, logistic {m_lg:.3f})"
        ax.set(xscale="log", xlabel="model evaluations per example", ylabel=ylabel, title=title)
        ax.title.set_fontsize(9)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer points, budgets and training steps (a smoke test)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="bench_out/classifier", help="folder for the JSON rows and trained runs")
    ap.add_argument("--write", default=None, help="write the markdown fragment (and the figure beside it) here")
    ap.add_argument(
        "--digits-runs",
        nargs="+",
        default=None,
        help="conditional digits runs to reuse: one per seed, "
        "or one for every seed (else one is trained per seed with --seed SEED)",
    )
    ap.add_argument("--digits-steps", type=int, default=3000)
    ap.add_argument("--mixture-n", type=int, default=2000, help="test points per mixture and seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(args.seeds)
    n = 300 if args.quick else args.mixture_n
    mix_budgets = (16, 64) if args.quick else (16, 64, 256)
    digit_budgets = (8, 64) if args.quick else (8, 16, 64)
    rows: dict[str, list[dict]] = {}
    refs: dict[str, dict] = {}
    for name, gm in (("overlap3", overlap3()), ("ring8-wide", ring8_wide())):
        rows[name], refs[name] = [], {"bayes": [], "logistic": [], "n": n}
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            xtr, ytr = gm.sample(n, generator=g, return_labels=True)
            x, y = gm.sample(n, generator=g, return_labels=True)
            bayes = bayes_log_posterior(gm, x).argmax(1)
            classes = list(range(gm.num_components))
            mc = MixtureClassConditional(gm)
            rows[name] += sweep(mc, x, y, classes, gm.weights.log(), mix_budgets, seed, bayes)
            refs[name]["bayes"].append(float((bayes == y).double().mean()))
            refs[name]["logistic"].append(logistic_reference(xtr, ytr, x, y))
    # digits with a trained class-conditional network per seed
    from scoredensity.checkpoint import load_run

    if args.digits_runs and len(args.digits_runs) not in (1, len(seeds)):
        ap.error("--digits-runs takes one run per seed, or one run for every seed")
    rows["digits"], refs["digits"] = [], {"logistic": [], "runs": [], "train_steps": [], "train_seed": []}
    for i, seed in enumerate(seeds):
        if args.digits_runs:
            run_dir = Path(args.digits_runs[i if len(args.digits_runs) > 1 else 0])
        else:
            run_dir = out / f"_digits_seed{seed}"
            train_digits(run_dir, 300 if args.quick else args.digits_steps, seed)
        model, config, ds = load_run(run_dir)
        xte = ds.to_model(ds.x_test, dequantize=False)
        xtr = ds.to_model(ds.x_train, dequantize=False)
        yte = ds.y_test
        if args.quick:
            xte, yte = xte[:60], yte[:60]
        tr = config["train"]
        lam = {"lam_min": tr["lam_min"], "lam_max": tr["lam_max"]}
        rows["digits"] += sweep(model, xte, yte, list(range(10)), None, digit_budgets, seed, None, lam)
        refs["digits"]["logistic"].append(logistic_reference(xtr, ds.y_train, xte, yte))
        refs["digits"]["runs"].append(str(run_dir))
        refs["digits"]["train_steps"].append(config["step"])
        refs["digits"]["train_seed"].append(config["data"]["seed"])
        refs["digits"]["n"] = len(yte)
    res = Results(rows, seeds)
    (out / "bench_classifier.json").write_text(json.dumps({"seeds": seeds, "rows": rows, "refs": refs}, indent=1))
    fig_dir = Path(args.write).parent if args.write else out
    png = fig_dir / "classifier_accuracy.png"
    fig_dir.mkdir(parents=True, exist_ok=True)
    plot(res, refs, png)

    command = "python " + " ".join(["benchmarks/classifier.py", *sys.argv[1:]])
    k = len(seeds)
    dig = refs["digits"]
    steps = sorted(set(dig["train_steps"]))
    if args.digits_runs and len(args.digits_runs) == 1 and k > 1:
        model_note = (
            f"one trained model for every seed (`--digits-runs`, trained with seed {dig['train_seed'][0]}): the test "
            "images are the same in every seed, only the classifier randomness changes"
        )
    elif args.digits_runs:
        model_note = f"the given runs (`--digits-runs`, trained with seeds {dig['train_seed']})"
    else:
        model_note = (
            "a model per seed, trained by the script with `--seed SEED` (a new train/test split and initialisation "
            "per seed)"
        )
    md = [
        "# Diffusion classifier (`benchmarks/classifier.py`)",
        "",
        provenance("benchmarks/classifier.py", command, time.perf_counter() - t_start),
        "",
        f"**Seeds**: {k} ({', '.join(map(str, seeds))}). Every table cell is the mean ± standard error over the seeds "
        "(one row per seed in the JSON output); NFE/example and s are means over the seeds. s: wall-clock seconds "
        "of one classification under the load printed above (not a cost comparison: use NFE).",
        "",
        "**Data and models.** `overlap3` (three overlapping 2-D Gaussians, weights 0.4 / 0.35 / 0.25) and "
        "`ring8-wide` (ring8 with standard deviation 0.9, eight equal classes) with their exact class-conditional "
        f"eps: per seed {n} new training points (for the `LogisticRegression` reference) and {n} new test points "
        "(`torch.Generator().manual_seed(seed)`), log prior = the mixture weights. Digits: a class-conditional MLP "
        f"trained for {', '.join(map(str, steps))} steps by `scoredensity train --data digits --net mlp "
        "--conditional --steps S --seed SEED --threads 1` (the defaults otherwise; label dropout 0.1), "
        f"{model_note}; classified at the bin centres of the {dig['n']} test images of its split, uniform prior; "
        "`LogisticRegression` (scikit-learn, fitted on the training split of the same run) on the same test images.",
        "",
        "**Classifier.** Each class's `log p(x|y)` by the density formula (log-SNR in [-20, 20] for the mixtures, "
        "the training range for digits; a shared pilot fits the log-SNR proposal), rounds of 32 evaluations per "
        "class (the whole budget when it is below 32 per class), `classify(..., seed=SEED)`. *CRN*: the same (t, z) "
        "for every class of an example; *antithetic*: each node at z and -z; *elimination*: a class more than 4 "
        "paired standard errors behind the leader is dropped (checked after every round). *Uniform weights*: the "
        "class score is minus the unweighted mean denoising error over uniformly drawn steps of DDPM's linear "
        "schedule (Li et al. 2023). budget/class: evaluations per class allowed (budget = that x classes); "
        f"{DEFAULT_PER_CLASS} per class is `scoredensity classify`'s default for 10 classes. NFE/example: "
        "evaluations actually spent per example, the pilot included. Accuracy: share of test points whose label is "
        "predicted; agreement with Bayes (mixtures): share of points where the prediction equals the exact Bayes "
        "classifier's (the paired measure: it removes the label noise of the test points). ECE: expected "
        "calibration error, 15 bins.",
        "",
        f"## Findings ({k} seed{'s' if k > 1 else ''}; differences are paired: same points and seeds, "
        "mean ± se over the seeds, per-seed differences in brackets)",
        "",
        *findings(res, refs),
        "",
    ]
    for ds in res.rows:
        r = refs[ds]
        ref = f"Bayes accuracy {fmt(r['bayes'])}, " if "bayes" in r else ""
        md += [
            f"## {ds} (n = {r['n']} test points per seed; {ref}LogisticRegression {fmt(r['logistic'])})",
            "",
            *table(res, ds, "bayes" in r),
            "",
        ]
    md += [f"![accuracy against evaluations, mean ± se over the seeds]({png.name})", ""]
    text = "\n".join(md)
    write(args.write, text)
    if not args.write:
        (out / "bench_classifier.md").write_text(text + "\n")
    print(f"cpu seconds (this process): {time.process_time():.0f}; wall {time.perf_counter() - t_start:.0f} s")
    print("load average:", os.getloadavg())


if __name__ == "__main__":
    main()
