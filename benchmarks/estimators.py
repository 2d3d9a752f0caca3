"""Every likelihood estimator on the same model: absolute error against cost, and seconds per example.

Model: the exact eps of the ``anisotropic`` preset (3 components, random rotations, covariance eigenvalues
log-spaced on [1e-3, 10]) in d = 2, 16, 64, the same data as ``benchmarks/density_formula.py``; test points drawn
from it, so the exact log-density is known. Estimators (each at a few budgets, see
:func:`scoredensity.commands.compare.default_suite`):

* density formula, default (stratified log-SNR, adaptive importance, Gaussian control variate, ||z||^2: the best
  variance reduction in ``benchmarks/density_formula.py``) and plain (uniform log-SNR, independent draws, none);
* divergence-form ELBO with one Rademacher probe and with the exact divergence (d <= 16);
* probability-flow ODE (dopri5) with the exact trace and with 4 Rademacher probes (Hutchinson);
* DDPM ELBO, fixed_large, ``abar_k = abar(k/T)`` of the VP-linear clock.

Cost per example = forward calls of eps (nfe) + vector-Jacobian products (vjp). Error = mean over the test points
of |estimate - exact|, per dimension (so Monte Carlo noise counts as error, as it does for a user).

Run: python benchmarks/estimators.py --part estimators --seeds 0 1 2 --formula-extra 4096 --write
docs/bench_estimators.md (level ``full`` plus the formula at n_t = 4096; each seed draws new test points and new
estimator randomness, all estimators of a seed share the points). The fragment has one table per dimension (cost,
bias check pooled over the seeds' points, error per dimension as mean ± se over seeds and per seed) and the cheapest
estimator to 0.01 nats/dim decided per seed, with the number of seeds that agree and the runner-up (and the verdict
without the extra budgets). ``--level quick --points 8``: a smoke run in well under a minute.

``--part samplers --seeds 0 1 2 --write docs/bench_samplers.md``: the samplers on ring8 with its exact eps (10k
samples per setting and seed): largest deviation of a component's mass from its weight (components by exact
posterior at t ≈ 0) and the samples' mean exact log-density minus E_p[log p] (from 10^6 true samples), mean ± se
over seeds, at several step counts. ``--level quick``: 2000 samples, the smallest step count of each sampler.

``--part ddpm``: the DDPM ELBO's gap to the exact log-density on ring8 against T (10, 100, 1000, 4000) for
fixed_large and fixed_small (decoder variance b_1, and the published clipped sigma~_2^2) (about 20 seconds).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import _fragment
import torch
from _fragment import mean_se, paired_diff, pm, provenance

from scoredensity.commands.compare import (
    EstimatorSpec,
    cheapest_to_reach,
    compare_estimators,
    default_suite,
    write_report,
)
from scoredensity.ddpm import ddpm_elbo
from scoredensity.formula import log_density
from scoredensity.mixtures import mixture_preset
from scoredensity.sampling import sample
from scoredensity.schedules import DDPMSchedule, VPLinearClock

SAMPLER_RUNS = [
    ("ddim", 0.0, [10, 25, 50, 100]),
    ("ddim", 1.0, [10, 25, 50, 100]),
    ("euler_maruyama", 1.0, [25, 50, 100, 200]),
    ("euler_maruyama", 0.0, [25, 50, 100, 200]),
    ("ode", None, [None, 10, 25]),
    ("ddpm", None, [25, 100, 1000]),
]

N_POINTS = {2: 64, 16: 32, 64: 16}


class _Counted:
    """An eps_fn that counts its calls."""

    def __init__(self, eps_fn):
        self.eps_fn = eps_fn
        self.calls = 0

    def __call__(self, x_t, t):
        self.calls += 1
        return self.eps_fn(x_t, t)


TARGET_PER_DIM = 0.01

# the settings tests/test_sampling.py asserts (masses within 2 pp, mean log p within 0.1 nats + 4 se); the fragment
# reports how many seeds meet them
TESTED_SAMPLER_SETTINGS = {("ddim", 0.0): 100, ("ddim", 1.0): 25, ("euler_maruyama", 1.0): 100, ("ode", None): None}
TESTED_SAMPLER_SETTINGS[("ddpm", None)] = 100


def _command() -> str:
    """The command line that ran this script (for the fragment's provenance line)."""
    return " ".join(["python benchmarks/estimators.py", *sys.argv[1:]])


def _label(row: dict) -> str:
    return f"{row['family']} {row['setting']}"


def _counts(labels: list[str]) -> str:
    """'a (3/3 seeds)' or 'a (2/3 seeds); b (1/3)', most frequent first."""
    n = len(labels)
    parts = [f"{lab} ({k}/{n} seeds)" for lab, k in Counter(labels).most_common()]
    return "; ".join(parts)


def _runner_up(res: dict, best: dict | None) -> dict | None:
    """Cheapest row of another family than ``best`` that reaches the target (None if none does)."""
    fam = None if best is None else best["family"]
    ok = [r for r in res["rows"] if r["family"] != fam and r["abs_err_per_dim"] <= TARGET_PER_DIM]
    return min(ok, key=lambda r: r["cost"]) if ok else None


def _closest(res: dict, exclude_family: str | None) -> dict:
    """Row with the smallest mean |error| per dimension outside ``exclude_family``."""
    return min((r for r in res["rows"] if r["family"] != exclude_family), key=lambda r: r["abs_err_per_dim"])


def _aggregate(per_seed: list[dict]) -> list[dict]:
    """One row per (estimator, setting) over the seeds' results (same suite, same order)."""
    out = []
    for i, r0 in enumerate(per_seed[0]["rows"]):
        rows = [res["rows"][i] for res in per_seed]
        assert all(_label(r) == _label(r0) for r in rows)
        gaps = [
            g - e
            for res, r in zip(per_seed, rows, strict=True)
            for g, e in zip(r["per_example"], res["exact_per_example"], strict=True)
        ]
        errs = [r["abs_err_per_dim"] for r in rows]
        costs = [r["cost"] for r in rows]
        out.append(
            {
                "family": r0["family"],
                "setting": r0["setting"],
                "nfe": sum(r["nfe"] for r in rows) / len(rows),
                "vjp": sum(r["vjp"] for r in rows) / len(rows),
                "cost": sum(costs) / len(rows),
                "cost_range": (min(costs), max(costs)),
                "seconds_per_example": sum(r["seconds_per_example"] for r in rows) / len(rows),
                "gap": mean_se(gaps),
                "err": mean_se(errs),
                "errs": errs,
                "n_reach": sum(e <= TARGET_PER_DIM for e in errs),
            }
        )
    return out


def _cost_cell(row: dict) -> str:
    lo, hi = row["cost_range"]
    rng = "" if lo == hi else f" ({lo:.0f}-{hi:.0f})"
    return f"{row['cost']:.0f}{rng}"


def _err(row: dict) -> str:
    """Error per dimension, mean ± se over seeds."""
    return pm(*row["err"], 4).lstrip("+")


def _estimator_table(agg: list[dict]) -> list[str]:
    lines = [
        "| estimator | setting | nfe | vjp | cost | s/example | mean gap ± se (nats) | abs error / dim, mean ± se "
        "| per seed | seeds <= 0.01 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in agg:
        per_seed = ", ".join(f"{e:.4f}" for e in r["errs"])
        lines.append(
            f"| {r['family']} | {r['setting']} | {r['nfe']:.0f} | {r['vjp']:.0f} | {_cost_cell(r)} | "
            f"{r['seconds_per_example']:.4f} | {pm(*r['gap'], 4)} | {pm(*r['err'], 5).lstrip('+')} | {per_seed} | "
            f"{r['n_reach']}/{len(r['errs'])} |"
        )
    return lines


def _suite(d: int, level: str, seed: int, extra_formula) -> list:
    """``default_suite`` with every estimator keyed by ``seed``, plus the formula at the extra n_t (same options)."""
    suite = default_suite(d, level, options={"seed": seed})
    last = max(i for i, s in enumerate(suite) if s.family == "formula")
    extra = [
        EstimatorSpec(
            "formula",
            f"n_t={m}",
            lambda f, x, m=m: log_density(f, x, n_t=m, lam_min=-20.0, lam_max=20.0, seed=seed, progress=False),
        )
        for m in extra_formula
    ]
    return suite[: last + 1] + extra + suite[last + 1 :]


def _verdict(per_seed: list[dict], skip: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Per seed: the cheapest row to the target and the runner-up of another family (labels, 'none' if none)."""
    best_labels, runner_labels = [], []
    for res in per_seed:
        rows = {"rows": [r for r in res["rows"] if _label(r) not in skip]}
        best = cheapest_to_reach(rows, TARGET_PER_DIM)
        runner = _runner_up(rows, best)
        best_labels.append(_label(best) if best else "none")
        runner_labels.append(_label(runner) if runner else "none")
    return best_labels, runner_labels


def estimators_fragment(
    seeds: list[int],
    dims: list[int],
    level: str,
    points: int | None,
    write: str | None,
    out: str | None,
    extra_formula: list[int] = (),
) -> str:
    """Every estimator on the anisotropic preset for each seed and dimension; verdict per seed (markdown)."""
    t_all = time.perf_counter()
    verdict_rows, findings, sections = [], [], []
    for d in dims:
        gm = mixture_preset("anisotropic", d=d)
        n = points or N_POINTS.get(d, 16)
        t0 = time.perf_counter()
        per_seed = []
        for seed in seeds:
            x = gm.sample(n, generator=torch.Generator().manual_seed(seed))
            res = compare_estimators(gm.eps, x, gm.log_prob(x), suite=_suite(d, level, seed, extra_formula))
            res.update(preset="anisotropic", seed=seed)
            per_seed.append(res)
            if out:
                write_report(
                    res,
                    Path(out),
                    stem=f"estimators_d{d}_seed{seed}",
                    title=f"anisotropic, d = {d}, {n} points, seed {seed}",
                )
            print(f"d = {d}, seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
        agg = _aggregate(per_seed)
        by_label = {_label(r): r for r in agg}
        best_labels, runner_labels = _verdict(per_seed)
        modal_best = Counter(best_labels).most_common(1)[0][0]
        modal_runner = Counter(runner_labels).most_common(1)[0][0]
        cells = []
        for lab, labels in ((modal_best, best_labels), (modal_runner, runner_labels)):
            r = by_label.get(lab)
            cells += [_counts(labels), "-" if r is None else _cost_cell(r), "-" if r is None else _err(r)]
        verdict_rows.append(f"| {d} | {n} | " + " | ".join(cells) + " |")
        # findings for this dimension, all computed from the rows above
        k = len(seeds)
        if modal_best == "none":
            close = [_closest(res, None) for res in per_seed]
            findings.append(
                f"d = {d}: no estimator reached {TARGET_PER_DIM} nats/dim in {best_labels.count('none')}/{k} "
                f"seeds; closest per seed: " + ", ".join(f"{_label(c)} {c['abs_err_per_dim']:.4f}" for c in close) + "."
            )
        else:
            b = by_label[modal_best]
            text = (
                f"d = {d}: the cheapest estimator to {TARGET_PER_DIM} nats/dim is {modal_best} in "
                f"{best_labels.count(modal_best)}/{k} seeds (cost {_cost_cell(b)} per example, error "
                f"{_err(b)} nats/dim, mean ± se over {k} seeds)"
            )
            # every other estimator family that reaches the target in some seed: its cheapest such row, paired with
            # the winner on the same seeds' points
            others = []
            for fam in dict.fromkeys(r["family"] for r in agg):
                if fam == b["family"]:
                    continue
                reach = [r for r in agg if r["family"] == fam and r["n_reach"] > 0]
                if reach:
                    others.append(min(reach, key=lambda r: r["cost"]))
            if others:
                text += "; other estimators that reach it in some seed (cheapest such budget, paired with the winner):"
                for r in others:
                    diff = paired_diff(r["errs"], b["errs"])
                    text += (
                        f" {_label(r)} in {r['n_reach']}/{k} seeds, cost {_cost_cell(r)} ({r['cost'] / b['cost']:.2f}x "
                        f"the winner's), error {_err(r)}, paired error difference minus the winner's {pm(*diff, 4)} "
                        f"nats/dim, wall-clock {r['seconds_per_example']:.3f} against {b['seconds_per_example']:.3f} "
                        "s/example (same run);"
                    )
                text = text[:-1] + "."
            else:
                close = [_closest(res, b["family"]) for res in per_seed]
                text += (
                    "; no other estimator reached it in any seed (closest other estimator per seed: "
                    + ", ".join(f"{_label(c)} {c['abs_err_per_dim']:.4f} at cost {c['cost']:.0f}" for c in close)
                    + ")."
                )
            findings.append(text)
        if extra_formula:
            skip = {f"formula n_t={m}" for m in extra_formula}
            base_best, _ = _verdict(per_seed, skip)
            findings.append(
                f"d = {d}, cheapest to {TARGET_PER_DIM} nats/dim without the extra formula budget(s) "
                f"({', '.join(sorted(skip))}), i.e. on the budgets of `default_suite` alone: {_counts(base_best)}."
            )
        biased = [r for r in agg if r["gap"][1] > 0 and abs(r["gap"][0]) > 3 * r["gap"][1]]
        biased += [r for r in agg if r["gap"][1] == 0 and r["gap"][0] != 0]
        findings.append(
            f"d = {d}, bias check: {len(biased)} of {len(agg)} rows have a pooled gap more than 3 se from zero "
            f"({k} x {n} points)"
            + (": " + ", ".join(f"{_label(r)} {pm(*r['gap'], 4)}" for r in biased) if biased else "")
            + "."
        )
        hut = [r for r in agg if r["family"] == "ode-hutchinson"]
        exa = [r for r in agg if r["family"] == "ode-exact"]
        if len(hut) >= 2 and len(exa) >= 2:
            findings.append(
                f"d = {d}, ODE error/dim from the loosest to the tightest tolerance: exact trace "
                f"{exa[0]['err'][0]:.5f} -> {exa[-1]['err'][0]:.5f}; Hutchinson (4 probes) {hut[0]['err'][0]:.4f} -> "
                f"{hut[-1]['err'][0]:.4f} (probe noise, not the solver, sets its error)."
            )
        sections += [
            f"### d = {d} ({len(seeds)} seeds x {n} test points, {time.perf_counter() - t0:.0f} s)",
            "",
            *_estimator_table(agg),
            "",
        ]
    seconds = time.perf_counter() - t_all
    text = "\n".join(
        [
            provenance("benchmarks/estimators.py --part estimators", _command(), seconds),
            "",
            "Model: the exact `eps` of the `anisotropic` preset (3 components, random rotations fixed by the preset, "
            "covariance eigenvalues log-spaced on [1e-3, 10]); the exact log-density is known. "
            f"Seeds {', '.join(map(str, seeds))}: each seed draws new test points "
            + ", ".join(f"({points or N_POINTS.get(d, 16)} at d = {d})" for d in dims)
            + " and new estimator randomness (`seed=` of every estimator); all estimators of a seed run on the same "
            f"points. Budgets: `compare_estimators` level `{level}` (`scoredensity.commands.compare.default_suite`)"
            + (
                f", plus the formula (its defaults) at n_t = {', '.join(map(str, extra_formula))} (`--formula-extra`)"
                if extra_formula
                else ""
            )
            + ".",
            "",
            "Columns: **cost** = forward calls of eps (nfe) + vector-Jacobian products (vjp) per example, mean over "
            "seeds (range in brackets where the adaptive ODE differs between seeds); **s/example** = wall-clock, mean "
            "over seeds, under the load in the line above; **mean gap ± se** = estimate - exact pooled over all "
            "seeds' points (bias check; se from the spread over points); **abs error / dim** = mean over a seed's "
            "points of |estimate - exact| / d (Monte Carlo noise counts as error), mean ± se over seeds, then per "
            f"seed; **seeds <= 0.01** = seeds in which it reaches {TARGET_PER_DIM} nats/dim.",
            "",
            f"## Cheapest estimator to {TARGET_PER_DIM} nats per dimension",
            "",
            "Decided per seed (the lowest-cost row whose error/dim is at most the target); the runner-up is the "
            "cheapest row of another estimator family that reaches it in that seed. Cost and error columns are those "
            "of the most frequent choice, over all seeds.",
            "",
            "| d | points / seed | cheapest, per seed | cost | error / dim | runner-up, per seed | cost "
            "| error / dim |",
            "|---|---|---|---|---|---|---|---|",
            *verdict_rows,
            "",
            "## Findings",
            "",
            *[f"- {f}" for f in findings],
            "",
            *sections,
        ]
    )
    _fragment.write(write, text)
    return text


def samplers_fragment(seeds: list[int], n: int, runs: list, write: str | None, n_ref: int = 1_000_000) -> str:
    """The samplers on ring8 with its exact eps, each setting once per seed (markdown)."""
    t_all = time.perf_counter()
    gm = mixture_preset("ring8")
    ref = gm.log_prob(gm.sample(n_ref, generator=torch.Generator().manual_seed(12345)).double())
    ref_mean, ref_se = float(ref.mean()), float(ref.std()) / math.sqrt(n_ref)
    w = gm.weights.double()
    binom_pp = float((w * (1 - w) / n).sqrt().max()) * 100
    lines = [
        "| sampler | eta | steps | nfe | max mass error (pp), mean ± se | seeds < 2 pp | mean log p - true, mean ± se "
        "| per seed | seeds within 0.1 | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = []
    for name, eta, steps_list in runs:
        for steps in steps_list:
            errs, lps, nfes, secs = [], [], [], []
            for seed in seeds:
                counted = _Counted(gm.eps)
                t0 = time.perf_counter()
                x = sample(
                    counted, (n, 2), sampler=name, steps=steps, eta=eta, generator=torch.Generator().manual_seed(seed)
                )
                secs.append(time.perf_counter() - t0)
                labels = gm.responsibilities_t(x.double(), 1e-12).argmax(1)
                mass = torch.bincount(labels, minlength=len(w)).double() / n
                errs.append(float((mass - w).abs().max()) * 100)
                lps.append(float(gm.log_prob(x.double()).mean()) - ref_mean)
                nfes.append(counted.calls)
            row = {
                "name": name,
                "eta": eta,
                "steps": steps,
                "err": mean_se(errs),
                "errs": errs,
                "lp": mean_se(lps),
                "lps": lps,
                "n_mass": sum(e < 2.0 for e in errs),
                "n_lp": sum(abs(v) < 0.1 for v in lps),
            }
            table.append(row)
            shown = "adaptive" if steps is None else steps
            nfe = sum(nfes) / len(nfes)
            lines.append(
                f"| {name} | {'-' if eta is None else eta} | {shown} | {nfe:.0f} | {pm(*row['err'], 2).lstrip('+')} | "
                f"{row['n_mass']}/{len(seeds)} | {pm(*row['lp'], 4)} | {', '.join(f'{v:+.4f}' for v in lps)} | "
                f"{row['n_lp']}/{len(seeds)} | {sum(secs) / len(secs):.2f} |"
            )
            print(lines[-1], flush=True)
    k = len(seeds)
    steps_txt = lambda r: "adaptive" if r["steps"] is None else f"{r['steps']} steps"  # noqa: E731
    eta_txt = lambda r: "" if r["eta"] is None else f" (eta {r['eta']})"  # noqa: E731
    findings = []
    all_mass = [r for r in table if r["n_mass"] == k]
    worst = max(max(r["errs"]) for r in table)
    findings.append(
        f"Component masses: {len(all_mass)} of {len(table)} settings put every component within 2 pp of its weight "
        f"in all {k} seeds; the largest max mass error of any setting and seed is {worst:.2f} pp (binomial sd of one "
        f"component's mass with {n} samples: {binom_pp:.2f} pp)."
    )
    for name, eta, _ in runs:
        rs = [r for r in table if r["name"] == name and r["eta"] == eta]
        ok = [r for r in rs if r["n_lp"] == k]
        every = "; ".join(f"{steps_txt(r)} {pm(*r['lp'], 4)} ({r['n_lp']}/{k})" for r in rs)
        where = ", ".join(steps_txt(r) for r in ok) if ok else "none of the settings tried"
        findings.append(
            f"{name}{eta_txt(rs[0])}: mean log p within 0.1 nats of the true value in all {k} seeds at: {where} "
            f"(mean log p - true, mean ± se, and seeds within 0.1: {every})."
        )
    tested = [r for r in table if TESTED_SAMPLER_SETTINGS.get((r["name"], r["eta"]), -1) == r["steps"]]
    findings.append(
        "The settings tests/test_sampling.py asserts ("
        + ", ".join(f"{r['name']}{eta_txt(r)} {steps_txt(r)}" for r in tested)
        + "): both within 2 pp (masses) and within 0.1 nats (mean log p) in "
        + ", ".join(
            f"{sum(e < 2.0 and abs(v) < 0.1 for e, v in zip(r['errs'], r['lps'], strict=True))}/{k}" for r in tested
        )
        + " seeds respectively."
    )
    seconds = time.perf_counter() - t_all
    text = "\n".join(
        [
            provenance("benchmarks/estimators.py --part samplers", _command(), seconds),
            "",
            f"Samplers on **ring8** with its exact eps, {n} samples per setting and seed, seeds "
            f"{', '.join(map(str, seeds))} (the seed keys the sampler's `generator`: starting noise and sampler "
            "noise). All samplers step on a uniform log-SNR grid on [-15, 15] (`ddpm`: the VP-linear clock). "
            "**max mass error** = largest |mass - weight| over the 8 components, in percentage points, components "
            "assigned by the exact posterior at t = 1e-12. **mean log p - true** = mean exact log-density of the "
            f"samples minus E_p[log p] = {ref_mean:.4f} ± {ref_se:.4f} (from {n_ref} true samples): 0 for exact "
            "samples up to sampling noise; negative when the samples are too spread. Mean ± se over the seeds, then "
            "per seed; **seeds within 0.1** = seeds with |mean log p - true| < 0.1 nats. nfe = eps calls "
            "(mean over seeds); seconds = wall-clock per setting, mean over seeds, under the load printed above.",
            "",
            "## Findings",
            "",
            *[f"- {f}" for f in findings],
            "",
            *lines,
            "",
        ]
    )
    _fragment.write(write, text)
    return text


def _fragment_header(name: str, command: str, seconds: float) -> list[str]:
    """First lines of a markdown fragment: who wrote it, the command, when and where."""
    return [
        f"<!-- written by benchmarks/estimators.py --part {name}; do not edit by hand -->",
        "",
        f"Command: `{command}` ({seconds:.0f} s wall; {datetime.date.today().isoformat()}, {platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}).",
        "",
    ]


def _paired_ratio(a: torch.Tensor, c: torch.Tensor) -> tuple[float, float]:
    """mean(a) / mean(c) and its delta-method standard error for paired samples (a_i, c_i)."""
    ma, mc = float(a.mean()), float(c.mean())
    cov = torch.cov(torch.stack([a.double(), c.double()]))
    rel = float(cov[0, 0]) / ma**2 + float(cov[1, 1]) / mc**2 - 2 * float(cov[0, 1]) / (ma * mc)
    r = ma / mc
    return r, r * math.sqrt(max(rel, 0.0) / a.numel())


def ddpm_gaps(seeds: list[int], n: int = 64, write: str | None = None) -> str:
    """DDPM ELBO's gap to log p_0 per dimension against T on ring8, pooled over seeds (markdown).

    ``abar_k = abar(k/T)`` of the VP-linear clock; each seed draws new points and new estimator noise.
    """
    t0 = time.perf_counter()
    gm = mixture_preset("ring8")
    d = gm.dim
    cols = (
        ("fixed_large", "model", "fixed_large (default decoder)"),
        ("fixed_small", "model", "fixed_small (default decoder: clipped posterior variance)"),
        ("fixed_small", "beta", 'fixed_small, decoder_variance="beta"'),
    )
    lines = [
        "| T | n_z | " + " | ".join(c[2] for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for T, n_z in ((10, 64), (100, 16), (1000, 4), (4000, 1)):
        cells = []
        for variance, dec, _ in cols:
            gaps = []
            for seed in seeds:
                x = gm.sample(n, generator=torch.Generator().manual_seed(seed))
                est = ddpm_elbo(
                    gm.eps,
                    x,
                    schedule=DDPMSchedule.from_clock(VPLinearClock(), T),
                    variance=variance,
                    decoder_variance=dec,
                    n_z=n_z,
                    seed=seed,
                )
                gaps.append((est.logp - gm.log_prob(x)).double() / d)
            g = torch.cat(gaps)
            m, se = float(g.mean()), float(g.std() / math.sqrt(g.numel()))
            cells.append(f"{m:+.4f} ± {se:.4f} ({abs(m) / se:.1f} se)")
        lines.append(f"| {T} | {n_z} | " + " | ".join(cells) + " |")
    command = "python benchmarks/estimators.py --part ddpm" + (f" --write {write}" if write else "")
    text = "\n".join(
        _fragment_header("ddpm", command, time.perf_counter() - t0)
        + [
            f"DDPM ELBO minus the exact log p_0 on **ring8** (2-D, exact eps), nats per dimension, mean ± se over "
            f"{len(seeds)} seeds x {n} points (seeds {', '.join(map(str, seeds))}: new points and new noise each); "
            "in brackets the gap in standard errors (below ~2: not distinguishable from zero). "
            "`abar_k = abar(k/T)` of the VP-linear clock.",
            "",
            *lines,
            "",
        ]
    )
    if write:
        Path(write).write_text(text)
    return text


def div_vs_formula(seeds: list[int], dims: list[int], n_ts=(128, 512), write: str | None = None) -> str:
    """Divergence-form ELBO (one Rademacher probe) against the density formula on the same points (markdown).

    Ratios pooled over the seeds' points, with paired (delta-method) standard errors: the per-example variance
    ratio at equal n_t (self-reported stderr^2 and actual squared error), and the variance ratio at equal cost
    (nfe + vjp), i.e. variance x cost.
    """
    from scoredensity.elbo import elbo
    from scoredensity.formula import log_density

    t0 = time.perf_counter()
    lines = [
        "| d | n_t | cost formula | cost div-ELBO | stderr ratio div/formula, equal n_t | squared-error ratio, "
        "equal n_t | variance ratio at equal cost (nfe + vjp) |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = []
    for d in dims:
        gm = mixture_preset("anisotropic", d=d)
        for n_t in n_ts:
            var_f, var_e, sq_f, sq_e, cost_f, cost_e = [], [], [], [], [], []
            for seed in seeds:
                x = gm.sample(N_POINTS.get(d, 16), generator=torch.Generator().manual_seed(seed))
                exact = gm.log_prob(x)
                f = log_density(gm.eps, x, n_t=n_t, seed=seed, progress=False)
                e = elbo(gm.eps, x, n_t=n_t, seed=seed)
                var_f.append(f.stderr.double().pow(2))
                var_e.append(e.stderr.double().pow(2))
                sq_f.append((f.logp - exact).double().pow(2))
                sq_e.append((e.logp - exact).double().pow(2))
                cost_f.append(f.nfe)
                cost_e.append(float(e.info["cost"]))
            cf, ce = sum(cost_f) / len(seeds), sum(cost_e) / len(seeds)
            r_var, r_var_se = _paired_ratio(torch.cat(var_e), torch.cat(var_f))
            r_sq, r_sq_se = _paired_ratio(torch.cat(sq_e), torch.cat(sq_f))
            se_ratio, se_ratio_se = math.sqrt(r_var), r_var_se / (2 * math.sqrt(r_var))
            cost_ratio = r_var * ce / cf
            summary.append((se_ratio, cost_ratio))
            lines.append(
                f"| {d} | {n_t} | {cf:.0f} | {ce:.0f} | {se_ratio:.2f} ± {se_ratio_se:.2f} "
                f"| {r_sq:.2f} ± {r_sq_se:.2f} | {cost_ratio:.1f} ± {r_var_se * ce / cf:.1f} |"
            )
    command = "python benchmarks/estimators.py --part div" + (f" --write {write}" if write else "")
    text = "\n".join(
        _fragment_header("div", command, time.perf_counter() - t0)
        + [
            "Divergence-form ELBO (`sd.elbo`, one Rademacher probe, its defaults) against the density formula "
            "(`sd.log_density`, its defaults) on the same points of the anisotropic preset with the exact eps, "
            f"{len(seeds)} seeds (seeds {', '.join(map(str, seeds))}; "
            + ", ".join(f"{N_POINTS.get(d, 16)} points at d = {d}" for d in dims)
            + " per seed). Ratios pooled over all points, ± paired standard error. Cost = eps calls + "
            "vector-Jacobian products per example.",
            "",
            *lines,
            "",
            f"- Standard-error ratio at equal n_t: {min(s for s, _ in summary):.2f}-{max(s for s, _ in summary):.2f}; "
            f"variance ratio at equal cost: {min(c for _, c in summary):.1f}-{max(c for _, c in summary):.1f}.",
            "",
        ]
    )
    if write:
        Path(write).write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["estimators", "samplers", "ddpm", "div"], default="estimators")
    p.add_argument(
        "--level",
        choices=["quick", "default", "full"],
        default="full",
        help="estimators: budgets of compare_estimators; samplers: quick = 2000 samples, smallest step count each",
    )
    p.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64])
    p.add_argument("--points", type=int, default=None, help="test points per dimension and seed (default 64/32/16)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (new points and noise each)")
    p.add_argument("--write", default=None, help="write the markdown fragment to this file")
    p.add_argument("--out", default=None, help="--part estimators: folder for JSON and PNG per dimension and seed")
    p.add_argument(
        "--formula-extra",
        type=int,
        nargs="*",
        default=[],
        help="--part estimators: extra formula budgets n_t beyond the suite's (the fragment also gives the verdict "
        "without them)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small ops)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "samplers":
        quick = args.level == "quick"
        runs = [(name, eta, steps[:1]) for name, eta, steps in SAMPLER_RUNS] if quick else SAMPLER_RUNS
        samplers_fragment(args.seeds, 2000 if quick else 10_000, runs, args.write)
        return
    if args.part == "ddpm":
        print(ddpm_gaps(args.seeds, write=args.write))
        return
    if args.part == "div":
        print(div_vs_formula(args.seeds, args.dims, write=args.write))
        return
    estimators_fragment(args.seeds, args.dims, args.level, args.points, args.write, args.out, args.formula_extra)


if __name__ == "__main__":
    main()
