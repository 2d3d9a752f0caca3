"""Network calls per image to reach a data-set standard error of 0.01 bits/dim on the digits U-Net.

"Data-set standard error" is the estimator's own error of the data-set mean (the images held fixed), in bits/dim:
``sqrt(sum_i var_i) / N`` over the ``N`` test images, ``var_i`` the variance of image ``i``'s estimate. It shrinks
with calls; the spread between images does not (it is reported apart as "± images"). Estimators:

* **formula + --target-se**: ``evaluate_images(methods=("formula-discrete",), target_se=0.01)`` on all test
  images: rounds of ``n_t`` log-SNR nodes (plus the decoder's draws) until the standard error from the spread
  between rounds is <= 0.01. Measured directly.
* **DDPM full sum** (improved-diffusion's ``calc_bpd_loop``): ``ddpm_elbo`` with every one of the T = 1000 steps,
  one z per step (T calls per image), the same discrete bound; two independent passes on the first ``n_sub`` images
  give the per-image variance; the data-set standard error of one pass over all ``N`` images is extrapolated as
  ``sqrt(mean_i var_i / N)``. A full sum cannot stop early, so its cost is ``T * max(1, (se_1 / 0.01)^2)`` calls.
* **DDPM sampled steps + --target-se**: ``evaluate_images(methods=("ddpm",), ddpm_steps=50, target_se=0.01)``,
  the CLI's default estimator, in rounds (capped; extrapolated ``calls * (se / 0.01)^2`` if the cap stops it).
* **ODE + Hutchinson** (score_sde's estimator): ``ode_log_likelihood(trace="hutchinson")`` (dopri5,
  rtol = atol = 1e-3, one Rademacher probe per pass) on the first ``n_sub`` images of the dequantised data, two
  passes with independent probes; extrapolated like the DDPM full sum. It estimates a different quantity (the
  ODE model's density of dequantised data, not a discrete bound) and has a solver bias that does not shrink
  with probes; only its noise is compared here.

Model: the digits U-Net (``scoredensity train --data digits --net unet --channels 16,32 --batch-size 64``)
trained briefly here; data: its test split (17 levels).

Run: python benchmarks/target_se.py [--steps 300] [--n-sub 24] [--work DIR]   (about 10 minutes on a shared
2-core machine). Writes docs/bench_target_se.md.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scoredensity import rng
from scoredensity.checkpoint import load_run
from scoredensity.data.dataset import levels_to_unit_scale
from scoredensity.ddpm import ddpm_elbo
from scoredensity.image_eval import _round_keys, evaluate_images
from scoredensity.ode import ode_log_likelihood
from scoredensity.schedules import DDPMSchedule, linear_betas

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.01


def train_run(work: Path, steps: int) -> Path:
    """Train the digits U-Net with the CLI (reused if present)."""
    run = work / f"digits-unet-{steps}"
    if not (run / "checkpoint.safetensors").exists():
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "scoredensity", "train", "--data", "digits", "--net", "unet"]
        cmd += ["--channels", "16,32", "--batch-size", "64", "--steps", str(steps), "--out", str(run)]
        subprocess.run(cmd + ["--threads", "1", "--no-progress", "--eval-n", "0"], env=env, check=True)
    return run


def two_pass_se(values: list[torch.Tensor], n_full: int) -> tuple[float, float]:
    """From two independent passes (each [n] nats) on ``n`` images: (the mean per-image variance of one pass,
    the data-set standard error of one pass over ``n_full`` images, both in nats)."""
    v = torch.stack(values)  # [2, n]
    var = float(v.var(0).mean())
    return var, math.sqrt(var / n_full)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n-sub", type=int, default=24)
    ap.add_argument("--n-t", type=int, default=8)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "scoredensity_bench_target_se"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "bench_target_se.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run = train_run(work, args.steps)
    model, config, dataset = load_run(run)
    images = dataset.x_test  # [N, 1, 8, 8] levels 0..16
    n, d, levels = images.shape[0], images[0].numel(), dataset.levels
    to_bits = 1.0 / (d * math.log(2))
    schedule = DDPMSchedule(linear_betas(1000))
    t_range = (float(schedule.times[0]), float(schedule.times[-1]))
    common = dict(levels=levels, t_range=t_range, schedule=schedule, progress=False)
    rows = []

    # 1. the formula with --target-se, measured on all N images
    t0 = time.perf_counter()
    res = evaluate_images(
        model, images, methods=("formula-discrete",), n_t=args.n_t, target_se=TARGET, max_rounds=64, **common
    )
    r = res["methods"]["formula-discrete"]
    rows.append(
        dict(
            what=f"formula (discrete decoder) + --target-se, rounds of n_t={args.n_t}",
            bpd=r["bpd"],
            spread=r["bpd_stderr"],
            se=r["bpd_estimator_stderr"],
            calls=r["nfe_per_example"],
            how=f"measured: {r['rounds']} rounds on all {n} images",
            sec=time.perf_counter() - t0,
        )
    )
    print(rows[-1], flush=True)

    # 2. the DDPM full sum, T calls per image (n_z = 1), two passes on the first n_sub images
    sub = torch.arange(min(args.n_sub, n))
    x_sub = levels_to_unit_scale(images[sub], levels).float()
    t0 = time.perf_counter()
    passes = [
        ddpm_elbo(
            model,
            x_sub,
            schedule=schedule,
            variance="fixed_small",
            decoder="discretized",
            levels=levels,
            n_steps_sampled=None,
            n_z=1,
            example_ids=_round_keys(sub, p),
            max_batch=2048,
        )
        for p in range(2)
    ]
    var, se1 = two_pass_se([-q.logp for q in passes], n)
    calls1 = passes[0].nfe
    bpd = float(torch.stack([-q.logp for q in passes]).mean() * to_bits)
    need = calls1 * max(1.0, (se1 * to_bits / TARGET) ** 2)
    rows.append(
        dict(
            what="DDPM ELBO, full sum of T=1000 steps (calc_bpd_loop), fixed_small",
            bpd=bpd,
            spread=float("nan"),
            se=se1 * to_bits,
            calls=need,
            spent=calls1,
            how=f"extrapolated from 2 passes on {len(sub)} images: one pass ({calls1:.0f} calls) gives "
            f"{se1 * to_bits:.4f} on {n} images",
            sec=time.perf_counter() - t0,
        )
    )
    print(rows[-1], flush=True)

    # 3. DDPM with 50 sampled steps (the CLI default) + --target-se, capped
    t0 = time.perf_counter()
    cap = 6
    res = evaluate_images(model, images, methods=("ddpm",), ddpm_steps=50, target_se=TARGET, max_rounds=cap, **common)
    r = res["methods"]["ddpm"]
    reached = res["target_se"]["reached"]
    need = r["nfe_per_example"] * max(1.0, (r["bpd_estimator_stderr"] / TARGET) ** 2)
    rows.append(
        dict(
            what="DDPM ELBO, 50 sampled steps per round + --target-se, fixed_small",
            bpd=r["bpd"],
            spread=r["bpd_stderr"],
            se=r["bpd_estimator_stderr"],
            calls=r["nfe_per_example"] if reached else need,
            spent=r["nfe_per_example"],
            how=f"measured: {r['rounds']} rounds on all {n} images"
            + ("" if reached else f" (cap {cap} reached: extrapolated as calls x (se/0.01)^2)"),
            sec=time.perf_counter() - t0,
        )
    )
    print(rows[-1], flush=True)

    # 4. the probability-flow ODE with Hutchinson traces, two passes with independent probes on n_sub images
    t0 = time.perf_counter()
    u = rng.uniforms(0, rng.Stream.DEQUANT, sub, d).reshape(x_sub.shape)
    x_deq = levels_to_unit_scale(images[sub], levels, u).float()
    lam_lo, lam_hi = config["train"]["lam_min"], config["train"]["lam_max"]
    odes = [
        ode_log_likelihood(
            model,
            x_deq,
            trace="hutchinson",
            n_probes=1,
            rtol=1e-3,
            atol=1e-3,
            seed=p,
            lam_min=lam_lo,
            lam_max=lam_hi,
            example_ids=sub,
        )
        for p in range(2)
    ]
    var, se1 = two_pass_se([-q.logp for q in odes], n)
    calls1 = float(sum(q.nfe for q in odes) / 2)
    offset = math.log2((levels - 1) / 2)
    bpd = float(torch.stack([-q.logp for q in odes]).mean() * to_bits) + offset
    need = calls1 * max(1.0, (se1 * to_bits / TARGET) ** 2)
    rows.append(
        dict(
            what="probability-flow ODE, Hutchinson (1 Rademacher probe), dopri5 1e-3, dequantised",
            bpd=bpd,
            spread=float("nan"),
            se=se1 * to_bits,
            calls=need,
            spent=calls1,
            how=f"extrapolated from 2 passes on {len(sub)} images: one pass ({calls1:.0f} forward calls + as many "
            f"vjps) gives {se1 * to_bits:.4f} on {n} images",
            sec=time.perf_counter() - t0,
        )
    )
    print(rows[-1], flush=True)

    base = rows[0]["calls"]
    lines = [
        "# Calls per image to reach a data-set standard error of 0.01 bits/dim (digits U-Net)",
        "",
        "Written by `benchmarks/target_se.py` (do not edit by hand): "
        f"`python benchmarks/target_se.py --steps {args.steps} --n-sub {args.n_sub} --n-t {args.n_t}`. "
        f"Model: the digits U-Net (channels 16, 32) trained {args.steps} steps; data: its {n} test images "
        f"(17 levels). Measured {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')} on the CPU, "
        f"1 thread, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, "
        f"{time.perf_counter() - t_start:.0f} s in all.",
        "",
        "Data-set standard error: the estimator's own error of the mean over these images (images held fixed); "
        '"± images" is the spread between images / sqrt(N), which no number of calls reduces. Rows marked '
        "*extrapolated* measure the per-image variance on a subset and scale it as described in the script's "
        "docstring; they are not direct runs to 0.01. The formula and DDPM rows bound the same discrete "
        "probability; the ODE row is the ODE model's density of dequantised data (another quantity; its solver "
        "bias is not counted).",
        "",
        "Calls/image to 0.01: what the estimator spends to get there (the formula and sampled DDPM in whole "
        "rounds, at least two so that the error comes from the spread between rounds; the full sum and the ODE "
        "in whole passes). Calls at exactly 0.01: the same cost rescaled by (se / 0.01)^2, i.e. if the error "
        "fell as 1/sqrt(calls) without rounding to whole rounds or passes (for the full DDPM sum and the ODE, "
        "below one pass this is not attainable: they cannot stop early).",
        "",
        "| estimator | bits/dim | ± images | data-set se | calls/image to 0.01 | x formula | calls at exactly 0.01 "
        "| how |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = "-" if math.isnan(r["spread"]) else f"{r['spread']:.3f}"
        spent = r.get("spent", r["calls"])
        exact = spent * (r["se"] / TARGET) ** 2
        lines.append(
            f"| {r['what']} | {r['bpd']:.3f} | {spread} | {r['se']:.4f} | {r['calls']:.0f} | "
            f"{r['calls'] / base:.1f} | {exact:.0f} | {r['how']} |"
        )
    Path(args.doc).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
