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

Matched standard error: every row reports the standard error of its mean over images (``se``: the spread of the
per-image estimates, which includes the estimator's own noise) and the estimator's share alone (``est. se``). The
budgets are chosen so the estimator's share is at or below the between-image spread of the formula rows (about
0.15 bits/dim per image): ``n_t`` nodes for the formula, a few Hutchinson probes for the ODE; the DDPM ELBO
cannot get there by sampling terms (its est. se at ``n_t`` terms is shown), so it also runs with all 1000 terms.

Throughput: the formula estimator (``formula-dequantized`` through ``evaluate_images``) against a plain reference
loop written here, which calls the diffusers ``UNet2DModel`` once per timestep per image (batch 1), and computes
the same dequantised bound (uniform stratified log-SNR nodes, nearest timestep, exact end terms) with the same
number of network calls per image.

Run: python benchmarks/images.py [--quick] [--out bench_out/images]   (default: about 5-6 minutes on 2 CPU cores,
300 training steps; ``--quick``: about a minute). Prints a markdown table and writes ``results.json``.
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
from scoredensity.formula import end_terms
from scoredensity.image_eval import evaluate_images

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
    t0 = time.perf_counter()
    r = evaluate_images(eps, k, levels=LEVELS, methods=[method], seed=seed, progress=False, **kw)
    secs = time.perf_counter() - t0
    m = r["methods"][method]
    n = r["n"]
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
    }


def dequantize(k: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(k.shape, generator=g, dtype=torch.float64)
    return (2 * (k.to(torch.float64) + u - 0.5) / (LEVELS - 1) - 1).float()


def run_ode(eps, x: torch.Tensor, lam_range: tuple[float, float], trace: str, probes: int) -> dict:
    d = x[0].numel()
    kw = dict(trace=trace, rtol=1e-3, atol=1e-3, lam_min=lam_range[0], lam_max=lam_range[1])
    if trace == "hutchinson":
        kw["n_probes"] = probes
    t0 = time.perf_counter()
    r = sd.ode_log_likelihood(eps, x, **kw)
    secs = time.perf_counter() - t0
    bpd = sd.bits_per_dim(-r.logp, d, levels=LEVELS).to(torch.float64)
    est = r.stderr.to(torch.float64).nan_to_num(0.0) / (d * math.log(2))
    name = "ode-exact" if trace == "exact" else f"ode-hutchinson-{probes}"
    row = _row(name, "dequantized", bpd, est, float(r.nfe), float(r.info["vjp"]), secs)
    row["setting"] = {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3, "trace": trace, "n_probes": kw.get("n_probes")}
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


def markdown(rows: list[dict], throughput: dict) -> str:
    lines = [
        "| estimator | kind | images | bits/dim | se | est. se | nfe/image | vjp/image | s/image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['estimator']} | {r['kind']} | {r['n']} | {r['bpd']:.3f} | {r['se']:.3f} | {r['est_se']:.3f} | "
            f"{r['nfe']:.0f} | {r['vjp']:.0f} | {r['seconds_per_image']:.3f} |"
        )
    return "\n".join(lines) + "\n\n" + throughput_markdown(throughput)


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
    p.add_argument("--write", default=None, help="with --throughput-only: write the markdown fragment to this file")
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

    rows = []
    rows.append(run_formula_and_ddpm(eps, k, "formula-dequantized", args.seed, n_t=n_t))
    rows.append(run_formula_and_ddpm(eps, k, "formula-discrete", args.seed, n_t=n_t))
    rows.append(run_formula_and_ddpm(eps, k, "ddpm", args.seed, ddpm_steps=n_t))
    rows[-1]["estimator"] = f"ddpm ({n_t} of 1000 terms sampled)"
    rows.append(run_formula_and_ddpm(eps, k, "ddpm", args.seed, ddpm_steps=None))
    rows[-1]["estimator"] = "ddpm (all 1000 terms)"
    x = dequantize(k, args.seed + 1)
    rows.append(run_ode(eps, x, lam_range, "hutchinson", s["probes"]))
    rows.append(run_ode(eps, x[slow], lam_range, "exact", 0))
    # the same images as the exact-trace ODE, for a paired look at the slow row
    rows.append(run_ode(eps, x[slow], lam_range, "hutchinson", s["probes"]))
    rows[-1]["estimator"] += f" (first {s['n_slow']})"
    rows.append(run_formula_and_ddpm(eps, k[slow], "formula-dequantized", args.seed, n_t=n_t))
    rows[-1]["estimator"] = f"formula-dequantized (first {s['n_slow']})"
    rows.append(run_formula_and_ddpm(eps, k[slow], "formula-discrete", args.seed, n_t=n_t))
    rows[-1]["estimator"] = f"formula-discrete (first {s['n_slow']})"

    # throughput at the same network calls per image
    tp = throughput(eps, k[: s["naive_n"]], n_t, lam_range, args.seed)

    table = markdown(rows, tp)
    print(table)
    result = {
        "settings": {**s, "quick": args.quick, "seed": args.seed, "levels": LEVELS, "lam_range": lam_range},
        "model": {"pipeline": str(pipe), "source": eps.source, "prediction_type": eps.prediction_type},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "seconds": {"train_and_export": t_train, "total": time.perf_counter() - t_start},
        "rows": rows,
        "throughput": tp,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "table.md").write_text(table + "\n")
    print(f"\nwrote {out / 'results.json'} ({result['seconds']['total']:.0f} s in all, {t_train:.0f} s training)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
