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

Run: python benchmarks/estimators.py [--level quick|default|full] [--out DIR]   (default ``full``: about 2 minutes
on 2 cores). Prints one markdown table per dimension and the cheapest estimator reaching 0.01 nats/dim.

``--part samplers``: the samplers on ring8 with its exact eps (10k samples each): largest deviation of a
component's mass from its weight (components by exact posterior at t ≈ 0), the mean exact log-density of the
samples against that of true samples, and seconds, at several step counts (about 1 minute).

``--part ddpm``: the DDPM ELBO's gap to the exact log-density on ring8 against T (10, 100, 1000, 4000) for
fixed_large and fixed_small (decoder variance b_1, and the published clipped sigma~_2^2) (about 20 seconds).
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

from scoredensity.commands.compare import cheapest_to_reach, compare_estimators, write_report
from scoredensity.ddpm import ddpm_elbo
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


def markdown(result: dict) -> str:
    """The result as a markdown table."""
    lines = [
        "| estimator | setting | nfe | vjp | cost | s/example | mean gap ± se | mean abs error | abs error / dim |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['family']} | {r['setting']} | {r['nfe']:.0f} | {r['vjp']:.0f} | {r['cost']:.0f} | "
            f"{r['seconds_per_example']:.4f} | {r['bias']:+.4f} ± {r['bias_stderr']:.4f} | {r['abs_err']:.4f} | "
            f"{r['abs_err_per_dim']:.5f} |"
        )
    return "\n".join(lines)


class _Counted:
    """An eps_fn that counts its calls."""

    def __init__(self, eps_fn):
        self.eps_fn = eps_fn
        self.calls = 0

    def __call__(self, x_t, t):
        self.calls += 1
        return self.eps_fn(x_t, t)


def samplers(n: int = 10_000, seed: int = 0) -> None:
    """Print the sampler table (markdown)."""
    gm = mixture_preset("ring8")
    true_lp = float(gm.log_prob(gm.sample(n, generator=torch.Generator().manual_seed(seed + 1))).mean())
    print(f"\n### Samplers on ring8 ({n} samples each; mean log p of true samples {true_lp:.4f})\n")
    print("| sampler | eta | steps | nfe | max mass error (pp) | mean log p - true | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, eta, steps_list in SAMPLER_RUNS:
        for steps in steps_list:
            counted = _Counted(gm.eps)
            t0 = time.perf_counter()
            x = sample(
                counted, (n, 2), sampler=name, steps=steps, eta=eta, generator=torch.Generator().manual_seed(seed)
            )
            secs = time.perf_counter() - t0
            labels = gm.responsibilities_t(x.double(), 1e-12).argmax(1)
            mass = torch.bincount(labels, minlength=8).double() / n
            err = float((mass - gm.weights).abs().max()) * 100
            lp = float(gm.log_prob(x.double()).mean()) - true_lp
            shown = "adaptive" if steps is None else steps
            print(
                f"| {name} | {'-' if eta is None else eta} | {shown} | {counted.calls} | {err:.2f} | "
                f"{lp:+.4f} | {secs:.2f} |"
            )


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
    p.add_argument("--level", choices=["quick", "default", "full"], default="full")
    p.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of --part ddpm and --part div")
    p.add_argument("--write", default=None, help="--part ddpm / div: write the markdown fragment to this file")
    p.add_argument("--out", default=None, help="folder for JSON and PNG per dimension")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small ops)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "samplers":
        samplers(seed=args.seed)
        return
    if args.part == "ddpm":
        print(ddpm_gaps(args.seeds, write=args.write))
        return
    if args.part == "div":
        print(div_vs_formula(args.seeds, args.dims, write=args.write))
        return
    t_all = time.perf_counter()
    for d in args.dims:
        gm = mixture_preset("anisotropic", d=d)
        n = N_POINTS.get(d, 16)
        x = gm.sample(n, generator=torch.Generator().manual_seed(args.seed))
        t0 = time.perf_counter()
        res = compare_estimators(gm.eps, x, gm.log_prob(x), level=args.level)
        res.update(preset="anisotropic", seed=args.seed)
        print(f"\n### d = {d} ({n} test points, {time.perf_counter() - t0:.0f} s)\n")
        print(markdown(res))
        best = cheapest_to_reach(res, 0.01)
        if best is None:
            print("\nNo estimator reached 0.01 nats/dim at these budgets.")
        else:
            print(
                f"\nCheapest to 0.01 nats/dim: {best['family']} ({best['setting']}), "
                f"cost {best['cost']:.0f} per example ({best['nfe']:.0f} eps calls + {best['vjp']:.0f} vjp)."
            )
        if args.out:
            write_report(res, Path(args.out), stem=f"estimators_d{d}", title=f"anisotropic, d = {d}, {n} points")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
