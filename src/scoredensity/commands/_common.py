"""Pieces shared by several sub-commands: the ``--threads`` option and a run's log-SNR range."""

from __future__ import annotations

import argparse

__all__ = ["add_threads_argument", "apply_threads", "training_lam_range"]


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch intra-op threads (0, the default, leaves torch's setting as it is)."""
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")


def apply_threads(args: argparse.Namespace) -> None:
    """Apply :func:`add_threads_argument`'s ``--threads`` (nothing for 0)."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def training_lam_range(config: dict, lam_min: float | None, lam_max: float | None) -> tuple[float, float]:
    """The log-SNR range to evaluate a run on: the one it was trained on (``config["train"]``), unless given.

    The network never saw log-SNR outside its training range, so that is the default everywhere."""
    tr = config["train"]
    return (tr["lam_min"] if lam_min is None else lam_min, tr["lam_max"] if lam_max is None else lam_max)
