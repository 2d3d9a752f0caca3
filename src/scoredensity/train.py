"""Training diffusion denoisers with the likelihood-weighted loss, and evaluating them by the density formula.

:func:`train` runs (or resumes) a training run in a folder (layout in :mod:`scoredensity.checkpoint`):
AdamW with linear warm-up and cosine decay, gradient clipping, an exponential moving average (EMA) of the
weights, tqdm progress, metrics in ``metrics.jsonl`` (and TensorBoard when installed), periodic held-out
NLL by the density formula with the EMA weights, atomic checkpoints and bit-for-bit resumption.

Reproducibility. Three separate sources of randomness, none of them global state:

* data order: one ``torch.randperm`` per epoch under a generator seeded by ``(seed, epoch)``;
* training noise: ``lam``, ``z``, dequantisation ``u`` and label dropout of each example are a pure function
  of ``(seed, step, global example index)`` (Philox, :mod:`scoredensity.losses`), so results do not depend on
  batch splitting or on the number of processes;
* evaluation: the formula's own seed (fixed per run), and a fixed generator for dequantising test points.

So a checkpoint needs only the weights, the EMA, the optimiser state, the adaptive sampler's statistics and
the step to continue a run exactly (torch's global RNG state is saved as well, for completeness).

Distributed: run the same call in every process of an initialised ``torch.distributed`` group (e.g. under
``torchrun``); the global batch is split over the processes and gradients are summed
(:mod:`scoredensity.distributed`). Rank 0 writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
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
    check_state_dict,
    flatten_optimizer_state,
    load_checkpoint,
    read_config,
    save_checkpoint,
    unflatten_optimizer_state,
    write_json_atomic,
)
from .losses import LAM_SAMPLINGS, WEIGHTINGS, LamSampler, dsm_loss, keyed_uniforms
from .nets import build_denoiser, denoiser_config, eval_eps_fn
from .rng import Stream

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate_model", "data_std", "KILL_ENV", "METRICS_NAME"]

KILL_ENV = "SCOREDENSITY_KILL_AFTER_CHECKPOINT"
"""Testing hook: when set to a step N, the process SIGKILLs itself right after writing the checkpoint of step N."""
METRICS_NAME = "metrics.jsonl"


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

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
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
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
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

    def __call__(self, step: int) -> Tensor:
        epoch, j = divmod(step - 1, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[j * self.batch : (j + 1) * self.batch]


def _write_metrics(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after ``step`` (by a run that died before its next checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(s + "\n" for s in keep))


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
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

    Args:
        model: denoiser (EMA weights, normally); called as an EpsFn.
        dataset: a :class:`~scoredensity.data.Dataset`.
        split: ``"test"`` or ``"train"``. n: the first ``n`` points of the split (default all).
        n_t, n_z, lam_min, lam_max, seed: passed to :func:`scoredensity.formula.log_density` (adaptive
            importance, stratified, Gaussian control variate); discrete data are dequantised with a generator
            seeded by ``seed``.

    Returns:
        JSON-serialisable dict: ``method``, ``n``, ``nll`` (mean NLL in nats per example on the data scale,
        i.e. including the logit Jacobian), ``nll_stderr`` (standard error of that mean over the test points,
        estimator noise included), ``estimator_stderr`` (the estimator's own part), ``bpd`` and ``bpd_stderr``
        (discrete data, dequantised density on the published scale; else None), ``nfe_per_example``,
        ``true_nll`` / ``true_nll_stderr`` (exact, analytic mixtures only) and the paired ``gap`` = nll - true_nll
        with ``gap_stderr``, plus the settings.
    """
    from .formula import log_density

    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    xs = dataset.x_test if split == "test" else dataset.x_train
    if n is not None:
        if n < 2:
            raise ValueError(f"n must be >= 2, got {n}")
        xs = xs[:n]
    g = torch.Generator().manual_seed(seed + 9_999_991)
    x_model = dataset.to_model(xs, generator=g)
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    eps_fn = eval_eps_fn(model)
    try:
        ld = log_density(
            eps_fn, x_model, n_t=n_t, n_z=n_z, lam_min=lam_min, lam_max=lam_max, seed=seed, progress=progress
        )
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    nll_model = -ld.logp
    nll = nll_model - dataset.log_jacobian(x_model)
    b = len(nll)
    res: dict[str, Any] = {
        "method": "formula",
        "split": split,
        "n": b,
        "nll": float(nll.mean()),
        "nll_stderr": float(nll.std() / math.sqrt(b)),
        "estimator_stderr": ld.mean_stderr(),
        "bpd": None,
        "bpd_stderr": None,
        "nfe_per_example": float(ld.nfe),
        "true_nll": None,
        "true_nll_stderr": None,
        "gap": None,
        "gap_stderr": None,
        "kind": "continuous" if dataset.levels is None else "dequantised",
        "units": "nats per example",
        "dim": int(dataset.dim),
        "lam_min": lam_min,
        "lam_max": lam_max,
        "n_t": n_t,
        "n_z": n_z,
        "seed": seed,
    }
    bpd = dataset.bits_per_dim(nll_model, x_model)
    if bpd is not None:
        res["bpd"] = float(bpd.mean())
        res["bpd_stderr"] = float(bpd.std() / math.sqrt(b))
    if dataset.mixture is not None:
        true = -dataset.mixture.log_prob(x_model.to(torch.float64))
        diff = nll - true
        res.update(
            true_nll=float(true.mean()),
            true_nll_stderr=float(true.std() / math.sqrt(b)),
            gap=float(diff.mean()),
            gap_stderr=float(diff.std() / math.sqrt(b)),
        )
    return res


