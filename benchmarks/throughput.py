"""Throughput of the estimators against the network's own forward speed: how close to the physical limit.

An estimator cannot call the network faster than the network runs at the batch size it uses, so the limit is
the network alone: ``rows/s`` of ``model(x_t, t)`` under ``torch.inference_mode()`` at ``max_batch`` rows per
call. Each estimator is timed on the same model with the same ``max_batch`` and reported as
``nfe x examples / s`` (network rows it pushed through per second, everything included: noise, integrands, end
terms, the pilot of the proposal); the ratio to the network alone is its efficiency (goal >= 0.9).

Models (random weights; no download):

* ``ring8-mlp``: the MLP of ``scoredensity train --data ring8`` (hidden 256, 3 residual blocks), 2-D points;
* ``digits-unet``: the U-Net of ``scoredensity train --data digits --net unet`` (channels 32, 64), 1x8x8;
* ``cifar-unet``: a diffusers ``UNet2DModel`` with the DDPM CIFAR-10 configuration (3x32x32, block_out_channels
  (128, 256, 256, 256), 2 layers per block, attention at 16x16, about 35.7M parameters), wrapped by
  :class:`scoredensity.DiffusersEps` with the 1000-step linear schedule.

Estimators: ``log_density`` (the density formula, ``n_t`` nodes), ``ddpm_elbo`` (``n_t`` sampled steps),
``evaluate_images`` (``formula-dequantized``; images only).

Run: python benchmarks/throughput.py [--device cpu|cuda] [--threads 1] [--models ring8-mlp,digits-unet,cifar-unet]
On the CPU the CIFAR model runs a few batches only (about a minute in all at 1 thread). Writes
docs/bench_throughput.md (``--doc`` to change; ``--no-doc`` to only print).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch

import scoredensity as sd
from scoredensity.image_eval import evaluate_images
from scoredensity.nets import build_denoiser, denoiser_config
from scoredensity.schedules import DDPMSchedule, linear_betas

ROOT = Path(__file__).resolve().parents[1]

# rows per network call and examples per estimator call, per model and device kind
SIZES = {
    "cpu": {
        "ring8-mlp": dict(max_batch=4096, examples=512, n_t=32, reps=5),
        "digits-unet": dict(max_batch=512, examples=64, n_t=32, reps=5),
        "cifar-unet": dict(max_batch=8, examples=1, n_t=8, reps=1),
    },
    "cuda": {
        "ring8-mlp": dict(max_batch=65536, examples=8192, n_t=64, reps=5),
        "digits-unet": dict(max_batch=8192, examples=1024, n_t=64, reps=5),
        "cifar-unet": dict(max_batch=256, examples=32, n_t=64, reps=3),
    },
}
CIFAR_UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    dropout=0.0,
)
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


def build(name: str, device: torch.device):
    """(eps_fn, example shape, levels or None, number of parameters) of a benchmark model on ``device``."""
    torch.manual_seed(0)
    if name == "ring8-mlp":
        net = build_denoiser(denoiser_config([2], "mlp"))
        shape, levels = (2,), None
    elif name == "digits-unet":
        net = build_denoiser(denoiser_config([1, 8, 8], "unet"))
        shape, levels = (1, 8, 8), 17
    elif name == "cifar-unet":
        from diffusers import UNet2DModel

        net = sd.DiffusersEps(UNet2DModel(**CIFAR_UNET), SCHEDULER)
        shape, levels = (3, 32, 32), 256
    else:
        raise ValueError(f"unknown model {name!r}")
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, shape, levels, sum(p.numel() for p in net.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int) -> float:
    """Best time of ``reps`` calls of ``fn`` (after one warm-up call), seconds: on the CPU the process's CPU time
    (with one thread it is the work done, whatever else runs on a shared machine), on an accelerator wall time."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        fn()
        _sync(device)
        best = min(best, clock() - t0)
    return best


def t_range_of(schedule: DDPMSchedule) -> tuple[float, float]:
    """The trained range ``(t_1, t_T)`` of a DDPM schedule."""
    return float(schedule.times[0]), float(schedule.times[-1])


class TimedNet(torch.nn.Module):
    """The model, with the time spent inside its calls accumulated in ``.seconds`` (the same clock as
    :func:`timed`), so an estimator's share of time in the network is measured in the same run."""

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.net, self.device, self.seconds = net, device, 0.0
        self.clock = time.process_time if device.type == "cpu" else time.perf_counter

    def forward(self, *args):
        t0 = self.clock()
        out = self.net(*args)
        _sync(self.device)
        self.seconds += self.clock() - t0
        return out


