"""bf16 against fp32: how much the network's precision moves the density formula's figure.

``precision="bf16"`` autocasts the network call only; integrands, end terms and sums stay float64. Two models:

* (a) a ring8 ``MLPDenoiser`` (hidden 64, 2 blocks) trained for 400 steps of the likelihood-weighted loss;
* (b) a small diffusers ``UNet2DModel`` on 1x8x8 images (channels (8, 16), random weights perturbed by
  0.05 N(0, 1) so its output is non-trivial), as a 100-step DDPM model on its trained log-SNR range.

Both estimates use the same seed (common random numbers), so their difference is the precision's effect, not
Monte Carlo noise. Reported: the difference of the mean log-density in nats, in bits/dim, and in units of the
joint standard error of the mean; and the largest per-example difference in units of the per-example joint
standard error. Timings are wall seconds on this machine (device named in the table).

Run: python benchmarks/precision.py [--device cpu|cuda] [--out docs/precision.md]   (about 1 minute on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _fragment import provenance, write
from _tiny_unet import perturbed_tiny_unet

from scoredensity.formula import log_density
from scoredensity.logdensity import LogDensity
from scoredensity.losses import LamSampler, dsm_loss
from scoredensity.mixtures import mixture_preset
from scoredensity.nets import MLPDenoiser

OUT = "docs/precision.md"


def trained_mlp(device: str, steps: int = 400) -> torch.nn.Module:
    """ring8 MLPDenoiser trained for ``steps`` steps (batch 256, Adam 3e-3, elbo weighting, lam in [-12, 12])."""
    gm = mixture_preset("ring8")
    torch.manual_seed(0)
    net = MLPDenoiser([2], hidden=64, blocks=2, emb_dim=32).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sampler = LamSampler("uniform", -12.0, 12.0)
    data = gm.sample(8192, generator=torch.Generator().manual_seed(0)).float().to(device)
    for step in range(steps):
        index = torch.arange(step * 256, (step + 1) * 256, device=device)
        out = dsm_loss(net, data[index % 8192], weighting="elbo", sampler=sampler, seed=0, step=step, index=index)
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
    net.lam_range = (-12.0, 12.0)
    return net.eval()


def small_unet(device: str):
    """The tiny diffusers U-Net of the tests as a 100-step DDPM eps model, and its trained log-SNR range."""
    import diffusers

    from scoredensity.adapters import DiffusersEps

    unet = perturbed_tiny_unet()
    sched = diffusers.DDPMScheduler(num_train_timesteps=100, beta_start=1e-4, beta_end=0.1)
    return DiffusersEps(unet.eval().to(device), sched.config), (-5.1, 9.2)


def compare(name: str, run) -> dict:
    """Run ``run(precision) -> LogDensity`` in fp32 and bf16 and summarise the difference."""
    res: dict[str, LogDensity] = {}
    secs = {}
    for p in ("fp32", "bf16"):
        t0 = time.perf_counter()
        res[p] = run(p)
        secs[p] = time.perf_counter() - t0
    a, b = res["bf16"], res["fp32"]
    diff = a.mean() - b.mean()
    joint = math.hypot(a.mean_stderr(), b.mean_stderr())
    per = ((a.logp - b.logp).abs() / torch.hypot(a.stderr, b.stderr)).max()
    return {
        "model": name,
        "B": len(a),
        "d": a.dim,
        "fp32 mean (nats)": f"{b.mean():.4f} ± {b.mean_stderr():.4f}",
        "bf16 - fp32 (nats)": f"{diff:+.2e}",
        "bf16 - fp32 (bits/dim)": f"{diff / (a.dim * math.log(2)):+.2e}",
        "in stderr of the mean": f"{diff / joint:+.3f}",
        "max per-example, in stderr": f"{float(per):.3f}",
        "s fp32 / bf16": f"{secs['fp32']:.2f} / {secs['bf16']:.2f}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    dev = args.device
    t0 = time.perf_counter()
    rows = []
    net = trained_mlp(dev)
    x = mixture_preset("ring8").sample(512, generator=torch.Generator().manual_seed(5)).float().to(dev)
    rows.append(compare("ring8 MLP (trained)", lambda p: log_density(net, x, n_t=64, seed=1, precision=p)))
    eps, (lo, hi) = small_unet(dev)
    k = torch.randint(0, 17, (64, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    xi = (2 * k.float() / 16 - 1).to(dev)
    rows.append(
        compare(
            "UNet2DModel 8x8 (random)",
            lambda p: log_density(eps, xi, n_t=32, seed=1, precision=p, lam_min=lo, lam_max=hi),
        )
    )
    keys = list(rows[0])
    device_name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "CPU"
    lines = [
        "# bf16 against fp32 (density formula)",
        "",
        provenance(
            "benchmarks/precision.py",
            f"python benchmarks/precision.py --device {dev}" + (f" --out {args.out}" if args.out != OUT else ""),
            time.perf_counter() - t0,
        ),
        "",
        f"Device: {device_name}; same seed for both precisions. The seconds column is wall-clock under the load above.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
        *("| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows),
        "",
    ]
    write(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