# ---------------------------------------------------------------------------------------- training
def _resolve_data(data) -> dict[str, Any]:
    if isinstance(data, str | os.PathLike):
        data = {"name": str(data)}
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError("data must be a data set name/path or a dict of load_dataset arguments with 'name'")
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in data.items()}


def train(
    run_dir: str | os.PathLike,
    data: str | dict | None = None,
    *,
    net: dict | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    steps: int | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train (or resume) a denoiser; see the module docstring.

    Args:
        run_dir: the run folder (created; must not already hold a run unless ``resume``).
        data: a name/path for :func:`scoredensity.data.load_dataset` or a dict of its arguments
            (``name``, ``seed``, ``test_fraction``, ``n``, ``logit``, ``root``, ``levels``). Optional when resuming.
        net: network settings: a full config (with ``type``) or overrides of :func:`scoredensity.nets.denoiser_config`
            (e.g. ``{"hidden": 128, "blocks": 2}``). ``shape``, ``num_classes`` and (MLP only; the U-Net keeps
            diffusers' convention ``data_std = 1``) ``data_std`` are filled in.
        config: :class:`TrainConfig`. Ignored when resuming (the stored one is used), except ``steps``.
        resume: continue the run in ``run_dir`` from its checkpoint.
        steps: total steps (overrides ``config.steps``; may extend a resumed run).
        progress: tqdm bar (default: when stderr is a terminal).

    Returns:
        :class:`TrainResult`.

    Raises:
        CheckpointError: resume with nothing to resume, a run folder already in use, a corrupt checkpoint, or
            a checkpoint from another configuration. ValueError / DataError: bad settings or data.
    """
    from .data import load_dataset

    rank, world = D.rank_world()
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT_NAME
    metrics_path = run_dir / METRICS_NAME

    if resume:
        if not ckpt_path.is_file():
            where = "folder does not exist" if not run_dir.is_dir() else f"no {CHECKPOINT_NAME}"
            raise CheckpointError(f"nothing to resume in {str(run_dir)!r} ({where})")
        stored = read_config(run_dir)
        if data is not None and _resolve_data(data) != stored["data"]:
            raise CheckpointError(
                f"cannot resume {str(run_dir)!r} with other data: stored {stored['data']}, given {_resolve_data(data)}"
            )
        data_args = stored["data"]
        cfg = TrainConfig.from_dict(stored["train"])
        net_cfg = stored["net"]
    else:
        if (run_dir / CONFIG_NAME).exists() or ckpt_path.exists():
            raise CheckpointError(
                f"{str(run_dir)!r} already holds a training run; pass --resume to continue it or choose another --out"
            )
        if data is None:
            raise ValueError("data is required for a new run")
        data_args = _resolve_data(data)
        cfg = dataclasses.replace(config) if config is not None else TrainConfig()
        net_cfg = None
    if steps is not None:
        cfg.steps = int(steps)
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    dataset = load_dataset(**data_args)
    if net_cfg is None:
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
    full_config = {"version": 1, "data": data_args, "net": net_cfg, "train": cfg.to_dict()}

    torch.manual_seed(cfg.seed)
    model = build_denoiser(net_cfg)
    if world > 1:
        for p in model.parameters():
            torch.distributed.broadcast(p.data, src=0)
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    sampler = LamSampler(cfg.lam_sampling, cfg.lam_min, cfg.lam_max, low_discrepancy=cfg.low_discrepancy)

    start = 0
    if resume:
        tensors, meta = load_checkpoint(ckpt_path)
        if meta.get("net") != net_cfg:
            raise CheckpointError(f"{ckpt_path}: checkpoint from another model configuration than {CONFIG_NAME}")
        _restore(model, ema, opt, sampler, tensors, meta, str(ckpt_path))
        start = int(meta["step"])
        if rank == 0:
            _truncate_metrics(metrics_path, start)
    elif rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / CONFIG_NAME, full_config)
    D.barrier()

    if progress is None:
        progress = sys.stderr.isatty()
    tb = _tensorboard(run_dir) if rank == 0 else None
    order = _EpochOrder(len(dataset.x_train), cfg.batch_size, cfg.seed)
    pos = D.shard(cfg.batch_size)
    params = [p for p in model.parameters()]
    kill_at = os.environ.get(KILL_ENV)
    kill_at = int(kill_at) if kill_at else None
    cond = net_cfg.get("num_classes", 0) > 0
    history: list[dict] = []
    final_eval = None
    win_loss, win_nll, win_n, win_t0 = 0.0, 0.0, 0, time.perf_counter()
    t_start = time.perf_counter()
    bar = tqdm(
        range(start + 1, cfg.steps + 1), desc="train", disable=not progress or rank != 0, initial=start, total=cfg.steps
    )
    model.train()
    for step in bar:
        batch = order(step)[pos]
        gidx = (step - 1) * cfg.batch_size + pos  # global example index
        xs = dataset.x_train[batch]
        if dataset.levels is not None:
            u = keyed_uniforms(cfg.seed, step, gidx, dataset.dim, stream=Stream.TRAIN_DEQUANT).reshape(xs.shape)
            x = dataset.to_model(xs, u=u.clamp(max=1 - 2**-53))
        else:
            x = dataset.to_model(xs)
        y = None
        if cond:
            y = dataset.y_train[batch].clone()
            drop = keyed_uniforms(cfg.seed, step, gidx, 1, stream=Stream.TRAIN_LABEL_DROP)[:, 0] < cfg.label_dropout
            y[drop] = net_cfg["num_classes"]
        lr = _lr_at(cfg, step)
        for gr in opt.param_groups:
            gr["lr"] = lr

        def fn(x_t, t, _y=y):
            return model(x_t, t, _y)

        out = dsm_loss(
            fn,
            x,
            weighting=cfg.weighting,
            sampler=sampler,
            seed=cfg.seed,
            step=step,
            index=gidx,
            position=pos,
            global_batch=cfg.batch_size,
        )
        loss = out.loss.sum() / cfg.batch_size
        opt.zero_grad(set_to_none=False)
        loss.backward()
        for p in params:  # parameters this batch did not reach still take part in the all-reduce
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        stats = sampler.bin_stats(out.lam, out.integrand)
        scal = torch.tensor(
            [float(out.loss.detach().sum()), float(out.nll.sum()) if out.nll is not None else 0.0],
            dtype=torch.float64,
        )
        D.all_reduce_sum_([p.grad for p in params] + [stats, scal])
        if cfg.grad_clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        else:
            gnorm = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in params)))
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        sampler.update(stats)

        win_loss += float(scal[0])
        win_nll += float(scal[1])
        win_n += cfg.batch_size
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            dt = time.perf_counter() - win_t0
            rec = {
                "step": step,
                "loss": win_loss / win_n,
                "lr": lr,
                "grad_norm": gnorm,
                "examples_per_s": win_n / max(dt, 1e-9),
                "time": time.perf_counter() - t_start,
            }
            if cfg.weighting == "elbo":
                rec["train_nll_bound"] = win_nll / win_n
            _write_metrics(metrics_path, rec)
            history.append(rec)
            if tb is not None:
                for k in ("loss", "lr", "grad_norm"):
                    tb.add_scalar(k, rec[k], step)
            bar.set_postfix(loss=f"{rec['loss']:.4g}")
            win_loss, win_nll, win_n, win_t0 = 0.0, 0.0, 0, time.perf_counter()

        last = step == cfg.steps
        if (cfg.eval_every and step % cfg.eval_every == 0) or (last and cfg.eval_final and cfg.eval_n > 0):
            if rank == 0:
                ev = evaluate_model(
                    ema,
                    dataset,
                    n=min(cfg.eval_n, len(dataset.x_test)),
                    n_t=cfg.eval_n_t,
                    n_z=cfg.eval_n_z,
                    lam_min=cfg.lam_min,
                    lam_max=cfg.lam_max,
                    seed=cfg.seed,
                )
                rec = {"step": step, "eval": ev}
                _write_metrics(metrics_path, rec)
                history.append(rec)
                if tb is not None:
                    tb.add_scalar("eval/nll", ev["nll"], step)
                if last:
                    final_eval = ev
            D.barrier()

        if step % cfg.checkpoint_every == 0 or last:
            if rank == 0:
                _save(ckpt_path, model, ema, opt, sampler, step, full_config)
            D.barrier()
            if kill_at is not None and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    if tb is not None:
        tb.close()
    seconds = time.perf_counter() - t_start
    done = max(cfg.steps - start, 0)
    return TrainResult(
        run_dir=run_dir,
        step=max(cfg.steps, start),
        model=model,
        ema=ema,
        final_eval=final_eval,
        seconds=seconds,
        steps_per_second=done / seconds if seconds > 0 else 0.0,
        history=history,
    )


def _save(path: Path, model, ema, opt, sampler: LamSampler, step: int, full_config: dict) -> None:
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
        "optimizer": opt_doc,
        "sampler": sampler.config(),
    }
    save_checkpoint(path, tensors, meta)


def _restore(model, ema, opt, sampler: LamSampler, tensors: dict, meta: dict, where: str) -> None:
    def sub(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    for mod, prefix in ((model, "model."), (ema, "ema.")):
        st = sub(prefix)
        check_state_dict(mod, st, where)
        mod.load_state_dict(st)
    try:
        opt.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: optimiser state does not fit this model ({e})") from None
    sampler.load_state_dict(sub("sampler."))
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
