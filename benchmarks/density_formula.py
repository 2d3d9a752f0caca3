"""Density formula: error and standard error against nfe, per integration scheme and variance reduction.

Data: the anisotropic preset (3 components, covariance eigenvalues 1e-3..10, random rotations) in d = 2, 16, 64
with its exact eps, so the exact log-density is known. For each configuration and budget we report, over the
same test points: the mean per-example variance (stderr^2) and its reduction against plain Monte Carlo at the
same budget (log-SNR uniform on [-16, 16], one z each, d in the integrand), the RMS of the actual error, the
mean error with its standard error, the spread of z-scores (1 = honest), and seconds per example.

Run: python benchmarks/density_formula.py [--quick]
"""

from __future__ import annotations

import argparse
import time

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


def run(dims, budgets, n_points, seed=0):
    rows = []
    for d in dims:
        gm = mixture_preset("anisotropic", d=d)
        x = gm.sample(n_points[d], generator=torch.Generator().manual_seed(seed)).float()
        exact = gm.log_prob(x)
        for nfe in budgets:
            base_var = None
            for name, cfg in CONFIGS.items():
                cfg = dict(cfg)
                n_z = cfg.pop("n_z", 1)
                n_t = max(2, nfe // n_z)
                if cfg.get("importance", "adaptive") == "adaptive":
                    # pay for the shared pilot out of the same budget
                    pilot = 64 * 16 / len(x)
                    n_t = max(2, int((nfe - pilot) // n_z))
                n_t -= n_t % 2
                t0 = time.perf_counter()
                est = log_density(gm.eps, x, n_t=n_t, n_z=n_z, seed=seed, progress=False, **cfg)
                sec = (time.perf_counter() - t0) / len(x)
                err = est.logp - exact
                var = float(est.stderr.pow(2).mean())
                if base_var is None:
                    base_var = var
                z = err / est.stderr
                rows.append(
                    dict(
                        d=d,
                        nfe=est.nfe,
                        config=name,
                        var=var,
                        reduction=base_var / var,
                        rmse=float(err.pow(2).mean().sqrt()),
                        bias=float(err.mean()),
                        bias_se=est.mean_stderr(),
                        z_std=float(z.std()),
                        us=sec * 1e6,
                    )
                )
                r = rows[-1]
                print(
                    f"d={d:3d} nfe={r['nfe']:6.1f} {name:32s} var={var:10.4g} x{r['reduction']:6.1f} "
                    f"rmse={r['rmse']:.4f} bias={r['bias']:+.4f}±{r['bias_se']:.4f} z_std={r['z_std']:.2f}",
                    flush=True,
                )
    return rows


def to_markdown(rows):
    lines = [
        "| d | nfe/example | configuration | per-example variance | reduction vs plain | RMS error (nats) "
        "| mean error ± se | z-score std | µs/example |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']} | {r['nfe']:.1f} | {r['config']} | {r['var']:.4g} | {r['reduction']:.1f}x | {r['rmse']:.4f} "
            f"| {r['bias']:+.4f} ± {r['bias_se']:.4f} | {r['z_std']:.2f} | {r['us']:.0f} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one budget, fewer points")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.quick:
        rows = run([2, 16], [32], {2: 200, 16: 200}, args.seed)
    else:
        rows = run([2, 16, 64], [16, 64, 256], {2: 1000, 16: 500, 64: 300}, args.seed)
    print()
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