def bench_model(name: str, device: torch.device, sizes: dict, precision: str) -> list[dict]:
    """Rows of the table for one model: the network alone, then each estimator, its ratio to the network alone and
    its share of time inside the network."""
    raw, shape, levels, n_params = build(name, device)
    net = TimedNet(raw, device)
    mb, b, n_t, reps = sizes["max_batch"], sizes["examples"], sizes["n_t"], sizes["reps"]
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand((b, *shape), generator=gen) * 2 - 1).to(device)
    schedule = DDPMSchedule(linear_betas(1000))
    t_lo, t_hi = t_range_of(schedule)
    lam_min, lam_max = (float(sd.schedules.logsnr_from_t(torch.tensor(v, dtype=torch.float64))) for v in (t_hi, t_lo))
    base = {"model": name, "params": n_params, "device": str(device), "max_batch": mb, "precision": precision}

    x_rows = (torch.rand((mb, *shape), generator=gen) * 2 - 1).to(device)
    t_rows = torch.rand(mb, generator=gen, dtype=torch.float64).mul(t_hi - t_lo).add(t_lo).to(device)

    def network():
        with torch.inference_mode(), sd.epsfn.autocast_context(precision, device):
            raw(x_rows, t_rows)

    net_sec = [timed(network, device, reps)]  # re-measured before each estimator; the best time is the limit
    measured: list[tuple[str, float, float, float]] = []  # (what, seconds, rows, seconds inside the network)

    def add(what: str, fn, nfe_total) -> None:
        net_sec.append(timed(network, device, reps))
        box.clear()
        best, inside = float("inf"), float("nan")
        fn()  # warm-up
        _sync(device)
        for _ in range(reps):
            net.seconds = 0.0
            clock = net.clock
            t0 = clock()
            fn()
            _sync(device)
            sec = clock() - t0
            if sec < best:
                best, inside = sec, net.seconds / sec
        measured.append((what, best, nfe_total(), inside))

    proposal = sd.fit_proposal(net, x, lam_min=lam_min, lam_max=lam_max, seed=0, precision=precision)
    box: dict = {}

    def formula():
        box["ld"] = sd.log_density(
            net,
            x,
            n_t=n_t,
            lam_min=lam_min,
            lam_max=lam_max,
            importance=proposal,
            control_variate=None,
            precision=precision,
            max_batch=mb,
            progress=False,
        )

    add(f"log_density (n_t={n_t}, fixed proposal)", formula, lambda: box["ld"].nfe * b)

    def formula_adaptive():
        box["ld"] = sd.log_density(
            net, x, n_t=n_t, lam_min=lam_min, lam_max=lam_max, precision=precision, max_batch=mb, progress=False
        )

    add(f"log_density (n_t={n_t}, default: pilot + control variate)", formula_adaptive, lambda: box["ld"].nfe * b)

    def ddpm():
        box["dd"] = sd.ddpm_elbo(
            net,
            x,
            schedule=schedule,
            n_steps_sampled=n_t,
            decoder="discretized" if levels else "gaussian",
            levels=levels or 256,
            precision=precision,
            max_batch=mb,
        )

    add(f"ddpm_elbo ({n_t} sampled steps)", ddpm, lambda: box["dd"].nfe * b)

    if levels is not None:
        images = torch.randint(0, levels, (b, *shape), generator=gen)

        def images_eval():
            box["ev"] = evaluate_images(
                net,
                images,
                levels=levels,
                t_range=(t_lo, t_hi),
                schedule=schedule,
                methods=("formula-dequantized",),
                n_t=n_t,
                batch_size=b,
                precision=precision,
                max_batch=mb,
                progress=False,
            )

        add(
            f"evaluate_images (formula-dequantized, n_t={n_t})",
            images_eval,
            lambda: box["ev"]["methods"]["formula-dequantized"]["nfe_per_example"] * b,
        )
    net_rate = mb / min(net_sec)
    rows = [{**base, "what": "network alone", "rows_per_s": net_rate, "ratio": 1.0, "inside": 1.0}]
    for what, sec, n_rows, inside in measured:
        rate = n_rows / sec
        rows.append({**base, "what": what, "rows_per_s": rate, "ratio": rate / net_rate, "inside": inside})
    return rows


def write_doc(path: Path, rows: list[dict], args: argparse.Namespace, load: tuple, wall: float) -> None:
    """The markdown table of ``rows`` with the conditions of the run."""
    dev = rows[0]["device"] if rows else args.device
    gpu = torch.cuda.get_device_name(0) if dev.startswith("cuda") else None
    lines = [
        "# Throughput: estimators against the network alone",
        "",
        "Written by `benchmarks/throughput.py` (do not edit by hand). Command:",
        "",
        f"    python benchmarks/throughput.py --device {args.device} --threads {args.threads} "
        f"--precision {args.precision} --models {args.models}",
        "",
        f"Measured {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')} on {dev}"
        + (f" ({gpu})" if gpu else f" ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
        + f", torch {torch.__version__}, {args.threads} thread(s), load average before the run "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min; the machine is shared), {wall:.0f} s in all. "
        "Random weights. Rows/s: network rows per second (for an estimator, nfe x examples / s, everything "
        "included); ratio: estimator / network alone at the same rows per call (`max_batch`; the network alone is "
        "re-measured before each estimator and its best time taken); goal >= 0.9. Time in network: the share of "
        "the estimator's own time spent inside the network's calls, measured in the same run (robust to the load "
        "of a shared machine, unlike the ratio of two separate timings). "
        "Best of a few repetitions after a warm-up; on the CPU the time is the process's CPU time (with one "
        "thread, the work done, whatever else runs on the shared machine), on an accelerator wall time.",
        "",
        "| model | params | device | precision | max_batch | what | rows/s | ratio | time in network |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['device']} | {r['precision']} | {r['max_batch']} | "
            f"{r['what']} | {r['rows_per_s']:.4g} | {r['ratio']:.2f} | {r['inside']:.0%} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--models", default="ring8-mlp,digits-unet,cifar-unet")
    p.add_argument("--doc", default=str(ROOT / "docs" / "bench_throughput.md"))
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    load = os.getloadavg()
    t0 = time.perf_counter()
    rows: list[dict] = []
    for name in args.models.split(","):
        new = bench_model(name.strip(), device, SIZES[kind][name.strip()], args.precision)
        for r in new:
            print(f"{r['model']:12s} {r['what']:56s} {r['rows_per_s']:10.4g} rows/s {r['ratio']:.2f} {r['inside']:.0%}")
        rows += new
    if not args.no_doc:
        write_doc(Path(args.doc), rows, args, load, time.perf_counter() - t0)
        print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
