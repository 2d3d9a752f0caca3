"""Training diffusion denoisers with the likelihood-weighted loss, and evaluating them by the density formula.

:func:`train` runs (or resumes) a training run in a folder (layout in :mod:`scoredensity.checkpoint`):
AdamW with linear warm-up and cosine decay, gradient clipping, an exponential moving average (EMA) of the
weights, progress (a tqdm bar on a terminal, plain lines every ~10 s in a log file), metrics in ``metrics.jsonl``
(and TensorBoard when installed), periodic held-out NLL by the density formula with the EMA weights, atomic
checkpoints and bit-for-bit resumption.

Devices and precision. The network, its weights and the optimiser live on ``TrainConfig.device`` (``"cuda"`` when
available, else ``"cpu"``; ``"cuda:N"`` and ``"mps"`` too); ``TrainConfig.precision`` autocasts the network's
forward pass only (``"bf16"``, or ``"fp16"`` with a gradient scaler). The batch, its keyed draws (dequantisation,
label dropout, log-SNR, noise), the loss (float64) and the adaptive sampler's statistics live on the training device
too (on MPS, which has no float64, on the host): the keyed draws are the same bits on every device. A step needs no
host round trip: the scalar metrics are read at the logging interval, and non-finite losses, gradient norms and
weights are checked there and before every evaluation and checkpoint (the first non-finite step is remembered on the
device), so a diverged run still stops with its last good checkpoint. fp16 reads the gradient scaler's verdict every
step, as the scaler itself does; a process group with more than one process reads the stop-signal flag every step;
discrete data pay :meth:`~scoredensity.data.Dataset.to_model`'s range checks.

Reproducibility. Three separate sources of randomness, none of them global state:

* data order: one ``torch.randperm`` per epoch under a generator seeded by ``(seed, epoch)``;
* training noise: ``lam``, ``z``, dequantisation ``u`` and label dropout of each example are a pure function
  of ``(seed, step, global example index)`` (Philox, :mod:`scoredensity.rng`), so results do not depend on
  batch splitting or on the number of processes;
* evaluation: the formula's own seed (fixed per run), and a fixed generator for dequantising test points.

So a checkpoint needs only the weights, the EMA, the optimiser state, the adaptive sampler's statistics and
the step to continue a run exactly (torch's global RNG state is saved as well, for completeness).

Failure behaviour. One process at a time trains a run folder (an OS lock, :mod:`scoredensity.runlock`); a folder
that is neither empty nor a run is refused; a run stopped before its first checkpoint can be restarted or resumed
from step 0; a non-finite loss or weight stops training with :class:`TrainingDiverged` and keeps the last good
checkpoint; SIGTERM and SIGINT save a checkpoint and raise :class:`TrainingInterrupted`; the data's fingerprint is
stored and checked on resume.

Distributed: run the same call in every process of an initialised ``torch.distributed`` group (e.g. under
``torchrun``); the global batch is split over the processes and gradients are summed
(:mod:`scoredensity.distributed`). Rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed as D
from .checkpoint import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    CheckpointError,
    RunFolderIOError,
    check_state_dict,
    data_fingerprint,
    flatten_optimizer_state,
    load_checkpoint,
    read_config,
    save_checkpoint,
    unflatten_optimizer_state,
    write_json_atomic,
)
from .config_schema import TRAIN_SCHEMA, ConfigError, check_run_config, check_section, check_step
from .epsfn import PRECISIONS, autocast_context
from .errors import DivergenceError, Interrupted
from .losses import LAM_SAMPLINGS, WEIGHTINGS, LamSampler, dsm_loss, keyed_uniforms
from .nets import build_denoiser, denoiser_config
from .rng import Stream
from .runlock import LOCK_NAME, METRICS_NAME, RUN_FILES, RunLock, foreign_entries, remove_orphans

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "train",
    "evaluate_model",
    "data_std",
    "KILL_ENV",
    "METRICS_NAME",
    "PROGRESS_SECONDS",
]

KILL_ENV = "SCOREDENSITY_KILL_AFTER_CHECKPOINT"
"""Testing hook: when set to a step N, the process SIGKILLs itself right after writing the checkpoint of step N."""
PROGRESS_SECONDS = 10.0
"""Seconds between plain progress lines when stderr is not a terminal (a log file)."""
FP16_SKIP_LIMIT = 50
"""fp16 only: consecutive steps with non-finite gradients (skipped by the gradient scaler) that count as divergence."""


class TrainingDiverged(DivergenceError):
    """The loss or the weights became non-finite; the last good checkpoint on disk is kept (exit code 5).

    A :class:`~scoredensity.errors.DivergenceError` (and a ``RuntimeError``).

    Attributes:
        step: the first step with a non-finite loss or gradient norm (they are checked at the logging interval and
            before every evaluation and checkpoint, so it may lie a few steps before the check that found it), or
            the step of that check when only the weights are non-finite. checkpoint_step: the step of the checkpoint
            kept (None: none yet).
    """

    def __init__(self, message: str, step: int, checkpoint_step: int | None):
        super().__init__(message)
        self.step, self.checkpoint_step = step, checkpoint_step


class TrainingInterrupted(Interrupted, RuntimeError):
    """SIGTERM or SIGINT stopped training after a checkpoint of the current step was saved (exit code
    128 + the signal: 143 for SIGTERM, 130 for SIGINT).

    An :class:`~scoredensity.errors.Interrupted` (and a ``RuntimeError``).

    Attributes:
        signum: the signal number. step: the step saved (the run resumes from it). exit_code: 128 + signum.
    """

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message, signum)
        self.step = step


@dataclass
class TrainConfig:
    """Settings of a training run (JSON-serialisable; stored in ``config.json``).

    Attributes:
        steps: optimiser steps. batch_size: *global* batch (split over processes), drop_last epochs.
        lr, warmup, lr_decay, min_lr_frac: AdamW learning rate, linear warm-up steps, ``"cosine"`` decay to
            ``min_lr_frac * lr`` at the last step or ``"constant"``.
        weight_decay, betas, grad_clip: AdamW and global-norm clipping (0 disables clipping).
        ema_decay: EMA decay (effective ``min(decay, (1 + step) / (10 + step))``).
        weighting: ``"elbo"`` (likelihood weighting; the loss is the negative bound) or ``"simple"``.
        lam_sampling: ``"adaptive"``, ``"uniform"``, ``"t_uniform"`` or ``"ddpm"`` (simple only).
        lam_min, lam_max: training range of log-SNR; the evaluation uses the same range by default.
        low_discrepancy: VDM's low-discrepancy draw of ``u`` over the global batch.
        conditional, label_dropout: class-conditional network, share of labels replaced by the null label.
        seed: the run's seed (initialisation, data order, noise, evaluation).
        eval_every, eval_n, eval_n_t, eval_n_z, eval_final: periodic/final held-out NLL (0 = never periodic).
        checkpoint_every, log_every: in steps (a checkpoint is always written at the last step).
        threads: ``torch.set_num_threads`` (0 leaves it alone).
        device: where the network trains: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (default ``"cuda"``
            when available, else ``"cpu"``). A resumed run may move to another device.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: autocast of the network's forward pass only (the loss
            and every sum stay in float32/float64); ``"fp16"`` uses a gradient scaler.
    """

    steps: int = 2000
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 100
    lr_decay: str = "cosine"
    min_lr_frac: float = 0.05
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    weighting: str = "elbo"
    lam_sampling: str = "adaptive"
    lam_min: float = -12.0
    lam_max: float = 12.0
    low_discrepancy: bool = True
    conditional: bool = False
    label_dropout: float = 0.1
    seed: int = 0
    eval_every: int = 0
    eval_n: int = 1000
    eval_n_t: int = 16
    eval_n_z: int = 1
    eval_final: bool = True
    checkpoint_every: int = 500
    log_every: int = 50
    threads: int = 0
    device: str = field(default_factory=lambda: D.default_device())
    precision: str = "fp32"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting (type, range or combination)."""
        try:
            check_section("TrainConfig", "train", self.to_dict(), TRAIN_SCHEMA)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.lam_sampling not in LAM_SAMPLINGS:
            raise ValueError(f"lam_sampling must be one of {LAM_SAMPLINGS}, got {self.lam_sampling!r}")
        if self.weighting == "elbo" and self.lam_sampling == "ddpm":
            raise ValueError("lam_sampling='ddpm' (the DDPM grid) goes with weighting='simple'")
        if not self.lam_max > self.lam_min:
            raise ValueError(f"need lam_max > lam_min, got [{self.lam_min}, {self.lam_max}]")
        if self.lr_decay not in ("cosine", "constant"):
            raise ValueError(f"lr_decay must be 'cosine' or 'constant', got {self.lr_decay!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (``betas`` as a list)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas) if isinstance(self.betas, list | tuple) else self.betas
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; keys missing from ``d`` take their defaults.

        Raises:
            ValueError: unknown keys.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: the run folder. step: last completed step. model, ema: the networks (raw and EMA weights).
        final_eval: the final held-out evaluation dict (see :func:`evaluate_model`) or None.
        seconds: wall-clock training time of this call. steps_per_second: over this call's steps.
    """

    run_dir: Path
    step: int
    model: nn.Module
    ema: nn.Module
    final_eval: dict | None = None
    seconds: float = 0.0
    steps_per_second: float = 0.0
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- helpers
def data_std(dataset) -> float:
    """Overall standard deviation of the training data in model space (bin centres for discrete data):
    ``sqrt(mean over elements of the per-element variance)``; the network's preconditioning scale."""
    x = dataset.to_model(dataset.x_train[:20000], dequantize=False).flatten(1).to(torch.float64)
    return float(x.var(0).mean().clamp_min(1e-12).sqrt())


_DEVICE_DATA_BYTES = 1 << 30
"""Training sets up to this many bytes are copied to the training device once; larger ones move batch by batch."""


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of (1-based) ``step``: linear warm-up, then cosine (or constant)."""
    warm = min(1.0, step / cfg.warmup) if cfg.warmup > 0 else 1.0
    if cfg.lr_decay == "constant" or cfg.steps <= cfg.warmup:
        return cfg.lr * warm
    frac = min(1.0, max(0.0, (step - cfg.warmup) / (cfg.steps - cfg.warmup)))
    cos = cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr * warm * cos


class _EpochOrder:
    """Global batch of (1-based) ``step`` in drop-last epochs; one permutation per epoch keyed by (seed, epoch)."""

    def __init__(self, n: int, batch: int, seed: int):
        if batch > n:
            raise ValueError(f"batch_size {batch} exceeds the {n} training examples")
        self.n, self.batch, self.seed = n, batch, seed
        self.per_epoch = n // batch
        self._epoch, self._perm = -1, None
        self._on: dict[torch.device, Tensor] = {}  # this epoch's permutation on other devices

    def __call__(self, step: int, device: torch.device | None = None) -> Tensor:
        """Indices [batch] int64 of the examples of ``step``, on the CPU or on ``device`` (the permutation is
        moved there once per epoch)."""
        epoch, j = divmod(step - 1, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
            self._on = {}
        perm = self._perm
        if device is not None and device.type != "cpu":
            if device not in self._on:
                self._on[device] = perm.to(device)
            perm = self._on[device]
        return perm[j * self.batch : (j + 1) * self.batch]


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; from pinned memory without waiting on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _write_metrics(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the metric records of steps after ``step`` (written by a run that died before its next checkpoint).

    Only lines this trainer writes are touched: a JSON object with an integer ``step`` above ``step``, or a torn
    last line without its newline (a write cut by a kill). Every other line is kept byte for byte. The file is
    rewritten atomically, and only when something is dropped."""
    if not path.is_file():
        return
    text = path.read_text(errors="surrogateescape")
    lines = text.split("\n")
    torn = lines.pop() if lines else ""  # "" when the file ends with a newline
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        ours = isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool)
        if not (ours and rec["step"] > step):
            keep.append(line)
    if len(keep) == len(lines) and not torn:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(s + "\n" for s in keep), errors="surrogateescape")
    os.replace(tmp, path)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


