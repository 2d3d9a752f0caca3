"""Density formula: actual error and honesty of the standard error against nfe, per scheme and variance reduction.

Data: the anisotropic preset (3 components, covariance eigenvalues 1e-3..10, random rotations) in d = 2, 16, 64
with its exact eps, so the exact log-density is known. Every configuration runs on the same test points with the
same seed, for several seeds (each seed draws new test points and new estimator randomness). Per configuration
and budget the script reports, pooled over the seeds:

* the **error-based variance cut**: mean squared actual error (estimate - exact)^2 of plain Monte Carlo divided by
  that of the configuration, with a paired standard error (delta method over the points, which both
  configurations share) and the range of the per-seed ratios;
* the self-reported cut (mean stderr^2 of plain / of the configuration), which overstates the gain where the
  standard errors are too small;
* the spread of z-scores (estimate - exact) / stderr, per seed (1 = honest standard errors);
* calls per example, including the adaptive proposal's shared pilot (64 examples x 16 nodes, paid out of the
  same budget).

Plain Monte Carlo: log-SNR uniform on [-16, 16], independent draws, one z each, d in the integrand.

Run: python benchmarks/density_formula.py [--quick] [--seeds 0 1 2] [--write docs/bench_density_formula.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import time
from pathlib import Path

import torch

from scoredensity import log_density, mixture_preset

PLAIN = dict(scheme="mc", importance="uniform", control_variate=None, norm_z=False, lam_min=-16.0, lam_max=16.0)
CONFIGS = {
    "plain MC (baseline)": PLAIN,
    "+ ||z||^2": {**PLAIN, "norm_z": True},
    "+ Gaussian CV": {**PLAIN, "control_variate": "batch"},
    "+ ||z||^2 + adaptive IS": {**PLAIN, "norm_z": True, "importance": "adaptive", "lam_min": -20.0, "lam_max": 20.0},
    "+ CV + adaptive IS": {
        **PLAIN,
        "control_variate": "batch",
        "importance": "adaptive",
        "lam_min": -20.0,
        "lam_max": 20.0,
    },
    "+ antithetic z (n_z=2)": {**PLAIN, "norm_z": True, "antithetic": True, "n_z": 2},
    "quadrature (n_z=2) + CV + IS": {"scheme": "quadrature", "n_z": 2, "control_variate": "batch"},
    "stratified + CV + IS (default)": {"control_variate": "batch"},
}
BASE = "plain MC (baseline)"


def run(dims: list[int], budgets: list[int], n_points: dict[int, int], seeds: list[int]) -> list[dict]:
    """Run every configuration; one row per (d, budget, configuration, seed) with per-point errors kept."""
    rows = []
    for d in dims:
        gm = mixture_preset("anisotropic", d=d)
        for seed in seeds:
            x = gm.sample(n_points[d], generator=torch.Generator().manual_seed(seed)).float()
            exact = gm.log_prob(x)
            for budget in budgets:
                for name, cfg in CONFIGS.items():
                    cfg = dict(cfg)
                    n_z = cfg.pop("n_z", 1)
                    n_t = max(2, budget // n_z)
                    if cfg.get("importance", "adaptive") == "adaptive":
                        # pay for the shared pilot out of the same budget
                        pilot = 64 * 16 / len(x)
                        n_t = max(2, int((budget - pilot) // n_z))
                    n_t -= n_t % 2
                    t0 = time.perf_counter()
                    est = log_density(gm.eps, x, n_t=n_t, n_z=n_z, seed=seed, progress=False, **cfg)
                    sec = (time.perf_counter() - t0) / len(x)
                    err = (est.logp - exact).double()
                    z = err / est.stderr.double()
                    rows.append(
                        dict(
                            d=d,
                            budget=budget,
                            seed=seed,
                            config=name,
                            nfe=est.nfe,
                            sq_err=err.pow(2),
                            var=est.stderr.double().pow(2),
                            err=err,
                            z_std=float(z.std()),
                            us=sec * 1e6,
                        )
                    )
                    print(
                        f"d={d:3d} seed={seed} nfe={est.nfe:6.1f} {name:32s} mse={float(err.pow(2).mean()):10.4g} "
                        f"stderr^2={float(rows[-1]['var'].mean()):10.4g} z_std={rows[-1]['z_std']:.2f}",
                        flush=True,
                    )
    return rows


def _ratio(a: torch.Tensor, c: torch.Tensor) -> tuple[float, float]:
    """mean(a) / mean(c) with its delta-method standard error for paired samples (a_i, c_i)."""
    n = a.numel()
    ma, mc = float(a.mean()), float(c.mean())
    r = ma / mc
    cov = torch.cov(torch.stack([a, c]))
    rel = float(cov[0, 0]) / ma**2 + float(cov[1, 1]) / mc**2 - 2 * float(cov[0, 1]) / (ma * mc)
    return r, r * math.sqrt(max(rel, 0.0) / n)


def summarise(rows: list[dict]) -> list[dict]:
    """Pool the seeds: one summary per (d, budget, configuration)."""
    out = []
    keys = sorted({(r["d"], r["budget"]) for r in rows})
    for d, budget in keys:
        group = [r for r in rows if r["d"] == d and r["budget"] == budget]
        seeds = sorted({r["seed"] for r in group})
        base = {r["seed"]: r for r in group if r["config"] == BASE}
        for name in CONFIGS:
            mine = {r["seed"]: r for r in group if r["config"] == name}
            a = torch.cat([base[s]["sq_err"] for s in seeds])
            c = torch.cat([mine[s]["sq_err"] for s in seeds])
            va = torch.cat([base[s]["var"] for s in seeds])
            vc = torch.cat([mine[s]["var"] for s in seeds])
            ratio, ratio_se = _ratio(a, c)
            per_seed = [float(base[s]["sq_err"].mean() / mine[s]["sq_err"].mean()) for s in seeds]
            err = torch.cat([mine[s]["err"] for s in seeds])
            out.append(
                dict(
                    d=d,
                    budget=budget,
                    config=name,
                    nfe=sum(mine[s]["nfe"] for s in seeds) / len(seeds),
                    n=int(err.numel()),
                    seeds=len(seeds),
                    mse=float(c.mean()),
                    rmse=float(c.mean().sqrt()),
                    cut_err=ratio,
                    cut_err_se=ratio_se,
                    cut_err_lo=min(per_seed),
                    cut_err_hi=max(per_seed),
                    cut_self=float(va.mean() / vc.mean()),
                    bias=float(err.mean()),
                    bias_se=float(err.std() / math.sqrt(err.numel())),
                    z_lo=min(mine[s]["z_std"] for s in seeds),
                    z_hi=max(mine[s]["z_std"] for s in seeds),
                    us=sum(mine[s]["us"] for s in seeds) / len(seeds),
                )
            )
    return out


def to_markdown(summary: list[dict]) -> str:
    """The pooled table."""
    lines = [
        "| d | budget | calls/example | configuration | error-based cut vs plain (± paired se) [per-seed range] "
        "| self-reported cut | RMS error (nats) | mean error ± se | z-score std (per seed) | µs/example |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['d']} | {r['budget']} | {r['nfe']:.1f} | {r['config']} "
            f"| {r['cut_err']:.1f}x ± {r['cut_err_se']:.1f} [{r['cut_err_lo']:.1f}-{r['cut_err_hi']:.1f}] "
            f"| {r['cut_self']:.1f}x | {r['rmse']:.4f} "
            f"| {r['bias']:+.4f} ± {r['bias_se']:.4f} | {r['z_lo']:.2f}-{r['z_hi']:.2f} | {r['us']:.0f} |"
        )
    return "\n".join(lines)


def findings(summary: list[dict]) -> str:
    """The sentences the README quotes, computed from the table (never typed by hand)."""
    dims = sorted({r["d"] for r in summary})
    out = []
    default = [r for r in summary if r["config"] == "stratified + CV + IS (default)"]
    parts = []
    for d in dims:
        rs = [r for r in default if r["d"] == d]
        lo, hi = min(r["cut_err"] for r in rs), max(r["cut_err"] for r in rs)
        parts.append(f"{lo:.0f}-{hi:.0f}x (d = {d})" if round(lo) != round(hi) else f"{lo:.0f}x (d = {d})")
    out.append(
        "- Default configuration, cut of the mean squared actual error against plain Monte Carlo at equal calls "
        "(pooled over the seeds, all budgets): " + ", ".join(parts) + "."
    )
    for name in CONFIGS:
        if name == BASE:
            continue
        rs = [r for r in summary if r["config"] == name]
        honest = [r for r in rs if r["budget"] >= 64]
        out.append(
            f"- z-score std, `{name}`: {min(r['z_lo'] for r in rs):.2f}-{max(r['z_hi'] for r in rs):.2f} over all "
            f"budgets and seeds; {min(r['z_lo'] for r in honest):.2f}-{max(r['z_hi'] for r in honest):.2f} from "
            "64 calls up."
            if honest
            else f"- z-score std, `{name}`: {min(r['z_lo'] for r in rs):.2f}-{max(r['z_hi'] for r in rs):.2f}."
        )
    return "\n".join(out)


def fragment(summary: list[dict], command: str, seconds: float) -> str:
    """The markdown fragment docs/benchmarks.md links to."""
    seeds = summary[0]["seeds"]
    return "\n".join(
        [
            "<!-- written by benchmarks/density_formula.py; do not edit by hand -->",
            "### Density formula: error-based variance cut and honesty of the standard error",
            "",
            f"Command: `{command}` ({seconds:.0f} s wall; {datetime.date.today().isoformat()}, "
            f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
            f"load average {os.getloadavg()[0]:.1f} at the end; the µs column depends on the load, the others do not).",
            "",
            f"{seeds} seeds (each: new test points and new estimator randomness); every configuration of a seed runs "
            "on the same points, so the cuts are paired. *Budget*: calls per example that each configuration is given; "
            "the adaptive proposal's pilot (64 examples x 16 nodes) is paid out of it, so `calls/example` can be "
            "below the budget.",
            "",
            to_markdown(summary),
            "",
            findings(summary),
            "",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one budget, fewer points")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--write", default=None, help="write the markdown fragment to this file")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.quick:
        rows = run([2, 16], [32], {2: 200, 16: 200}, args.seeds)
    else:
        rows = run([2, 16, 64], [16, 64, 256], {2: 1000, 16: 500, 64: 300}, args.seeds)
    summary = summarise(rows)
    command = "python benchmarks/density_formula.py" + (" --quick" if args.quick else "")
    if args.seeds != [0, 1, 2]:
        command += " --seeds " + " ".join(map(str, args.seeds))
    text = fragment(summary, command + (f" --write {args.write}" if args.write else ""), time.perf_counter() - t0)
    print()
    print(text)
    if args.write:
        Path(args.write).write_text(text)


if __name__ == "__main__":
    main()
