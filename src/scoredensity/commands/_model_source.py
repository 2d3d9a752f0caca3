"""What ``compare`` and ``sample`` share: where they get their model (a mixture preset's exact eps, or a trained
run folder), on which device, and the ``--threads`` default that suits it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._common import load_run_checked, net_kind, training_lam_range, warn_if_unfinished

__all__ = ["ModelSource", "add_model_arguments", "model_source", "mixture_on_device"]


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
    kind: str = "small"  # "small" (MLP, 2-D) or "unet": the thread default
    device: Any = None  # torch.device the model lives on


def mixture_on_device(gm: Any, device: torch.device) -> Any:
    """A copy of a :class:`~scoredensity.mixtures.GaussianMixture` whose tensors live on ``device`` (its closed-form
    ``eps`` then runs there). MPS has no float64: there the mixture stays on the CPU and its ``eps`` moves inputs
    and outputs across."""
    import copy

    device = torch.device(device)
    if device.type == "cpu":
        return gm
    if device.type == "mps":

        class _ViaCPU:
            dim, num_components, weights = gm.dim, gm.num_components, gm.weights

            def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
                return gm.eps(x_t.cpu(), t.cpu()).to(x_t.device)

            __call__ = eps

            def __getattr__(self, name: str) -> Any:
                return getattr(gm, name)

        return _ViaCPU()
    out = copy.copy(gm)
    for name, value in vars(gm).items():
        if isinstance(value, Tensor):
            setattr(out, name, value.to(device))
    return out


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``RUN_DIR`` (optional) or ``--preset``/``--dim``, and the log-SNR range."""
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run folder from 'scoredensity train' (EMA weights)")
    p.add_argument("--preset", default=None, help="mixture preset whose exact eps is the model (default ring8)")
    p.add_argument("--dim", type=int, default=None, help="dimension for the 'anisotropic' preset")
    p.add_argument(
        "--lam-min", type=float, default=None, help="log-SNR range (default: -20, or the run's training range)"
    )
    p.add_argument("--lam-max", type=float, default=None, help="(default: 20, or the run's training range)")


def model_source(args: argparse.Namespace, device: Any = None) -> ModelSource:
    """Resolve the arguments of :func:`add_model_arguments`; the model is put on ``device`` (default CPU).

    Test points (``test_points``) and exact log-densities (``exact_log_prob``) are CPU tensors; move the points.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if args.run_dir and args.preset:
        raise ValueError("give either a run folder or --preset, not both")
    if args.run_dir:
        model, config, ds = load_run_checked(args.run_dir)
        warn_if_unfinished(config, args.run_dir)
        model = model.to(device)
        lam_min, lam_max = training_lam_range(config, args.lam_min, args.lam_max)

        def points(n: int, seed: int) -> Tensor:
            x = ds.x_test[:n]
            return ds.to_model(x, generator=torch.Generator().manual_seed(seed))

        exact = None if ds.mixture is None else (lambda x: ds.mixture.log_prob(x.flatten(1).double().cpu()))
        return ModelSource(
            model,
            tuple(ds.shape),
            lam_min,
            lam_max,
            f"run {args.run_dir} ({ds.name})",
            points,
            exact,
            ds,
            kind=net_kind(config),
            device=device,
        )
    from ..mixtures import mixture_preset

    name = args.preset or "ring8"
    kw = {"d": args.dim} if args.dim is not None else {}
    gm = mixture_preset(name, **kw)
    return ModelSource(
        mixture_on_device(gm, device).eps,
        (gm.dim,),
        -20.0 if args.lam_min is None else args.lam_min,
        20.0 if args.lam_max is None else args.lam_max,
        f"{name}: d = {gm.dim}",
        lambda n, seed: gm.sample(n, generator=torch.Generator().manual_seed(seed)),
        lambda x: gm.log_prob(x.cpu()),
        device=device,
    )
