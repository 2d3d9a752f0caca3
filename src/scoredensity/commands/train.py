"""``scoredensity train``: train a denoiser with the likelihood-weighted loss (a thin layer over
:func:`scoredensity.train.train`). Runs under ``torchrun`` too (nccl on CUDA, gloo on the CPU).

Errors are raised, and :mod:`scoredensity.cli` reports each as one line with the exit codes of
:mod:`scoredensity.errors`: 0 trained; 2 bad settings; 3 bad data, run folder contents, checkpoint or config.json;
4 I/O (``--out`` a file or under a file, no permission, full disk: the previous checkpoint is kept); 5 training
diverged (the last good checkpoint is kept); 6 the run folder is locked by another training process; 130 stopped by
SIGINT and 143 stopped by SIGTERM, in both cases after saving a checkpoint of the current step."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import EXIT_BUSY, EXIT_DATA, EXIT_DIVERGED, EXIT_IO, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE
from ._common import add_threads_argument, default_threads

NAME = "train"
HELP = "train a diffusion denoiser on a data set (mixture presets, toys, digits, mnist, cifar10, paths)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``scoredensity train``."""
    from ..losses import LAM_SAMPLINGS, WEIGHTINGS
    from ..train import TrainConfig

    d = TrainConfig()
    p.epilog = (
        f"exit codes: 0 trained; {EXIT_USAGE} bad settings; {EXIT_DATA} bad data, run folder contents, checkpoint "
        f"or config.json; {EXIT_IO} I/O error (--out a file, no permission, full disk: the previous checkpoint is "
        f"kept); {EXIT_DIVERGED} training diverged (the last good checkpoint is kept); {EXIT_BUSY} the run folder "
        f"is in use by another training process; {EXIT_SIGINT} / {EXIT_SIGTERM} stopped by SIGINT / SIGTERM after "
        "saving a checkpoint (continue with --resume)"
    )
    p.add_argument("--data", help="data set name (ring8, grid25, blobs2d, moons, digits, mnist, ...) or a path")
    p.add_argument("--steps", type=int, default=None, help=f"optimiser steps (default {d.steps})")
    p.add_argument("--out", required=True, help="run folder (config, checkpoint, metrics)")
    p.add_argument("--seed", type=int, default=d.seed, help="run seed: data split, init, data order, noise")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (with its stored settings; --steps may extend it)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--n",
        "--num-examples",
        dest="n",
        type=int,
        default=None,
        help="number of examples (synthetic: sampled; else a subset)",
    )
    g.add_argument("--test-fraction", type=float, default=0.2, help="share of held-out examples (default 0.2)")
    g.add_argument("--logit", action="store_true", help="logit transform (alpha = 0.05) for discrete data")
    g.add_argument("--root", default=None, help="data directory for mnist / cifar10")
    g = p.add_argument_group("network")
    g.add_argument("--net", choices=["auto", "mlp", "unet"], default="auto", help="MLP for vectors, U-Net for images")
    g.add_argument("--hidden", type=int, default=None, help="MLP width (default 256)")
    g.add_argument("--blocks", type=int, default=None, help="MLP residual blocks (default 3)")
    g.add_argument("--channels", type=str, default=None, help="U-Net block channels, e.g. 32,64")
    g.add_argument("--param", choices=["v", "eps"], default=None, help="output parameterisation (default v)")
    g.add_argument("--conditional", action="store_true", help="class-conditional network (null label dropout)")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--warmup", type=int, default=d.warmup)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip)
    g.add_argument("--ema-decay", type=float, default=d.ema_decay)
    g.add_argument("--loss", dest="weighting", choices=list(WEIGHTINGS), default=d.weighting, help="loss weighting")
    g.add_argument("--lam-sampling", choices=list(LAM_SAMPLINGS), default=d.lam_sampling, help="log-SNR sampling")
    g.add_argument("--lam-min", type=float, default=d.lam_min, help="training/evaluation range of log-SNR")
    g.add_argument("--lam-max", type=float, default=d.lam_max)
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out NLL every N steps (0: end only)")
    g.add_argument("--eval-n", type=int, default=d.eval_n, help="held-out points for the NLL (0: none)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    g.add_argument("--log-every", type=int, default=d.log_every)
    add_threads_argument(g)
    g.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu; a resumed run may change it)",
    )
    g.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default=d.precision,
        help="autocast of the network's forward pass (fp16 with a gradient scaler; the loss stays float32/64)",
    )
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress output (default: a bar on a terminal, a plain line every ~10 s in a log file)",
    )
    p.add_argument("--json", action="store_true", help="print the final evaluation as JSON")


def run(args: argparse.Namespace) -> int:
    """Train; print the final held-out evaluation. Returns the exit code (see the module docstring)."""
    from .. import distributed as D
    from ..errors import UsageError
    from ..train import TrainConfig, train

    if args.threads is not None and args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    distributed = D.init_from_env(device=args.device)
    if not args.resume and not args.data:
        raise ValueError("--data is required (unless --resume)")
    data = None
    if args.data:
        data = {
            "name": args.data,
            "seed": args.seed,
            "test_fraction": args.test_fraction,
            "n": args.n,
            "logit": args.logit,
        }
        if args.root:
            data["root"] = args.root
    net = {"type": args.net, "hidden": args.hidden, "blocks": args.blocks, "param": args.param}
    if args.channels:
        try:
            net["channels"] = [int(c) for c in args.channels.split(",")]
        except ValueError:
            raise ValueError(f"--channels must be comma-separated integers, got {args.channels!r}") from None
    if args.net != "unet":
        net.pop("channels", None)
    if args.net == "unet":
        net.pop("hidden")
        net.pop("blocks")
    cfg = TrainConfig(
        steps=args.steps or TrainConfig().steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay,
        weighting=args.weighting,
        lam_sampling=args.lam_sampling,
        lam_min=args.lam_min,
        lam_max=args.lam_max,
        conditional=args.conditional,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_n=args.eval_n,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        threads=args.threads or 0,
        precision=args.precision,
        **({"device": args.device} if args.device else {}),
    )
    rank = D.rank_world()[0]
    try:  # errors propagate: the CLI reports them as one line with the exit codes of scoredensity.errors
        res = train(
            args.out,
            data if not args.resume or args.data else None,
            net={k: v for k, v in net.items() if v is not None},
            config=cfg,
            resume=args.resume,
            steps=args.steps,
            progress=False if args.no_progress else None,
            device=args.device,
            default_threads=default_threads if args.threads is None else (lambda _kind: args.threads or None),
        )
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return 0
    ev = res.final_eval
    if args.json:
        print(json.dumps({"run_dir": str(res.run_dir), "step": res.step, "seconds": res.seconds, "eval": ev}))
    else:
        print(f"trained {res.run_dir} to step {res.step} in {res.seconds:.1f} s ({res.steps_per_second:.1f} steps/s)")
        if ev is not None:
            line = f"held-out NLL bound (EMA, n={ev['n']}): {ev['nll']:.4f} ± {ev['nll_stderr']:.4f} nats"
            if ev["bpd"] is not None:
                line += f", {ev['bpd']:.4f} bits/dim ({ev['kind']})"
            if ev["true_nll"] is not None:
                line += f"; exact {ev['true_nll']:.4f}, gap {ev['gap']:.4f} ± {ev['gap_stderr']:.4f}"
            print(line)
    sys.stdout.flush()
    return 0
