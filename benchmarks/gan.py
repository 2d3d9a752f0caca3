"""Plain GAN vs score-regularised GAN on the 2-D mode-collapse benchmarks (issue 8 §1; Li & Yan 2024, §4.2).

Parts:

1. **What each shortcut costs, at fixed points.** At ``--points`` points near the data (mixture samples plus
   N(0, 0.1^2) noise), ``--n-z`` draws per point of the regulariser's gradient for each (gradient, weighting)
   variant, against the exact ``-grad log p_data`` (autograd of the mixture): cosine of the Monte Carlo mean,
   relative bias with its Monte Carlo floor, the squared z-scores (about 1 for an unbiased estimator), the
   relative noise per draw and the CPU time; mean ± standard error over the points.
2. **GAN training.** For each preset and variant, seeds ``0 .. --seeds-1``; a seed fixes the networks'
   initialisation and the data and latent streams, so every variant is paired with plain seed by seed. Metrics of
   2,500 samples (modes covered, high-quality fraction, mode KL, exact cross-entropy, MMD^2 to real samples): mean
   ± se over seeds, and each regularised variant's paired difference to plain. A PNG of seed 0 per preset, whose
   panel titles are the metrics of the very samples drawn.
3. **Coefficient check** (``--sweep-coefs``): ``full/formula`` on ``--sweep-preset`` at other coefficients, on the
   first ``--sweep-seeds`` seeds, paired with plain.
4. **Regulariser alone** (``--reg-only-steps``): the same generator trained on the regulariser only (no
   discriminator), on ring8, first ``--sweep-seeds`` seeds: what the regulariser pulls towards.

Run (about 15 CPU-minutes at one thread; writes the fragment and its two PNGs)::

    python benchmarks/gan.py --write docs/bench_gan.md

``--quick`` (about a CPU-minute): 2 seeds, 100 steps, 500 samples, 32 points, 256 draws, one sweep coefficient;
for checking the script only.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _fragment import mean_se, paired_diff, pm, provenance, write

from scoredensity.apps.gan import (
    MLP,
    GANConfig,
    GANResult,
    gan_metrics,
    regulariser_gradient,
    score_regulariser,
    train_gan,
)
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
PAIRED = ("modes_covered", "high_quality", "cross_entropy", "mmd2")  # mode KL is inf when no sample is high quality
BETTER = {"modes_covered": 1, "high_quality": 1, "mode_kl": -1, "cross_entropy": 0, "mmd2": -1}  # 0: no direction
LABEL = {
    "modes_covered": "modes",
    "high_quality": "high-quality fraction",
    "mode_kl": "mode KL",
    "cross_entropy": "cross-entropy",
    "mmd2": "MMD²",
}
DIGITS = {"modes_covered": 2, "high_quality": 3, "mode_kl": 3, "cross_entropy": 2, "mmd2": 4}


def _fmt(x: float, digits: int) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def _ints(rows: list[dict], key: str = "modes_covered") -> str:
    return ", ".join(f"{r[key]:.0f}" for r in rows)


def _ms(vals, digits: int = 3, signed: bool = False) -> str:
    """`mean ± se` of a list (inf shown as such)."""
    m, se = mean_se(vals)
    if signed:
        return pm(m, se, digits)
    if not math.isfinite(m):
        return _fmt(m, digits)
    return f"{m:.{digits}f}" if math.isnan(se) else f"{m:.{digits}f} ± {se:.{digits}f}"


# ------------------------------------------------------------------------------------- part 1: fixed points
def gradient_bias(preset: str, n_points: int, n_z: int) -> dict[str, dict[str, list[float]]]:
    """Per-point figures of each regularised variant's gradient estimate against the exact ``-grad log p_data``.

    Every variant uses the same points and the same keyed draws of ``(u, z)`` (seed 0), so figures pair over
    points across variants.
    """
    gm = mixture_preset(preset)
    g = torch.Generator().manual_seed(0)
    x = gm.sample(n_points, generator=g) + 0.1 * torch.randn(n_points, 2, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(-gm.log_prob(xr).sum(), xr)
    norm = exact.norm(dim=1)
    for kw in VARIANTS.values():  # warm-up, so that the first variant timed does not pay for it
        if "reg_gradient" in kw:
            regulariser_gradient(gm.eps, x[:4], n_z=2, gradient=kw["reg_gradient"], weighting=kw["reg_weighting"])
    out = {}
    for name, kw in VARIANTS.items():
        if name == "plain":
            continue
        c0 = time.process_time()
        _, _, grad, se = regulariser_gradient(
            gm.eps, x, n_z=n_z, gradient=kw["reg_gradient"], weighting=kw["reg_weighting"]
        )
        cpu = time.process_time() - c0
        z = (grad - exact) / se
        out[name] = dict(
            cosine=torch.nn.functional.cosine_similarity(grad, exact, dim=1).tolist(),
            rel_bias=((grad - exact).norm(dim=1) / norm).tolist(),
            rel_floor=(se.norm(dim=1) / norm).tolist(),
            z2=z.pow(2).mean(1).tolist(),
            max_abs_z=[float(z.abs().max())],
            rel_noise=(se.norm(dim=1) * math.sqrt(n_z) / norm).tolist(),
            ms_per_1000=[1e6 * cpu / (n_points * n_z)],
        )
    return out


# ------------------------------------------------------------------------------------- part 2-4: training
def _one_run(job: tuple[str, str, int, int, float, int]) -> dict:
    preset, variant, seed, steps, coef, n_samples = job
    torch.set_num_threads(1)
    kw = dict(VARIANTS[variant])
    if variant != "plain":
        kw["reg_coef"] = coef
    c0 = time.process_time()
    res = train_gan(preset=preset, steps=steps, seed=seed, **kw)
    samples = res.sample(n_samples, seed=1000 + seed)
    m = gan_metrics(samples, mixture_preset(preset))
    return dict(
        preset=preset,
        variant=variant,
        coef=coef if variant != "plain" else 0.0,
        seed=seed,
        seconds=res.seconds,
        cpu_s=time.process_time() - c0,
        **m,
        samples=samples.numpy().tolist() if seed == 0 else None,
    )


def _reg_only(job: tuple[str, int, int, int]) -> dict:
    """The GAN's generator (same initialisation for the seed) trained on the regulariser alone (full/formula)."""
    preset, seed, steps, n_samples = job
    torch.set_num_threads(1)
    cfg = GANConfig(preset=preset, seed=seed, steps=steps)
    mix = mixture_preset(preset)
    torch.manual_seed(seed)  # as train_gan: the generator is the first network built after this
    G = MLP(cfg.latent_dim, mix.dim, cfg.hidden, cfg.depth)
    opt = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    gen = torch.Generator().manual_seed(seed)
    c0 = time.process_time()
    for step in range(steps):
        fake = G(torch.randn(cfg.batch, cfg.latent_dim, generator=gen))
        loss = score_regulariser(mix.eps, fake, seed=seed, step=step).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    samples = GANResult(generator=G.eval(), config=cfg).sample(n_samples, seed=1000 + seed)
    return dict(preset=preset, seed=seed, steps=steps, cpu_s=time.process_time() - c0, **gan_metrics(samples, mix))


