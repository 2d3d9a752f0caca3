"""``scoredensity gan``: train a plain or score-regularised GAN on a 2-D mixture and report mode-collapse metrics."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAME = "gan"
HELP = "train a (score-regularised) GAN on ring8/grid25 and report modes covered, quality, cross-entropy, MMD"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``scoredensity gan``."""
    p.add_argument("--preset", default="ring8", help="data mixture preset (ring8, grid25, blobs2d; default ring8)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--loss", choices=["ns", "hinge"], default="ns", help="non-saturating (default) or hinge")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--reg-coef", type=float, default=0.0, help="score-regulariser coefficient (0: plain GAN)")
    p.add_argument("--reg-gradient", choices=["full", "sds"], default="full", help="through eps's Jacobian or not")
    p.add_argument("--reg-weighting", choices=["formula", "t_uniform"], default="formula")
    p.add_argument(
        "--denoiser",
        metavar="DIR",
        default=None,
        help="run folder of 'scoredensity train' to use as the data denoiser (default: the mixture's exact eps)",
    )
    p.add_argument("--n-samples", type=int, default=2500, help="generated samples for the metrics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="gan_out", help="folder for samples.png and gan.json")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: faster for these tiny nets)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Train, evaluate, write the figure and JSON. Returns the exit code."""
    import torch

    from ..apps.gan import gan_metrics, train_gan
    from ..mixtures import mixture_preset
    from ..plots import save_scatter

    if args.threads:
        torch.set_num_threads(args.threads)
    mix = mixture_preset(args.preset)
    eps_fn = None
    if args.denoiser is not None:
        from ..checkpoint import load_run

        model, config, _ = load_run(args.denoiser, load_data=False)
        shape = list(config["net"].get("shape", []))
        if shape != [mix.dim]:
            raise ValueError(f"the denoiser in {args.denoiser} models data of shape {shape}, not [{mix.dim}]")
        trained_on = config.get("data", {}).get("name")
        if trained_on != args.preset:
            print(
                f"warning: the denoiser was trained on {trained_on!r}, the GAN's data are {args.preset!r}",
                file=sys.stderr,
            )
        eps_fn = model
    res = train_gan(
        eps_fn=eps_fn,
        preset=args.preset,
        steps=args.steps,
        batch=args.batch,
        loss=args.loss,
        lr=args.lr,
        reg_coef=args.reg_coef,
        reg_gradient=args.reg_gradient,
        reg_weighting=args.reg_weighting,
        seed=args.seed,
    )
    samples = res.sample(args.n_samples, seed=args.seed + 1000)
    metrics = gan_metrics(samples, mix)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    real = mix.sample(args.n_samples, generator=torch.Generator().manual_seed(0)).numpy()
    title = "plain GAN" if args.reg_coef == 0 else f"reg {args.reg_gradient}/{args.reg_weighting} x{args.reg_coef:g}"
    save_scatter(out / "samples.png", [("data", real), (title, samples.numpy())])
    doc = dict(
        config=vars(res.config),
        denoiser=args.denoiser or "exact",
        metrics=metrics,
        seconds=res.seconds,
        history=res.history,
    )
    (out / "gan.json").write_text(json.dumps(doc, indent=1))
    if args.json:
        print(json.dumps(dict(metrics=metrics, seconds=res.seconds)))
        return 0
    print(f"GAN on {args.preset}: {title}, {args.steps} steps, {res.seconds:.1f} s")
    print(f"  modes covered        {metrics['modes_covered']:.0f} / {mix.num_components}")
    print(f"  high-quality samples {metrics['high_quality']:.3f}  (within 3 std of a mode)")
    print(f"  mode KL              {metrics['mode_kl']:.3f}")
    print(f"  cross-entropy        {metrics['cross_entropy']:.3f} nats  (exact -E log p_data(G(w)))")
    print(f"  MMD^2 to real        {metrics['mmd2']:.4f}")
    print(f"wrote {out / 'samples.png'} and {out / 'gan.json'}")
    return 0
