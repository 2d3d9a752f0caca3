"""``scoredensity evaluate --diffusers PATH --images SRC``: bits/dim of a local diffusers model, no code needed.

Kept apart from the run-folder evaluation; :mod:`scoredensity.commands.evaluate` dispatches here. The images
given are the evaluation set: all of them are evaluated (a file with a fixed train/test split: its test part),
in the layout inferred from the model's channel count (NCHW, NHWC as in improved-diffusion's ``arr_0`` sample
files, or NHW greyscale).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["add_diffusers_arguments", "run_diffusers_eval", "load_eval_images"]


def add_diffusers_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the diffusers evaluation (added to ``scoredensity evaluate``)."""
    g = p.add_argument_group("diffusers models (--diffusers PATH --images SRC)")
    g.add_argument("--diffusers", metavar="PATH", help="local diffusers pipeline or UNet2DModel folder")
    g.add_argument(
        "--images",
        metavar="SRC",
        help="the evaluation set: .npz/.npy of integer levels (NCHW, NHWC e.g. an arr_0 sample file, or NHW), "
        "an image folder, an MNIST idx or CIFAR-10 bin folder",
    )
    g.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of formula-discrete, formula-dequantized, ddpm, ode-dequantized (default: the "
        "first three; ddpm for the ddpm and improved-diffusion conventions, formula-discrete for vdm, "
        "ode-dequantized for score-sde)",
    )
    g.add_argument("--ddpm-steps", type=int, default=50, help="KL terms sampled per image for the DDPM ELBO (0: all)")
    g.add_argument(
        "--ode-tol", type=float, default=1e-5, help="ode-dequantized: rtol = atol of the adaptive solver (1e-5)"
    )
    g.add_argument(
        "--ode-trace",
        choices=("exact", "hutchinson"),
        default="exact",
        help="ode-dequantized: exact trace (one vjp per dimension) or Hutchinson with 8 Gaussian probes",
    )
    g.add_argument(
        "--timesteps",
        choices=("interpolated", "nearest"),
        default=None,
        help="how continuous t maps to the model's timesteps (default: interpolated when possible)",
    )
    g.add_argument(
        "--convention",
        default=None,
        help="a published evaluation convention: ddpm, improved-diffusion, scoredensity, vdm or score-sde "
        "(docs/conventions.md)",
    )
    g.add_argument(
        "--clip-convention-range",
        action="store_true",
        help="vdm / score-sde on a model trained on a narrower log-SNR range: evaluate on the intersection (the "
        "figure is then not the published one and is labelled so) instead of refusing",
    )


def _model_geometry(eps) -> tuple[int, tuple[int, int] | None]:
    """(input channels, (H, W) or None) of a diffusers model, from its config."""
    cfg = getattr(getattr(eps, "model", None), "config", None) or {}
    channels = int(cfg.get("in_channels", 3))
    size = cfg.get("sample_size")
    if size is None:
        return channels, None
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return channels, size


