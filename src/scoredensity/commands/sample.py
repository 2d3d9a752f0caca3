"""``scoredensity sample``: draw samples with a chosen sampler, write them as ``.npy`` and a PNG.

The work is done by :func:`sample_to_dir` ``(eps_fn, shape, out_dir, ...)``, so a mixture preset (its exact
``eps``) and, once its loader is wired, a trained run folder go through the same code.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ._common import (
    add_device_arguments,
    add_threads_argument,
    apply_threads,
    prepare_out_dir,
    resolve_device,
    with_precision,
)
from ._model_source import add_model_arguments, model_source

NAME = "sample"
HELP = "draw samples from a model with a chosen sampler; write samples.npy and samples.png"


def plot_samples(x, path: str | Path, title: str = "", reference=None) -> None:
    """Save a picture of samples ``x`` [N, *shape]: a scatter for vectors (first two coordinates; the reference
    mixture's density as contours when given and 2-D), a grid of the first 64 for images [N, C, H, W]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    x = torch.as_tensor(x).detach().cpu().to(torch.float64)
    if x.dim() == 4 and x.shape[1] in (1, 3):
        k = min(64, x.shape[0])
        cols = int(np.ceil(np.sqrt(k)))
        rows = int(np.ceil(k / cols))
        img = ((x[:k].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        h, w, c = img.shape[1:]
        canvas = np.ones((rows * (h + 1), cols * (w + 1), c))
        for i in range(k):
            r, q = divmod(i, cols)
            canvas[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = img[i]
        fig, ax = plt.subplots(figsize=(6, 6 * rows / cols))
        ax.imshow(canvas.squeeze(-1) if c == 1 else canvas, cmap="gray" if c == 1 else None)
        ax.axis("off")
    else:
        flat = x.flatten(1)
        fig, ax = plt.subplots(figsize=(5.5, 5.5))
        if flat.shape[1] == 1:
            ax.hist(flat[:, 0].numpy(), bins=100, density=True)
        else:
            ax.scatter(flat[:, 0].numpy(), flat[:, 1].numpy(), s=1.5, alpha=0.4, lw=0)
            if reference is not None and reference.dim == 2:
                lo, hi = flat.quantile(0.001, 0).numpy() - 0.5, flat.quantile(0.999, 0).numpy() + 0.5
                gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
                grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1))
                lp = reference.log_prob(grid).reshape(gx.shape).numpy()
                ax.contour(
                    gx,
                    gy,
                    lp,
                    levels=np.linspace(lp.max() - 8, lp.max(), 6),
                    colors="k",
                    linewidths=0.6,
                    linestyles="solid",
                )
            ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_to_dir(
    eps_fn,
    shape: tuple[int, ...],
    out_dir: str | Path,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    reference=None,
    title: str = "",
    device=None,
    precision: str = "fp32",
    **sample_options,
) -> dict:
    """Draw ``shape = (N, *shape)`` samples with :func:`scoredensity.sampling.sample`; write ``samples.npy``,
    ``samples.png`` and ``samples.json`` (settings, seconds; component masses when ``reference`` is a mixture).
    The sampler runs on ``device`` (default CPU; the starting noise is drawn on the CPU from ``seed``, so the
    samples agree across devices up to rounding), the network at ``precision`` (autocast).

    Returns:
        the JSON summary as a dict.
    """
    import numpy as np
    import torch

    from ..sampling import sample

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = sample(
            with_precision(eps_fn, precision),
            shape,
            sampler=sampler,
            steps=steps,
            eta=eta,
            generator=torch.Generator().manual_seed(seed),
            device=device,
            **sample_options,
        )
    x = x.detach().cpu()
    secs = time.perf_counter() - t0
    np.save(out / "samples.npy", x.numpy())
    summary = {
        "sampler": sampler,
        "steps": steps,
        "eta": eta,
        "seed": seed,
        "shape": list(shape),
        "seconds": secs,
        "device": str(device or "cpu"),
        "precision": precision,
    }
    if reference is not None:
        labels = reference.responsibilities_t(x.flatten(1).double(), 1e-12).argmax(1)
        mass = torch.bincount(labels, minlength=reference.num_components).double() / x.shape[0]
        summary["component_mass"] = mass.tolist()
        summary["max_mass_error"] = float((mass - reference.weights).abs().max())
        summary["mean_log_prob"] = float(reference.log_prob(x.flatten(1).double()).mean())
    plot_samples(x, out / "samples.png", title or f"{sampler}, {steps or 'default'} steps", reference)
    (out / "samples.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``scoredensity sample``."""
    from ..sampling import SAMPLERS

    add_model_arguments(p)
    p.add_argument("-n", "--n", type=int, default=10_000, help="number of samples (default 10000)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="sampler (default ddim)")
    p.add_argument("--steps", type=int, default=None, help="steps (sampler's default if omitted)")
    p.add_argument("--eta", type=float, default=None, help="0: probability-flow ODE, 1: reverse SDE (ddim, em)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    add_device_arguments(p, max_batch=False)
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    """Sample from the preset's exact eps or a run's model on ``--device`` and write the outputs."""
    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    device = resolve_device(args.device)
    prepare_out_dir(args.out)
    src = model_source(args, device)
    apply_threads(args, src.kind)
    reference = None
    if src.dataset is None:
        from ..mixtures import mixture_preset

        reference = mixture_preset(args.preset or "ring8", **({"d": args.dim} if args.dim is not None else {}))
    elif src.dataset.mixture is not None:
        reference = src.dataset.mixture
    opts = {}
    if src.dataset is not None or args.lam_min is not None or args.lam_max is not None:
        opts = {"lam_min": src.lam_min, "lam_max": src.lam_max}
    s = sample_to_dir(
        src.eps_fn,
        (args.n, *src.shape),
        args.out,
        sampler=args.sampler,
        steps=args.steps,
        eta=args.eta,
        seed=args.seed,
        reference=reference,
        title=f"{src.title}: {args.sampler}, {args.steps or 'default'} steps",
        device=device,
        precision=args.precision,
        **opts,
    )
    print(f"{args.n} samples in {s['seconds']:.2f} s")
    if "max_mass_error" in s:
        print(
            f"component masses within {s['max_mass_error']:.4f} of the weights; "
            f"mean exact log-density of the samples {s['mean_log_prob']:.4f} nats"
        )
    print(f"wrote {Path(args.out) / 'samples.npy'}, samples.png, samples.json")
    return 0


__all__ = ["sample_to_dir", "plot_samples"]