# ---------------------------------------------------------------------------------------- evaluation
def evaluate_model(
    model: nn.Module,
    dataset,
    *,
    split: str = "test",
    n: int | None = None,
    n_t: int = 32,
    n_z: int = 1,
    lam_min: float = -12.0,
    lam_max: float = 12.0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Held-out negative log-likelihood of a denoiser by the density formula (a bound: the continuous ELBO).

    Delegates to :func:`scoredensity.dataset_eval.evaluate_dataset` (streamed block by block to the model's device,
    so memory does not grow with ``n``; one log-SNR proposal and one Gaussian control variate fitted on the first
    examples; discrete data dequantised with keyed uniforms) and restores the model's training mode and
    ``requires_grad`` flags afterwards. In an initialised process group every process must call it (the examples
    are shared out and the figures gathered; every process returns them).

    Args:
        model: denoiser (EMA weights, normally), called as ``model(x_t, t)``; computed where its parameters are.
        dataset: a :class:`~scoredensity.data.Dataset`.
        split: ``"test"`` or ``"train"``. n: the first ``n`` points of the split (default all).
        n_t, n_z, lam_min, lam_max, seed: as in :func:`scoredensity.formula.log_density` (nodes and noise draws
            per example, log-SNR range, key of every draw).
        progress: progress bar on a terminal, else periodic plain lines on stderr.

    Returns:
        JSON-serialisable dict: ``method``, ``n``, ``nll`` (mean NLL in nats per example on the data scale,
        i.e. including the logit Jacobian), ``nll_stderr`` (standard error of that mean over the test points,
        estimator noise included), ``estimator_stderr`` (the estimator's own part), ``bpd`` and ``bpd_stderr``
        (discrete data, dequantised density on the published scale; else None), ``nfe_per_example`` (the shared
        pilot included), ``true_nll`` / ``true_nll_stderr`` (exact, analytic mixtures only) and the paired ``gap`` =
        nll - true_nll with ``gap_stderr``, plus the settings (see :func:`~scoredensity.dataset_eval.evaluate_dataset`
        for the further keys).
    """
    from .dataset_eval import evaluate_dataset

    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    try:
        return evaluate_dataset(
            model,
            dataset,
            split=split,
            n=n,
            n_t=n_t,
            n_z=n_z,
            lam_min=lam_min,
            lam_max=lam_max,
            seed=seed,
            progress=progress,
        )
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


# ---------------------------------------------------------------------------------------- training
def _resolve_data(data) -> dict[str, Any]:
    if isinstance(data, str | os.PathLike):
        data = {"name": str(data)}
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError("data must be a data set name/path or a dict of load_dataset arguments with 'name'")
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in data.items()}


@dataclass
class _RunSpec:
    """What a call of :func:`train` will do, resolved before the folder is touched.

    ``net_cfg`` is the stored network (resume) or None (built from the data); ``stored`` the stored
    ``config.json`` (resume) or None."""

    run_dir: Path
    cfg: TrainConfig
    data_args: dict[str, Any]
    net_cfg: dict | None
    resume: bool
    stored: dict | None


def _resolve_run(run_dir, data, config, resume: bool, steps: int | None, device: str | None) -> _RunSpec:
    """Settings of a new or resumed run, checked (types, ranges, schema of a stored ``config.json``)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderIOError(f"--out {str(run_dir)!r} is a file, not a folder")
    stored = None
    if resume:
        if not (run_dir / CONFIG_NAME).is_file() and not (run_dir / CHECKPOINT_NAME).is_file():
            where = "folder does not exist" if not run_dir.is_dir() else f"no {CONFIG_NAME} or {CHECKPOINT_NAME}"
            raise CheckpointError(f"nothing to resume in {str(run_dir)!r} ({where})")
        stored = read_config(run_dir)  # schema-checked
        if data is not None and _resolve_data(data) != stored["data"]:
            raise CheckpointError(
                f"cannot resume {str(run_dir)!r} with other data: stored {stored['data']}, given {_resolve_data(data)}"
            )
        data_args = stored["data"]
        train_dict = {k: v for k, v in stored["train"].items() if k != "device"}
        cfg = TrainConfig.from_dict(train_dict)  # the device is the machine's, not the run's
        net_cfg = stored["net"]
    else:
        if (run_dir / CHECKPOINT_NAME).exists():  # early, before loading the data (again under the lock)
            raise CheckpointError(
                f"{str(run_dir)!r} already holds a training run; pass --resume to continue it or choose another --out"
            )
        _refuse_foreign(run_dir)  # before the lock file is made there (again under the lock)
        if data is None:
            raise ValueError("data is required for a new run")
        data_args = _resolve_data(data)
        cfg = dataclasses.replace(config) if config is not None else TrainConfig()
        net_cfg = None
    if steps is not None:
        cfg.steps = steps
    if device is not None:
        cfg.device = device
    cfg.validate()
    D.resolve_device(cfg.device)  # a clear error now if it is not available
    return _RunSpec(run_dir, cfg, data_args, net_cfg, resume, stored)


def _load_training_data(data_args: dict, batch_size: int):
    """The run's data set, checked (:func:`scoredensity.data.load_dataset` rejects data that are not finite in
    float32) and holding at least one batch of training examples."""
    from .data import load_dataset

    dataset = load_dataset(**data_args)
    if batch_size > len(dataset.x_train):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(dataset.x_train)} training examples")
    return dataset


def _network_config(net: dict | None, cfg: TrainConfig, dataset) -> dict[str, Any]:
    """A new run's network settings: defaults for the data's shape, the caller's overrides, and ``shape``,
    ``data_std`` and ``num_classes`` filled in."""
    net = dict(net or {})
    kind = net.pop("type", "auto")
    num_classes = 0
    if cfg.conditional:
        if dataset.num_classes is None:
            raise ValueError(f"conditional training needs labels; {dataset.name!r} has none")
        num_classes = dataset.num_classes
    net_cfg = denoiser_config(dataset.shape, kind, **net)
    # the MLP is preconditioned with the data's scale; the U-Net keeps data_std = 1, diffusers' own convention
    # (then it exports exactly to a diffusers v-prediction UNet2DModel, see scoredensity.diffusers_io)
    auto_std = data_std(dataset) if net_cfg["type"] == "mlp" else 1.0
    net_cfg.update(shape=list(dataset.shape), data_std=float(net.get("data_std", auto_std)))
    net_cfg["num_classes"] = num_classes
    return net_cfg


def _refuse_foreign(run_dir: Path) -> None:
    """Refuse, for a new run, a folder holding files that are not a run's: anything but the lock file, unless the
    folder holds a ``config.json`` of ours (then also the other files a run writes)."""
    ours = False
    if (run_dir / CONFIG_NAME).is_file():
        try:
            read_config(run_dir)
            ours = True
        except CheckpointError:
            pass
    foreign = foreign_entries(run_dir, RUN_FILES if ours else {LOCK_NAME})
    if foreign:
        more = "" if len(foreign) <= 5 else f" and {len(foreign) - 5} more"
        raise CheckpointError(
            f"--out {str(run_dir)!r} is neither empty nor a scoredensity run folder "
            f"(it holds {foreign[:5]}{more}); choose a new or empty folder"
        )


def _prepare_folder(spec: _RunSpec, full_config: dict) -> bool:
    """Make the run folder ready (rank 0, holding the lock). Returns True when a checkpoint is to be resumed.

    New run: refuse a folder with a checkpoint or with files no run writes; a folder whose earlier run stopped
    before its first checkpoint is cleared. Resume: without a checkpoint the run restarts from step 0.
    Orphaned temporary files of killed writes are removed in both cases."""
    run_dir = spec.run_dir
    ckpt = run_dir / CHECKPOINT_NAME
    remove_orphans(run_dir)
    if not spec.resume:
        if ckpt.exists():
            raise CheckpointError(
                f"{str(run_dir)!r} already holds a training run; pass --resume to continue it or choose another --out"
            )
        _refuse_foreign(run_dir)
        if (run_dir / CONFIG_NAME).exists():
            print(
                f"note: {run_dir} held a run that stopped before its first checkpoint; starting afresh", file=sys.stderr
            )
            for name in (CONFIG_NAME, METRICS_NAME):
                (run_dir / name).unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        write_json_atomic(run_dir / CONFIG_NAME, full_config)
        return False
    if not ckpt.exists():
        print(f"note: {run_dir} has no checkpoint yet; starting from step 0", file=sys.stderr)
        _truncate_metrics(run_dir / METRICS_NAME, 0)
        return False
    return True


def _hms(seconds: float) -> str:
    """``H:MM:SS`` (hours unbounded)."""
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h:02d}:{m:02d}:{sec:02d}"


