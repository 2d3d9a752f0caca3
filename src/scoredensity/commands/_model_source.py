"""What ``compare`` and ``sample`` share: where they get their model (a mixture preset's exact eps, or a trained
run folder) and the ``--threads`` option."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._common import training_lam_range

__all__ = ["ModelSource", "add_model_arguments", "model_source"]


@dataclass
class ModelSource:
    """A model and what is known about it."""

    eps_fn: Any
    shape: tuple[int, ...]
    lam_min: float
    lam_max: float
    title: str
    test_points: Any = None  # callable (n, seed) -> [n, *shape] model-space points
    exact_log_prob: Any = None  # callable x -> [n] exact log-density, or None
    dataset: Any = None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``RUN_DIR`` (optional) or ``--preset``/``--dim``, and the log-SNR range."""
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run folder from 'scoredensity train' (EMA weights)")
    p.add_argument("--preset", default=None, help="mixture preset whose exact eps is the model (default ring8)")
    p.add_argument("--dim", type=int, default=None, help="dimension for the 'anisotropic' preset")
    p.add_argument(
        "--lam-min", type=float, default=None, help="log-SNR range (default: -20, or the run's training range)"
    )
    p.add_argument("--lam-max", type=float, default=None, help="(default: 20, or the run's training range)")


def model_source(args: argparse.Namespace) -> ModelSource:
    """Resolve the arguments of :func:`add_model_arguments`."""
    if args.run_dir and args.preset:
        raise ValueError("give either a run folder or --preset, not both")
    if args.run_dir:
        from ..checkpoint import load_run

        model, config, ds = load_run(args.run_dir)
        lam_min, lam_max = training_lam_range(config, args.lam_min, args.lam_max)

        def points(n: int, seed: int) -> Tensor:
            x = ds.x_test[:n]
            return ds.to_model(x, generator=torch.Generator().manual_seed(seed))

        exact = None if ds.mixture is None else (lambda x: ds.mixture.log_prob(x.flatten(1).double()))
        return ModelSource(
            model, tuple(ds.shape), lam_min, lam_max, f"run {args.run_dir} ({ds.name})", points, exact, ds
        )
    from ..mixtures import mixture_preset

    name = args.preset or "ring8"
    kw = {"d": args.dim} if args.dim is not None else {}
    gm = mixture_preset(name, **kw)
    return ModelSource(
        gm.eps,
        (gm.dim,),
        -20.0 if args.lam_min is None else args.lam_min,
        20.0 if args.lam_max is None else args.lam_max,
        f"{name}: d = {gm.dim}",
        lambda n, seed: gm.sample(n, generator=torch.Generator().manual_seed(seed)),
        gm.log_prob,
    )
