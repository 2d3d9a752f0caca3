"""Certifying ELBO training (issue 7, part 1): fit a Gaussian-mixture family by the continuous ``elbo`` loss, by the
discrete DDPM ELBO (T in {10, 100, 1000}; fixed_large and fixed_small; ``abar_k = abar(k/T)`` from the VP-linear
clock) and by EM, and compare every fit with the EM (maximum-likelihood) fit, for several seeds.

Data sets: the ``blobs2d`` preset (K = 3), the ``ring8`` preset (K = 8), and scikit-learn's digits projected on
their first two principal components (scaled to [-1, 1] first, standardised after; K = 6; a real data set whose
true density is unknown). Every family member is an exact mixture denoiser, so every fit is also a density with
an exact log-likelihood. A seed draws new train/test points (a new split for digits), a new k-means start, new EM
initialisations and new Monte Carlo draws of every loss. Also: the spread of the continuous fit over independent
draws on one data set (its Monte Carlo floor), and three small networks trained on ring8 by three losses.

Each (data set, seed) result is stored in ``--out``/units.json as soon as it is done, and the fragment is rewritten
after every unit, so an interrupted run leaves a fragment that says what was run (``--resume`` continues it).

Run: python benchmarks/certify.py --seeds 0 1 2 --write docs/bench_certify.md   (about 15 CPU-minutes at 1 thread)
     python benchmarks/certify.py --quick                                       (a smoke run, about 1 CPU-minute)
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fragment import mean_se, paired_diff, provenance, write  # noqa: E402

from scoredensity.apps.certify import (  # noqa: E402
    certify_data,
    certify_mixture,
    continuous_elbo_objective,
    fit_em,
    fit_objective,
    kmeans_init,
    parameter_distance,
    pilot_proposal,
    plot_gap,
    train_denoiser,
)
from scoredensity.schedules import DDPMSchedule, VPLinearClock  # noqa: E402

K = {"blobs2d": 3, "ring8": 8, "digits-pca2": 6}
VARS = ("fixed_large", "fixed_small")


# ----------------------------------------------------------------------------------------------------- formatting
def e(x: float) -> str:
    return f"{x:.1e}" if abs(x) < 0.01 and x != 0 else f"{x:.3f}"


def pme(m: float, s: float) -> str:
    """mean ± se in scientific notation (se omitted when nan)."""
    return f"{m:+.1e}" if math.isnan(s) else f"{m:+.1e} ± {s:.1e}"


def rng(values) -> str:
    lo, hi = min(values), max(values)
    return e(lo) if f"{lo:.1e}" == f"{hi:.1e}" else f"{e(lo)} to {e(hi)}"


def ratio(x: float) -> str:
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def fit_key(r: dict) -> str:
    return r["method"] if r["steps"] is None else f"T={r['steps']} {r['variance']}"


# ----------------------------------------------------------------------------------------------------- experiments
def mixture_unit(name: str, seed: int, n: int, steps, variances, png: Path | None) -> dict:
    """One data set and one seed: every fit against EM."""
    xtr, xte = certify_data(name, n, seed)
    if name == "digits-pca2" and n < 1000:  # --quick: a subset of the split (else the whole split)
        xtr, xte = xtr[:n], xte[:n]
    w0, c0 = time.perf_counter(), time.process_time()
    rep = certify_mixture(xtr, xte, K[name], steps=tuple(steps), variances=tuple(variances), seed=seed)
    unit = {
        "name": name,
        "seed": seed,
        "n_train": rep.n_train,
        "n_test": rep.n_test,
        "num_params": rep.num_params,
        "resolution": rep.resolution,
        "rows": [dict(r.__dict__) for r in rep.rows],
        "wall": time.perf_counter() - w0,
        "cpu": time.process_time() - c0,
    }
    if png is not None:
        plot_gap(rep, png)
    print(f"{name} seed {seed}: {unit['wall']:.0f} s wall, {unit['cpu']:.0f} s CPU", flush=True)
    print(rep.table(), flush=True)
    return unit


def spread_unit(name: str, n: int, repeats: int, seed: int) -> dict:
    """Continuous fits with independent draws (same data, start and proposal) against EM: the Monte Carlo floor."""
    w0 = time.perf_counter()
    x, _ = certify_data(name, n, seed)
    k = K[name]
    em = fit_em(x, k, n_init=8, seed=seed)
    init = kmeans_init(x, k, seed=seed)
    prop = pilot_proposal(init, x[:256], seed=seed + 7)
    rows = []
    for r in range(repeats):
        model = kmeans_init(x, k, seed=seed)
        obj = continuous_elbo_objective(x, n_t=32, n_z=2, antithetic=True, proposal=prop, seed=100 + r)
        fit_objective(model, obj)
        gm = model.to_mixture()
        rows.append({"excess_train": float((em.log_prob(x) - gm.log_prob(x)).mean()), **parameter_distance(em, gm)})
    return {"name": name, "seed": seed, "rows": rows, "wall": time.perf_counter() - w0}


NEURAL = (("elbo", "continuous elbo"), ("ddpm", "DDPM ELBO, T=1000, fixed_large"), ("simple", "simple"))


def neural_unit(n: int, steps: int, n_eval: int, seed: int) -> dict:
    """Train one MLP per loss on ring8 (same net, optimiser, data order and budget); judge each by the true
    objective: the formula bound of its reverse SDE on two log-SNR ranges and its probability-flow ODE likelihood."""
    from scoredensity.formula import log_density
    from scoredensity.mixtures import mixture_preset
    from scoredensity.nets import MLPDenoiser
    from scoredensity.ode import ode_log_likelihood

    w0 = time.perf_counter()
    gm = mixture_preset("ring8")
    x_train, x_test = certify_data("ring8", n, seed)
    xe = x_test[:n_eval]
    t_grid = DDPMSchedule.from_clock(VPLinearClock(), 1000).times
    grid = (
        float(torch.log1p(-t_grid[-1]) - torch.log(t_grid[-1])),
        float(torch.log1p(-t_grid[0]) - torch.log(t_grid[0])),
    )
    out = {"seed": seed, "steps": steps, "n_train": len(x_train), "n_eval": len(xe), "grid": grid}
    out["exact"] = [float(v) for v in -gm.log_prob(xe)]
    for loss, _ in NEURAL:
        torch.manual_seed(seed)
        net = MLPDenoiser((x_train.shape[1],), hidden=128, blocks=2, emb_dim=64, data_std=float(x_train.std()))
        t0 = time.perf_counter()
        train_denoiser(net, x_train, loss, steps=steps, seed=seed)
        secs = time.perf_counter() - t0
        for p in net.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            wide = log_density(net, xe.float(), n_t=128, seed=seed, lam_min=-12.0, lam_max=12.0)
            ongrid = log_density(net, xe.float(), n_t=128, seed=seed, lam_min=grid[0], lam_max=grid[1])
        od = ode_log_likelihood(net, xe.float(), seed=seed)
        out[loss] = {
            "wide": [float(v) for v in -wide.logp],
            "grid": [float(v) for v in -ongrid.logp],
            "ode": [float(v) for v in -od.logp],
            "ode_nfe": float(od.nfe),
            "seconds": secs,
        }
        print(f"neural {loss}: bound {-wide.mean():.4f}, grid {-ongrid.mean():.4f}, ODE {-od.mean():.4f}", flush=True)
    out["wall"] = time.perf_counter() - w0
    return out


# ----------------------------------------------------------------------------------------------------- fragment
def f4(x: tuple[float, float], sign: str = "", digits: int = 4) -> str:
    return f"{x[0]:{sign}.{digits}f} ± {x[1]:.{digits}f}"


def _pts(v: list[float]) -> tuple[float, float]:
    """Mean and standard error over points."""
    return mean_se(v)


def mixture_section(name: str, units: list[dict]) -> tuple[list[str], dict]:
    """Table of one data set over seeds, the verdict per seed and paired comparisons; returns also numbers for the
    findings."""
    units = sorted(units, key=lambda u: u["seed"])
    seeds = [u["seed"] for u in units]
    u0 = units[0]
    keys = [fit_key(r) for r in u0["rows"] if r["method"] != "em"]
    by = {k: [next(r for r in u["rows"] if fit_key(r) == k) for u in units] for k in keys}
    wall = sum(u["wall"] for u in units)
    res = u0["resolution"]
    lines = [
        f"### {name} (K = {K[name]}, N = {u0['n_train']} train / {u0['n_test']} test, p = {u0['num_params']}, "
        f"resolution p/(2N) = {res:.2e}; seeds {', '.join(map(str, seeds))}; {wall:.0f} s wall in all)",
        "",
        "| fit | excess train NLL vs EM: mean ± se | per seed (" + ", ".join(map(str, seeds)) + ") "
        "| excess test NLL: mean ± se | gap loss - NLL (test): mean ± se | max Δmean: mean | s per fit: mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in keys:
        rs = by[k]
        lines.append(
            f"| {k} | {pme(*mean_se([r['excess_train'] for r in rs]))} "
            f"| {', '.join(format(r['excess_train'], '.1e') for r in rs)} "
            f"| {pme(*mean_se([r['excess_test'] for r in rs]))} "
            f"| {pme(*mean_se([r['gap'] for r in rs]))} "
            f"| {mean_se([r['distance']['mean'] for r in rs])[0]:.3f} | {mean_se([r['seconds'] for r in rs])[0]:.1f} |"
        )
    lines.append("")
    # verdict per seed: the fixed_large fit at the largest T (or the largest T's first variance) vs the resolution
    big_t = max(r["steps"] for r in u0["rows"] if r["steps"] is not None)
    ref = f"T={big_t} fixed_large" if f"T={big_t} fixed_large" in by else next(k for k in keys if f"T={big_t}" in k)
    verdicts = []
    lines += [
        f"Verdict per seed ({ref} against the resolution p/(2N) = {res:.2e}; the claim holds when its excess "
        "training NLL is below it):",
        "",
        "| seed | excess train, " + ref + " | resolution / excess | worst DDPM fit | its excess | claim |",
        "|---|---|---|---|---|---|",
    ]
    for u, r in zip(units, by[ref], strict=True):
        worst = max((x for x in u["rows"] if x["method"] == "ddpm"), key=lambda x: x["excess_train"])
        held = r["excess_train"] < res
        verdicts.append((name, u["seed"], held, r["excess_train"], res))
        lines.append(
            f"| {u['seed']} | {r['excess_train']:.2e} | {ratio(res / max(r['excess_train'], 1e-12))} "
            f"| {fit_key(worst)} "
            f"| {worst['excess_train']:.2e} | {'held' if held else 'did not hold'} |"
        )
    lines.append("")
    # paired comparisons over seeds (same data, start and seed for both fits)
    pairs = []
    for t in sorted({r["steps"] for r in u0["rows"] if r["steps"] is not None and r["steps"] != big_t}):
        for v in VARS:
            if f"T={t} {v}" in by and f"T={big_t} {v}" in by:
                pairs.append((f"T={t} {v}", f"T={big_t} {v}"))
    if f"T={big_t} fixed_small" in by and f"T={big_t} fixed_large" in by:
        pairs.append((f"T={big_t} fixed_small", f"T={big_t} fixed_large"))
    if "continuous" in by:
        pairs.append(("continuous", ref))
    paired = {}
    lines += [
        f"Paired comparisons over the {len(seeds)} seeds (difference of training NLL, A - B, same data and start):",
        "",
        "| A | B | mean paired difference ± se (nats/example) | per seed |",
        "|---|---|---|---|",
    ]
    for a, b in pairs:
        va, vb = [r["excess_train"] for r in by[a]], [r["excess_train"] for r in by[b]]
        paired[(a, b)] = paired_diff(va, vb)
        lines.append(
            f"| {a} | {b} | {pme(*paired[(a, b)])} "
            f"| {', '.join(f'{x - y:+.1e}' for x, y in zip(va, vb, strict=True))} |"
        )
    lines.append("")
    stats = {
        "res": res,
        "ref": ref,
        "verdicts": verdicts,
        "excess": {k: [r["excess_train"] for r in by[k]] for k in keys},
        "gap": {k: mean_se([r["gap"] for r in by[k]]) for k in keys},
        "paired": paired,
        "seeds": seeds,
    }
    return lines, stats


def neural_section(nu: dict) -> tuple[list[str], dict]:
    grid = nu["grid"]
    ex = nu["exact"]
    lines = [
        f"### Neural denoisers on ring8 (one seed: {nu['seed']}; {nu['steps']} steps, batch 256, AdamW 2e-3 cosine; "
        f"{nu['n_train']} training points, {nu['n_eval']} held-out points; exact NLL of those points "
        f"{mean_se(ex)[0]:.4f}; {nu['wall']:.0f} s wall)",
        "",
        "The formula bound is the continuous-time ELBO of each network's reverse SDE (128 log-SNR nodes, adaptive "
        "proposal, Gaussian control variate) on [-12, 12] (the elbo training range) and on the log-SNR range of the "
        f"T = 1000 DDPM grid, [{grid[0]:.2f}, {grid[1]:.2f}]; the ODE column is the exact log-likelihood of each "
        "network's probability-flow ODE (dopri5, exact trace), a different model from the SDE's. Same "
        "initialisation, data order and number of steps for the three losses. ± is the standard error over the "
        "held-out points; paired differences are over the same points (one seed of training).",
        "",
        "| training loss | bound on [-12, 12]: NLL ± se | bound - exact (paired) | bound on the DDPM grid's range "
        "| its paired difference to the elbo-trained net | ODE NLL (NFE) | its paired difference | training s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    stats = {}
    ref = nu["elbo"]
    for loss, label in NEURAL:
        r = nu[loss]
        d_exact = paired_diff(r["wide"], ex)
        d_grid = paired_diff(r["grid"], ref["grid"])
        d_ode = paired_diff(r["ode"], ref["ode"])
        d_grid_exact = paired_diff(r["grid"], ex)
        stats[loss] = {"exact": d_exact, "grid": d_grid, "ode": d_ode, "grid_exact": d_grid_exact}
        lines.append(
            f"| {label} | {f4(_pts(r['wide']))} | {f4(d_exact, '+')} | {f4(_pts(r['grid']))} | {f4(d_grid, '+')} "
            f"| {f4(_pts(r['ode']))} ({r['ode_nfe']:.0f}) | {f4(d_ode, '+')} | {r['seconds']:.0f} |"
        )
    lines.append("")
    return lines, stats


def findings(mix: dict, spread: dict | None, neural: dict | None, big_t: int) -> list[str]:
    out = ["**Findings** (computed by the script from the tables above):", ""]
    verdicts = [v for s in mix.values() for v in s["verdicts"]]
    if verdicts:
        held = [v for v in verdicts if v[2]]
        refs = sorted({s["ref"] for s in mix.values()})
        ratios = [v[4] / max(v[3], 1e-12) for v in verdicts]
        out.append(
            f"- The claim (excess training NLL of the DDPM-ELBO fit below the resolution p/(2N)) held in {len(held)} "
            f"of {len(verdicts)} (data set, seed) runs ({', '.join(refs)}): its excess over EM ranges "
            f"{rng([v[3] for v in verdicts])} nats/example; resolution / excess = {ratio(min(ratios))} "
            f"to {ratio(max(ratios))} "
            f"(resolution {rng([v[4] for v in verdicts])})."
        )
        per = "; ".join(
            f"{n} {pme(*mean_se(s['excess'][s['ref']]))} ({len(s['seeds'])} seed{'s' * (len(s['seeds']) > 1)})"
            for n, s in mix.items()
        )
        out.append(f"- Excess training NLL of that fit, mean ± se over seeds: {per}.")
    for t in (10, 100):
        key = f"T={t} fixed_large"
        have = {n: s for n, s in mix.items() if key in s["excess"]}
        if have:
            vals = [x for s in have.values() for x in s["excess"][key]]
            res = [s["res"] for s in have.values()]
            out.append(
                f"- At {key} the excess ranges {rng(vals)} over {len(vals)} runs ({', '.join(have)}; resolution "
                f"{rng(res)})."
            )
    comp = []
    for n, s in mix.items():
        for (a, b), (m, se) in s["paired"].items():
            if b == f"T={big_t} fixed_large" and a in ("T=10 fixed_large", "T=100 fixed_large"):
                comp.append(f"{n} {a.split()[0]}: {pme(m, se)}")
    if comp:
        out.append(
            f"- Training NLL of the T=10 and T=100 fixed_large fits minus that of the T={big_t} fit, paired over "
            f"seeds: {'; '.join(comp)}."
        )
    comp = [
        f"{n} {pme(*s['paired'][(f'T={big_t} fixed_small', f'T={big_t} fixed_large')])}"
        for n, s in mix.items()
        if (f"T={big_t} fixed_small", f"T={big_t} fixed_large") in s["paired"]
    ]
    if comp:
        gaps = [s["gap"][f"T={big_t} fixed_small"][0] for s in mix.values() if f"T={big_t} fixed_small" in s["gap"]]
        out.append(
            f"- The fixed_small loss sits {rng(gaps)} nats above the exact test NLL at its own fit (T={big_t}, mean "
            f"over seeds); the training NLL of its fit minus that of the fixed_large fit at T={big_t}, paired over "
            f"seeds: {'; '.join(comp)}."
        )
    gl = []
    for t in (10, 100, 1000):
        key = f"T={t} fixed_large"
        vals = [s["gap"][key][0] for s in mix.values() if key in s["gap"]]
        if vals:
            gl.append(f"{rng(vals)} at T={t}")
    if gl:
        out.append(f"- The fixed_large loss minus the exact test NLL at its fit (mean over seeds): {'; '.join(gl)}.")
    cont = [(n, s) for n, s in mix.items() if "continuous" in s["excess"]]
    if cont:
        per = "; ".join(f"{n} {pme(*mean_se(s['excess']['continuous']))}" for n, s in cont)
        pc = "; ".join(f"{n} {pme(*s['paired'][('continuous', s['ref'])])}" for n, s in cont)
        out.append(
            f"- The continuous elbo fit's excess over EM, mean ± se over seeds: {per}; paired difference continuous - "
            f"DDPM fit: {pc}."
        )
    worst = max(
        ((n, s, i) for n, s in mix.items() for i in range(len(s["seeds"]))),
        default=None,
        key=lambda t: t[1]["excess"][t[1]["ref"]][t[2]],
    )
    if worst and "continuous" in worst[1]["excess"]:
        n, s, i = worst
        out.append(
            f"- The largest excess of the DDPM-ELBO fit ({s['excess'][s['ref']][i]:.1e}, {n} seed {s['seeds'][i]}, "
            f"resolution {s['res']:.1e}) comes with an excess of {s['excess']['continuous'][i]:.1e} for the "
            "continuous elbo fit from the same start, whose loss is -E log p_theta for this family"
            + (
                ": both fits stop about as far from the EM fit, so there the distance to EM reflects where L-BFGS "
                "stopped from that start rather than the ELBO; the paired continuous - DDPM differences isolate the "
                "ELBO."
                if abs(s["excess"]["continuous"][i] - s["excess"][s["ref"]][i]) < 0.25 * s["excess"][s["ref"]][i]
                else "."
            )
        )
    if spread:
        ex = [r["excess_train"] for r in spread["rows"]]
        out.append(
            f"- Monte Carlo floor: {len(ex)} continuous fits of {spread['name']} (seed {spread['seed']}) with "
            f"independent draws land {rng(ex)} nats/example from EM; max Δmean "
            f"{rng([r['mean'] for r in spread['rows']])}."
        )
    if neural:
        st, nu = neural["stats"], neural["unit"]

        def f(x):
            return f4(x, "+", 3)

        out.append(
            f"- Neural (ring8, one seed, {nu['steps']} steps): on the DDPM grid's log-SNR range the DDPM-ELBO-trained "
            f"net's bound is {f(st['ddpm']['grid'])} nats/example from the elbo-trained net's and simple's "
            f"{f(st['simple']['grid'])} (paired over {nu['n_eval']} points); their probability-flow ODE NLLs differ "
            f"by {f(st['ddpm']['ode'])} and {f(st['simple']['ode'])}. On that range the three bounds sit "
            f"{', '.join(format(st[k]['grid_exact'][0], '+.3f') for k, _ in NEURAL)} (elbo, ddpm, simple) "
            f"above the exact NLL; on [-12, 12] {', '.join(format(st[k]['exact'][0], '+.3f') for k, _ in NEURAL)}: "
            "the DDPM-ELBO and simple losses never train the denoiser above the grid's largest log-SNR."
        )
    out.append("")
    return out


def render(args, units: dict, spread, neural, seconds: float, reused: int = 0) -> str:
    big_t = max(args.steps)
    md = [
        "# Certifying ELBO training",
        "",
        provenance("benchmarks/certify.py", "python benchmarks/certify.py " + shlex.join(sys.argv[1:]), seconds),
        "",
        "Family: Gaussian mixtures with full covariances, each member's denoiser its exact `eps*`. Fits: EM "
        "(scikit-learn, 8 initialisations, the reference), the continuous `elbo` loss (density formula, 32 log-SNR "
        "nodes x 2 antithetic z per example, fitted log-SNR proposal), and the DDPM ELBO for each T and reverse "
        "variance (VP-linear clock; all steps for T <= 127, else 127 steps drawn in proportion to their weights, 2 "
        "antithetic z); each denoising loss is minimised by L-BFGS over fixed draws, from the same k-means start. "
        "A seed draws new train and test points (for digits-pca2: a new train/test split), a new k-means start, new "
        "EM initialisations and new Monte Carlo draws. *excess train* = exact training NLL of the fit minus that of "
        "the EM fit (nats/example; >= 0 up to EM's tolerance); *excess test* the same on the test points; *gap* = "
        "the fit's own loss on the test points (minus its ELBO, 4 independent draws) minus the exact test NLL of the "
        "same parameters; *max Δmean* = largest distance between matched component means of the fit and of EM; *s* "
        "= wall seconds of the L-BFGS fit. Resolution p/(2N), p the number of parameters: the expected excess test "
        "NLL of the maximum-likelihood fit itself. The losses use different numbers of evaluations per example "
        "(continuous 64, T = 10: 20, T = 100: 200, T = 1000: 256), so their Monte Carlo floors differ. ± is the "
        "standard error over seeds. Timings are wall-clock under the load in the command line above.",
        "",
        f"Run: seeds {' '.join(map(str, args.seeds))} for {', '.join(n for n in args.data if n != 'digits-pca2')} "
        f"(T = {', '.join(map(str, args.steps))}; {', '.join(args.variances)})"
        + (
            f"; digits-pca2 with seeds {' '.join(map(str, args.digits_seeds))} and only T = "
            f"{', '.join(map(str, args.digits_steps))}, {', '.join(args.digits_variances)} (to fit the CPU budget)"
            if "digits-pca2" in args.data
            else ""
        )
        + "."
        + (
            f" {reused} of the units below (one data set and seed, the spread, the neural part) were computed by "
            "earlier invocations and read back from their `--out`/units.json (`--resume`); the wall time above adds "
            "theirs."
            if reused
            else ""
        ),
        "",
    ]
    mix = {}
    for name in args.data:
        us = [u for (n, _), u in units.items() if n == name]
        if not us:
            md += [f"### {name}: not run (interrupted)", ""]
            continue
        sec, stats = mixture_section(name, us)
        mix[name] = stats
        md += sec
        png = Path(args.write).parent / f"certify_{name}.png" if args.write else None
        if png is not None and png.exists():
            md += [f"![excess and gap against T, seed {min(stats['seeds'])} (one seed)]({png.name})", ""]
    if spread:
        md += [
            f"### Monte Carlo floor of the continuous fit ({spread['name']}, seed {spread['seed']}, "
            f"{len(spread['rows'])} independent sets of draws)",
            "",
            "| draws | excess train NLL vs EM | max Δmean | max Δcov | max Δw |",
            "|---|---|---|---|---|",
        ]
        md += [
            f"| {i} | {r['excess_train']:.2e} | {r['mean']:.4f} | {r['cov']:.4f} | {r['weight']:.4f} |"
            for i, r in enumerate(spread["rows"])
        ]
        md.append("")
    nstats = None
    if neural:
        sec, st = neural_section(neural)
        md += sec
        nstats = {"stats": st, "unit": neural}
    elif args.neural_steps > 0:
        md += ["### Neural denoisers on ring8: not run (interrupted)", ""]
    else:
        md += ["### Neural denoisers on ring8: not run in this invocation (`--neural-steps 0`)", ""]
    md += findings(mix, spread, nstats, big_t)
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, seeds 0 1 (a smoke run)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", nargs="+", default=list(K), choices=list(K))
    ap.add_argument("--n", type=int, default=1000, help="training (and test) points of the mixture presets")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000], help="DDPM T values")
    ap.add_argument("--variances", nargs="+", default=list(VARS), choices=VARS)
    ap.add_argument("--digits-seeds", type=int, nargs="+", default=None, help="default: --seeds")
    ap.add_argument("--digits-steps", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--digits-variances", nargs="+", default=["fixed_large"], choices=VARS)
    ap.add_argument("--spread", type=int, default=5, help="independent continuous fits on blobs2d (0: skip)")
    ap.add_argument("--neural-steps", type=int, default=4000, help="training steps per network (0: skip)")
    ap.add_argument("--neural-seed", type=int, default=0)
    ap.add_argument("--out", default="bench_out/certify", help="folder for units.json (the per-unit results)")
    ap.add_argument("--resume", action="store_true", help="keep the units already in --out/units.json")
    ap.add_argument("--write", default=None, help="markdown fragment to write (PNGs go next to it)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.n, args.steps, args.digits_steps, args.spread, args.neural_steps = 300, [10, 100], [10, 100], 2, 100
        if "--seeds" not in sys.argv:
            args.seeds = [0, 1]
    args.digits_seeds = args.digits_seeds if args.digits_seeds is not None else args.seeds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "units.json"
    store = json.loads(cache.read_text()) if args.resume and cache.exists() else {}
    units = {tuple(k.split("|")[:2]): v for k, v in store.items() if k.split("|")[0] in K}
    units = {(n, int(s)): v for (n, s), v in units.items()}
    spread, neural = store.get("spread"), store.get("neural")
    units = {key: u for key, u in units.items() if key[0] in args.data}
    earlier = [*units.values(), *(u for u in (spread, neural) if u)]
    prior, reused = sum(u["wall"] for u in earlier), len(earlier)
    t_start = time.perf_counter()

    def save_and_render():
        store.update({f"{n}|{s}": u for (n, s), u in units.items()})
        store["spread"], store["neural"] = spread, neural
        cache.write_text(json.dumps(store, indent=1))
        write(args.write, render(args, units, spread, neural, prior + time.perf_counter() - t_start, reused))

    png_dir = Path(args.write).parent if args.write else out
    for name in args.data:
        digits = name == "digits-pca2"
        seeds = args.digits_seeds if digits else args.seeds
        for i, seed in enumerate(seeds):
            if (name, seed) in units:
                continue
            png = png_dir / f"certify_{name}.png" if i == 0 else None
            units[(name, seed)] = mixture_unit(
                name,
                seed,
                args.n,
                args.digits_steps if digits else args.steps,
                args.digits_variances if digits else args.variances,
                png,
            )
            save_and_render()
    if args.spread > 0 and spread is None:
        spread = spread_unit("blobs2d", args.n, args.spread, args.seeds[0])
        save_and_render()
    if args.neural_steps > 0 and neural is None:
        neural = neural_unit(4 * args.n, args.neural_steps, 100 if args.quick else 500, args.neural_seed)
        save_and_render()
    save_and_render()


if __name__ == "__main__":
    main()
