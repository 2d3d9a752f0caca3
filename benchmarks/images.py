"""Bits per dimension of a real diffusers model on 8x8 digits: density formula vs DDPM ELBO vs probability-flow ODE.

Model: a small U-Net (``--channels 16,32``) trained by ``scoredensity train --data digits --net unet`` (elbo
weighting, dequantised data), exported with ``scoredensity export`` (a ``DDPMPipeline`` folder: ``UNet2DModel``
with a learned time-embedding table, ``v_prediction``, 1000-step linear schedule) and loaded back with
``scoredensity.load_diffusers_eps``, so every estimator calls a diffusers network (``timesteps="nearest"``).

Data: the first ``n`` test images of ``load_dataset("digits")`` (17 levels). Estimators, all in bits/dim of the
17-level data:

* ``formula-dequantized`` / ``formula-discrete``: :func:`scoredensity.image_eval.evaluate_images`, ``n_t`` log-SNR
  nodes per image on the trained range ``[t_1, t_T]``;
* ``ddpm``: the 1000-step DDPM ELBO (``fixed_small``, the exported scheduler's), once with ``n_t`` sampled KL terms
  (the same cost as the formula) and once summing all 1000 terms;
* ``ode``: :func:`scoredensity.ode_log_likelihood` on the same dequantised images (dopri5, rtol = atol = 1e-3, on
  the model's log-SNR range), with a Hutchinson trace (4 Rademacher probes; all ``n`` images) and
  with the exact trace (the first ``n_slow`` images); nats converted by ``bits_per_dim(nll, 64, levels=17)``.

Paired: every row is on the same images, and the dequantised rows (formula and both ODE traces) share the same
dequantisation noise ``u`` per image (``evaluate_images``' keyed stream, reproduced here for the ODE), so the
fragment gives per-image paired differences with their standard errors. ``se`` of a row is the standard error of
its mean over images (the spread of the per-image estimates, the estimator's noise included); ``est. se`` is the
estimator's share alone.

Throughput (``--throughput-only``, its own fragment docs/bench_images_throughput.md): the formula estimator
(``formula-dequantized`` through ``evaluate_images``) against a plain reference loop written here, which calls the
diffusers ``UNet2DModel`` once per timestep (per image, batch 1, or batched over the images), and computes the same
dequantised bound (uniform stratified log-SNR nodes, nearest timestep, exact end terms) with the same number of
network calls per image.

Run::

    python benchmarks/images.py --write docs/bench_images.md   # 1302 s wall at load about 10 on 2 cores, 541 s training
    python benchmarks/images.py --throughput-only --write docs/bench_images_throughput.md

(300 training steps, cached under ``--out``; ``--quick``: 40 training steps and 16 images, about a minute.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import scoredensity as sd
from scoredensity import rng
from scoredensity.data.dataset import levels_to_unit_scale
from scoredensity.eval_store import ResultStore
from scoredensity.formula import end_terms
from scoredensity.image_eval import evaluate_images, record_keys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fragment import paired_diff, pm, provenance, write  # noqa: E402

LEVELS = 17

SETTINGS = {
    "default": dict(train_steps=300, n=64, n_slow=8, n_t=64, probes=4, naive_n=16),
    "quick": dict(train_steps=40, n=16, n_slow=4, n_t=16, probes=4, naive_n=8),
}


def train_and_export(out: Path, steps: int, seed: int) -> Path:
    """Train the U-Net with the CLI and export it to a diffusers pipeline folder (reused if present)."""
    run, pipe = out / "run", out / "diffusers"
    cfg = run / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text())["train"]["steps"] != steps:
        raise SystemExit(f"{run} holds a run with another step count; remove {out} or pick another --out")
    if not (run / "checkpoint.safetensors").is_file():
        subprocess.run(
            [sys.executable, "-m", "scoredensity", "train", "--data", "digits", "--net", "unet", "--channels", "16,32",
             "--steps", str(steps), "--seed", str(seed), "--eval-n", "64", "--out", str(run), "--no-progress"],
            check=True,
        )  # fmt: skip
    if not (pipe / "model_index.json").is_file():
        subprocess.run([sys.executable, "-m", "scoredensity", "export", str(run), "--out", str(pipe)], check=True)
    return pipe


def _row(name: str, kind: str, bpd: torch.Tensor, est_se_per_image: torch.Tensor, nfe: float, vjp: float, secs: float):
    n = len(bpd)
    return {
        "estimator": name,
        "kind": kind,
        "n": n,
        "bpd": float(bpd.mean()),
        "se": float(bpd.std() / math.sqrt(n)),
        "est_se": float(est_se_per_image.pow(2).sum().sqrt() / n),
        "nfe": nfe,
        "vjp": vjp,
        "seconds_per_image": secs / n,
    }


def run_formula_and_ddpm(eps, k: torch.Tensor, method: str, seed: int, **kw) -> dict:
    """One method of ``evaluate_images``, with its per-image bits/dim (``per_image``) read from a result store."""
    t0 = time.perf_counter()
    store = ResultStore(record_keys([method]))
    r = evaluate_images(eps, k, levels=LEVELS, methods=[method], seed=seed, progress=False, store=store, **kw)
    secs = time.perf_counter() - t0
    m = r["methods"][method]
    n, d = r["n"], k[0].numel()
    logp = store.table(0, torch.arange(n))[f"{method}/logp"]
    bpd = -logp / (d * math.log(2)) + m.get("bpd_offset_dequantization", 0.0)
    assert abs(float(bpd.mean()) - m["bpd"]) < 1e-9, (float(bpd.mean()), m["bpd"])
    return {
        "estimator": method,
        "kind": m["kind"],
        "n": n,
        "bpd": m["bpd"],
        "se": m["bpd_stderr"],
        "est_se": m["bpd_estimator_stderr"],
        "nfe": m["nfe_per_example"],
        "vjp": 0.0,
        "seconds_per_image": secs / n,
        "terms_bpd": m["terms_bpd"],
        "setting": {k2: m[k2] for k2 in ("n_t", "T", "steps_sampled", "variance") if k2 in m},
        "per_image": bpd.tolist(),
    }


def shared_dequantization(k: torch.Tensor, seed: int) -> torch.Tensor:
    """The dequantised images ``evaluate_images`` scores with ``formula-dequantized`` (round 0, example ids
    0..n-1): ``x = 2(k + u - 1/2)/(L-1) - 1`` with ``u`` from its keyed stream, so the ODE rows share ``u``."""
    ids = torch.arange(k.shape[0])
    u = rng.uniforms(seed, rng.Stream.DEQUANT, ids, k[0].numel(), step=0).reshape(k.shape)
    return levels_to_unit_scale(k, LEVELS, u).float()


def dequantize(k: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(k.shape, generator=g, dtype=torch.float64)
    return (2 * (k.to(torch.float64) + u - 0.5) / (LEVELS - 1) - 1).float()


def run_ode(eps, x: torch.Tensor, lam_range: tuple[float, float], trace: str, probes: int, seed: int) -> dict:
    d = x[0].numel()
    kw = dict(trace=trace, rtol=1e-3, atol=1e-3, lam_min=lam_range[0], lam_max=lam_range[1])
    if trace == "hutchinson":
        kw["n_probes"] = probes
    t0 = time.perf_counter()
    r = sd.ode_log_likelihood(eps, x, seed=seed, example_ids=torch.arange(x.shape[0]), **kw)
    secs = time.perf_counter() - t0
    bpd = sd.bits_per_dim(-r.logp, d, levels=LEVELS).to(torch.float64)
    est = r.stderr.to(torch.float64).nan_to_num(0.0) / (d * math.log(2))
    name = "ode-exact" if trace == "exact" else f"ode-hutchinson-{probes}"
    row = _row(name, "dequantized", bpd, est, float(r.nfe), float(r.info["vjp"]), secs)
    row["setting"] = {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3, "trace": trace, "n_probes": kw.get("n_probes")}
    row["per_image"] = bpd.tolist()
    return row


@torch.no_grad()
def naive_loop(eps, k: torch.Tensor, calls: int, lam_range: tuple[float, float], seed: int) -> dict:
    """The dequantised bound, one diffusers UNet call per timestep per image (batch 1): the reference loop."""
    unet = eps.model
    abar = torch.cumprod(1 - eps.schedule.betas.to(torch.float64), 0)
    lam_grid = torch.log(abar) - torch.log1p(-abar)
    lo, hi = lam_range
    x_all = dequantize(k, seed + 1)
    d = x_all[0].numel()
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        logps = _naive_images(unet, abar, lam_grid, x_all, calls, lo, hi, g)
    secs = time.perf_counter() - t0
    bpd = sd.bits_per_dim(-torch.tensor(logps, dtype=torch.float64), d, levels=LEVELS)
    row = _row("reference loop (UNet per timestep, batch 1)", "dequantized", bpd, torch.zeros(len(k)), calls, 0, secs)
    row["setting"] = {"n_t": calls, "importance": "uniform", "timesteps": "nearest"}
    return row


def _naive_images(unet, abar, lam_grid, x_all, calls, lo, hi, g) -> list[float]:
    logps = []
    for x in x_all:
        x = x[None].to(torch.float64)
        lam = lo + (hi - lo) * (torch.arange(calls, dtype=torch.float64) + torch.rand(calls, generator=g)) / calls
        integral = 0.0
        for lam_i in lam:
            t = torch.sigmoid(-lam_i)
            z = torch.randn(x.shape, generator=g, dtype=torch.float64)
            x_t = torch.sqrt(1 - t) * x + torch.sqrt(t) * z
            j = int((lam_grid - lam_i).abs().argmin())
            v = unet(x_t.float(), torch.tensor([j])).sample.to(torch.float64)
            e = abar[j].sqrt() * v + (1 - abar[j]).sqrt() * x_t  # v_prediction -> eps, read at t_j
            integral += 0.5 * float(torch.sigmoid(lam_i) * z.pow(2).sum() - (z - e).pow(2).sum()) * (hi - lo) / calls
        noisy, clean = end_terms(x, lo, hi)
        logps.append(float(noisy[0] + clean[0]) + integral)
    return logps


def batched_loop(eps, k: torch.Tensor, calls: int, lam_range: tuple[float, float], seed: int) -> dict:
    """The same reference computation batched over the images: one diffusers UNet call per timestep for all images
    (each image keeps its own stratified log-SNR nodes, fed as per-image integer timesteps)."""
    unet = eps.model
    abar = torch.cumprod(1 - eps.schedule.betas.to(torch.float64), 0)
    lam_grid = torch.log(abar) - torch.log1p(-abar)
    lo, hi = lam_range
    x = dequantize(k, seed + 1).to(torch.float64)
    n, d = x.shape[0], x[0].numel()
    g = torch.Generator().manual_seed(seed)
    lam = lo + (hi - lo) * (torch.arange(calls, dtype=torch.float64) + torch.rand(n, calls, generator=g)) / calls
    shape = (-1,) + (1,) * (x.dim() - 1)
    integral = torch.zeros(n, dtype=torch.float64)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for c in range(calls):
            lam_c = lam[:, c]
            t = torch.sigmoid(-lam_c).reshape(shape)
            z = torch.randn(x.shape, generator=g, dtype=torch.float64)
            x_t = torch.sqrt(1 - t) * x + torch.sqrt(t) * z
            j = (lam_grid[None] - lam_c[:, None]).abs().argmin(1)
            v = unet(x_t.float(), j).sample.to(torch.float64)
            e = abar[j].sqrt().reshape(shape) * v + (1 - abar[j]).sqrt().reshape(shape) * x_t
            f = torch.sigmoid(lam_c) * z.flatten(1).pow(2).sum(1) - (z - e).flatten(1).pow(2).sum(1)
            integral += 0.5 * f * (hi - lo) / calls
        noisy, clean = end_terms(x, lo, hi)
    secs = time.perf_counter() - t0
    bpd = sd.bits_per_dim(-(noisy + clean + integral), d, levels=LEVELS)
    row = _row("reference loop (UNet per timestep, batched)", "dequantized", bpd, torch.zeros(n), calls, 0, secs)
    row["setting"] = {"n_t": calls, "importance": "uniform", "timesteps": "nearest"}
    return row


def throughput_markdown(throughput: dict) -> str:
    """The throughput table: evaluate_images against the batch-1 and the batched reference loops."""
    f = throughput["formula"]
    lines = [
        "| throughput (dequantised bound) | network calls/image | images/s | bits/dim ± se |",
        "|---|---|---|---|",
        f"| evaluate_images (batched) | {f['nfe']:.1f} | {f['images_per_second']:.2f} | "
        f"{f['bpd']:.3f} ± {f['se']:.3f} |",
    ]
    for key, label in (("reference", "reference loop (batch 1)"), ("batched", "reference loop (batched over images)")):
        if key in throughput:
            r = throughput[key]
            lines.append(
                f"| {label} | {r['nfe']:.0f} | {r['images_per_second']:.2f} | {r['bpd']:.3f} ± {r['se']:.3f} |"
            )
    lines.append(f"\nspeed-up of evaluate_images: {throughput['speedup']:.1f}x against the batch-1 loop")
    if "batched" in throughput:
        lines[-1] += f", {throughput['speedup_batched']:.1f}x against the batched loop"
    return "\n".join(lines)


def _pd(a: dict, b: dict, n: int | None = None) -> tuple[float, float, int]:
    """Mean ± se of the per-image differences a - b on the first ``n`` images (default: all images of both)."""
    n = min(len(a["per_image"]), len(b["per_image"])) if n is None else n
    m, se = paired_diff(a["per_image"][:n], b["per_image"][:n])
    return m, se, n


def main_fragment(rows: dict, s: dict, info: dict, command: str, seconds: float) -> str:
    """The main table, the paired differences and the findings, every number from the rows."""
    fd, fq = rows["formula-dequantized"], rows["formula-discrete"]
    dd, ds_ = rows["ddpm-all"], rows["ddpm-sampled"]
    oh, oe = rows["ode-hutchinson"], rows["ode-exact"]
    n, n_slow = fd["n"], oe["n"]
    lo, hi = info["lam_range"]
    L = [
        provenance("benchmarks/images.py", command, seconds),
        "",
        f"Model: one U-Net (`--channels 16,32`), one training seed ({info['seed']}): trained {s['train_steps']} steps "
        "by `scoredensity train --data digits --net unet` (elbo weighting, dequantised data), exported with "
        "`scoredensity export` and loaded with `scoredensity.load_diffusers_eps` (diffusers `UNet2DModel`, "
        f'`{info["prediction_type"]}`, 1000-step linear schedule, `timesteps="nearest"`, network only called on its '
        f"trained range, log-SNR [{lo:.1f}, {hi:.1f}]); training and export took {info['train_s']:.0f} s of the wall "
        f'time. Data: the first {n} test images of `load_dataset("digits")`, {LEVELS} levels; bits/dim of the '
        f"{LEVELS}-level data. Every row is on the same images; the dequantised rows (formula and both ODE traces) "
        "share the same dequantisation noise u per image (the keyed stream of `evaluate_images`), so the differences "
        "below are paired per image.",
        "",
        f"Estimators: `formula-*`: `evaluate_images` with {s['n_t']} log-SNR nodes per image (plus its shared pilot "
        "and, for the discrete bound, the decoder draws); `ddpm`: the 1000-step DDPM ELBO (`fixed_small`, the "
        f"exported scheduler's), with {s['n_t']} sampled KL terms (about the formula's cost) and summing all 1000; "
        f"`ode`: `ode_log_likelihood` (dopri5, rtol = atol = 1e-3, on the model's log-SNR range) with a Hutchinson "
        f"trace ({s['probes']} Rademacher probes, all {n} images) and with the exact trace (the first {n_slow} "
        "images), nats converted by `bits_per_dim(nll, 64, levels=17)`.",
        "",
        "Columns: `bits/dim` mean over images; `se` its standard error over images (the spread of the per-image "
        "estimates, estimator noise included); `est. se` the estimator's own share; `nfe`/`vjp` network calls and "
        "vector-Jacobian products per image; `s/image` wall-clock under the load of the provenance line (after a "
        "warm-up call; compare costs by nfe/vjp). `prior` / `diffusion` / `reconstruction`: the terms of the bound in "
        "bits/dim (costs) for the formula and DDPM rows.",
        "",
        "| estimator | kind | images | bits/dim | se | est. se | nfe/image | vjp/image | s/image | prior | diffusion "
        "| reconstruction |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("formula-dequantized", "formula-discrete", "ddpm-sampled", "ddpm-all", "ode-hutchinson", "ode-exact"):
        r = rows[key]
        t = r.get("terms_bpd")
        terms = " | ".join(f"{t[v]:.3f}" if t else "" for v in ("prior", "diffusion", "reconstruction"))
        L.append(
            f"| {r['estimator']} | {r['kind']} | {r['n']} | {r['bpd']:.3f} | {r['se']:.3f} | {r['est_se']:.3f} | "
            f"{r['nfe']:.0f} | {r['vjp']:.0f} | {r['seconds_per_image']:.3f} | {terms} |"
        )
    diffs = [
        ("formula-discrete − formula-dequantized", _pd(fq, fd), "same images; the discrete bound uses no u"),
        ("ode-hutchinson − formula-dequantized", _pd(oh, fd), "same images, same u"),
        (f"ode-exact − formula-dequantized (first {n_slow})", _pd(oe, fd, n_slow), "same images, same u"),
        (f"ode-hutchinson − ode-exact (first {n_slow})", _pd(oh, oe, n_slow), "same dequantised images"),
        ("ddpm (all 1000) − formula-discrete", _pd(dd, fq), "same images, both discrete"),
        (f"ddpm ({s['n_t']} sampled) − ddpm (all 1000)", _pd(ds_, dd), "same images"),
    ]
    L += [
        "",
        "Paired differences, bits/dim: mean of the per-image differences ± its standard error.",
        "",
        "| difference | images | mean ± se | pairing |",
        "|---|---|---|---|",
    ]
    for name, (m, se, k), how in diffs:
        L.append(f"| {name} | {k} | {pm(m, se)} | {how} |")
    dq, ohf, oef, he, ddf, _ = (d[1] for d in diffs)
    fnfe = f"{min(fd['nfe'], fq['nfe']):.0f}-{max(fd['nfe'], fq['nfe']):.0f}"

    def share(r: dict) -> str:
        return f"{100 * (r['est_se'] / r['se']) ** 2:.0f}%"

    F = [
        f"* Bounds of the exported U-Net on {n} images: {fd['bpd']:.2f} ± {fd['se']:.2f} bits/dim dequantised and "
        f"{fq['bpd']:.2f} ± {fq['se']:.2f} discrete, at {fnfe} network calls per image; the discrete bound is "
        f"{pm(dq[0], dq[1])} bits/dim above the dequantised one (paired over the {dq[2]} images). Terms (discrete vs "
        f"dequantised): diffusion {fq['terms_bpd']['diffusion']:.2f} vs {fd['terms_bpd']['diffusion']:.2f}, "
        f"reconstruction {fq['terms_bpd']['reconstruction']:.2f} vs {fd['terms_bpd']['reconstruction']:.2f} + "
        f"log2(8) = {fd['terms_bpd']['reconstruction'] + math.log2((LEVELS - 1) / 2):.2f} bits/dim (the 17-level "
        "bin offset): the discrete decoder at t_1 can at best give its bin probability 1 (0 bits), while the "
        "dequantised Gaussian reconstruction credits a density. The network was trained on dequantised data, so "
        "it never learns to snap to the lattice.",
        f"* The probability-flow ODE (not a bound; the ODE model of the same network) on the same dequantised images: "
        f"ode-hutchinson − formula-dequantized {pm(ohf[0], ohf[1])} bits/dim ({ohf[2]} images), ode-exact − "
        f"formula-dequantized {pm(oef[0], oef[1])} ({oef[2]} images). Hutchinson with {s['probes']} probes against "
        f"the exact trace on the same images: {pm(he[0], he[1])} bits/dim ({he[2]} images). Cost: "
        f"{oh['nfe']:.0f} calls + {oh['vjp']:.0f} vjps per image (Hutchinson) and {oe['nfe']:.0f} + {oe['vjp']:.0f} "
        f"(exact trace) against {fd['nfe']:.0f} calls for the formula.",
        f"* The DDPM ELBO (fixed_small, all 1000 terms, {dd['nfe']:.0f} calls per image) is {pm(ddf[0], ddf[1])} "
        f"bits/dim above the formula's discrete bound on the same images. Sampling {s['n_t']} of its terms "
        f"({ds_['nfe']:.0f} calls) gives se {ds_['se']:.3f} ({ds_['se'] / fq['se']:.1f}x the discrete formula's "
        f"{fq['se']:.3f} at {fq['nfe']:.0f} calls; est. se {ds_['est_se']:.3f}).",
        f"* Standard errors over {n} images: formula dequantised {fd['se']:.3f} and discrete {fq['se']:.3f}, "
        f"full-sum DDPM {dd['se']:.3f}, Hutchinson ODE {oh['se']:.3f} bits/dim; the estimator's share of the "
        f"variance of the mean (est. se² / se²): {share(fd)}, {share(fq)}, {share(dd)}, {share(oh)}, the rest is "
        "the spread between images. The rows estimate different quantities, so equal se does not mean equal cost "
        "for the same quantity (calls to a target estimator se: the target-se benchmark).",
        f"* The full-sum DDPM ELBO's stated estimator se ({dd['est_se']:.3f}) is "
        f"{dd['est_se'] / dd['se']:.1f}x its total se over images ({dd['se']:.3f})"
        + (", so its per-image error bars overstate the noise here." if dd["est_se"] > dd["se"] else "."),
    ]
    return "\n".join(
        L + ["", "Findings (computed by the script from the rows above; one model, one training seed):", ""] + F
    )


def throughput(eps, k: torch.Tensor, n_t: int, lam_range: tuple[float, float], seed: int) -> dict:
    """evaluate_images against both reference loops at equal network calls per image (after a warm-up call)."""
    run_formula_and_ddpm(eps, k[:2], "formula-dequantized", seed, n_t=n_t)  # one-off first-call costs
    form = run_formula_and_ddpm(eps, k, "formula-dequantized", seed, n_t=n_t)
    ref = naive_loop(eps, k, round(form["nfe"]), lam_range, seed)
    bat = batched_loop(eps, k, round(form["nfe"]), lam_range, seed)
    out = {
        "formula": {**form, "images_per_second": 1 / form["seconds_per_image"]},
        "reference": {**ref, "images_per_second": 1 / ref["seconds_per_image"]},
        "batched": {**bat, "images_per_second": 1 / bat["seconds_per_image"]},
    }
    out["speedup"] = out["formula"]["images_per_second"] / out["reference"]["images_per_second"]
    out["speedup_batched"] = out["formula"]["images_per_second"] / out["batched"]["images_per_second"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="about a minute: 40 training steps, 16 images")
    p.add_argument("--out", default="bench_out/images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--throughput-only", action="store_true", help="only the throughput table (the same U-Net)")
    p.add_argument("--write", default=None, help="write the markdown fragment (main table or --throughput-only) here")
    args = p.parse_args(argv)
    s = SETTINGS["quick" if args.quick else "default"]
    out = Path(args.out) / ("quick" if args.quick else "default")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    pipe = train_and_export(out, s["train_steps"], args.seed)
    t_train = time.perf_counter() - t_start

    eps = sd.load_diffusers_eps(pipe)
    ds = sd.load_dataset("digits", seed=args.seed)
    k = ds.x_test[: s["n"]]
    assert not k.dtype.is_floating_point and int(k.max()) <= LEVELS - 1
    t_lo, t_hi = eps.t_range
    lam_range = (math.log((1 - t_hi) / t_hi), math.log((1 - t_lo) / t_lo))
    n_t, slow = s["n_t"], slice(0, s["n_slow"])
    if args.throughput_only:
        t0 = time.perf_counter()
        tp = throughput(eps, k[: s["naive_n"]], n_t, lam_range, args.seed)
        text = "\n".join(
            [
                "<!-- written by benchmarks/images.py --throughput-only; do not edit by hand -->",
                "",
                f"Command: `python benchmarks/images.py{' --quick' if args.quick else ''} --throughput-only"
                f"{f' --write {args.write}' if args.write else ''}` ({time.perf_counter() - t0:.0f} s for the table, "
                f"{t_train:.0f} s training/export; {time.strftime('%Y-%m-%d')}, {platform.machine()}, torch "
                f"{torch.__version__}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}).",
                "",
                f"Digits U-Net (`--channels 16,32`, trained {s['train_steps']} steps and exported to diffusers), "
                f"{s['naive_n']} test images, {n_t} log-SNR nodes: the dequantised bound by `evaluate_images` against "
                "the same computation written as a loop over timesteps that calls the diffusers `UNet2DModel` once per "
                "timestep, either per image (batch 1) or for all images at once. Seconds include every call; the "
                "machine was shared, so compare the rows with each other, not with other runs.",
                "",
                throughput_markdown(tp),
                "",
            ]
        )
        print(text)
        if args.write:
            Path(args.write).write_text(text)
        return 0

    command = "python benchmarks/images.py " + " ".join(sys.argv[1:] if argv is None else argv)
    run_formula_and_ddpm(eps, k[:2], "formula-dequantized", args.seed, n_t=8)  # one-off first-call costs
    rows = {}
    rows["formula-dequantized"] = run_formula_and_ddpm(eps, k, "formula-dequantized", args.seed, n_t=n_t)
    rows["formula-discrete"] = run_formula_and_ddpm(eps, k, "formula-discrete", args.seed, n_t=n_t)
    rows["ddpm-sampled"] = run_formula_and_ddpm(eps, k, "ddpm", args.seed, ddpm_steps=n_t)
    rows["ddpm-sampled"]["estimator"] = f"ddpm ({n_t} of 1000 terms sampled)"
    rows["ddpm-all"] = run_formula_and_ddpm(eps, k, "ddpm", args.seed, ddpm_steps=None)
    rows["ddpm-all"]["estimator"] = "ddpm (all 1000 terms)"
    x = shared_dequantization(k, args.seed)  # the u of formula-dequantized
    rows["ode-hutchinson"] = run_ode(eps, x, lam_range, "hutchinson", s["probes"], args.seed)
    rows["ode-exact"] = run_ode(eps, x[slow], lam_range, "exact", 0, args.seed)
    info = {"seed": args.seed, "lam_range": lam_range, "prediction_type": eps.prediction_type, "train_s": t_train}
    text = main_fragment(rows, s, info, command, time.perf_counter() - t_start)
    write(args.write, text)
    result = {
        "settings": {**s, "quick": args.quick, "seed": args.seed, "levels": LEVELS, "lam_range": lam_range},
        "model": {"pipeline": str(pipe), "source": eps.source, "prediction_type": eps.prediction_type},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "seconds": {"train_and_export": t_train, "total": time.perf_counter() - t_start},
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out / 'results.json'} ({result['seconds']['total']:.0f} s in all, {t_train:.0f} s training)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
