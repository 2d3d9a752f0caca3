"""Checkpoints of training runs: one safetensors file per checkpoint, written atomically and verified on load.

Layout of a run folder::

    config.json               run configuration (data, network, training, data fingerprint), written at the start
    checkpoint.safetensors    the latest checkpoint (weights, EMA, optimiser, sampler state, RNG states)
    metrics.jsonl             one JSON object per logged step / evaluation
    .train.lock               the lock a training process holds (:mod:`scoredensity.runlock`)

A checkpoint is a single safetensors file: tensors ``model.*``, ``ema.*``, ``optim.<param>.<key>``,
``sampler.*``, ``rng.torch``; its string metadata holds a JSON document (``step``, the run config, the
optimiser's scalar state and hyper-parameters, a SHA-256 of every tensor). One file, so one
``os.replace`` makes weights and state change together: a reader sees the old checkpoint or the new one,
never a mix. The new file is written to a temporary name, flushed, read back and verified *before* it
replaces the old one, so a good checkpoint is never overwritten by a broken one. A reader reads the file in one
``read`` (header, metadata and tensors from the same bytes), so a rename during the read cannot mix two versions.
Files are created with the permissions the umask allows (like any other file), not the 0600 of a temporary file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import Tensor, nn

from .config_schema import ConfigError, check_run_config, check_step
from .errors import EXIT_IO, InputFileError

__all__ = [
    "CheckpointError",
    "RunFolderIOError",
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
    "data_fingerprint",
    "UnfinishedRunWarning",
]

CHECKPOINT_NAME = "checkpoint.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "scoredensity-checkpoint/1"


class CheckpointError(InputFileError):
    """A checkpoint or run folder that cannot be used; the message says which file and why (exit code 3).

    A ``ValueError`` (and :class:`~scoredensity.errors.InputFileError`)."""


class RunFolderIOError(CheckpointError):
    """A run folder or checkpoint that cannot be created, locked or written: a full disk, no permission, a
    read-only file system, ``--out`` naming a file or a path under a file (exit code 4, an I/O error). Whatever
    was on disk before is kept."""

    exit_code = EXIT_IO


class UnfinishedRunWarning(UserWarning):
    """:func:`load_run` on a run whose training stopped before its last step."""


def _honour_umask(path: str | os.PathLike) -> None:
    """Give a file made by ``tempfile.mkstemp`` (mode 0600) the mode an ordinary ``open`` would: 0666 & ~umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


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
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise RunFolderIOError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        _honour_umask(tmp)
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise RunFolderIOError(f"cannot write {path}: {e.strerror or e} (the previous file is kept)") from None
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
    except OSError as e:
        raise RunFolderIOError(f"{p} cannot be read: {e.strerror or e}") from None
    if not isinstance(cfg, dict) or any(not isinstance(cfg.get(k), dict) for k in ("data", "net", "train")):
        missing = [k for k in ("data", "net", "train") if not isinstance(cfg, dict) or not isinstance(cfg.get(k), dict)]
        raise CheckpointError(f"{p} is not a scoredensity run configuration (missing {missing})")
    try:
        return check_run_config(str(p), cfg)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


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
        CheckpointError: the file cannot be written (full disk, no permission) or the freshly written file does
            not read back identically; in both cases the old file is kept.
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    doc = dict(meta, format=FORMAT, sha256=tensor_digest(tensors))
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise RunFolderIOError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"scoredensity": json.dumps(doc)})
        _honour_umask(tmp)  # after writing: save_file makes a file of its own
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        load_checkpoint(tmp)  # verify before replacing anything
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or e
        raise RunFolderIOError(f"cannot write checkpoint {path}: {reason} (the previous checkpoint is kept)") from None
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
        data = path.read_bytes()  # one read: metadata and tensors of the same version of the file
    except OSError as e:
        raise RunFolderIOError(f"checkpoint {path} cannot be read: {e.strerror or e}") from None
    try:
        raw = _safetensors_metadata(data).get("scoredensity")
        tensors = load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({len(data)} bytes): {e}") from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a scoredensity checkpoint (no metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT!r})")
    if tensor_digest(tensors) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: tensor data do not match the stored SHA-256")
    return tensors, meta