def _map(fn, jobs, workers: int) -> list:
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(workers) as ex:
        return list(ex.map(fn, jobs))


def entropy(preset: str, n: int = 200_000) -> tuple[float, float]:
    """Monte Carlo entropy of the mixture (nats) and its standard error: the floor of any generator's cross-entropy."""
    gm = mixture_preset(preset)
    lp = gm.log_prob(gm.sample(n, generator=torch.Generator().manual_seed(99)))
    return float(-lp.mean()), float(lp.std() / math.sqrt(n))


# ------------------------------------------------------------------------------------- the fragment
def _verdict(metric: str, m: float, se: float) -> str:
    """ "better" / "worse" than plain beyond 2 se ("lower" / "higher" for a metric without a direction), "" within."""
    if not (math.isfinite(m) and math.isfinite(se)) or abs(m) <= 2 * se:
        return ""
    if BETTER[metric] == 0:
        return "lower" if m < 0 else "higher"
    return "better" if m * BETTER[metric] > 0 else "worse"


MARK = {"better": " ▲", "worse": " ▼", "lower": " ↓", "higher": " ↑", "": ""}


def part1_lines(bias: dict, args) -> list[str]:
    lines = [
        "## 1. The regulariser's gradient at fixed points, against the exact gradient",
        "",
        f"{args.points} points per preset near the data (mixture samples + N(0, 0.1²) noise, seed 0), "
        f"{args.n_z} draws of `(lam, z)` per point (the same keyed draws for every variant), against the exact "
        "`-grad log p_data` (autograd of the mixture's `log_prob`). One draw set; the ± are standard errors over "
        "the points. Columns: **cosine**: cosine between the Monte Carlo mean gradient and the exact one; "
        "**rel. bias**: `|mean - exact| / |exact|`, mean ± se and median over points (it includes the Monte Carlo "
        "error of the mean); **MC floor**: `|se| / |exact|`, the size of that Monte Carlo error (median), so a "
        "rel. bias near the floor is noise; **mean z²**: mean over points and coordinates of "
        "`((mean - exact) / se)²`, about 1 for an unbiased estimator, far above 1 for a biased one; **max |z|**: "
        f"largest over all {2 * args.points} coordinates; **noise/draw**: median of `|se| sqrt(n_z) / |exact|`; "
        "**CPU ms/1000**: process CPU time per 1,000 evaluations (float64, one thread, under the load of the "
        "provenance line).",
        "",
        "| preset | variant | cosine | rel. bias (mean) | rel. bias (median) | MC floor | mean z² | max \\|z\\| | "
        "noise/draw | CPU ms/1000 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pr, rows in bias.items():
        for v, r in rows.items():
            lines.append(
                f"| {pr} | {v} | {_ms(r['cosine'])} | {_ms(r['rel_bias'])} | {np.median(r['rel_bias']):.3f} | "
                f"{np.median(r['rel_floor']):.3f} | {_ms(r['z2'], 2)} | {r['max_abs_z'][0]:.1f} | "
                f"{np.median(r['rel_noise']):.2f} | {r['ms_per_1000'][0]:.2f} |"
            )
    lines += ["", "Findings (computed from the table's per-point values; ± = se over points):", ""]
    for pr, rows in bias.items():
        f = rows["full/formula"]
        lines.append(
            f"* {pr}, `full/formula`: mean z² {_ms(f['z2'], 2)}, max |z| {f['max_abs_z'][0]:.1f} over "
            f"{2 * args.points} coordinates; its median rel. bias {np.median(f['rel_bias']):.3f} against a Monte "
            f"Carlo floor of {np.median(f['rel_floor']):.3f}: "
            + (
                "consistent with an unbiased estimator (rule: mean z² < 1.5; `tests/test_gan.py` checks it within 5 "
                "standard errors)."
                if mean_se(f["z2"])[0] < 1.5
                else "NOT consistent with an unbiased estimator at this number of draws."
            )
        )
        for v, r in rows.items():
            if v == "full/formula":
                continue
            dc = paired_diff(r["cosine"], f["cosine"])
            db = paired_diff(r["rel_bias"], f["rel_bias"])
            lines.append(
                f"* {pr}, `{v}`: cosine {_ms(r['cosine'])}, rel. bias {_ms(r['rel_bias'])} (median "
                f"{np.median(r['rel_bias']):.3f}); paired over the points, minus `full/formula`: cosine "
                f"{pm(*dc)}, rel. bias {pm(*db)}; mean z² {_ms(r['z2'], 1)}."
            )
        if "sds/formula" in rows:
            s = rows["sds/formula"]
            lines.append(
                f"* {pr}, cost of the Jacobian: `full/formula` takes "
                f"{f['ms_per_1000'][0] / s['ms_per_1000'][0]:.2f}× the CPU time of `sds/formula` (same run, one "
                f"draw set), and its median noise per draw is "
                f"{np.median(f['rel_noise']) / np.median(s['rel_noise']):.2f}× "
                "that of `sds/formula` (relative to the exact gradient's norm)."
            )
    return lines


def part2_lines(runs: list[dict], sweep: list[dict], reg_only: list[dict], args, coefs, png: dict) -> list[str]:
    seeds = list(range(args.seeds))

    def get(pr, v, coef=None, seeds=seeds):
        rs = {
            r["seed"]: r
            for r in runs + sweep
            if r["preset"] == pr and r["variant"] == v and (coef is None or math.isclose(r["coef"], coef))
        }
        return [rs[s] for s in seeds]

    lines = [
        f"## 2. GAN training: plain vs regularised, {args.seeds} seeds each",
        "",
        "MLP generator and discriminator (3×128, LeakyReLU 0.2), non-saturating loss, Adam(2e-4, betas 0.5/0.9), "
        f"batch 256, {args.steps} steps, latent N(0, I_2); the regulariser uses the mixture's exact `eps`, one "
        f"`(lam, z)` draw per generated sample, coefficient {', '.join(f'{k} ×{v:g}' for k, v in coefs.items())}. "
        f"Seeds 0-{args.seeds - 1}: a seed fixes both networks' initialisation and the data, latent and regulariser "
        "streams, so each regularised run is paired with the plain run of the same seed. Metrics on "
        f"{args.samples} samples (latent key 1000 + seed): **modes**: modes with ≥ 1 high-quality sample; **high "
        "quality**: fraction of samples within 3 std of their nearest mode; **mode KL**: KL of the high-quality "
        "samples' mode histogram to the mixture weights; **cross-entropy**: the exact `-mean log p_data(samples)` "
        f"(nats); **MMD²**: three Gaussian kernels, to {args.samples} fixed real samples. Mean ± se over the "
        f"{args.seeds} seeds. **CPU s/run**: mean process CPU time of one run (training + metrics, one thread).",
        "",
        "| preset | variant | modes | high quality | mode KL | cross-entropy (nats) | MMD² | CPU s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pr in args.presets:
        for v in args.variants:
            rs = get(pr, v, None if v == "plain" else coefs[pr])
            cells = [_ms([r[m] for r in rs], DIGITS[m]) for m in METRICS]
            name = v if v == "plain" else f"{v} ×{coefs[pr]:g}"
            lines.append(f"| {pr} | {name} | {' | '.join(cells)} | {np.mean([r['cpu_s'] for r in rs]):.0f} |")
    lines += [
        "",
        "Paired differences, regularised minus plain (same seed), mean ± se over the "
        f"{args.seeds} seeds; ▲ better than plain beyond 2 se, ▼ worse beyond 2 se (more modes, a higher "
        "high-quality fraction and a lower MMD² are better), ↓ / ↑ cross-entropy lower / higher beyond 2 se (not "
        "marked better or worse: a generator collapsed onto the densest points has a cross-entropy below the data's "
        f"entropy), no mark: within 2 se. With {args.seeds} seeds, 2 se is a rough screen, not a test at 5%.",
        "",
        "| preset | variant | Δ modes | Δ high quality | Δ cross-entropy (nats) | Δ MMD² |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = {}
    for pr in args.presets:
        plain = get(pr, "plain")
        for v in args.variants:
            if v == "plain":
                continue
            rs = get(pr, v, coefs[pr])
            cells = []
            for m in PAIRED:
                d = paired_diff([r[m] for r in rs], [r[m] for r in plain])
                verdicts[pr, v, m] = (_verdict(m, *d), d)
                cells.append(pm(*d, DIGITS[m]) + MARK[verdicts[pr, v, m][0]])
            lines.append(f"| {pr} | {v} ×{coefs[pr]:g} | {' | '.join(cells)} |")

    pngs = ", ".join(f"[`{p.name}`]({p.name})" for p in png.values())
    lines += ["", f"Samples of seed 0 (one seed; first panel: data; each title gives that panel's modes and "
              f"high-quality fraction, computed from the drawn samples): {pngs}.", ""]  # fmt: skip

    lines += ["Findings (computed from the rows above):", ""]
    for pr in args.presets:
        h, hse = entropy(pr)
        plain = get(pr, "plain")
        k = mixture_preset(pr).num_components
        lines.append(
            f"* {pr}: plain covers {_ms([r['modes_covered'] for r in plain], 1)} of {k} modes with cross-entropy "
            f"{_ms([r['cross_entropy'] for r in plain], 2)} nats; the data's entropy (the cross-entropy of a "
            f"generator that matches the data law) is {h:.3f} ± {hse:.3f} (Monte Carlo, 200,000 samples)."
        )
        for v in args.variants:
            if v == "plain":
                continue
            parts = []
            for word in ("better", "worse"):
                ms = [
                    f"{LABEL[m]} {pm(*verdicts[pr, v, m][1], DIGITS[m])}"
                    for m in PAIRED
                    if verdicts[pr, v, m][0] == word
                ]
                parts.append(f"{word} beyond 2 se on " + ("; ".join(ms) if ms else "none"))
            ce = verdicts[pr, v, "cross_entropy"]
            if ce[0]:
                parts.append(f"cross-entropy {ce[0]} beyond 2 se ({pm(*ce[1], 2)} nats)")
            within = [LABEL[m] for m in PAIRED if verdicts[pr, v, m][0] == ""]
            if within:
                parts.append(f"within 2 se on {', '.join(within)}")
            lines.append(f"* {pr}, `{v}` ×{coefs[pr]:g} vs plain (paired, {args.seeds} seeds): {'; '.join(parts)}.")
        s0 = {v: get(pr, v, None if v == "plain" else coefs[pr], seeds=[0])[0] for v in args.variants}
        lines.append(
            f"* {pr}, seed 0 (the picture; one seed): "
            + ", ".join(f"{v} {s0[v]['modes_covered']:.0f}/{k} modes" for v in args.variants)
            + "."
        )

    if sweep:
        sp, sseeds = args.sweep_preset, list(range(min(args.sweep_seeds, args.seeds)))
        plain = get(sp, "plain", seeds=sseeds)
        k = mixture_preset(sp).num_components
        lines += [
            "",
            f"## 3. Coefficient check: `full/formula` on {sp} at other coefficients, seeds {sseeds[0]}-{sseeds[-1]}",
            "",
            f"{args.steps} steps as above; {len(sseeds)} seeds, paired with plain (same seeds); mean ± se over seeds; "
            "Δ: minus plain, paired.",
            "",
            "| coefficient | modes | Δ modes | high quality | cross-entropy (nats) | Δ cross-entropy | MMD² | Δ MMD² |",
            "|---|---|---|---|---|---|---|---|",
        ]
        cs = sorted({r["coef"] for r in sweep} | ({coefs[sp]} if "full/formula" in args.variants else set()))
        for c in cs:
            rs = get(sp, "full/formula", c, seeds=sseeds)
            row = [f"{c:g}"]
            for m in ("modes_covered", "high_quality", "cross_entropy", "mmd2"):
                row.append(_ms([r[m] for r in rs], DIGITS[m]))
                if m != "high_quality":
                    row.append(pm(*paired_diff([r[m] for r in rs], [r[m] for r in plain]), DIGITS[m]))
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "Findings:", ""]
        for c in cs:
            rs = get(sp, "full/formula", c, seeds=sseeds)
            lines.append(
                f"* ×{c:g}: modes {_ints(rs)} of {k} (seeds "
                f"{sseeds[0]}-{sseeds[-1]}; plain {_ints(plain)}), "
                f"cross-entropy minus plain {pm(*paired_diff([r['cross_entropy'] for r in rs], [r['cross_entropy'] for r in plain]), 2)} nats."  # noqa: E501
            )
    if reg_only:
        pr = reg_only[0]["preset"]
        h, hse = entropy(pr)
        k = mixture_preset(pr).num_components
        lines += [
            "",
            f"## 4. The regulariser alone ({pr}, no discriminator)",
            "",
            f"The same generator (same initialisation per seed) trained for {reg_only[0]['steps']} steps on the "
            "`full/formula` regulariser only, i.e. on the Monte Carlo cross-entropy `-E log p_data(G(w))`; metrics "
            f"as above. Seeds {', '.join(str(r['seed']) for r in reg_only)}.",
            "",
            "| seed | modes | high quality | cross-entropy (nats) | MMD² |",
            "|---|---|---|---|---|",
        ]
        for r in reg_only:
            lines.append(
                f"| {r['seed']} | {r['modes_covered']:.0f} | {r['high_quality']:.3f} | {r['cross_entropy']:.2f} | "
                f"{r['mmd2']:.4f} |"
            )
        below = sum(r["cross_entropy"] < h for r in reg_only)
        plain_modes = {r["seed"]: r["modes_covered"] for r in runs if r["preset"] == pr and r["variant"] == "plain"}
        fewer = sum(r["modes_covered"] < plain_modes.get(r["seed"], k) for r in reg_only)
        lines += [
            "",
            f"Finding: modes covered {_ints(reg_only)} of {k} (plain GAN, same seeds: "
            f"{_ints([dict(m=plain_modes[r['seed']]) for r in reg_only], 'm')}); "
            f"cross-entropy {_ms([r['cross_entropy'] for r in reg_only], 2)} nats against the data's entropy {h:.3f}: "
            f"{below} of {len(reg_only)} runs below the entropy and {fewer} of {len(reg_only)} with fewer modes than "
            "plain."
            + (
                " The cross-entropy is lowest where all mass sits on the densest points, not at the data law: alone, "
                "the regulariser rewards collapse, and the GAN's discriminator has to pull the samples apart again."
                if below == fewer == len(reg_only)
                else ""
            ),
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out/gan", help="folder for gan.json")
    p.add_argument("--write", default=None, help="markdown fragment to write (PNGs beside it)")
    p.add_argument("--presets", nargs="+", default=["ring8", "grid25"])
    p.add_argument("--variants", nargs="+", default=["plain", "full/formula", "sds/formula", "sds/t_uniform"])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument(
        "--coef", nargs="+", default=["ring8=0.1", "grid25=0.003"], help="regulariser coefficient per preset"
    )
    p.add_argument("--samples", type=int, default=2500, help="generated samples per run for the metrics")
    p.add_argument("--points", type=int, default=256, help="part 1: points per preset")
    p.add_argument("--n-z", type=int, default=1024, help="part 1: draws per point")
    p.add_argument("--sweep-preset", default="grid25")
    p.add_argument("--sweep-coefs", nargs="*", type=float, default=[0.001, 0.01])
    p.add_argument("--sweep-seeds", type=int, default=3)
    p.add_argument("--reg-only-steps", type=int, default=600, help="part 4 (0: skip)")
    p.add_argument("--workers", type=int, default=1, help="processes for the training runs")
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 seeds, 100 steps, 500 samples, 32 points, 256 draws, one sweep coefficient (a smoke run)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.points, args.n_z, args.samples = 2, 100, 32, 256, 500
        args.reg_only_steps, args.sweep_coefs = min(args.reg_only_steps, 100), args.sweep_coefs[:1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    coefs = {k: float(v) for k, v in (c.split("=") for c in args.coef)}
    for v in args.variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    if args.variants[0] != "plain" or args.seeds < 2:
        raise SystemExit("the first variant must be plain (the paired baseline) and --seeds must be >= 2")
    for pr in args.presets:
        coefs.setdefault(pr, 0.01)
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    bias = {pr: gradient_bias(pr, args.points, args.n_z) for pr in args.presets}
    print(f"part 1 done ({time.perf_counter() - t0:.0f} s)", flush=True)

    jobs = [
        (pr, v, s, args.steps, coefs[pr], args.samples)
        for pr in args.presets
        for v in args.variants
        for s in range(args.seeds)
    ]
    runs = _map(_one_run, jobs, args.workers)
    print(f"part 2 done ({time.perf_counter() - t0:.0f} s)", flush=True)
    sweep = []
    if args.sweep_coefs and args.sweep_preset in args.presets:
        sjobs = [
            (args.sweep_preset, "full/formula", s, args.steps, c, args.samples)
            for c in args.sweep_coefs
            for s in range(min(args.sweep_seeds, args.seeds))
        ]
        sweep = _map(_one_run, sjobs, args.workers)
    reg_only = []
    if args.reg_only_steps > 0:
        reg_only = _map(
            _reg_only,
            [("ring8", s, args.reg_only_steps, args.samples) for s in range(min(3, args.seeds))],
            args.workers,
        )
    print(f"parts 3-4 done ({time.perf_counter() - t0:.0f} s)", flush=True)

    frag = Path(args.write) if args.write else out / "bench_gan.md"
    png = {}
    for pr in args.presets:
        gm = mixture_preset(pr)
        k = gm.num_components
        data = gm.sample(args.samples, generator=torch.Generator().manual_seed(0))
        md = gan_metrics(data, gm)
        sets = [(f"data: {md['modes_covered']:.0f}/{k} modes, hq {md['high_quality']:.2f}", data.numpy())]
        for v in args.variants:
            r0 = next(r for r in runs if r["preset"] == pr and r["variant"] == v and r["seed"] == 0)
            pts = np.array(r0["samples"])
            m0 = gan_metrics(torch.from_numpy(pts), gm)  # the metrics of exactly the samples drawn
            assert m0["modes_covered"] == r0["modes_covered"]
            sets.append((f"{v} (seed 0): {m0['modes_covered']:.0f}/{k} modes, hq {m0['high_quality']:.2f}", pts))
        png[pr] = save_scatter(frag.parent / f"{frag.stem}_{pr}.png", sets, lim=5.5 if pr == "grid25" else 4.5)
    for r in runs + sweep:
        r.pop("samples", None)
    (out / "gan.json").write_text(
        json.dumps(dict(args=vars(args), gradient_bias=bias, runs=runs, sweep=sweep, reg_only=reg_only), indent=1)
    )

    cpu = sum(r["cpu_s"] for r in runs + sweep + reg_only)
    wall = time.perf_counter() - t0
    lines = [
        "# Score-regularised GANs",
        "",
        provenance("benchmarks/gan.py", shlex.join(["python", "benchmarks/gan.py", *argv]), wall),
        f"Training runs: {cpu / 60:.1f} CPU-minutes in all.",
        "",
        "Regulariser `R(G) = -E_w log p_data(G(w))` written with the density formula and the mixture's exact `eps` "
        "(`scoredensity.apps.gan.score_regulariser`). Variants: `full` (through eps's Jacobian: unbiased for "
        "`-grad log p_data`) or `sds` (Jacobian dropped, the score-distillation shortcut) × `formula` weights "
        "(uniform in log-SNR on [-20, 20]) or `t_uniform` (score distillation's, uniform in t, scaled to the same "
        "total mass).",
        "",
        *part1_lines(bias, args),
        "",
        *part2_lines(runs, sweep, reg_only, args, coefs, png),
    ]
    write(frag, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
