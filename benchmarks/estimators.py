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


def ddpm_gaps(n: int = 64, seed: int = 0) -> None:
    """Print the DDPM ELBO's gap to log p_0 per dimension against T (markdown), abar_k = abar(k/T) of VP-linear."""
    gm = mixture_preset("ring8")
    x = gm.sample(n, generator=torch.Generator().manual_seed(seed))
    exact = gm.log_prob(x)
    d = gm.dim
    print(f"\n### DDPM ELBO gap to log p_0 on ring8 ({n} points), nats per dimension (mean ± se)\n")
    print("| T | n_z | fixed_large | fixed_small, decoder var b_1 | fixed_small, clipped decoder var (published) |")
    print("|---|---|---|---|---|")
    for T, n_z in ((10, 64), (100, 16), (1000, 4), (4000, 1)):
        cells = []
        for variance, dec in (("fixed_large", "model"), ("fixed_small", "beta"), ("fixed_small", "model")):
            est = ddpm_elbo(
                gm.eps,
                x,
                schedule=DDPMSchedule.from_clock(VPLinearClock(), T),
                variance=variance,
                decoder_variance=dec,
                n_z=n_z,
                seed=seed,
            )
            cells.append(f"{float((est.logp - exact).mean()) / d:+.4f} ± {est.mean_stderr() / d:.4f}")
        print(f"| {T} | {n_z} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["estimators", "samplers", "ddpm"], default="estimators")
    p.add_argument("--level", choices=["quick", "default", "full"], default="full")
    p.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for JSON and PNG per dimension")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small ops)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "samplers":
        samplers(seed=args.seed)
        return
    if args.part == "ddpm":
        ddpm_gaps(seed=args.seed)
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
