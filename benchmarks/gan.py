"""Plain GAN vs score-regularised GAN on the 2-D mode-collapse benchmarks (issue 8 §1; Li & Yan 2024, §4.2).

Two parts:

1. **What each shortcut costs, at fixed points.** At points near the data (mixture samples plus noise), the
   regulariser's gradient estimator for each (gradient, weighting) variant against the exact ``-grad log p_data``
   (autograd of the mixture): cosine similarity of the Monte Carlo mean, relative bias, relative per-draw noise
   and time per 1,000 evaluations.
2. **GAN training.** For each preset and variant, ``--seeds`` runs; metrics of 2,500 samples (modes covered,
   high-quality fraction, mode KL, exact cross-entropy, MMD^2 to real samples); mean and standard deviation
   over seeds; a PNG of samples of the first seed.

Run (about 10 minutes on 2 shared CPU cores with the defaults; ``--workers`` runs seeds in parallel)::

    python benchmarks/gan.py --out bench_out/gan
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from scoredensity.apps.gan import gan_metrics, regulariser_gradient, train_gan
from scoredensity.mixtures import mixture_preset
from scoredensity.plots import save_scatter

VARIANTS = {
    "plain": dict(reg_coef=0.0),
    "full/formula": dict(reg_gradient="full", reg_weighting="formula"),
    "sds/formula": dict(reg_gradient="sds", reg_weighting="formula"),
    "full/t_uniform": dict(reg_gradient="full", reg_weighting="t_uniform"),
    "sds/t_uniform": dict(reg_gradient="sds", reg_weighting="t_uniform"),
}
METRICS = ("modes_covered", "high_quality", "mode_kl", "cross_entropy", "mmd2")


def gradient_costs(preset: str, n_points: int = 64, n_draws: int = 1024) -> list[dict]:
    """Bias and noise of each gradient variant against the exact gradient of ``-log p_data``."""
    gm = mixture_preset(preset)
    g = torch.Generator().manual_seed(0)
    x = gm.sample(n_points, generator=g) + 0.1 * torch.randn(n_points, 2, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(-gm.log_prob(xr).sum(), xr)
    rows = []
    for name, kw in VARIANTS.items():
        if name == "plain":
            continue
        t0 = time.perf_counter()
        _, _, grad, se = regulariser_gradient(
            gm.eps, x, n_draws=n_draws, gradient=kw["reg_gradient"], weighting=kw["reg_weighting"]
        )
        ms = 1000 * (time.perf_counter() - t0) / (n_points * n_draws) * 1000
        norm = exact.norm(dim=1)
        rows.append(
            dict(
                preset=preset,
                variant=name,
                cosine=float(torch.nn.functional.cosine_similarity(grad, exact, dim=1).mean()),
                rel_bias=float(((grad - exact).norm(dim=1) / norm).median()),
                rel_noise_per_draw=float((se.norm(dim=1) * math.sqrt(n_draws) / norm).median()),
                ms_per_1000=ms,
            )
        )
    return rows


def _one_run(job: tuple[str, str, int, int, float]) -> dict:
    preset, variant, seed, steps, coef = job
    torch.set_num_threads(1)
    kw = dict(VARIANTS[variant])
    if variant != "plain":
        kw["reg_coef"] = coef
    res = train_gan(preset=preset, steps=steps, seed=seed, **kw)
    samples = res.sample(2500, seed=1000 + seed)
    m = gan_metrics(samples, mixture_preset(preset))
    return dict(preset=preset, variant=variant, seed=seed, seconds=res.seconds, **m, samples=samples.numpy().tolist())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out/gan")
    p.add_argument("--presets", nargs="+", default=["ring8", "grid25"])
    p.add_argument("--variants", nargs="+", default=["plain", "full/formula", "sds/formula", "sds/t_uniform"])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument(
        "--coef", nargs="+", default=["ring8=0.1", "grid25=0.001"], help="regulariser coefficient per preset"
    )
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    coefs = {k: float(v) for k, v in (c.split("=") for c in args.coef)}
    for v in args.variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {list(VARIANTS)}")

    torch.set_num_threads(1)
    costs = [r for preset in args.presets for r in gradient_costs(preset)]
    print("## Gradient of the regulariser at points near the data vs exact -grad log p_data (1024 draws/point)")
    print("| preset | variant | mean cosine | median rel. bias | median rel. noise/draw | ms per 1000 evals |")
    print("|---|---|---|---|---|---|")
    for r in costs:
        print(
            f"| {r['preset']} | {r['variant']} | {r['cosine']:.3f} | {r['rel_bias']:.3f} | "
            f"{r['rel_noise_per_draw']:.2f} | {r['ms_per_1000']:.2f} |"
        )

    jobs = [
        (pr, v, s, args.steps, coefs.get(pr, 0.01))
        for pr in args.presets
        for v in args.variants
        for s in range(args.seeds)
    ]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as ex:
        runs = list(ex.map(_one_run, jobs))
    wall = time.perf_counter() - t0

    print(f"\n## GAN training: {args.steps} steps, {args.seeds} seeds, 2500 samples; mean ± std over seeds")
    print(f"coefficients: {coefs}; wall {wall:.0f} s")
    print("| preset | variant | modes | high quality | mode KL | cross-entropy (nats) | MMD^2 | s/run |")
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    for pr in args.presets:
        for v in args.variants:
            rs = [r for r in runs if r["preset"] == pr and r["variant"] == v]
            row = dict(preset=pr, variant=v, coef=0.0 if v == "plain" else coefs.get(pr, 0.01))
            for m in METRICS + ("seconds",):
                vals = np.array([r[m] for r in rs], dtype=float)
                with np.errstate(invalid="ignore"):  # mode KL is inf when no sample is high quality
                    row[m] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0)
            summary.append(row)

            def f(m, fmt, row=row):
                return f"{row[m][0]:{fmt}} ± {row[m][1]:{fmt}}"

            print(
                f"| {pr} | {v} | {f('modes_covered', '.1f')} | {f('high_quality', '.3f')} | {f('mode_kl', '.3f')} | "
                f"{f('cross_entropy', '.2f')} | {f('mmd2', '.4f')} | {row['seconds'][0]:.0f} |"
            )
        gm = mixture_preset(pr)
        sets = [("data", gm.sample(2500, generator=torch.Generator().manual_seed(0)).numpy())]
        for v in args.variants:
            r0 = next(r for r in runs if r["preset"] == pr and r["variant"] == v and r["seed"] == 0)
            sets.append((f"{v} (seed 0)", np.array(r0["samples"])))
        save_scatter(out / f"gan_{pr}.png", sets, lim=5.5 if pr == "grid25" else 4.5)
    for r in runs:
        r.pop("samples")
    (out / "gan.json").write_text(
        json.dumps(dict(args=vars(args), gradient_costs=costs, summary=summary, runs=runs), indent=1)
    )
    print(f"\nwrote {out}/gan.json and {out}/gan_<preset>.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
