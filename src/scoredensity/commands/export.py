"""``scoredensity export RUN_DIR --out DIR``: a trained image run as a diffusers pipeline folder."""

from __future__ import annotations

import argparse
import errno
import sys

from ._common import load_run_checked, warn_if_unfinished

NAME = "export"
HELP = "export a trained U-Net run to a diffusers folder that DDPMPipeline.from_pretrained loads and samples"

MIN_STEPS = 21
"""The exported linear schedule has ``beta_T = 0.02 * 1000 / T``; it must stay below 1, so ``T >= 21``."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``scoredensity export``."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder from 'scoredensity train --net unet'")
    p.add_argument("--out", required=True, help="output folder (model_index.json, unet/, scheduler/)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument(
        "--steps",
        type=int,
        default=1000,
        help=f"timesteps T of the exported linear DDPM schedule (betas 1e-4 .. 20/T; T >= {MIN_STEPS}; default 1000)",
    )


def run(args: argparse.Namespace) -> int:
    """Load the run (EMA weights), bake canonical time into diffusers timesteps, check, write."""
    from pathlib import Path

    from ..diffusers_io import save_diffusers
    from ..schedules import DDPMSchedule, linear_betas

    if args.steps < MIN_STEPS:
        raise ValueError(
            f"--steps must be >= {MIN_STEPS}, got {args.steps}: the exported linear schedule ends at beta_T = 20/T, "
            "which must stay below 1"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(errno.EEXIST, "exists and is a file, not a folder", str(out))
    model, config, _ = load_run_checked(args.run_dir, ema=not args.raw, load_data=False)
    if config["net"].get("type", "mlp") != "unet":
        raise ValueError(f"{args.run_dir}: only U-Net runs ('--net unet') export to diffusers")
    warn_if_unfinished(config, args.run_dir)
    sched = DDPMSchedule(linear_betas(args.steps, 1e-4, 0.02 * 1000 / args.steps))
    path = save_diffusers(model, out, scheduler=sched)
    step = config.get("step")
    print(
        f"wrote {path} from step {step} (load with diffusers.DDPMPipeline.from_pretrained({str(path)!r}))",
        file=sys.stdout,
    )
    return 0