class _Progress:
    """Progress of the steps: a tqdm bar (``"bar"``), plain lines on stderr every :data:`PROGRESS_SECONDS`
    (``"lines"``, for log files) or nothing (``"off"``)."""

    def __init__(self, mode: str, start: int, total: int):
        self.mode, self.start, self.total = mode, start, total
        self.t0 = self.last = time.perf_counter()
        self.loss_sum, self.loss_n = 0.0, 0  # mean loss per example since the last line
        self.bar = tqdm(desc="train", initial=start, total=total) if mode == "bar" else None
        if mode == "lines":
            print(f"train: starting at step {start} of {total}", file=sys.stderr, flush=True)

    def update(self, step: int, loss: float | Tensor) -> None:
        """After ``step``, whose mean loss per example was ``loss`` (a number or a 0-d tensor on the training
        device: it is read only when a line is printed)."""
        if self.bar is not None:
            self.bar.update(1)
            return
        if self.mode != "lines":
            return
        self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
        now = time.perf_counter()
        if self.mode == "lines" and (now - self.last >= PROGRESS_SECONDS or step == self.total):
            self.last = now
            print(self.line(step, now), file=sys.stderr, flush=True)
            self.loss_sum, self.loss_n = 0.0, 0

    def line(self, step: int, now: float) -> str:
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        eta_s = "?" if not math.isfinite(eta) else _hms(eta)
        loss = "" if not self.loss_n else f", loss {float(self.loss_sum) / self.loss_n:.4g}"  # mean since last line
        return (
            f"train: step {step}/{self.total} ({100 * step / self.total:.0f}%){loss}, {rate:.1f} steps/s, ETA {eta_s}"
        )

    def postfix(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4g}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _stop_signals(trainer: _Trainer):
    """SIGTERM and SIGINT set ``trainer.signal`` instead of killing the process (main thread only); the loop then
    saves a checkpoint and stops. The previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        trainer.signal = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Trainer:
    """The state of one training call and its steps (see :func:`train`, whose loop calls these methods)."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, dataset, full_config: dict, device: torch.device):
        self.rank, self.world = D.rank_world()
        self.run_dir, self.cfg, self.dataset, self.full_config, self.device = run_dir, cfg, dataset, full_config, device
        self.ckpt_path = run_dir / CHECKPOINT_NAME
        self.metrics_path = run_dir / METRICS_NAME
        net_cfg = full_config["net"]
        torch.manual_seed(cfg.seed)
        self.model = build_denoiser(net_cfg).to(device)  # initialised on the CPU: the same weights on any device
        # the batch, its draws and the loss: on the device (MPS has no float64: there on the host)
        self.data_device = torch.device("cpu") if device.type == "mps" else device
        if self.world > 1:
            for p in self.model.parameters():
                torch.distributed.broadcast(p.data, src=0)
        self.ema = copy.deepcopy(self.model)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.sampler = LamSampler(cfg.lam_sampling, cfg.lam_min, cfg.lam_max, low_discrepancy=cfg.low_discrepancy)
        self.sampler.to(self.data_device)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        self.num_classes = int(net_cfg.get("num_classes", 0))
        self.order = _EpochOrder(len(dataset.x_train), cfg.batch_size, cfg.seed)
        self.pos = D.shard(cfg.batch_size)
        self.pos_dev = self.pos.to(self.data_device)
        self.x_dev, self.y_dev = self._data_on_device(dataset)
        self.first_bad = torch.zeros((), dtype=torch.int64, device=self.data_device)  # first non-finite step (0: none)
        self.start = 0
        self.saved_step: int | None = None
        self.signal: int | None = None  # set by the handler, in this process
        self.stop: int | None = None  # the signal all processes agreed to stop on (after the step's all-reduce)
        self.skipped = 0
        self.history: list[dict] = []
        self.final_eval: dict | None = None
        self.tb = None
        self.win_loss, self.win_nll, self.win_n, self.win_t0 = 0.0, 0.0, 0, time.perf_counter()
        self.t_start = time.perf_counter()

    # -- initialise
    def restore(self) -> None:
        """Continue from the run's checkpoint (sanity-checked: step, settings, tensors)."""
        tensors, meta = load_checkpoint(self.ckpt_path)
        where = str(self.ckpt_path)
        try:
            meta_cfg = check_run_config(where, meta)
            step = check_step(where, meta.get("step"), meta_cfg["train"].get("steps"))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        if meta_cfg["net"] != self.full_config["net"]:
            raise CheckpointError(f"{where}: checkpoint from another model configuration than {CONFIG_NAME}")
        if meta_cfg["data"] != self.full_config["data"]:
            raise CheckpointError(
                f"{self.run_dir / CONFIG_NAME}: data settings {self.full_config['data']} differ from those the "
                f"checkpoint was trained on {meta_cfg['data']} (edited?); restore them to resume"
            )
        stored_fp = meta.get("data_fingerprint")
        if stored_fp is not None and stored_fp != self.full_config["data_fingerprint"]:
            raise CheckpointError(_DATA_CHANGED.format(run=self.run_dir, name=self.full_config["data"]["name"]))
        try:
            _restore(self.model, self.ema, self.opt, self.sampler, self.scaler, tensors, meta, where)
        except KeyError as e:
            raise CheckpointError(f"{where}: incomplete checkpoint, entry {e} is missing") from None
        self.start = self.saved_step = step

    # -- one step
    def draw_batch(self, step: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """This process's share of the global batch of ``step``: model-space ``x`` [b, *shape] (keyed
        dequantisation), labels [b] with keyed dropout (conditional runs) and global example indices [b]."""
        cfg, ds, dev = self.cfg, self.dataset, self.data_device
        gidx = (step - 1) * cfg.batch_size + self.pos_dev  # global example index, on the device
        if self.x_dev is not None:  # the training set lives on the device
            batch = self.order(step, dev)[self.pos_dev]
            xs = self.x_dev[batch]
            ys = None if self.y_dev is None else self.y_dev[batch]
        else:  # too large: this batch's rows are copied (asynchronously from pinned memory on CUDA)
            batch = self.order(step)[self.pos]
            xs = _to_device(ds.x_train[batch], dev)
            ys = None if ds.y_train is None or self.num_classes == 0 else _to_device(ds.y_train[batch], dev)
        if ds.levels is not None:
            u = keyed_uniforms(cfg.seed, step, gidx, ds.dim, stream=Stream.TRAIN_DEQUANT).reshape(xs.shape)
            x = ds.to_model(xs, u=u.clamp(max=1 - 2**-53))
        else:
            x = ds.to_model(xs)
        y = None
        if self.num_classes > 0:
            drop = keyed_uniforms(cfg.seed, step, gidx, 1, stream=Stream.TRAIN_LABEL_DROP)[:, 0] < cfg.label_dropout
            y = torch.where(drop, self.num_classes, ys)  # not y[drop] = ...: a boolean index waits for the device
        return x, y, gidx

    def _data_on_device(self, dataset) -> tuple[Tensor | None, Tensor | None]:
        """The training examples (and labels) on the data device: the dataset's own tensors on the CPU, a copy
        made once when they fit in :data:`_DEVICE_DATA_BYTES`, else ``(None, None)`` (moved batch by batch)."""
        x, y = dataset.x_train, dataset.y_train if self.num_classes > 0 else None
        if self.data_device.type == "cpu":
            return x, y
        nbytes = x.numel() * x.element_size() + (0 if y is None else y.numel() * y.element_size())
        if nbytes > _DEVICE_DATA_BYTES:
            return None, None
        return x.to(self.data_device), None if y is None else y.to(self.data_device)

    def _network(self, y: Tensor | None):
        """The eps function of the loss: the network on the device, at the run's precision (in and out on the data
        device: the same one except on MPS)."""
        model, dev, prec = self.model, self.device, self.cfg.precision
        y_dev = None if y is None else y.to(dev)
        t_dtype = torch.float32 if dev.type == "mps" else None  # MPS has no float64

        def fn(x_t: Tensor, t: Tensor) -> Tensor:
            with autocast_context(prec, dev):
                out = model(x_t.to(dev), t.to(dev, t_dtype or t.dtype), y_dev)
            return out.float().to(x_t.device)

        return fn

    def optimiser_step(self, step: int, x: Tensor, y: Tensor | None, gidx: Tensor) -> dict[str, float]:
        """Loss, gradients summed over processes, clipping, AdamW, EMA and sampler update of one step.

        The metrics come back as tensors on the data device (read at the logging interval); a non-finite loss or
        gradient norm is remembered in ``self.first_bad`` and raised by :meth:`check_finite`.

        Raises:
            TrainingDiverged: fp16 only: :data:`FP16_SKIP_LIMIT` consecutive steps skipped by the gradient scaler."""
        cfg, params = self.cfg, self.params
        lr = _lr_at(cfg, step)
        for gr in self.opt.param_groups:
            gr["lr"] = lr
        out = dsm_loss(
            self._network(y),
            x,
            weighting=cfg.weighting,
            sampler=self.sampler,
            seed=cfg.seed,
            step=step,
            index=gidx,
            position=self.pos_dev,
            global_batch=cfg.batch_size,
        )
        loss = out.loss.sum() / cfg.batch_size
        self.opt.zero_grad(set_to_none=False)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        for p in params:  # parameters this batch did not reach still take part in the all-reduce
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        stats = self.sampler.bin_stats(out.lam, out.integrand)
        loss_sum = out.loss.detach().sum().to(torch.float64)
        parts = [loss_sum, out.nll.sum() if out.nll is not None else torch.zeros_like(loss_sum)]
        if self.world > 1:  # the stop flag travels with the sums (a fill, not a copy from the host)
            parts.append(
                torch.full((), 0.0 if self.signal is None else 1.0, dtype=torch.float64, device=loss_sum.device)
            )
        scal = torch.stack(parts)
        D.all_reduce_sum_([p.grad for p in params] + [stats, scal])
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gnorm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        finite = torch.isfinite(scal[0]) & torch.isfinite(gnorm).to(scal.device)  # on the device: no wait
        if self.scaler is not None:
            self.scaler.step(self.opt)  # skipped by the scaler when the gradients are not finite (it reads that)
            self.scaler.update()
            self.skipped = 0 if bool(finite) else self.skipped + 1
            if self.skipped >= FP16_SKIP_LIMIT:
                raise self._diverged(step, f"{self.skipped} consecutive fp16 steps with non-finite gradients")
        else:
            self.opt.step()  # a non-finite step is remembered below and stops the run at the next check
            self.first_bad = torch.where(~finite & (self.first_bad == 0), step, self.first_bad)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        self.sampler.update(torch.where(finite, stats, 0.0))  # zero statistics leave the sampler as it was
        if self.world > 1:
            if bool(scal[2] > 0):  # some process was signalled: all stop after this step, together
                self.stop = self.signal if self.signal is not None else signal.SIGTERM
        elif self.signal is not None:
            self.stop = self.signal
        return {"loss": scal[0], "nll": scal[1], "lr": lr, "grad_norm": gnorm}

    def check_finite(self, step: int) -> None:
        """Raise :class:`TrainingDiverged` if a step since the last check had a non-finite loss or gradient norm, or
        the weights are not finite (one read from the device). Called at the logging interval and before every
        evaluation and checkpoint, in every process (the values are the same in all of them)."""
        w_ok = torch.stack([torch.isfinite(p.detach()).all() for p in self.params]).all()
        bad, w_ok = torch.stack([self.first_bad, w_ok.to(self.first_bad.device, torch.int64)]).tolist()
        if bad:
            raise self._diverged(int(bad), f"non-finite loss or gradient norm (found at step {step})")
        if not w_ok:
            raise self._diverged(step, "non-finite weights after the optimiser step")

    def check_due(self, step: int) -> bool:
        """Whether ``step`` logs, evaluates or checkpoints (then :meth:`check_finite` runs first)."""
        cfg = self.cfg
        return (
            step % cfg.log_every == 0
            or step % cfg.checkpoint_every == 0
            or step == cfg.steps
            or self.stop is not None
            or bool(cfg.eval_every and step % cfg.eval_every == 0)
        )

    def _diverged(self, step: int, what: str) -> TrainingDiverged:
        kept = (
            f"the last good checkpoint (step {self.saved_step}) in {self.ckpt_path} is kept"
            if self.saved_step is not None
            else f"no checkpoint was written yet ({self.run_dir} can be restarted)"
        )
        hint = "lower --lr, or keep --grad-clip and --warmup on" if self.scaler is None else "lower --lr or use bf16"
        return TrainingDiverged(f"training diverged at step {step}: {what}; {kept}. Try: {hint}", step, self.saved_step)

    # -- bookkeeping
    def metrics_window(self, step: int, rec: dict[str, float], progress: _Progress) -> None:
        """Accumulate the step's loss; every ``log_every`` steps write one metrics record (rank 0)."""
        cfg = self.cfg
        self.win_loss = self.win_loss + rec["loss"]  # tensors on the device until the logging step
        self.win_nll = self.win_nll + rec["nll"]
        self.win_n += cfg.batch_size
        if self.rank != 0 or not (step % cfg.log_every == 0 or step == cfg.steps):
            return
        dt = time.perf_counter() - self.win_t0
        out = {
            "step": step,
            "loss": float(self.win_loss) / self.win_n,
            "lr": rec["lr"],
            "grad_norm": float(rec["grad_norm"]),
            "examples_per_s": self.win_n / max(dt, 1e-9),
            "time": time.perf_counter() - self.t_start,
        }
        if cfg.weighting == "elbo":
            out["train_nll_bound"] = float(self.win_nll) / self.win_n
        _write_metrics(self.metrics_path, out)
        self.history.append(out)
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm"):
                self.tb.add_scalar(k, out[k], step)
        progress.postfix(out["loss"])
        self.win_loss, self.win_nll, self.win_n, self.win_t0 = 0.0, 0.0, 0, time.perf_counter()

    def evaluate_if_due(self, step: int) -> None:
        """Held-out NLL of the EMA weights every ``eval_every`` steps and at the last step (rank 0)."""
        cfg = self.cfg
        last = step == cfg.steps
        if not ((cfg.eval_every and step % cfg.eval_every == 0) or (last and cfg.eval_final and cfg.eval_n > 0)):
            return
        ev = evaluate_model(  # in every process: the examples are shared out, the figures gathered
            self.ema,
            self.dataset,
            n=min(cfg.eval_n, len(self.dataset.x_test)),
            n_t=cfg.eval_n_t,
            n_z=cfg.eval_n_z,
            lam_min=cfg.lam_min,
            lam_max=cfg.lam_max,
            seed=cfg.seed,
        )
        if self.rank == 0:
            rec = {"step": step, "eval": ev}
            _write_metrics(self.metrics_path, rec)
            self.history.append(rec)
            if self.tb is not None:
                self.tb.add_scalar("eval/nll", ev["nll"], step)
            if last:
                self.final_eval = ev
        D.barrier()

    def checkpoint_if_due(self, step: int, kill_at: int | None) -> None:
        """Save every ``checkpoint_every`` steps, at the last step and when a stop signal arrived."""
        if not (step % self.cfg.checkpoint_every == 0 or step == self.cfg.steps or self.stop is not None):
            return
        if self.rank == 0:
            _save(self.ckpt_path, self.model, self.ema, self.opt, self.sampler, self.scaler, step, self.full_config)
        self.saved_step = step
        D.barrier()
        if kill_at is not None and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def stop_if_signalled(self, step: int) -> None:
        """After the checkpoint of a signalled step: raise :class:`TrainingInterrupted`."""
        if self.stop is None:
            return
        name = signal.Signals(self.stop).name
        raise TrainingInterrupted(
            f"stopped by {name} at step {step} of {self.cfg.steps}; checkpoint saved to {self.ckpt_path}; "
            f"continue with: scoredensity train --resume --out {self.run_dir}",
            self.stop,
            step,
        )

    # -- the loop
    def run(self, progress_mode: str) -> TrainResult:
        cfg = self.cfg
        kill_at = os.environ.get(KILL_ENV)
        kill_at = int(kill_at) if kill_at else None
        self.tb = _tensorboard(self.run_dir) if self.rank == 0 else None
        progress = _Progress(progress_mode if self.rank == 0 else "off", self.start, cfg.steps)
        self.model.train()
        try:
            with _stop_signals(self):
                for step in range(self.start + 1, cfg.steps + 1):
                    x, y, gidx = self.draw_batch(step)
                    rec = self.optimiser_step(step, x, y, gidx)
                    if self.check_due(step):
                        self.check_finite(step)
                    self.metrics_window(step, rec, progress)
                    self.evaluate_if_due(step)
                    self.checkpoint_if_due(step, kill_at)
                    self.stop_if_signalled(step)
                    progress.update(step, rec["loss"] / cfg.batch_size)
        finally:
            progress.close()
            if self.tb is not None:
                self.tb.close()
        seconds = time.perf_counter() - self.t_start
        done = max(cfg.steps - self.start, 0)
        return TrainResult(
            run_dir=self.run_dir,
            step=max(cfg.steps, self.start),
            model=self.model,
            ema=self.ema,
            final_eval=self.final_eval,
            seconds=seconds,
            steps_per_second=done / seconds if seconds > 0 else 0.0,
            history=self.history,
        )


_DATA_CHANGED = (
    "{run}: the data {name!r} are not those the run was trained on (their fingerprint, a hash of the arrays and the "
    "split, differs: a data file was replaced or edited, or the split settings changed)"
)


def train(
    run_dir: str | os.PathLike,
    data: str | dict | None = None,
    *,
    net: dict | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    steps: int | None = None,
    progress: bool | None = None,
    device: str | None = None,
    default_threads: Callable[[str], int | None] | None = None,
) -> TrainResult:
    """Train (or resume) a denoiser; see the module docstring.

    Args:
        run_dir: the run folder (created; it must be new, empty, or hold a run that stopped before its first
            checkpoint, unless ``resume``).
        data: a name/path for :func:`scoredensity.data.load_dataset` or a dict of its arguments
            (``name``, ``seed``, ``test_fraction``, ``n``, ``logit``, ``root``, ``levels``). Optional when resuming.
        net: network settings: a full config (with ``type``) or overrides of :func:`scoredensity.nets.denoiser_config`
            (e.g. ``{"hidden": 128, "blocks": 2}``). ``shape``, ``num_classes`` and (MLP only; the U-Net keeps
            diffusers' convention ``data_std = 1``) ``data_std`` are filled in.
        config: :class:`TrainConfig`. Ignored when resuming (the stored one is used), except ``steps``.
        resume: continue the run in ``run_dir`` from its checkpoint (from step 0 if it has none yet).
        steps: total steps (overrides ``config.steps``; may extend a resumed run).
        progress: True: a tqdm bar; False: nothing; None (default): the bar when stderr is a terminal, else a plain
            progress line every :data:`PROGRESS_SECONDS` seconds.
        device: overrides ``config.device`` (and the stored device when resuming; default there: this machine's).
        default_threads: used when the run's ``threads`` setting is 0: called with the network's kind
            (``"unet"`` or ``"small"``) once it is known, it returns the number of torch threads to set (None:
            leave torch's setting as it is). The command line passes
            :func:`scoredensity.commands._common.default_threads`. None (default): leave the threads alone.

    Returns:
        :class:`TrainResult` (its networks on the training device).

    Raises:
        CheckpointError: resume with nothing to resume, a folder that is not a run (or already holds one), a
            corrupt or crafted checkpoint or config, a checkpoint from another configuration, or changed data
            (command-line exit code 3).
        RunFolderIOError: the run folder cannot be created, locked or written (a file, a path under a file, no
            permission, a full disk; the previous checkpoint is kept; exit code 4). A ``CheckpointError``.
        RunLockedError: another process trains or resumes the run folder (exit code 6). A ``CheckpointError``.
        TrainingDiverged: non-finite loss or weights (the last good checkpoint is kept; exit code 5).
        TrainingInterrupted: SIGTERM/SIGINT (a checkpoint of the current step was saved first; exit code 143/130).
        ValueError / DataError: bad settings (exit code 2) or data (exit code 3).
    """
    rank, _ = D.rank_world()
    spec = _resolve_run(run_dir, data, config, resume, steps, device)
    cfg = spec.cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dataset = _load_training_data(spec.data_args, cfg.batch_size)
    net_cfg = spec.net_cfg if spec.net_cfg is not None else _network_config(net, cfg, dataset)
    if not cfg.threads and default_threads is not None:
        n_threads = default_threads("unet" if net_cfg.get("type") == "unet" else "small")
        if n_threads:
            torch.set_num_threads(int(n_threads))
    fingerprint = data_fingerprint(dataset)
    stored_fp = None if spec.stored is None else spec.stored.get("data_fingerprint")
    if stored_fp is not None and stored_fp != fingerprint:
        raise CheckpointError(_DATA_CHANGED.format(run=spec.run_dir, name=spec.data_args["name"]))
    full_config = {
        "version": 2,
        "data": spec.data_args,
        "net": net_cfg,
        "train": cfg.to_dict(),
        "data_fingerprint": fingerprint,
    }
    dev = D.resolve_device(cfg.device)
    with RunLock(spec.run_dir) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            _prepare_folder(spec, full_config)
        D.barrier()
        trainer = _Trainer(spec.run_dir, cfg, dataset, full_config, dev)
        if (spec.run_dir / CHECKPOINT_NAME).is_file():
            trainer.restore()
            if rank == 0:
                _truncate_metrics(trainer.metrics_path, trainer.start)
        if rank == 0 and spec.resume and spec.stored != full_config:
            write_json_atomic(spec.run_dir / CONFIG_NAME, full_config)  # e.g. more --steps, another device
        D.barrier()
        mode = "off" if progress is False else "bar" if progress or sys.stderr.isatty() else "lines"
        return trainer.run(mode)


def _save(path: Path, model, ema, opt, sampler: LamSampler, scaler, step: int, full_config: dict) -> None:
    tensors: dict[str, Tensor] = {}
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_t, opt_doc = flatten_optimizer_state(opt.state_dict())
    tensors.update(opt_t)
    tensors.update({f"sampler.{k}": v for k, v in sampler.state_dict().items()})
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "step": step,
        "net": full_config["net"],
        "train": full_config["train"],
        "data": full_config["data"],
        "data_fingerprint": full_config["data_fingerprint"],
        "optimizer": opt_doc,
        "sampler": sampler.config(),
    }
    if scaler is not None:
        meta["grad_scaler"] = scaler.state_dict()
    save_checkpoint(path, tensors, meta)


def _restore(model, ema, opt, sampler: LamSampler, scaler, tensors: dict, meta: dict, where: str) -> None:
    def sub(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    for mod, prefix in ((model, "model."), (ema, "ema.")):
        st = sub(prefix)
        check_state_dict(mod, st, where)
        mod.load_state_dict(st)
    try:
        opt.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where}: optimiser state does not fit this model ({e})") from None
    try:
        sampler.load_state_dict(sub("sampler."))
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: log-SNR sampler state is missing or does not fit ({e})") from None
    if scaler is not None and isinstance(meta.get("grad_scaler"), dict):
        scaler.load_state_dict(meta["grad_scaler"])
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
