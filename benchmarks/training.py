"""Training benchmark (issue 4): what the likelihood weighting and the log-SNR sampling buy, on CPU.

(a) ring8: held-out NLL bound (EMA weights, density formula) minus the exact NLL of the same test points, after
    the same number of steps for every (weighting, log-SNR sampling, range) scheme, over several seeds, with
    paired differences against the default (elbo + adaptive, [-12, 12]).
(b) digits (scikit-learn 8x8, 17 levels, 80/20 split, uniform dequantisation): held-out bits/dim of the diffusion
    MLP (logit transform; optionally also on [-1, 1]) over several seeds, against scikit-learn's GaussianMixture
    (best over n_components and covariance types, chosen on the test set) scored on the same dequantised images.
(c) steps per second of :func:`scoredensity.train.train` against a plain reference loop written here for the
    same network, batch and loss (no EMA, logging, keyed noise or checkpoints), interleaved repeats.

Usage (each writes its own markdown fragment; ``--quick`` checks the script in well under a minute)::

    python benchmarks/training.py --part a --seeds 0,1,2 --write docs/bench_training_ring8.md
    python benchmarks/training.py --part b --seeds 0,1,2 --raw-seeds 0,1,2 --write docs/bench_training_digits.md
    python benchmarks/training.py --part c --write docs/bench_training_speed.md

Prints one JSON line per measurement and the fragment at the end. With ``--write`` the fragment is also
rewritten after every finished run of (a) and (b), marked partial until the last one.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _fragment import mean_se, paired_diff, pm, provenance, write

from scoredensity.data import load_dataset
from scoredensity.dataset_eval import DATASET_KEYS, _model_inputs, evaluate_dataset
from scoredensity.eval_store import ResultStore
from scoredensity.losses import keyed_normals
from scoredensity.nets import build_denoiser, denoiser_config
from scoredensity.train import TrainConfig, data_std, train

RING_NET = {"type": "mlp", "hidden": 128, "blocks": 2, "emb_dim": 64}
SCHEMES = [
    ("elbo", "adaptive"),
    ("elbo", "adaptive", -20.0, 20.0),
    ("elbo", "adaptive", -8.0, 8.0),
    ("elbo", "uniform"),
    ("elbo", "t_uniform"),
    ("simple", "t_uniform"),
    ("simple", "ddpm"),
    ("simple", "uniform"),
]
RUN_ORDER = [0, 3, 5, 6, 7, 4, 1, 2]  # (a) the schemes the README compares first


def _emit(rec: dict) -> dict:
    print(json.dumps(rec), flush=True)
    return rec


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench_train_"))


def _eval_points(model, ds, n: int, lam_min: float, lam_max: float, seed: int) -> tuple[dict, torch.Tensor]:
    """The trainer's final held-out evaluation (same arguments, so the same figures), plus the per-point NLL bound.

    Within a seed every scheme is evaluated on the same test points with the same keyed draws, so per-point
    differences between schemes are paired (the exact NLL cancels)."""
    store = ResultStore(DATASET_KEYS)
    n = min(n, len(ds.x_test))
    ev = evaluate_dataset(model, ds, n=n, n_t=32, n_z=1, lam_min=lam_min, lam_max=lam_max, seed=seed, store=store)
    return ev, store.table(0, torch.arange(n))["nll"]


def part_a(
    steps: int, seeds: list[int], eval_n: int, schemes: list[int] | None = None, on_row=None
) -> tuple[list[dict], dict]:
    """ring8: bound - exact after the same number of steps for each weighting / sampling scheme.

    ``schemes``: indices into :data:`SCHEMES` to run (default all). The step count is the same for every scheme
    (they share the network, so this is also the same compute budget). Returns the rows and the per-point held-out
    NLL bounds ``{(scheme index, seed): tensor}`` for the paired comparisons.
    """
    d = _tmp()
    out, points = [], {}
    datasets = {seed: load_dataset("ring8", seed=seed) for seed in seeds}
    order = [i for i in RUN_ORDER if schemes is None or i in schemes]  # schemes outer: a partial run has all seeds
    for i in order:
        weighting, sampling, *rng = SCHEMES[i]
        for seed in seeds:
            ds = datasets[seed]
            lam_min, lam_max = rng or (-12.0, 12.0)
            cfg = TrainConfig(
                lam_min=lam_min,
                lam_max=lam_max,
                steps=steps,
                batch_size=512,
                lr=4e-3,
                weighting=weighting,
                lam_sampling=sampling,
                seed=seed,
                eval_final=False,
                log_every=10**9,
                checkpoint_every=10**9,
            )
            res = train(d / f"{i}-{seed}", {"name": "ring8", "seed": seed}, net=RING_NET, config=cfg)
            ev, nll = _eval_points(res.ema, ds, eval_n, lam_min, lam_max, seed)
            points[(i, seed)] = nll
            out.append(
                _emit(
                    {
                        "part": "a",
                        "scheme": i,
                        "weighting": weighting,
                        "lam_sampling": sampling,
                        "lam_range": [lam_min, lam_max],
                        "seed": seed,
                        "steps": steps,
                        "seconds": round(res.seconds, 1),
                        "n": ev["n"],
                        "nll": ev["nll"],
                        "true_nll": ev["true_nll"],
                        "gap": ev["gap"],
                        "gap_stderr": ev["gap_stderr"],
                    }
                )
            )
            if on_row is not None:
                on_row(out, points)
    shutil.rmtree(d, ignore_errors=True)
    return out, points


def _gmm_grid(quick: bool) -> list[tuple[str, int]]:
    if quick:
        return [("diag", 1), ("diag", 8)]
    return [(cov, k) for cov in ("diag", "full") for k in (1, 8, 16, 32, 64, 128)]


def _sklearn_gmm(ds, seed: int, n_test: int, grid: list[tuple[str, int]]) -> dict:
    """sklearn's GaussianMixture on the dequantised digits: fitted on the training split (dequantised once with a
    seeded generator), scored on the *same* dequantised test points as the diffusion evaluation (keyed uniforms of
    ``seed``, round 0), so per-image differences are paired. Best of ``grid`` chosen on the test set."""
    from sklearn.mixture import GaussianMixture as SkGMM

    xtr = ds.to_model(ds.x_train, generator=torch.Generator().manual_seed(seed)).flatten(1).double().numpy()
    ids = torch.arange(n_test)
    xte = _model_inputs(ds, ds.x_test[:n_test], ids, seed, 0, torch.device("cpu"))
    rows, best = [], None
    for cov, k in grid:
        t0 = time.perf_counter()
        m = SkGMM(n_components=k, covariance_type=cov, random_state=seed, reg_covar=1e-4, max_iter=200).fit(xtr)
        nll = torch.from_numpy(-m.score_samples(xte.flatten(1).double().numpy()))
        bpd = ds.bits_per_dim(nll, xte)  # logit Jacobian included
        rows.append({"covariance": cov, "n_components": k, "bpd": float(bpd.mean()), "s": time.perf_counter() - t0})
        if best is None or rows[-1]["bpd"] < best[0]["bpd"]:
            best = (rows[-1], bpd)
    return {"best": best[0], "points": best[1], "grid": rows}


def part_b(steps: int, seeds: list[int], raw_seeds: list[int], quick: bool, on_row=None) -> list[dict]:
    """digits: the diffusion MLP's held-out bits/dim against sklearn's GaussianMixture on the same split and the
    same dequantised test points, per seed; with the logit transform for ``seeds``, on [-1, 1] for ``raw_seeds``."""
    netcfg = {"type": "mlp", "hidden": 512, "blocks": 4, "emb_dim": 128}
    out = []
    d = _tmp()
    for logit, ss in ((True, seeds), (False, raw_seeds)):
        for seed in ss:
            data = {"name": "digits", "seed": seed, "test_fraction": 0.2, "logit": logit}
            ds = load_dataset(**data)
            n_test = len(ds.x_test) if not quick else 100
            gmm = _sklearn_gmm(ds, seed, n_test, _gmm_grid(quick))
            cfg = TrainConfig(
                steps=steps,
                batch_size=128,
                lr=1e-3,
                seed=seed,
                eval_n=n_test,
                eval_n_t=32,
                eval_every=max(steps // 4, 1),
                eval_final=False,
                weight_decay=0.0,
                ema_decay=0.999,
                log_every=10**9,
                checkpoint_every=10**9,
            )
            res = train(d / f"digits-{logit}-{seed}", data, net=netcfg, config=cfg)
            store = ResultStore(DATASET_KEYS)
            ev = evaluate_dataset(
                res.ema, ds, n=n_test, n_t=32, n_z=1, lam_min=-12.0, lam_max=12.0, seed=seed, store=store
            )
            nll = store.table(0, torch.arange(n_test))["nll"]  # nats on the [-1, 1] scale (Jacobian included)
            bpd = nll / (ds.dim * math.log(2)) + math.log2((ds.levels - 1) / 2)
            diff = bpd - gmm["points"]
            out.append(
                _emit(
                    {
                        "part": "b",
                        "logit": logit,
                        "seed": seed,
                        "steps": steps,
                        "seconds": round(res.seconds, 1),
                        "n_test": n_test,
                        "bpd": ev["bpd"],
                        "bpd_stderr": ev["bpd_stderr"],
                        "bpd_check": float(bpd.mean()),
                        "bpd_during_training": [[h["step"], h["eval"]["bpd"]] for h in res.history if "eval" in h],
                        "gmm_best": gmm["best"],
                        "gmm_grid": gmm["grid"],
                        "gmm_bpd": float(gmm["points"].mean()),
                        "diff_vs_gmm": float(diff.mean()),
                        "diff_vs_gmm_stderr": float(diff.std() / math.sqrt(n_test)),
                    }
                )
            )
            if on_row is not None:
                on_row(out)
    shutil.rmtree(d, ignore_errors=True)
    return out


def _reference_loop(net_cfg: dict, x: torch.Tensor, steps: int, batch: int, lam_min: float, lam_max: float) -> float:
    """A plain training loop for the same network and loss: uniform log-SNR, Adam, no extras. Returns steps/s."""
    torch.manual_seed(0)
    model = build_denoiser(net_cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(steps):
        xb = x[torch.randint(0, len(x), (batch,))]
        lam = lam_min + (lam_max - lam_min) * torch.rand(batch, dtype=torch.float64)
        t = torch.sigmoid(-lam)
        z = torch.randn_like(xb)
        x_t = (torch.sigmoid(lam).sqrt()[:, None] * xb + t.sqrt()[:, None] * z).float()
        loss = 0.5 * (lam_max - lam_min) * (z - model(x_t, t)).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0)


def part_c(steps: int, repeats: int) -> list[dict]:
    """Steps per second: the trainer against the plain reference loop, same network and batch, ``repeats``
    interleaved repeats per configuration (the order alternates, so a load change hits both alike)."""
    ds = load_dataset("ring8")
    out = []
    for rep in range(repeats):
        for hidden, batch in ((128, 512), (512, 256)):
            net = dict(RING_NET, hidden=hidden)
            net_cfg = denoiser_config([2], "mlp", **{k: v for k, v in net.items() if k != "type"})
            net_cfg.update(data_std=data_std(ds), num_classes=0)
            speeds = {}
            for who in ("reference", "trainer") if rep % 2 == 0 else ("trainer", "reference"):
                if who == "reference":
                    speeds[who] = _reference_loop(net_cfg, ds.x_train, steps, batch, -12.0, 12.0)
                else:
                    d = _tmp()
                    cfg = TrainConfig(
                        steps=steps, batch_size=batch, eval_final=False, log_every=50, checkpoint_every=10**9
                    )
                    speeds[who] = train(d / "c", {"name": "ring8"}, net=net, config=cfg).steps_per_second
                    shutil.rmtree(d, ignore_errors=True)
            out.append(
                _emit(
                    {
                        "part": "c",
                        "repeat": rep,
                        "hidden": hidden,
                        "batch": batch,
                        "steps": steps,
                        "trainer_steps_per_s": speeds["trainer"],
                        "reference_steps_per_s": speeds["reference"],
                        "ratio": speeds["trainer"] / speeds["reference"],
                    }
                )
            )
    # the keyed (Philox) noise on its own, per step of the larger batch
    t0 = time.perf_counter()
    for s in range(200):
        keyed_normals(0, s, torch.arange(256), (2,))
    out.append(_emit({"part": "c", "keyed_noise_ms_per_step": (time.perf_counter() - t0) / 200 * 1e3}))
    return out


# ------------------------------------------------------------------------------------------------ fragments
def _scheme_name(i: int) -> str:
    w, s, *rng = SCHEMES[i]
    lo, hi = rng or (-12.0, 12.0)
    return f"{w} + {SAMPLING_WORDS[s]}, [{lo:g}, {hi:g}]"


SAMPLING_WORDS = {
    "adaptive": "adaptive",
    "uniform": "uniform in log-SNR",
    "t_uniform": "uniform in t",
    "ddpm": "DDPM grid (T = 1000)",
}


def _rng(values: list[float], digits: int = 2) -> str:
    """``lo-hi`` for positive values, ``lo to hi`` (signed) otherwise."""
    lo, hi = min(values), max(values)
    if lo >= 0:
        return f"{lo:.{digits}f}-{hi:.{digits}f}"
    return f"{lo:+.{digits}f} to {hi:+.{digits}f}"


def fragment_a(rows: list[dict], points: dict, seeds: list[int], header: str) -> str:
    by = {(r["scheme"], r["seed"]): r for r in rows}
    idx = sorted(i for i in {r["scheme"] for r in rows} if all((i, s) in by for s in seeds))  # complete schemes
    rows = [r for r in rows if r["scheme"] in idx]
    r0 = rows[0]
    lines = [
        header,
        "",
        f"**ring8** (8-Gaussian ring, 2-D; exact NLL known). MLP denoiser (width 128, 2 residual blocks, "
        f"v-parameterisation), batch 512, AdamW lr 4e-3 with warm-up and cosine decay, EMA 0.995, **{r0['steps']} "
        f"steps for every scheme** (same network, so the same compute), seeds {', '.join(map(str, seeds))} "
        f"({len(seeds)} seeds: each seed draws its own data, 80/20 split, initialisation and noise). Evaluation: EMA "
        f"weights, the density formula (32 stratified log-SNR nodes per point, adaptive importance, Gaussian control "
        f"variate, over the training range of log-SNR) on the first {r0['n']} held-out points of the seed; within a "
        "seed every scheme is evaluated on the same points with the same keyed draws, so differences between schemes "
        "are paired per point (the exact NLL cancels).",
        "",
        "Columns: *gap* = held-out NLL bound minus exact NLL (nats), ± its paired standard error over the points, one "
        "entry per seed, then the mean ± se over seeds; *vs default* = the scheme's gap minus the default's "
        "(elbo + adaptive, [-12, 12]) per seed (± paired se over the shared points), then the mean ± se over seeds.",
        "",
        "| scheme (weighting + log-SNR sampling, range) | gap per seed | gap, mean over seeds | vs default per seed "
        "| vs default, mean over seeds |",
        "|---|---|---|---|---|",
    ]
    diffs = {}
    for i in idx:
        gaps = [by[(i, s)]["gap"] for s in seeds]
        cells = ", ".join(f"{by[(i, s)]['gap']:.3f} ± {by[(i, s)]['gap_stderr']:.3f}" for s in seeds)
        m, se = mean_se(gaps)
        if i == 0 or 0 not in idx:
            dcell, dmean = "(default)" if i == 0 else "-", "-"
        else:
            per = []
            for s in seeds:
                dd = points[(i, s)] - points[(0, s)]
                per.append((float(dd.mean()), float(dd.std() / math.sqrt(len(dd)))))
            diffs[i] = per
            dcell = ", ".join(pm(a, b) for a, b in per)
            dmean = pm(*paired_diff(gaps, [by[(0, s)]["gap"] for s in seeds]))
        lines.append(f"| {_scheme_name(i)} | {cells} | {m:.3f} ± {se:.3f} | {dcell} | {dmean} |")
    lines += ["", "Findings (computed from the rows above):", ""]
    if 0 in idx:
        g0 = [by[(0, s)]["gap"] for s in seeds]
        lines.append(
            f"- Default elbo + adaptive, [-12, 12]: gap {_rng(g0)} nats over the {len(seeds)} seeds "
            f"(mean {pm(*mean_se(g0))})."
        )
    simple = [i for i in idx if SCHEMES[i][0] == "simple" and SCHEMES[i][1] in ("t_uniform", "ddpm")]
    if simple and 0 in idx:
        gs = [by[(i, s)]["gap"] for i in simple for s in seeds]
        ds_ = [d for i in simple for d, _ in diffs[i]]
        ses = [e for i in simple for _, e in diffs[i]]
        zs = [d / e for i in simple for d, e in diffs[i]]
        n_pos = sum(d > 0 for d in ds_)
        lines.append(
            f"- L_simple with uniform t or the DDPM grid: gap {_rng(gs)} nats, {_rng(ds_)} nats more than the default "
            f"in {n_pos} of {len(ds_)} (scheme, seed) pairs (paired per point, se {_rng(ses, 3)}; "
            f"{min(zs):.0f}-{max(zs):.0f} se)."
        )
    uni = [i for i in idx if SCHEMES[i][:2] == ("elbo", "uniform")]
    if uni and 0 in idx:
        i = uni[0]
        ratios = [by[(i, s)]["gap"] / by[(0, s)]["gap"] for s in seeds]
        ok = all(by[(0, s)]["gap"] > 0 for s in seeds)
        lines.append(
            f"- elbo + uniform in log-SNR against the default: gap ratio {_rng(ratios, 1)}x per seed"
            + ("" if ok else " (a default gap <= 0 makes a ratio meaningless: read the paired difference)")
            + f"; paired difference {_rng([d for d, _ in diffs[i]], 3)} nats per seed, mean "
            f"{pm(*paired_diff([by[(i, s)]['gap'] for s in seeds], [by[(0, s)]['gap'] for s in seeds]))} over seeds."
        )
    for i in idx:
        if i in diffs and SCHEMES[i][1] == "adaptive":
            per = diffs[i]
            lines.append(
                f"- {_scheme_name(i)} against [-12, 12]: {', '.join(pm(a, b) for a, b in per)} per seed "
                f"(mean {pm(*paired_diff([by[(i, s)]['gap'] for s in seeds], [by[(0, s)]['gap'] for s in seeds]))})."
            )
    su = [i for i in idx if SCHEMES[i][:2] == ("simple", "uniform")]
    if su and uni:
        a, b = su[0], uni[0]
        dd = [float((points[(a, s)] - points[(b, s)]).mean()) for s in seeds]
        lines.append(
            f"- simple + uniform in log-SNR (the same objective as elbo + uniform in log-SNR up to a constant factor) "
            f"minus elbo + uniform in log-SNR: {', '.join(f'{x:+.3f}' for x in dd)} per seed "
            f"(mean {pm(*mean_se(dd))})."
        )
    lines.append(_wall_time_finding(rows))
    return "\n".join(lines)


def _wall_time_finding(rows: list[dict]) -> str:
    """The findings line on training wall time (for orientation: it depends on the load)."""
    secs = [r["seconds"] for r in rows]
    return (
        f"- Training wall time {min(secs):.0f}-{max(secs):.0f} s per run (wall-clock under the load printed above; "
        "for orientation only)."
    )


def fragment_b(rows: list[dict], header: str) -> str:
    lg = [r for r in rows if r["logit"]]
    raw = [r for r in rows if not r["logit"]]
    r0 = rows[0]
    grid = r0["gmm_grid"]
    covs = sorted({g["covariance"] for g in grid})
    ks = sorted({g["n_components"] for g in grid})
    lines = [
        header,
        "",
        f"scikit-learn's 8x8 **digits**, 17 levels, the library's seeded 80/20 split (per seed), uniform "
        f"dequantisation; {r0['n_test']} held-out images per seed. Figures are *dequantised* continuous densities in "
        "bits per dimension of the integer data, `bpd = NLL/(64 ln 2) + log2((17-1)/2)`, with the exact logit "
        f"Jacobian where the logit transform (alpha = 0.05) is used; uniform over 17 levels = {math.log2(17):.3f}.",
        "",
        f"- Diffusion: MLP (width 512, 4 residual blocks), elbo + adaptive, [-12, 12], {r0['steps']} steps of batch "
        "128, AdamW lr 1e-3, EMA 0.999; EMA weights evaluated by the density formula (32 stratified log-SNR nodes per "
        "image) on keyed dequantised test images.",
        f"- Reference: sklearn `GaussianMixture` (reg_covar 1e-4, max_iter 200), fitted on the seed's dequantised "
        f"training split, grid {{{', '.join(covs)}}} x {{{', '.join(map(str, ks))}}} components, the best "
        "configuration **chosen on the test set** (this favours the reference), scored on the same dequantised test "
        "images as the diffusion model, so the per-image difference is paired.",
        "- Each seed draws its own split, dequantisation noise, initialisation and training noise.",
        "",
        "| data space | seed | diffusion bpd | best GMM (config) bpd | diffusion - GMM (paired over images) "
        "| diffusion bpd during training (step: bpd) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r["gmm_best"]
        during = ", ".join(f"{s}: {b:.3f}" for s, b in r["bpd_during_training"])
        lines.append(
            f"| {'logit' if r['logit'] else '[-1, 1]'} | {r['seed']} | {r['bpd']:.3f} ± {r['bpd_stderr']:.3f} | "
            f"{r['gmm_bpd']:.3f} ({g['covariance']}, {g['n_components']}) | "
            f"{pm(r['diff_vs_gmm'], r['diff_vs_gmm_stderr'])} | {during} |"
        )
    lines += ["", "Findings (computed from the rows above):", ""]
    for name, rs in (("logit", lg), ("[-1, 1]", raw)):
        if not rs:
            continue
        n = len(rs)
        seeds_word = f"{n} seeds" if n > 1 else "one seed"
        b = mean_se([r["bpd"] for r in rs])
        gm = mean_se([r["gmm_bpd"] for r in rs])
        dd = paired_diff([r["bpd"] for r in rs], [r["gmm_bpd"] for r in rs])
        if n > 1:
            lines.append(
                f"- {name}, {seeds_word}: diffusion {b[0]:.3f} ± {b[1]:.3f} bits/dim (mean ± se over seeds) against "
                f"{gm[0]:.3f} ± {gm[1]:.3f} for the best GaussianMixture; difference {pm(*dd)} bits/dim (paired by "
                f"seed), per seed {', '.join(pm(r['diff_vs_gmm'], r['diff_vs_gmm_stderr']) for r in rs)} "
                "(paired over the same images)."
            )
        else:
            r = rs[0]
            lines.append(
                f"- {name}, one seed (seed {r['seed']}): diffusion {r['bpd']:.3f} ± {r['bpd_stderr']:.3f} bits/dim "
                f"against {r['gmm_bpd']:.3f} for the best GaussianMixture; difference "
                f"{pm(r['diff_vs_gmm'], r['diff_vs_gmm_stderr'])} bits/dim (paired over the same images)."
            )
        curves = [r["bpd_during_training"] for r in rs]
        steps_ = [s for s, _ in curves[0]]
        means = [mean_se([c[j][1] for c in curves])[0] for j in range(len(steps_))]
        lines.append(
            f"- {name}, held-out bpd during training (mean over {seeds_word}): "
            + ", ".join(f"{m:.3f} (step {s})" for s, m in zip(steps_, means, strict=True))
            + "."
        )
    if lg and raw:
        common = [s for s in (r["seed"] for r in raw) if s in {r["seed"] for r in lg}]
        if common:
            lg_bpd = {r["seed"]: r["bpd"] for r in lg}
            dd = [r["bpd"] - lg_bpd[r["seed"]] for r in raw if r["seed"] in lg_bpd]
            lines.append(
                f"- [-1, 1] minus logit for the diffusion model: {', '.join(f'{x:+.3f}' for x in dd)} bits/dim "
                f"(seed{'s' if len(common) > 1 else ''} {', '.join(map(str, common))})."
            )
    lines.append(_wall_time_finding(rows))
    return "\n".join(lines)


def fragment_c(rows: list[dict], header: str) -> str:
    reps = [r for r in rows if "ratio" in r]
    noise = next(r for r in rows if "keyed_noise_ms_per_step" in r)
    confs = sorted({(r["hidden"], r["batch"]) for r in reps})
    nrep = len({r["repeat"] for r in reps})
    lines = [
        header,
        "",
        f"ring8, {reps[0]['steps']} steps per timing, {nrep} interleaved repeats per configuration (the order of "
        "trainer and reference alternates between repeats), one torch thread. The reference loop (written in the "
        "benchmark) draws batches with `torch.randint`, noise with `torch.randn`, uniform log-SNR, and takes Adam "
        "steps, nothing else; the trainer (`scoredensity.train.train`) adds the keyed (Philox) per-example noise, the "
        "adaptive log-SNR sampler, gradient clipping, the EMA update and metrics (its steps/s is over the whole call). "
        "Steps/s are wall-clock under the load printed above; only the ratio within a repeat (same moment) is "
        "compared.",
        "",
        "| network | batch | trainer steps/s (median; per repeat) | reference steps/s (median; per repeat) "
        "| ratio trainer / reference (median; range) |",
        "|---|---|---|---|---|",
    ]
    find = []
    for h, b in confs:
        rs = [r for r in reps if (r["hidden"], r["batch"]) == (h, b)]
        tr = [r["trainer_steps_per_s"] for r in rs]
        rf = [r["reference_steps_per_s"] for r in rs]
        ra = [r["ratio"] for r in rs]
        lines.append(
            f"| MLP {h}x2 | {b} | {statistics.median(tr):.1f}; {', '.join(f'{x:.1f}' for x in tr)} | "
            f"{statistics.median(rf):.1f}; {', '.join(f'{x:.1f}' for x in rf)} | "
            f"{statistics.median(ra):.2f}; {min(ra):.2f}-{max(ra):.2f} |"
        )
        find.append(f"MLP {h}x2, batch {b}: {statistics.median(ra):.2f} (range {min(ra):.2f}-{max(ra):.2f})")
    lines += [
        "",
        "Findings (computed from the rows above):",
        "",
        f"- Trainer steps/s relative to the plain loop, median over {nrep} repeats: " + "; ".join(find) + ".",
        f"- Keyed noise alone: {noise['keyed_noise_ms_per_step']:.2f} ms per step (batch 256, d = 2).",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["a", "b", "c"], required=True)
    p.add_argument("--seeds", type=str, default="0,1,2", help="(a, b) comma-separated seeds (b: the logit runs)")
    p.add_argument("--steps-a", type=int, default=1200, help="(a) steps per run (default 1200)")
    p.add_argument("--eval-n", type=int, default=2000, help="(a) held-out points")
    p.add_argument("--schemes", type=str, default=None, help="(a) comma-separated indices into SCHEMES (default all)")
    p.add_argument("--steps", type=int, default=4000, help="(b) training steps on digits")
    p.add_argument("--raw-seeds", type=str, default="0", help="(b) seeds of the [-1, 1] runs ('' for none)")
    p.add_argument("--speed-steps", type=int, default=300, help="(c) steps per timing")
    p.add_argument("--repeats", type=int, default=5, help="(c) interleaved repeats")
    p.add_argument("--quick", action="store_true", help="tiny settings to check the script (not for the docs)")
    p.add_argument("--write", type=str, default=None, help="write the markdown fragment here")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.quick:
        args.steps_a, args.eval_n, args.steps, args.speed_steps, args.repeats = 60, 200, 40, 30, 2
    command = "python " + " ".join(["benchmarks/training.py"] + sys.argv[1:])
    n_runs = {"a": 0, "b": len(seeds) + len([s for s in args.raw_seeds.split(",") if s])}

    def fragment(rows, points=None, partial=False):
        header = provenance("benchmarks/training.py", command, time.perf_counter() - t0)
        if partial:
            header += (
                f"\n\n**Partial: {len(rows)} of {n_runs[args.part]} runs finished when this was written** "
                "(the wall time above is up to then)."
            )
        if args.part == "a":
            return fragment_a(rows, points, seeds, header)
        return fragment_b(rows, header) if args.part == "b" else fragment_c(rows, header)

    def on_row(rows, points=None):
        if args.write and len(rows) < n_runs[args.part]:
            try:
                text = fragment(rows, points, partial=True)
            except Exception:  # noqa: BLE001 (best effort: the final fragment is written at the end)
                return  # nothing complete to show yet
            Path(args.write).write_text(text + "\n")

    if args.part == "a":
        schemes = None if args.schemes is None else [int(i) for i in args.schemes.split(",")]
        n_runs["a"] = len(seeds) * (len(SCHEMES) if schemes is None else len(schemes))
        rows, points = part_a(args.steps_a, seeds, args.eval_n, schemes, on_row)
        text = fragment(rows, points)
    elif args.part == "b":
        rows = part_b(args.steps, seeds, [int(s) for s in args.raw_seeds.split(",") if s], args.quick, on_row)
        text = fragment(rows)
    else:
        text = fragment(part_c(args.speed_steps, args.repeats))
    write(args.write, text)


if __name__ == "__main__":
    main()
