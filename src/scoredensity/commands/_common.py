"""Pieces shared by several sub-commands: ``--device``/``--precision``/``--max-batch``, ``--threads``, loading a
run folder with one-line errors, a run's log-SNR range, and the warning for a run that did not finish training."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import InputFileError, UsageError

__all__ = [
    "add_device_arguments",
    "resolve_device",
    "default_device",
    "estimator_options",
    "add_threads_argument",
    "apply_threads",
    "default_threads",
    "load_run_checked",
    "warn_if_unfinished",
    "training_lam_range",
    "check_positive",
    "supported_kwargs",
    "with_precision",
    "net_kind",
    "prepare_out_dir",
]

PRECISION_CHOICES = ("fp32", "bf16", "fp16")


# ---------------------------------------------------------------------------------------------- devices
def default_device() -> str:
    """``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None):
    """The ``torch.device`` for ``--device`` (None: :func:`default_device`), checked to exist on this machine.

    Accepts ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` (the check is :func:`scoredensity.distributed.resolve_device`).

    Raises:
        UsageError: an unknown device name, or one that this machine does not have (the message says why).
    """
    import torch

    from ..distributed import resolve_device as check_device

    if name is None or name == "auto":
        name = default_device()
    name = str(name).strip().lower()
    m = re.fullmatch(r"(cpu|mps|cuda)(?::(\d+))?", name)
    if m is None or (m.group(1) != "cuda" and m.group(2) is not None and m.group(2) != "0"):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or mps, got {name!r}")
    if m.group(1) == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if m.group(1) == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: Apple MPS is not available on this machine; use --device cpu")
    try:
        return check_device(name)
    except ValueError as e:
        raise UsageError(f"--device {name}: {e}") from None


def add_device_arguments(p: argparse.ArgumentParser, *, precision: bool = True, max_batch: bool = True) -> None:
    """``--device`` (default cuda when available, else cpu; also cuda:N, mps), ``--precision fp32|bf16|fp16``
    (autocast of the network only; sums stay float64) and ``--max-batch N`` (rows per network call; default from a
    memory budget)."""
    p.add_argument(
        "--device",
        default=None,
        metavar="DEV",
        help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)",
    )
    if precision:
        p.add_argument(
            "--precision",
            choices=PRECISION_CHOICES,
            default="fp32",
            help="precision of the network's forward pass (autocast; integrands and sums stay float64; default fp32)",
        )
    if max_batch:
        p.add_argument(
            "--max-batch",
            type=int,
            default=None,
            metavar="N",
            help="rows per network call (default: sized from a memory budget); lower it if memory runs out",
        )


def estimator_options(args: argparse.Namespace) -> dict[str, Any]:
    """``{"precision": ..., "max_batch": ...}`` from :func:`add_device_arguments`'s options, checked.

    Raises:
        UsageError: ``--max-batch`` below 1, or ``--precision`` other than fp32 on a device whose autocast does
        not support it.
    """
    opts: dict[str, Any] = {}
    if getattr(args, "precision", None) is not None:
        opts["precision"] = args.precision
    mb = getattr(args, "max_batch", None)
    if mb is not None:
        check_positive("--max-batch", mb)
        opts["max_batch"] = mb
    return opts


