"""``scoredensity evaluate``: held-out NLL of a trained run by the density formula (EMA weights), with an
error bar, bits per dimension for discrete data and the exact NLL for analytic mixtures; or bits/dim of a local
diffusers model (``--diffusers``). Both stream the examples in blocks on ``--device``, can write per-example
results as they go (``--out``) and continue after a kill (``--resume``), run sharded under torchrun, and can
evaluate to a target standard error (``--target-se``)."""

from __future__ import annotations

import argparse
import json
import os

from ..distributed import join_process_group, local_device
from ._common import add_threads_argument, apply_threads, resolve_device, training_lam_range

NAME = "evaluate"
HELP = "held-out negative log-likelihood (nats, bits/dim) of a trained run by the density formula"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``scoredensity evaluate``."""
    from ._diffusers_eval import add_diffusers_arguments

    p.add_argument("run_dir", metavar="DIR", nargs="?", help="run folder written by 'scoredensity train'")
    p.add_argument(
        "--split",
        choices=["test", "train", "all"],
        default=None,
        help="run folders: test (default) or train; --images: all of the given images (default), or the test/train "
        "part of a file with a fixed split",
    )
    p.add_argument("--n", type=int, default=None, help="first N examples (default all)")
    p.add_argument("--n-t", type=int, default=32, help="log-SNR nodes per example (default 32)")
    p.add_argument("--n-z", type=int, default=1, help="noise draws per node (default 1)")
    p.add_argument("--lam-min", type=float, default=None, help="log-SNR range (default: the training range)")
    p.add_argument("--lam-max", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="estimator seed")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    g = p.add_argument_group("device, memory and long evaluations")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast of the network")
    g.add_argument("--max-batch", type=int, default=None, help="rows per network call (default: from a memory budget)")
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="examples per estimator call (default 16 images; run folders 2^14/(n_t n_z), about 2^14 network rows)",
    )
    g.add_argument("--out", metavar="DIR", default=None, help="write per-example results and a manifest here")
    g.add_argument("--resume", action="store_true", help="continue the evaluation in --out (same settings and data)")
    g.add_argument(
        "--target-se",
        type=float,
        default=None,
        metavar="S",
        help="spend calls in rounds until the data set's estimator standard error is <= S bits/dim",
    )
    g.add_argument("--max-rounds", type=int, default=64, help="the most rounds --target-se may spend (default 64)")
    g.add_argument("--no-progress", action="store_true", help="print no progress")
    add_threads_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_diffusers_arguments(p)


def check_common(args: argparse.Namespace) -> None:
    """Checks shared by both kinds of evaluation (one clear line naming the option)."""
    for opt, v, lo in (("--max-batch", args.max_batch, 1), ("--batch-size", args.batch_size, 1), ("--n", args.n, 2)):
        if v is not None and v < lo:
            raise ValueError(f"{opt} must be >= {lo}, got {v}")
    if args.max_rounds < 2 and args.target_se is not None:
        raise ValueError(f"--max-rounds must be >= 2 with --target-se, got {args.max_rounds}")
    if args.target_se is not None and not args.target_se > 0:
        raise ValueError(f"--target-se must be a positive number of bits/dim, got {args.target_se}")
    if args.resume and not args.out:
        raise ValueError("--resume needs --out DIR (the folder of the evaluation to continue)")


def run(args: argparse.Namespace) -> int:
    """Evaluate; print the result. Returns the exit code."""

    check_common(args)
    if args.diffusers:
        if args.run_dir:
            raise ValueError("give either a run folder or --diffusers PATH, not both")
        from ._diffusers_eval import run_diffusers_eval

        return run_diffusers_eval(args)
    if not args.run_dir:
        raise ValueError("give a run folder (DIR) or --diffusers PATH --images SRC")
    if getattr(args, "convention", None):
        raise ValueError("--convention applies to --diffusers image evaluations; a run folder uses the formula")
    split = args.split or "test"
    if split == "all":
        raise ValueError("--split all applies to --images; a run folder has a test and a train split")

    import torch

    from ..checkpoint import load_run
    from ..dataset_eval import DATASET_KEYS, evaluate_dataset
    from ..eval_store import ResultStore

    apply_threads(args)
    device = resolve_device(args.device)
    distributed = join_process_group(device)
    device = local_device(device)
    try:
        model, config, dataset = load_run(args.run_dir, ema=not args.raw)
        model.to(device)
        lam_min, lam_max = training_lam_range(config, args.lam_min, args.lam_max)
        settings = {
            "run_dir": os.path.abspath(args.run_dir),
            "step": config["step"],
            "ema": not args.raw,
            "split": split,
            "n": args.n,
            "n_t": args.n_t,
            "n_z": args.n_z,
            "lam_min": lam_min,
            "lam_max": lam_max,
            "seed": args.seed,
            "precision": args.precision,
            "target_se": args.target_se,
            "max_rounds": args.max_rounds,
            "batch_size": args.batch_size,
        }
        xs = dataset.x_test if split == "test" else dataset.x_train
        store = None
        if args.out:
            from ..image_eval import data_hash

            xs_n = xs[: args.n] if args.n is not None else xs
            digest = data_hash(xs_n) if not xs_n.is_floating_point() else _float_hash(xs_n)
            store = ResultStore(DATASET_KEYS, args.out, settings=settings, data_sha256=digest, resume=args.resume)
        res = evaluate_dataset(
            model,
            dataset,
            split=split,
            n=args.n,
            n_t=args.n_t,
            n_z=args.n_z,
            lam_min=lam_min,
            lam_max=lam_max,
            seed=args.seed,
            precision=args.precision,
            max_batch=args.max_batch,
            batch_size=args.batch_size,
            target_se=args.target_se,
            max_rounds=args.max_rounds,
            store=store,
            progress=not args.no_progress,
        )
        rank = torch.distributed.get_rank() if distributed else 0
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    res.update(run_dir=str(args.run_dir), step=config["step"], data=config["data"]["name"], ema=not args.raw)
    if rank != 0:
        return 0
    if args.json:
        print(json.dumps(res))
        return 0
    print(
        f"{res['data']} ({res['split']}, n={res['n']}, step {res['step']}, {'EMA' if res['ema'] else 'raw'} weights, "
        f"{res['device']}, {res['precision']})"
    )
    print(
        f"  NLL bound   {res['nll']:.4f} ± {res['nll_stderr']:.4f} nats/example"
        f"  (formula, {res['nfe_per_example']:.0f} NFE; estimator ± {res['estimator_stderr']:.4f})"
    )
    if res["bpd"] is not None:
        print(f"  bits/dim    {res['bpd']:.4f} ± {res['bpd_stderr']:.4f}  ({res['kind']})")
    if res["true_nll"] is not None:
        print(f"  exact NLL   {res['true_nll']:.4f};  gap {res['gap']:.4f} ± {res['gap_stderr']:.4f} (paired)")
    if "target_se" in res:
        t = res["target_se"]
        print(
            f"  target-se   {t['se_bpd']:.4g} bits/dim after {t['rounds']} rounds (target {t['target_bpd']:g}, "
            f"{'reached' if t['reached'] else 'NOT reached: raise --max-rounds'}); "
            f"{res['nfe_per_example']:.1f} calls/example"
        )
    return 0


def _float_hash(x) -> str:
    """SHA-256 of float data (float64 bytes, C order) with its shape."""
    import hashlib

    import torch

    h = hashlib.sha256(str(tuple(x.shape)).encode())
    for s in range(0, x.shape[0], 65536):
        h.update(x[s : s + 65536].to(torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()
