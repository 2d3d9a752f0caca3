"""``scoredensity certify``: does minimising the DDPM ELBO nearly minimise -E log p? Fit a Gaussian-mixture family
through its exact denoiser by the continuous elbo loss and by the DDPM ELBO (per T and reverse variance), and
compare with the maximum-likelihood (EM) fit; print the table and the verdict, save a plot of the gap against T."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ._common import add_device_arguments, add_threads_argument, apply_threads, prepare_out_dir, resolve_device

NAME = "certify"
HELP = "certify ELBO training: ELBO-fitted vs maximum-likelihood Gaussian mixtures, gap against T"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``scoredensity certify``."""
    p.add_argument("--data", default="blobs2d", help="blobs2d, ring8, grid25, digits-pca2 or a .npy of [N, d] points")
    p.add_argument("--k", type=int, default=None, help="mixture components (default: 3 blobs2d, 8 ring8, 25 grid25, 6)")
    p.add_argument("--n", type=int, default=1000, help="train (and test) points sampled from a mixture preset")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000], help="DDPM step counts T")
    p.add_argument(
        "--variances", nargs="+", default=["fixed_large", "fixed_small"], choices=["fixed_large", "fixed_small"]
    )
    p.add_argument("--n-init", type=int, default=8, help="EM initialisations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="certify_out", help="folder for the PNG and JSON (default certify_out)")
    add_device_arguments(p, precision=False, max_batch=False)
    add_threads_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Run the experiment; print the table and verdict. Returns the exit code."""

    from ..apps.certify import certify_data, certify_mixture, plot_gap
    from ..demo import ProgressLog

    device = resolve_device(args.device)
    apply_threads(args)
    if any(t < 2 for t in args.steps):
        raise ValueError(f"--steps must all be >= 2, got {args.steps}")
    if args.k is not None and args.k < 1:
        raise ValueError(f"--k must be >= 1 mixture components, got {args.k}")
    if args.n < 10:
        raise ValueError(f"--n must be >= 10 points, got {args.n}")
    if args.n_init < 1:
        raise ValueError(f"--n-init must be >= 1, got {args.n_init}")
    if args.data.lower().endswith((".npy", ".npz")):
        from ..data.files import read_array_file

        read_array_file(args.data)  # a one-line DataError for a missing, truncated, pickled or random-bytes file
        if not args.data.lower().endswith(".npy"):
            raise ValueError(f"--data {args.data}: certify reads a .npy of [N, d] points, not a .npz")
    if args.device is not None and device.type != "cpu":  # an explicit request deserves an answer
        print(
            f"note: certify's EM fits and exact mixture denoisers are small CPU work; it runs on the CPU, not {device}",
            file=sys.stderr,
        )
    out = prepare_out_dir(args.out)
    k = args.k if args.k is not None else {"blobs2d": 3, "ring8": 8, "grid25": 25}.get(args.data, 6)
    x_train, x_test = certify_data(args.data, args.n, args.seed)
    if k > len(x_train):
        raise ValueError(f"--k {k} exceeds the {len(x_train)} training points")
    log = ProgressLog("certify")  # plain lines when stderr is a log (not a terminal): start, every 10 s, done
    t_start = time.perf_counter()
    n_fits = 2 + len(args.steps) * len(args.variances)
    log(f"{n_fits} fits of K = {k} components to {len(x_train)} points (EM, continuous ELBO, DDPM ELBO per T/variance)")
    with log.every(lambda: f"fitting, {time.perf_counter() - t_start:.0f} s elapsed"):
        rep = certify_mixture(
            x_train,
            x_test,
            k,
            steps=tuple(args.steps),
            variances=tuple(args.variances),
            n_init=args.n_init,
            seed=args.seed,
        )
    log(f"fits done in {time.perf_counter() - t_start:.1f} s")
    png = out / "certify_gap.png"
    plot_gap(rep, png)
    summary = {
        "data": args.data,
        "k": k,
        "n_train": rep.n_train,
        "n_test": rep.n_test,
        "resolution": rep.resolution,
        "verdict": rep.verdict,
        "rows": [r.__dict__ for r in rep.rows],
        "png": str(png),
    }
    (out / "certify.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{args.data}: K = {k}, {rep.n_train} train / {rep.n_test} test points (NLL in nats/example)")
    print(rep.table())
    print(rep.verdict)
    print(f"wrote {png} and {out / 'certify.json'}")
    return 0