def supported_kwargs(fn: Any, options: dict[str, Any], what: str) -> dict[str, Any]:
    """The subset of ``options`` that ``fn`` accepts as keyword arguments. Options it does not take are dropped;
    a dropped option with a non-default value (``precision`` other than fp32, any ``max_batch``) is reported on
    stderr, so a setting is never ignored silently."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return dict(options)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    kept = {k: v for k, v in options.items() if k in params}
    dropped = [k for k, v in options.items() if k not in params and v is not None and v != "fp32"]
    if dropped:
        flags = ", ".join("--" + k.replace("_", "-") for k in dropped)
        print(f"note: {what} does not take {flags}; ignored there", file=sys.stderr, flush=True)
    return kept


def with_precision(eps_fn: Any, precision: str) -> Any:
    """``eps_fn`` whose network call runs under ``precision``'s autocast (:func:`scoredensity.epsfn.call_eps`),
    returning ``x_t``'s dtype; for callers (samplers, the GAN regulariser) that take no ``precision=`` themselves.
    ``"fp32"`` returns ``eps_fn`` unchanged."""
    if precision in (None, "fp32"):
        return eps_fn
    from ..epsfn import autocast_context

    def eps(x_t, t, *cond):
        with autocast_context(precision, x_t.device):
            out = eps_fn(x_t, t, *cond)
        return out.to(x_t.dtype)

    for attr in ("lam_range", "config"):
        if hasattr(eps_fn, attr):
            setattr(eps, attr, getattr(eps_fn, attr))
    return eps


def check_positive(option: str, value: int | float | None, minimum: int | float = 1) -> None:
    """Raise a one-line :class:`UsageError` naming ``option`` unless ``value >= minimum`` (None passes)."""
    if value is not None and not value >= minimum:
        raise UsageError(f"{option} must be >= {minimum}, got {value}")


# ---------------------------------------------------------------------------------------------- threads
def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch intra-op threads (default: OMP_NUM_THREADS when set, else chosen by model size)."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads (default: $OMP_NUM_THREADS if set, else 1 for small MLP/2-D models, "
        "min(4, cores) for U-Nets; extra threads slow small models down and a busy machine down a lot)",
    )


def default_threads(kind: str = "small") -> int | None:
    """Threads for work of ``kind`` (``"small"``: MLPs and 2-D data; ``"unet"``: image networks).

    Returns None when ``OMP_NUM_THREADS`` is set (torch already honours it), else 1 for small work and
    ``min(4, cores)`` for U-Nets. Small models gain nothing from several threads, and on a loaded machine
    oversubscription costs up to 8x (measured: a 1-minute training took 8 on a busy 2-core machine).
    """
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    if kind == "unet":
        return max(1, min(4, os.cpu_count() or 1))
    return 1


def apply_threads(args: argparse.Namespace, kind: str = "small") -> int:
    """Set torch's intra-op threads from ``--threads`` (:func:`add_threads_argument`), or the default for
    ``kind`` (:func:`default_threads`). Returns the number of threads in use.

    Raises:
        UsageError: ``--threads`` below 0 (0 leaves torch's own setting as it is).
    """
    import torch

    n = getattr(args, "threads", None)
    if n is not None and n < 0:
        raise UsageError(f"--threads must be >= 0, got {n}")
    if n is None:
        n = default_threads(kind)
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def net_kind(config: dict) -> str:
    """``"unet"`` or ``"small"`` for a run's config (thread defaults, :func:`default_threads`)."""
    net = config.get("net", {}) if isinstance(config, dict) else {}
    return "unet" if isinstance(net, dict) and net.get("type") == "unet" else "small"


# ---------------------------------------------------------------------------------------------- outputs
def prepare_out_dir(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (and its parents) before any work is done, so that an unusable
    ``--out`` (an existing file, a path under a file, a read-only parent) fails at once with the ``OSError`` that
    names it, instead of after minutes of computing.

    Raises:
        FileExistsError / NotADirectoryError / PermissionError: naming the path (exit code 4 on the command line).
    """
    import errno

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(errno.EEXIST, "exists and is a file, not a folder", str(out))
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "folder not writable", str(out))
    return out


# ---------------------------------------------------------------------------------------------- run folders
def load_run_checked(run_dir: str | os.PathLike, **kw: Any):
    """:func:`scoredensity.checkpoint.load_run` whose failures on a crafted or damaged run folder are one
    :class:`InputFileError` naming the folder (instead of a ``KeyError``/``TypeError``/``AttributeError`` from
    deep inside). File-system errors (permissions) pass through unchanged. The library's
    :class:`~scoredensity.checkpoint.UnfinishedRunWarning` is silenced here: every command reports an unfinished
    run itself, in one line, with :func:`warn_if_unfinished` (else the user read it twice, once with a source line).

    Returns:
        ``(model, config, dataset)`` as :func:`~scoredensity.checkpoint.load_run`.
    """
    import warnings

    from ..checkpoint import UnfinishedRunWarning, load_run

    path = Path(run_dir)
    if not path.exists():
        raise InputFileError(f"{path}: no such run folder")
    if not path.is_dir():
        raise InputFileError(f"{path}: is a file, not a run folder")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnfinishedRunWarning)
            return load_run(path, **kw)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        what = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) and e.args else f"{type(e).__name__}: {e}"
        raise InputFileError(f"{path}: not a usable run folder (damaged or crafted config/checkpoint: {what})") from e


def warn_if_unfinished(config: dict, run_dir: str | os.PathLike) -> None:
    """Print the checkpoint's step, and a warning on stderr when the run stopped before its planned steps
    (interrupted or killed training): its figures are those of an unfinished model."""
    step = config.get("step")
    planned = config.get("train", {}).get("steps") if isinstance(config.get("train"), dict) else None
    if not isinstance(step, int):
        return
    if isinstance(planned, int) and step < planned:
        print(
            f"warning: {run_dir}: training did not finish (checkpoint at step {step} of {planned}); "
            f"resume it with `scoredensity train --resume --out {run_dir}`",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(f"{run_dir}: checkpoint at step {step}", file=sys.stderr, flush=True)


def training_lam_range(config: dict, lam_min: float | None, lam_max: float | None) -> tuple[float, float]:
    """The log-SNR range to evaluate a run on: the one it was trained on (``config["train"]``), unless given.

    The network never saw log-SNR outside its training range, so that is the default everywhere."""
    tr = config["train"]
    return (tr["lam_min"] if lam_min is None else lam_min, tr["lam_max"] if lam_max is None else lam_max)
