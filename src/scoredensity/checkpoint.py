"""Checkpoints of training runs: one safetensors file per checkpoint, written atomically and verified on load.

Layout of a run folder::

    config.json               run configuration (data, network, training), written once
    checkpoint.safetensors    the latest checkpoint (weights, EMA, optimiser, sampler state, RNG states)
    metrics.jsonl             one JSON object per logged step / evaluation

A checkpoint is a single safetensors file: tensors ``model.*``, ``ema.*``, ``optim.<param>.<key>``,
``sampler.*``, ``rng.torch``; its string metadata holds a JSON document (``step``, the run config, the
optimiser's scalar state and hyper-parameters, a SHA-256 of every tensor). One file, so one
``os.replace`` makes weights and state change together: a reader sees the old checkpoint or the new one,
never a mix. The new file is written to a temporary name, flushed, read back and verified *before* it
replaces the old one, so a good checkpoint is never overwritten by a broken one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "CHECKPOINT_NAME",
    "CONFIG_NAME",
    "save_checkpoint",
    "load_checkpoint",
    "tensor_digest",
    "flatten_optimizer_state",
    "unflatten_optimizer_state",
    "check_state_dict",
    "write_json_atomic",
    "read_config",
    "load_run",
]

CHECKPOINT_NAME = "checkpoint.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "scoredensity-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be used; the message says which file and why."""


# ---------------------------------------------------------------------------------------- files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace`` (atomic)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_config(run_dir: str | os.PathLike) -> dict:
    """The run configuration ``config.json`` of a run folder.

    Raises:
        CheckpointError: the folder or file is missing or not valid JSON.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {str(run_dir)!r} does not exist")
    p = run_dir / CONFIG_NAME
    if not p.is_file():
        raise CheckpointError(f"{p} is missing: {str(run_dir)!r} is not a training run folder")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is corrupt (not valid JSON: {e})") from None
    missing = [k for k in ("data", "net", "train") if not isinstance(cfg, dict) or not isinstance(cfg.get(k), dict)]
    if missing:
        raise CheckpointError(f"{p} is not a scoredensity run configuration (missing {missing})")
    return cfg


def tensor_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write tensors and a JSON document to ``path`` atomically, verifying the new file before it replaces
    the old one.

    Args:
        path: destination ``.safetensors`` file.
        tensors: name -> tensor (CPU, contiguous copies are made).
        meta: JSON-serialisable document stored in the file's metadata (a ``sha256`` entry is added).

    Raises:
        CheckpointError: the freshly written file does not read back identically (the old file is kept).
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    doc = dict(meta, format=FORMAT, sha256=tensor_digest(tensors))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"scoredensity": json.dumps(doc)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        load_checkpoint(tmp)  # verify before replacing anything
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Returns:
        ``(tensors, meta)``.

    Raises:
        CheckpointError: missing, truncated or corrupt file (bad header, checksum mismatch), or not a
            scoredensity checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("scoredensity")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        size = path.stat().st_size
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({size} bytes): {e}") from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a scoredensity checkpoint (no metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata is not valid JSON") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT!r})")
    if tensor_digest(tensors) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: tensor data do not match the stored SHA-256")
    return tensors, meta


# ---------------------------------------------------------------------------------------- state dicts
def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a torch optimiser ``state_dict`` into tensors ``optim.<param id>.<key>`` and JSON (param groups
    and non-tensor per-parameter entries)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in state_dict["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"optim.{pid}.{key}"] = val
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, Tensor], doc: dict[str, Any]) -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if not name.startswith("optim."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = val
    for pid, st in doc.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": doc["param_groups"]}


def check_state_dict(module: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Check that ``state`` has exactly ``module``'s parameter/buffer names and shapes.

    Raises:
        CheckpointError: "checkpoint from another model configuration", listing missing and unexpected
            keys and shape mismatches.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]))
        raise CheckpointError(f"{where}: checkpoint from another model configuration ({', '.join(parts)})")


def _sub(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------- runs
def load_run(
    run_dir: str | os.PathLike,
    *,
    ema: bool = True,
    load_data: bool = True,
) -> tuple[nn.Module, dict, Any]:
    """Load a trained model from a run folder, ready to use as an :class:`~scoredensity.epsfn.EpsFn`.

    Args:
        run_dir: folder written by :func:`scoredensity.train.train` / ``scoredensity train``.
        ema: the EMA weights (default; the ones every reported figure uses) or the raw weights.
        load_data: also rebuild the :class:`~scoredensity.data.Dataset` (same name, seed and split);
            ``False`` returns ``None`` in its place.

    Returns:
        ``(model, config, dataset)``: the denoiser in eval mode with frozen parameters (call it as
        ``model(x_t [B, *shape], t [B] float64) -> eps``; class-conditional models take ``y=`` too),
        the run configuration dict (``config["data"]``, ``config["net"]``, ``config["train"]``, plus
        ``config["step"]`` of the checkpoint) and the dataset.

    Raises:
        CheckpointError: missing/corrupt config or checkpoint, or a checkpoint from another configuration.
    """
    from .nets import build_denoiser

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    tensors, meta = load_checkpoint(run_dir / CHECKPOINT_NAME)
    if meta.get("net") != config.get("net"):
        raise CheckpointError(
            f"{run_dir / CHECKPOINT_NAME}: checkpoint from another model configuration "
            f"(its network {meta.get('net')} differs from {CONFIG_NAME}'s {config.get('net')})"
        )
    model = build_denoiser(config["net"])
    state = _sub(tensors, "ema." if ema else "model.")
    check_state_dict(model, state, str(run_dir / CHECKPOINT_NAME))
    model.load_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    config = dict(config, step=int(meta["step"]))
    dataset = None
    if load_data:
        from .data import load_dataset

        dataset = load_dataset(**config["data"])
    return model, config, dataset
