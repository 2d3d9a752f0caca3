"""Every published evaluation convention on the same small U-Net, so that their differences are seen in bits/dim.

Model: ``--diffusers DIR``, a diffusers folder (e.g. a digits U-Net trained and exported with
``scoredensity train --data digits --net unet --channels 16,32 --steps 400 --seed 0 --out RUN`` and
``scoredensity export RUN --out DIR``); without it, a random-weight ``UNet2DModel`` (8x8, channels (8, 16)) on
diffusers' default 1000-step linear schedule, which is enough to show the bookkeeping but not realistic figures.

Data: the first ``--n`` test images of ``load_dataset("digits")`` (8x8, 17 levels, ``x = 2k/16 - 1``). The
conventions are defined for 8-bit data; here every discrete one runs with ``levels = 17`` (bins ``x ± 1/16``).

Rows (same seed, so the discrete rows share their noise where their steps coincide):

* ``ddpm`` / ``improved-diffusion`` (fixed_large, decoder variance ``sigma~_2^2``, clipped ``x0``), and the variants
  ``fixed_small``, ``cdf="tanh"``, ``clip_denoised=False``, and ``scoredensity`` (fixed_large, decoder ``b_1``, no
  clipping), each by :func:`scoredensity.ddpm_elbo` with all T KL terms (``n_z = 2``);
* ``scoredensity`` (formula): :func:`scoredensity.log_density` with the discretised decoder on the model's own
  log-SNR range ``[lam(t_T), lam(t_1)]``;
* ``vdm``-style: the same formula on VDM's range ``[-5, 13.3]`` cut to the model's range, with VDM's categorical
  decoder (on the model's grid ``2k/16 - 1``) at the clean end.

It also prints the model-free part of the fixed_large bound, ``sum_{k>=2} d/2 (r_k - 1 - log r_k)`` with
``r_k = t_{k-1} / t_k`` (the KL between the posterior variance and ``b_k``), which the continuous bound does not pay.

Run: python benchmarks/conventions.py [--diffusers DIR] [--n 8]. Writes docs/bench_conventions.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from _fragment import provenance, write
from _tiny_unet import perturbed_tiny_unet

import scoredensity as sd
from scoredensity.ddpm import ddpm_elbo, kl_constants, reverse_variances
from scoredensity.decoders import categorical_gaussian_log_likelihood

LEVELS = 17
OUT = Path(__file__).resolve().parents[1] / "docs" / "bench_conventions.md"


def random_unet() -> sd.DiffusersEps:
    from diffusers import DDPMScheduler

    unet = perturbed_tiny_unet()
    return sd.DiffusersEps(unet, DDPMScheduler().config)


def bpd(r) -> tuple[float, float]:
    """Mean bits/dim of a discrete result and the estimator's standard error of that mean."""
    b = r.bits_per_dim()
    return float(b.mean()), r.mean_stderr() / (r.dim * math.log(2))


def vdm_row(eps, x, lam_range, n_t, seed) -> tuple[float, float]:
    """Continuous ELBO on ``lam_range`` with VDM's categorical decoder at ``lam_max`` (prior KL at ``lam_min``)."""
    lo, hi = lam_range
    r = sd.log_density(eps, x, lam_min=lo, lam_max=hi, n_t=n_t, decoder="discretized", levels=LEVELS, seed=seed)
    d = r.dim
    sp = lambda v: float(torch.nn.functional.softplus(torch.tensor(v, dtype=torch.float64)))  # noqa: E731
    prior = r.terms["noisy_end"] - 0.5 * d * sp(lo)
    diffusion = r.terms["integral"] - 0.5 * d * (sp(hi) - sp(lo))
    # categorical decoder: z_0 = alpha_0 x + sigma_0 z, rescaled z_0 / alpha_0 = x + exp(-lam/2) z
    draws = 8
    vals = []
    for j in range(draws):
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed * 1000 + j), dtype=torch.float64)
        mean = x.to(torch.float64) + math.exp(-hi / 2) * z
        vals.append(categorical_gaussian_log_likelihood(x, mean, -hi / 2, LEVELS, centres="grid"))
    rec = torch.stack(vals).mean(0)
    total = prior + diffusion + rec
    se = (r.stderr.pow(2) + torch.stack(vals).var(0) / draws).sqrt()
    return float((-total / (d * math.log(2))).mean()), float(se.pow(2).sum().sqrt() / len(se)) / (d * math.log(2))


