"""``scoredensity evaluate``: held-out NLL of a trained run by the density formula (EMA weights), with an
error bar, bits per dimension for discrete data and the exact NLL for analytic mixtures."""

from __future__ import annotations

import argparse
import json

from ._common import add_threads_argument, apply_threads, training_lam_range

NAME = "evaluate"
HELP = "held-out negative log-likelihood (nats, bits/dim) of a trained run by the density formula"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``scoredensity evaluate``."""
    from ._diffusers_eval import add_diffusers_arguments

    p.add_argument("run_dir", metavar="DIR", nargs="?", help="run folder written by 'scoredensity train'")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--n", type=int, default=None, help="first N points of the split (default all)")
    p.add_argument("--n-t", type=int, default=32, help="log-SNR nodes per example (default 32)")
    p.add_argument("--n-z", type=int, default=1, help="noise draws per node (default 1)")
    p.add_argument("--lam-min", type=float, default=None, help="log-SNR range (default: the training range)")
    p.add_argument("--lam-max", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="estimator seed")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    add_threads_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_diffusers_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Evaluate; print the result. Returns the exit code."""

    if args.diffusers:
        if args.run_dir:
            raise ValueError("give either a run folder or --diffusers PATH, not both")
        from ._diffusers_eval import run_diffusers_eval

        return run_diffusers_eval(args)
    if not args.run_dir:
        raise ValueError("give a run folder (DIR) or --diffusers PATH --images SRC")

    from ..checkpoint import load_run
    from ..train import evaluate_model

    apply_threads(args)
    model, config, dataset = load_run(args.run_dir, ema=not args.raw)
    lam_min, lam_max = training_lam_range(config, args.lam_min, args.lam_max)
    res = evaluate_model(
        model,
        dataset,
        split=args.split,
        n=args.n,
        n_t=args.n_t,
        n_z=args.n_z,
        lam_min=lam_min,
        lam_max=lam_max,
        seed=args.seed,
    )
    res.update(run_dir=str(args.run_dir), step=config["step"], data=config["data"]["name"], ema=not args.raw)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{res['data']} ({res['split']}, n={res['n']}, step {res['step']}, {'EMA' if res['ema'] else 'raw'} weights)")
    print(
        f"  NLL bound   {res['nll']:.4f} ± {res['nll_stderr']:.4f} nats/example"
        f"  (formula, {res['nfe_per_example']:.0f} NFE)"
    )
    if res["bpd"] is not None:
        print(f"  bits/dim    {res['bpd']:.4f} ± {res['bpd_stderr']:.4f}  ({res['kind']})")
    if res["true_nll"] is not None:
        print(f"  exact NLL   {res['true_nll']:.4f};  gap {res['gap']:.4f} ± {res['gap_stderr']:.4f} (paired)")
    return 0