def _safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file held in ``data`` (8-byte little-endian header size, JSON header).

    Raises:
        ValueError: a header that does not fit the file or is not JSON.
    """
    if len(data) < 8:
        raise ValueError("shorter than the 8-byte header size")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"header of {n} bytes does not fit in the file")
    header = json.loads(data[8 : 8 + n])
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not an object")
    return meta


def data_fingerprint(dataset) -> str:
    """SHA-256 fingerprint of a loaded data set: the hashes of its train/test arrays and labels *after* the split,
    with shape, dtype, levels, logit transform and split settings. It changes when a data file changes or when the
    split settings (seed, test fraction, n) select other examples."""
    m = dataset.meta
    doc = {
        "sha256": m.get("sha256"),
        "shape": list(dataset.shape),
        "dtype": str(dataset.x_train.dtype),
        "levels": dataset.levels,
        "logit_alpha": dataset.logit_alpha,
        "split": {k: m.get(k) for k in ("seed", "split", "test_fraction", "n", "n_train", "n_test")},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


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
    check_data: bool = True,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, dict, Any]:
    """Load a trained model from a run folder, ready to use as an :class:`~scoredensity.epsfn.EpsFn`.

    Args:
        run_dir: folder written by :func:`scoredensity.train.train` / ``scoredensity train``.
        ema: the EMA weights (default; the ones every reported figure uses) or the raw weights.
        load_data: also rebuild the :class:`~scoredensity.data.Dataset` (same name, seed and split);
            ``False`` returns ``None`` in its place.
        check_data: refuse (``CheckpointError``) when the data are not those the run was trained on: the data
            settings of ``config.json`` differ from the checkpoint's (e.g. an edited ``data.seed``), or, with
            ``load_data``, the rebuilt data set's fingerprint (hash of its arrays and split) differs from the
            stored one (e.g. a replaced ``.npy``). Pass ``False`` only to evaluate the model on other data on
            purpose; the data set is then built from ``config.json``'s settings as they are.
        device: where to put the model (default the CPU). Checkpoints are read on the CPU and then moved, so a
            run trained on any device loads on any other.

    Returns:
        ``(model, config, dataset)``: the denoiser in eval mode with frozen parameters (call it as
        ``model(x_t [B, *shape], t [B] float64) -> eps``; class-conditional models take ``y=`` too), carrying
        ``model.lam_range = (lam_min, lam_max)``, its training range of log-SNR, which the estimators use by
        default; the run configuration dict (``config["data"]``, ``config["net"]``, ``config["train"]`` (the
        settings stored *in the checkpoint*, so they agree with its step), ``config["step"]`` and
        ``config["finished"]``); and the dataset. A run whose training stopped early loads with an
        :class:`UnfinishedRunWarning` (printed on stderr).

    Raises:
        CheckpointError: missing/corrupt/crafted config or checkpoint, a checkpoint from another configuration,
            or (``check_data``) other data than the run's.
    """
    from .nets import build_denoiser

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    ckpt = run_dir / CHECKPOINT_NAME
    if not ckpt.is_file():
        raise CheckpointError(
            f"{ckpt} does not exist: the run in {str(run_dir)!r} stopped before its first checkpoint "
            "(continue it with 'scoredensity train --resume')"
        )
    tensors, meta = load_checkpoint(ckpt)
    try:
        meta_cfg = check_run_config(str(ckpt), meta)
        step = check_step(str(ckpt), meta.get("step"), meta_cfg["train"].get("steps"))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if meta_cfg["net"] != config["net"]:
        raise CheckpointError(
            f"{ckpt}: checkpoint from another model configuration "
            f"(its network {meta_cfg['net']} differs from {CONFIG_NAME}'s {config['net']})"
        )
    if check_data and meta_cfg["data"] != config["data"]:
        raise CheckpointError(
            f"{run_dir / CONFIG_NAME}: data settings {config['data']} differ from those the checkpoint was trained "
            f"on {meta_cfg['data']} (edited?); restore them, or pass check_data=False to use other data on purpose"
        )
    try:
        model = build_denoiser(config["net"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{run_dir / CONFIG_NAME}: key 'net' does not describe a network ({e})") from None
    state = _sub(tensors, "ema." if ema else "model.")
    check_state_dict(model, state, str(ckpt))
    model.load_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if device is not None:
        model.to(device)
    train_cfg = meta_cfg["train"]
    lam_range = (float(train_cfg.get("lam_min", -12.0)), float(train_cfg.get("lam_max", 12.0)))
    model.lam_range = lam_range
    total = int(train_cfg.get("steps", step))
    config = dict(config, train=train_cfg, step=step, finished=step >= total)
    if step < total:
        msg = f"run {str(run_dir)!r} stopped at step {step} of {total}: training did not finish"
        warnings.warn(msg, UnfinishedRunWarning, stacklevel=2)
    dataset = None
    if load_data:
        from .data import load_dataset

        dataset = load_dataset(**config["data"])
        stored = meta.get("data_fingerprint") or config.get("data_fingerprint")
        if check_data and stored is not None and data_fingerprint(dataset) != stored:
            raise CheckpointError(
                f"{run_dir}: the data {config['data']['name']!r} are not those the run was trained on (their "
                "fingerprint, a hash of the arrays and the split, differs: a data file was replaced or edited); "
                "pass check_data=False to evaluate on other data on purpose"
            )
    return model, config, dataset