def describe(folder: str) -> str:
    """The model of a diffusers folder in words, from its own config files (not its path, which is local)."""
    unet = json.loads((Path(folder) / "unet" / "config.json").read_text())
    sched = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    return (
        f"the diffusers folder given as `--diffusers` ({unet['_class_name']}, {unet['sample_size']}x"
        f"{unet['sample_size']}x{unet['in_channels']}, block_out_channels {unet['block_out_channels']}, "
        f"{sched['num_train_timesteps']}-step {sched['beta_schedule']} schedule, {sched['prediction_type']} "
        "prediction; made by the two commands in the script's docstring)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diffusers", default=None, help="diffusers folder of the model (default: random-weight U-Net)")
    ap.add_argument("--n", type=int, default=8, help="test images")
    ap.add_argument("--n-t", type=int, default=64, help="log-SNR nodes of the formula rows")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    eps = random_unet() if args.diffusers is None else sd.load_diffusers_eps(args.diffusers)
    model = "random-weight U-Net (8x8, channels 8,16)" if args.diffusers is None else describe(args.diffusers)
    k = sd.load_dataset("digits", seed=0).x_test[: args.n]
    x = (2 * k.to(torch.float64) / (LEVELS - 1) - 1).float()
    sch = eps.schedule
    T, d = sch.num_steps, x[0].numel()
    t_lo, t_hi = eps.t_range
    lam_range = (math.log((1 - t_hi) / t_hi), math.log((1 - t_lo) / t_lo))

    rows = []
    common = dict(schedule=sch, levels=LEVELS, seed=args.seed, max_batch=4096)
    discrete = [
        ("ddpm", "ddpm", {}),
        ("improved-diffusion (fixed_large)", "improved-diffusion", {}),
        ("improved-diffusion, cdf=tanh", "improved-diffusion", {"cdf": "tanh"}),
        ("improved-diffusion, clip_denoised=False", "improved-diffusion", {"clip_denoised": False}),
        ("improved-diffusion, fixed_small", "improved-diffusion", {"variance": "fixed_small"}),
        ("scoredensity ddpm_elbo (fixed_large, decoder b_1, no clip)", "scoredensity", {}),
    ]
    for label, conv, over in discrete:
        r = ddpm_elbo(eps, x, convention=conv, **common, **over)
        rows.append((label, f"discrete T={T}", *bpd(r), r.nfe))
    f = sd.log_density(
        eps, x, lam_min=lam_range[0], lam_max=lam_range[1], n_t=args.n_t, decoder="discretized", levels=LEVELS,
        seed=args.seed,
    )  # fmt: skip
    rows.append(("scoredensity (density formula)", f"lam [{lam_range[0]:.2f}, {lam_range[1]:.2f}]", *bpd(f), f.nfe))
    vdm_range = (max(-5.0, lam_range[0]), min(13.3, lam_range[1]))
    rows.append(("vdm-style (categorical decoder)", f"lam [{vdm_range[0]:.2f}, {vdm_range[1]:.2f}]",
                 *vdm_row(eps, x, vdm_range, args.n_t, args.seed), float(args.n_t)))  # fmt: skip

    model_var, post_var = reverse_variances(sch, "fixed_large")
    gap_nats = float(kl_constants(model_var, post_var, d)[1:].sum())
    gap_bpd = gap_nats / (d * math.log(2))
    secs = time.perf_counter() - t0
    command = "python benchmarks/conventions.py" + (" --diffusers DIR" if args.diffusers else "")
    command += f" --n {args.n}" + (f" --n-t {args.n_t}" if args.n_t != 64 else "")
    command += f" --seed {args.seed}" if args.seed else ""
    lines = [
        "# All conventions on one model",
        "",
        provenance("benchmarks/conventions.py", command, secs),
        "",
        f"Model: {model}; data: the first {args.n} digits test images (8x8, 17 levels, the conventions' discrete",
        f"rows with `levels=17`). T = {T}. Bits/dim of the 17-level data (lower is better); `est. se`: the",
        "estimator's standard error of the mean over these images.",
        "",
        "| convention | setting | bits/dim | est. se | calls/image |",
        "|---|---|---|---|---|",
    ]
    for label, setting, b, se, nfe in rows:
        lines.append(f"| {label} | {setting} | {b:.4f} | {se:.4f} | {nfe:.0f} |")
    lines += [
        "",
        f"Model-free part of the fixed_large bound: sum_(k>=2) d/2 (r_k - 1 - log r_k), r_k = t_(k-1)/t_k, "
        f"= {gap_nats:.2f} nats = {gap_bpd:.4f} bits/dim (d = {d}).",
    ]
    lines += ["", *findings({r[0]: (r[2], r[3]) for r in rows})]
    write(OUT, "\n".join(lines))


def findings(v: dict[str, tuple[float, float]]) -> list[str]:
    """The differences the worked example discusses, from the rows (bits/dim; ± sqrt(se_a^2 + se_b^2), which is
    conservative where two rows share their noise)."""

    def diff(a: str, b: str) -> str:
        (ma, sa), (mb, sb) = v[a], v[b]
        return f"{ma - mb:+.4f} ± {math.hypot(sa, sb):.4f}"

    clip, noclip = "improved-diffusion (fixed_large)", "improved-diffusion, clip_denoised=False"
    b1, formula = "scoredensity ddpm_elbo (fixed_large, decoder b_1, no clip)", "scoredensity (density formula)"
    return [
        "Findings (bits/dim, computed from the table):",
        f"- clipping `x0_hat`: unclipped minus clipped bound {diff(noclip, clip)};",
        f"- tanh CDF minus the exact CDF {diff('improved-diffusion, cdf=tanh', clip)}; decoder variance `b_1` "
        f"(scoredensity, no clip) minus `sigma~_2^2` (no clip) {diff(b1, noclip)};",
        f"- fixed_small minus fixed_large (both clipped) {diff('improved-diffusion, fixed_small', clip)};",
        f"- density formula minus the unclipped fixed_large bound {diff(formula, noclip)};",
        f"- vdm-style bound minus the density formula {diff('vdm-style (categorical decoder)', formula)}.",
    ]


if __name__ == "__main__":
    main()
