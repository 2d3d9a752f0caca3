"""The one model convention: a noise predictor in canonical time, and the checked call every estimator uses."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["EpsFn", "call_eps", "check_data"]


class EpsFn(Protocol):
    """``eps_fn(x_t [B, *shape], t [B] float64) -> eps [B, *shape]``, predicting ``E[z | x_t]``
    for ``x_t = sqrt(1-t) x + sqrt(t) z`` (DESIGN.md §1). Score = ``-eps / sqrt(t)``."""

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor: ...


def call_eps(eps_fn: EpsFn, x_t: Tensor, t: Tensor, *cond: Tensor) -> Tensor:
    """Call ``eps_fn(x_t, t, *cond)`` and check its output: same shape as ``x_t``, finite.

    ``cond`` (optional) is a row-aligned condition [N, ...] for conditional models.

    Raises:
        ValueError: naming the offending shape or rows.
    """
    out = eps_fn(x_t, t, *cond)
    if not isinstance(out, Tensor):
        raise TypeError(f"eps_fn must return a torch.Tensor, got {type(out).__name__}")
    if out.shape != x_t.shape:
        raise ValueError(f"eps_fn returned shape {tuple(out.shape)} for input of shape {tuple(x_t.shape)}")
    finite = torch.isfinite(out.flatten(1)).all(dim=1)
    if not finite.all():
        rows = (~finite).nonzero().flatten()[:10].tolist()
        tv = t[(~finite).nonzero().flatten()[:3]].tolist()
        raise ValueError(f"eps_fn returned NaN/Inf in rows {rows} (at t = {tv})")
    return out


def check_data(x: Tensor, name: str = "x") -> Tensor:
    """Check a batch of data points [B, *shape]: a floating tensor, at least 1-D batch, all finite.

    Raises:
        TypeError / ValueError naming the offending rows.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be batched, shape [B, *shape]; got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    finite = torch.isfinite(x.flatten(1)).all(dim=1)
    if not finite.all():
        rows = (~finite).nonzero().flatten()[:10].tolist()
        more = "" if (~finite).sum() <= 10 else f" (and {int((~finite).sum()) - 10} more)"
        raise ValueError(f"{name} contains NaN or Inf in rows {rows}{more}")
    return x
