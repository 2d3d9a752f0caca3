"""``scoredensity gan``: train a plain or score-regularised GAN on a 2-D mixture and report mode-collapse metrics."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ._common import (
    add_device_arguments,
    add_threads_argument,
    apply_threads,
    load_run_checked,
    prepare_out_dir,
    resolve_device,
    warn_if_unfinished,
    with_precision,
)

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
    add_device_arguments(p, max_batch=False)
    add_threads_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Train, evaluate, write the figure and JSON. Returns the exit code."""
    import dataclasses

    import torch

    from ..apps.gan import GANConfig, gan_metrics, train_gan
    from ..demo import ProgressLog
    from ..mixtures import mixture_preset
    from ..plots import save_mode_coverage

    for name in ("steps", "batch", "n_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = resolve_device(args.device)
    apply_threads(args)
    mix = mixture_preset(args.preset)
    out = prepare_out_dir(args.out)
    eps_fn = None
    if args.denoiser is not None:
        model, config, _ = load_run_checked(args.denoiser, load_data=False)
        warn_if_unfinished(config, args.denoiser)
        shape = list(config["net"].get("shape", []))
        if shape != [mix.dim]:
            raise ValueError(f"the denoiser in {args.denoiser} models data of shape {shape}, not [{mix.dim}]")
        trained_on = config.get("data", {}).get("name")
        if trained_on != args.preset:
            print(
                f"warning: the denoiser was trained on {trained_on!r}, the GAN's data are {args.preset!r}",
                file=sys.stderr,
            )
        eps_fn = with_precision(model, args.precision)
    elif args.precision != "fp32":
        print(
            "note: --precision applies to a --denoiser network; the exact mixture eps runs in float64", file=sys.stderr
        )
    device_kw = {}
    if "device" in {f.name for f in dataclasses.fields(GANConfig)}:
        device_kw = {"device": str(device)}
        if eps_fn is not None:
            model.to(device)
    elif args.device is not None and device.type != "cpu":
        print(f"note: the GAN's 2-D networks train on the CPU, not {device}", file=sys.stderr)
    log = ProgressLog("gan")  # plain lines when stderr is a log (not a terminal): start, every 10 s, done
    t_start = time.perf_counter()
    log(f"training {args.steps} steps on {args.preset} ({'plain GAN' if args.reg_coef == 0 else 'regularised'})")
    with log.every(lambda: f"training, {time.perf_counter() - t_start:.0f} s elapsed"):
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
            **device_kw,
        )
    log(f"trained in {res.seconds:.1f} s; sampling and metrics")
    samples = res.sample(args.n_samples, seed=args.seed + 1000).detach().cpu()
    metrics = gan_metrics(samples, mix)
    counts, radii = mode_counts(samples, mix)
    real = mix.sample(args.n_samples, generator=torch.Generator().manual_seed(0)).numpy()
    title = "plain GAN" if args.reg_coef == 0 else f"reg {args.reg_gradient}/{args.reg_weighting} x{args.reg_coef:g}"
    covered = int((counts >= 1).sum())
    save_mode_coverage(
        out / "samples.png",
        real,
        samples.double().numpy(),
        mix.means.numpy(),
        radii.numpy(),
        counts.numpy(),
        f"{title}: {covered}/{mix.num_components} modes (>= 1 sample within 3 std)",
    )
    doc = dict(
        config=vars(res.config),
        denoiser=args.denoiser or "exact",
        metrics=metrics,
        samples_per_mode=counts.tolist(),
        seconds=res.seconds,
        history=res.history,
    )
    (out / "gan.json").write_text(json.dumps(doc, indent=1))
    if args.json:
        print(json.dumps(dict(metrics=metrics, samples_per_mode=counts.tolist(), seconds=res.seconds)))
        return 0
    per_mode = " ".join(str(int(c)) for c in counts)
    print(f"GAN on {args.preset}: {title}, {args.steps} steps, {res.seconds:.1f} s")
    print(
        f"  modes covered        {metrics['modes_covered']:.0f} / {mix.num_components}  (>= 1 of {args.n_samples} "
        "samples within 3 std of the mode)"
    )
    print(f"  samples per mode     {per_mode}")
    print(f"  high-quality samples {metrics['high_quality']:.3f}  (within 3 std of a mode)")
    print(f"  mode KL              {metrics['mode_kl']:.3f}")
    print(f"  cross-entropy        {metrics['cross_entropy']:.3f} nats  (exact -E log p_data(G(w)))")
    print(f"  MMD^2 to real        {metrics['mmd2']:.4f}")
    print(f"wrote {out / 'samples.png'} and {out / 'gan.json'}")
    return 0


def mode_counts(samples, mixture, n_std: float = 3.0):
    """``(counts [K], radii [K])``: generated samples within ``n_std`` standard deviations of each mode, with the
    same definition as :func:`scoredensity.apps.gan.gan_metrics` (nearest mode; a component's std is the root mean
    eigenvalue of its covariance), so the picture and the "modes covered" figure count the same thing."""
    import torch

    x = samples.detach().to(torch.float64)
    dist = torch.cdist(x, mixture.means)
    near = dist.argmin(1)
    std = mixture.evals.mean(1).sqrt()
    hq = dist.gather(1, near[:, None])[:, 0] <= n_std * std[near]
    counts = torch.bincount(near[hq], minlength=mixture.num_components)
    return counts, n_std * std