def _read_source(src: str) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays (``x`` or ``x_train``/``x_test``, optionally ``levels``) from an image source, and its provenance."""
    from ..data.files import read_array_file, read_cifar10, read_image_folder, read_mnist

    p = Path(src)
    if p.is_dir():
        from ..data.load import is_cifar_dir, is_mnist_dir

        if is_mnist_dir(p):
            return read_mnist(p)
        if is_cifar_dir(p):
            return read_cifar10(p)
        return read_image_folder(p)
    if p.is_file():
        return read_array_file(p)
    if src == "digits":
        from sklearn.datasets import load_digits

        return {"x": np.asarray(load_digits().images, dtype=np.int64), "levels": np.array(17)}, {"source": "digits"}
    raise ValueError(f"--images {src}: no such file or folder")


def load_eval_images(
    src: str, channels: int, size: tuple[int, int] | None, split: str | None
) -> tuple[torch.Tensor, int, dict]:
    """The evaluation images of ``--images SRC`` as [N, C, H, W] integer levels, their number of levels, and a
    description (source, split, layout).

    ``split``: ``None`` = all of a single array, or the test part of a fixed train/test split; ``"all"``,
    ``"test"``, ``"train"``.

    Raises:
        ValueError: unreadable source, float data, a split the source does not have, an ambiguous layout.
    """
    from ..data.load import infer_levels

    arrays, info = _read_source(src)
    levels = int(arrays.pop("levels")) if "levels" in arrays else None
    if "x" in arrays:
        if split in ("test", "train"):
            raise ValueError(f"--images {src}: has one array (no fixed train/test split); use --split all or omit it")
        x, split = arrays["x"], "all"
    else:
        split = split or "test"
        x = arrays["x_test"] if split == "test" else arrays["x_train"]
        if split == "all":
            x = np.concatenate([arrays["x_train"], arrays["x_test"]])
    if x.dtype.kind not in "biu":
        raise ValueError(f"--images {src}: images must be integer levels (e.g. uint8), got {x.dtype}")
    if levels is None:
        levels = 256 if x.dtype == np.uint8 else infer_levels(x, src)
    from ..image_eval import image_layout, to_nchw

    try:
        layout = image_layout(x.shape, channels, size)
    except ValueError as e:
        raise ValueError(f"--images {src}: {e}") from None
    images = to_nchw(torch.from_numpy(np.ascontiguousarray(x)), layout).contiguous()
    desc = {"source": str(src), "split": split, "layout": layout, "file_shape": list(x.shape), "meta": info}
    return images, levels, desc


def run_diffusers_eval(args: argparse.Namespace) -> int:
    """Load the model and the images, evaluate, print a table or JSON. Under torchrun each process takes a
    shard and rank 0 prints the gathered result."""
    from ..diffusers_io import load_diffusers_eps
    from ..distributed import join_process_group, local_device
    from ..eval_store import ResultStore
    from ..image_eval import CONVENTION_METHODS, DEFAULT_IMAGE_METHODS, data_hash, evaluate_images, record_keys
    from ._common import resolve_device

    if not args.images:
        raise ValueError("--diffusers needs --images SRC (a folder, .npz/.npy, or MNIST/CIFAR-10 files)")
    if args.ddpm_steps is not None and args.ddpm_steps < 0:
        raise ValueError(f"--ddpm-steps must be >= 0 (0: all steps), got {args.ddpm_steps}")
    if args.lam_min is not None or args.lam_max is not None:
        raise ValueError("--lam-min/--lam-max do not apply to --diffusers: the model's trained range is used")
    device = resolve_device(args.device)
    distributed = join_process_group(device)
    device = local_device(device)
    try:
        eps = load_diffusers_eps(args.diffusers, timesteps=args.timesteps, device=device)
        channels, size = _model_geometry(eps)
        images, levels, desc = load_eval_images(args.images, channels, size, args.split)
        if args.n is not None:
            images = images[: args.n]
        convention = None
        if args.clip_convention_range and not args.convention:
            raise ValueError("--clip-convention-range applies to --convention vdm or score-sde only")
        if args.convention:
            from ..conventions import get_convention

            convention = get_convention(args.convention)
        if args.methods is not None:
            methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        elif convention is not None and convention.time == "discrete":
            methods = ("ddpm",)
        elif convention is not None and convention.name in CONVENTION_METHODS:
            methods = CONVENTION_METHODS[convention.name]
        else:
            methods = DEFAULT_IMAGE_METHODS
        kw = dict(
            levels=levels,
            methods=methods,
            n_t=args.n_t,
            ddpm_steps=args.ddpm_steps or None,
            seed=args.seed,
            batch_size=args.batch_size or 16,
            precision=args.precision,
            max_batch=args.max_batch,
            target_se=args.target_se,
            max_rounds=args.max_rounds,
            progress=not args.no_progress,
        )
        if "ode-dequantized" in methods:  # only then: other evaluations keep their stored settings for --resume
            kw.update(ode_tol=args.ode_tol, ode_trace=args.ode_trace)
        if convention is not None:
            kw["convention"] = convention
            if args.clip_convention_range:
                kw["convention_range"] = "clip"
        store = None
        if args.out:
            settings = {
                "model": os.path.abspath(args.diffusers),
                "timesteps": args.timesteps,
                "images": {k: desc[k] for k in ("source", "split", "layout")},
                "n": args.n,
                "convention": args.convention,
                **{k: v for k, v in kw.items() if k not in ("progress", "convention")},
            }
            store = ResultStore(
                record_keys(methods), args.out, settings=settings, data_sha256=data_hash(images), resume=args.resume
            )
        res = evaluate_images(eps, images, store=store, **kw)
        res["model"] = getattr(eps, "source", {"path": str(args.diffusers)})
        res["images"] = desc
        rank = torch.distributed.get_rank() if distributed else 0
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        if args.json:
            json.dump(res, sys.stdout, indent=2, default=str)
            print()
        else:
            print(
                f"{res['n']} images {res['shape']} ({res['levels']} levels, {desc['split']} of {desc['source']}, "
                f"read as {desc['layout']}), sha256 {res['data_sha256'][:16]}..., "
                f"log-SNR range [{res['lam_range'][0]:.2f}, {res['lam_range'][1]:.2f}], {res['device']}, "
                f"{res['precision']}"
            )
            if res.get("convention"):
                c = res["convention"]
                print(f"convention {c['name']}: " + ", ".join(f"{k}={v}" for k, v in c.items() if k != "name"))
            print(
                "| method | kind | bits/dim | stderr | estimator stderr | prior | diffusion | reconstruction "
                "| nfe/image |"
            )
            print("|---|---|---|---|---|---|---|---|---|")
            for m, r in res["methods"].items():
                t = r["terms_bpd"]
                print(
                    f"| {m} | {r['kind']} | {r['bpd']:.4f} | {r['bpd_stderr']:.4f} | {r['bpd_estimator_stderr']:.4f} "
                    f"| {t['prior']:.4f} | {t['diffusion']:.4f} | {t['reconstruction']:.4f} | "
                    f"{r['nfe_per_example']:.1f} |"
                )
            if "target_se" in res:
                t = res["target_se"]
                print(
                    f"target-se {t['target_bpd']:g} bits/dim: {'reached' if t['reached'] else 'NOT reached'} "
                    f"({t['se_bpd']:.4g}) after {t['rounds']} rounds"
                )
    return 0
