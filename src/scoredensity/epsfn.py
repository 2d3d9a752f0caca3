"""The one model convention: a noise predictor in canonical time, and the checked call every estimator uses."""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "EpsFn",
    "call_eps",
    "check_data",
    "PRECISIONS",
    "DEFAULT_LAM_RANGE",
    "DEFAULT_MEMORY_BUDGET",
    "autocast_context",
    "default_max_batch",
    "resolve_max_batch",
    "resolve_lam_range",
    "check_int",
    "check_precision",
    "work_device",
    "row_blocks",
]

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_LAM_RANGE = (-20.0, 20.0)
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of float64 working rows per network call (x_t, z, eps and temporaries)


class EpsFn(Protocol):
    """``eps_fn(x_t [B, *shape], t [B] float64) -> eps [B, *shape]``, predicting ``E[z | x_t]``
    for ``x_t = sqrt(1-t) x + sqrt(t) z`` (docs/design.md §1). Score = ``-eps / sqrt(t)``."""

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor: ...


def autocast_context(precision: str, device: torch.device | str):
    """The context in which the *network* runs at ``precision`` (``"fp32"``: none; ``"bf16"``/``"fp16"``:
    ``torch.autocast`` on ``device``'s type). Integrands, end terms and sums stay in float64 outside it.

    Raises:
        ValueError: for an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_AUTOCAST_DTYPES[precision])


def check_precision(precision: str) -> str:
    """``precision`` checked to be one of :data:`PRECISIONS`.

    Raises:
        ValueError: naming the option and the accepted values.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def call_eps(eps_fn: EpsFn, x_t: Tensor, t: Tensor, *cond: Tensor, precision: str = "fp32") -> Tensor:
    """Call ``eps_fn(x_t, t, *cond)`` and check its output: same shape as ``x_t``, finite.

    ``cond`` (optional) is a row-aligned condition [N, ...] for conditional models. ``precision`` autocasts the
    network call only (:func:`autocast_context`); the output is returned as a float32 (or ``x_t``'s float64)
    tensor, never in half precision. ``x_t`` is handed over as a fresh tensor that the caller does not reuse,
    so a model that writes into its input cannot corrupt the estimate.

    Raises:
        ValueError: naming the offending shape or rows.
    """
    with autocast_context(precision, x_t.device):
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
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()
    return out


def check_int(name: str, value, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as an int, checked to be an integer (not a bool or float) and ``>= minimum``.

    Raises:
        ValueError / TypeError naming the option.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def default_max_batch(row_numel: int, budget_bytes: int = DEFAULT_MEMORY_BUDGET, copies: int = 8) -> int:
    """Rows per network call that keep the estimator's working memory near ``budget_bytes``.

    A row of ``row_numel`` elements costs about ``copies`` float64 tensors (x_t, z, eps and temporaries); the
    network's own activations come on top and are bounded by lowering ``max_batch`` (``--max-batch``).
    """
    return max(1, int(budget_bytes) // (8 * copies * max(1, int(row_numel))))


def resolve_max_batch(max_batch: int | None, row_numel: int, chunk_size: int | None = None) -> int:
    """The rows per network call: ``max_batch``, else the deprecated ``chunk_size``, else :func:`default_max_batch`.

    Raises:
        ValueError / TypeError for a non-positive or non-integer value.
    """
    if chunk_size is not None:
        warnings.warn("chunk_size is deprecated; use max_batch (rows per network call)", DeprecationWarning, 3)
        if max_batch is None:
            return check_int("chunk_size", chunk_size)
    if max_batch is None:
        return default_max_batch(row_numel)
    return check_int("max_batch", max_batch)


def resolve_lam_range(eps_fn: EpsFn, lam_min: float | None, lam_max: float | None) -> tuple[float, float]:
    """The log-SNR range of an estimate: the given ends, else the trained range the model carries as
    ``eps_fn.lam_range`` (set by :func:`scoredensity.load_run`), else :data:`DEFAULT_LAM_RANGE`.

    Raises:
        ValueError: unless ``lam_min < lam_max``, both finite.
    """
    own = getattr(eps_fn, "lam_range", None)
    lo_d, hi_d = (float(own[0]), float(own[1])) if own is not None else DEFAULT_LAM_RANGE
    lo = lo_d if lam_min is None else float(lam_min)
    hi = hi_d if lam_max is None else float(lam_max)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"lam_min and lam_max must be finite (the ends are closed by exact terms), got [{lo}, {hi}]")
    if not hi > lo:
        raise ValueError(f"need lam_max > lam_min, got [{lo}, {hi}]")
    return lo, hi


def work_device(x: Tensor) -> torch.device:
    """Where an estimator's float64 work on ``x`` runs: ``x``'s device, except MPS (no float64) -> the CPU."""
    return torch.device("cpu") if x.device.type == "mps" else x.device


def row_blocks(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` rows covering ``range(n)``: how estimators bound their memory."""
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


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
    rows_per_block = max(1, (1 << 24) // max(1, x[0].numel()))  # bounded temporary, whatever B
    finite = torch.cat([torch.isfinite(x[sl].flatten(1)).all(dim=1) for sl in row_blocks(x.shape[0], rows_per_block)])
    if not finite.all():
        rows = (~finite).nonzero().flatten()[:10].tolist()
        more = "" if (~finite).sum() <= 10 else f" (and {int((~finite).sum()) - 10} more)"
        raise ValueError(f"{name} contains NaN or Inf in rows {rows}{more}")
    return x
