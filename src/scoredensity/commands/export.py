"""``scoredensity export RUN_DIR --out DIR``: a trained image run as a diffusers pipeline folder."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "export a trained U-Net run to a diffusers folder that DDPMPipeline.from_pretrained loads and samples"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``scoredensity export``."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder from 'scoredensity train --net unet'")
    p.add_argument("--out", required=True, help="output folder (model_index.json, unet/, scheduler/)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--steps", type=int, default=1000, help="timesteps of the exported linear DDPM schedule")


def run(args: argparse.Namespace) -> int:
    """Load the run (EMA weights), bake canonical time into diffusers timesteps, check, write."""
    from ..checkpoint import load_run
    from ..diffusers_io import save_diffusers
    from ..schedules import DDPMSchedule, linear_betas

    model, config, _ = load_run(args.run_dir, ema=not args.raw, load_data=False)
    if config["net"].get("type", "mlp") != "unet":
        raise ValueError(f"{args.run_dir}: only U-Net runs ('--net unet') export to diffusers")
    sched = DDPMSchedule(linear_betas(args.steps, 1e-4, 0.02 * 1000 / args.steps))
    path = save_diffusers(model, args.out, scheduler=sched)
    print(f"wrote {path} (load with diffusers.DDPMPipeline.from_pretrained({str(path)!r}))")
    return 0
