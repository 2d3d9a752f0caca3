"""``scoredensity evaluate --diffusers PATH --images SRC``: bits/dim of a local diffusers model, no code needed.

Kept apart from the run-folder evaluation; :mod:`scoredensity.commands.evaluate` dispatches here.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

__all__ = ["add_diffusers_arguments", "run_diffusers_eval"]


def add_diffusers_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the diffusers evaluation (added to ``scoredensity evaluate``)."""
    g = p.add_argument_group("diffusers models (--diffusers PATH --images SRC)")
    g.add_argument("--diffusers", metavar="PATH", help="local diffusers pipeline or UNet2DModel folder")
    g.add_argument("--images", metavar="SRC", help="image folder, .npz/.npy of uint8, MNIST idx or CIFAR-10 bin folder")
    g.add_argument(
        "--methods",
        default="formula-discrete,formula-dequantized,ddpm",
        help="comma-separated subset of formula-discrete, formula-dequantized, ddpm",
    )
    g.add_argument("--ddpm-steps", type=int, default=50, help="KL terms sampled per image for the DDPM ELBO (0: all)")
    g.add_argument("--batch-size", type=int, default=16, help="images per network call (bounds memory)")
    g.add_argument(
        "--timesteps",
        choices=("interpolated", "nearest"),
        default=None,
        help="how continuous t maps to the model's timesteps (default: interpolated when possible)",
    )


def run_diffusers_eval(args: argparse.Namespace) -> int:
    """Load the model and the images, evaluate, print a table or JSON. Under torchrun each process takes a
    shard and rank 0 prints the gathered result."""
    from ..data import load_dataset
    from ..diffusers_io import load_diffusers_eps
    from ..image_eval import evaluate_images

    if not args.images:
        raise ValueError("--diffusers needs --images SRC (a folder, .npz/.npy, or MNIST/CIFAR-10 files)")
    if torch.distributed.is_available() and "LOCAL_RANK" in __import__("os").environ:
        torch.distributed.init_process_group("gloo")
    eps = load_diffusers_eps(args.diffusers, timesteps=args.timesteps)
    ds = load_dataset(args.images, seed=args.seed)
    if ds.levels is None:
        raise ValueError(f"{args.images}: images must be integer levels (8-bit), got continuous data")
    split = getattr(args, "split", "test")
    images = {"train": ds.x_train, "test": ds.x_test}[split]
    if args.n is not None:
        images = images[: args.n]
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    res = evaluate_images(
        eps,
        images,
        levels=ds.levels,
        methods=methods,
        n_t=args.n_t,
        ddpm_steps=args.ddpm_steps or None,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    res["model"] = getattr(eps, "source", {"path": str(args.diffusers)})
    res["images"] = {"source": str(args.images), "split": split, "meta": ds.meta}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        if args.json:
            json.dump(res, sys.stdout, indent=2, default=str)
            print()
        else:
            print(
                f"{res['n']} images {res['shape']} ({res['levels']} levels), sha256 {res['data_sha256'][:16]}..., "
                f"log-SNR range [{res['lam_range'][0]:.2f}, {res['lam_range'][1]:.2f}]"
            )
            print("| method | kind | bits/dim | stderr | prior | diffusion | reconstruction | nfe/image |")
            print("|---|---|---|---|---|---|---|---|")
            for m, r in res["methods"].items():
                t = r["terms_bpd"]
                print(
                    f"| {m} | {r['kind']} | {r['bpd']:.4f} | {r['bpd_stderr']:.4f} | {t['prior']:.4f} "
                    f"| {t['diffusion']:.4f} | {t['reconstruction']:.4f} | {r['nfe_per_example']:.1f} |"
                )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
