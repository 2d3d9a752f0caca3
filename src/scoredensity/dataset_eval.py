"""Held-out NLL of a trained run's model on its data set by the density formula, streamed so that memory does
not grow with the number of examples, resumable, sharded over processes, and to a target standard error.

The examples are taken ``batch_size`` at a time to the model's device; one log-SNR proposal and one Gaussian
control variate are fitted once (on the first examples) and shared by every block, round and process, and every
random draw is keyed by ``(seed, example index, round)`` (:mod:`scoredensity.rng`), so the figures do not depend
on the block size, the number of processes, or an interruption (:class:`~scoredensity.eval_store.ResultStore`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import rng
from .epsfn import PRECISIONS, check_int
from .eval_store import ResultStore, evaluate_rounds, round_stats
from .formula import fit_proposal, log_density
from .image_eval import model_device, round_keys
from .mixtures import GaussianMixture

__all__ = ["evaluate_dataset", "DATASET_KEYS"]

DATASET_KEYS = ("logp", "stderr", "nll", "true_nll", "nfe")  # per-example record (nats; true_nll NaN if unknown)
_REFERENCE = 4096  # examples the control variate and the proposal are fitted on
_BLOCK_ROWS = 1 << 14  # default network rows (examples x n_t x n_z) per block
_PILOT_EXAMPLES, _PILOT_NODES = 64, 16


def _model_inputs(dataset, xs: Tensor, ids: Tensor, seed: int, round_: int, device: torch.device) -> Tensor:
    """Model-space [b, *shape] float32 points of stored examples ``xs`` [b, ...] (dequantised with keyed uniforms
    for discrete data: stream ``DEQUANT``, the round as the step), on ``device``."""
    if dataset.levels is None:
        return dataset.to_model(xs).to(device)
    d = xs[0].numel()
    u = rng.uniforms(seed, rng.Stream.DEQUANT, ids, d, step=round_).reshape(xs.shape)
    u = u.clamp(max=1 - 2**-53)  # [0, 1) as to_model asks
    return dataset.to_model(xs, u=u).to(device)


@torch.no_grad()
def evaluate_dataset(
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
    precision: str = "fp32",
    max_batch: int | None = None,
    batch_size: int | None = None,
    target_se: float | None = None,
    max_rounds: int = 64,
    store: ResultStore | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Held-out negative log-likelihood of a denoiser by the density formula (a bound: the continuous ELBO).

    Computes where the model's parameters are; the data stay on the CPU and are moved block by block.

    Args:
        model: denoiser (EMA weights, normally), called as ``model(x_t, t)``; left in eval mode, frozen.
        dataset: a :class:`~scoredensity.data.Dataset`.
        split: ``"test"`` or ``"train"``. n: the first ``n`` examples of the split (default all).
        n_t, n_z, lam_min, lam_max, seed: as in :func:`scoredensity.formula.log_density`.
        precision: ``"fp32"``/``"bf16"``/``"fp16"``: autocast of the network only.
        max_batch: rows per network call (default: the estimator's memory budget).
        batch_size: examples per estimator call (default ``2**14 // (n_t * n_z)``, so that a block is about 2^14
            network rows); with ``max_batch`` it bounds the memory, whatever ``n``.
        target_se: rounds of independent draws until the estimator's standard error of the data-set mean is at
            most this many bits/dim (nats / (d ln 2) for continuous data); ``None``: one round.
        max_rounds: the most rounds ``target_se`` may spend.
        store: per-example records (keys :data:`DATASET_KEYS`) to resume from and write to.
        progress: progress bar on a terminal, else periodic plain lines on stderr.

    Returns:
        JSON-serialisable dict with the keys of :func:`scoredensity.train.evaluate_model` (``nll``,
        ``nll_stderr``, ``estimator_stderr``, ``bpd``, ``bpd_stderr``, ``nfe_per_example``, ``true_nll``, ``gap``,
        ...) plus ``device``, ``precision``, ``max_batch``, ``batch_size``, ``rounds`` and ``target_se``.
    """
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    xs_all = dataset.x_test if split == "test" else dataset.x_train
    if n is not None:
        n = check_int("n", n, 2)
        xs_all = xs_all[:n]
    n = xs_all.shape[0]
    if n < 2:
        raise ValueError(f"the {split} split has {n} examples; need at least 2")
    d = int(dataset.dim)
    n_t, n_z = check_int("n_t", n_t, 2), check_int("n_z", n_z, 1)
    if batch_size is None:  # about 2^14 network rows per block: the network's activations stay bounded
        batch_size = max(1, _BLOCK_ROWS // (n_t * n_z))
    batch_size = check_int("batch_size", batch_size, 1)
    max_rounds = check_int("max_rounds", max_rounds, 2 if target_se is not None else 1)
    if target_se is not None and not (isinstance(target_se, (int, float)) and target_se > 0):
        raise ValueError(f"target_se must be a positive number of bits/dim, got {target_se!r}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    device = model_device(model)
    store = store if store is not None else ResultStore(DATASET_KEYS)

    ref_ids = torch.arange(min(n, _REFERENCE))
    x_ref = _model_inputs(dataset, xs_all[ref_ids], ref_ids, seed, 0, device)
    gauss = GaussianMixture.fit_gaussian(x_ref.flatten(1).double().cpu()) if len(ref_ids) > d else None
    proposal = fit_proposal(
        model,
        x_ref,
        lam_min=lam_min,
        lam_max=lam_max,
        control_variate=gauss,
        seed=seed,
        pilot_examples=_PILOT_EXAMPLES,
        pilot_nodes=_PILOT_NODES,
        precision=precision,
    )
    pilot_nfe = min(len(ref_ids), _PILOT_EXAMPLES) * _PILOT_NODES / n

    def compute_round(r: int):
        def block(ids: Tensor) -> dict[str, Tensor]:
            x = _model_inputs(dataset, xs_all[ids], ids, seed, r, device)
            ld = log_density(
                model,
                x,
                n_t=n_t,
                n_z=n_z,
                lam_min=lam_min,
                lam_max=lam_max,
                seed=seed,
                importance=proposal,
                control_variate=gauss,
                example_ids=round_keys(ids, r),
                progress=False,
                precision=precision,
                max_batch=max_batch,
            )
            logp = ld.logp.detach().double().cpu()
            x_cpu = x.cpu()
            nll = -logp - dataset.log_jacobian(x_cpu)
            true = torch.full_like(logp, math.nan)
            if dataset.mixture is not None:
                true = -dataset.mixture.log_prob(x_cpu.to(torch.float64))
            return {
                "logp": logp,
                "stderr": ld.stderr.detach().double().cpu(),
                "nll": nll,
                "true_nll": true,
                "nfe": torch.full_like(logp, float(ld.nfe)),
            }

        return block

    to_bits = 1.0 / (d * math.log(2))

    def se_of(tables: list[dict[str, Tensor]]) -> float:
        return round_stats([t["nll"] for t in tables], [t["stderr"] for t in tables])[1] * to_bits

    tables, target = evaluate_rounds(
        compute_round,
        n,
        store,
        batch_size=batch_size,
        se_of=se_of,
        target_se=target_se,
        max_rounds=max_rounds,
        progress=progress,
    )
    nll, est_se, stated_se = round_stats([t["nll"] for t in tables], [t["stderr"] for t in tables])  # [n] nats
    res: dict[str, Any] = {
        "method": "formula",
        "split": split,
        "n": n,
        "nll": float(nll.mean()),
        "nll_stderr": float(nll.std() / math.sqrt(n)),
        "estimator_stderr": est_se,
        "estimator_stderr_stated": stated_se,
        "bpd": None,
        "bpd_stderr": None,
        "nfe_per_example": float(sum(t["nfe"].mean() for t in tables)) + pilot_nfe,
        "true_nll": None,
        "true_nll_stderr": None,
        "gap": None,
        "gap_stderr": None,
        "kind": "continuous" if dataset.levels is None else "dequantised",
        "units": "nats per example",
        "dim": d,
        "lam_min": lam_min,
        "lam_max": lam_max,
        "n_t": n_t,
        "n_z": n_z,
        "seed": seed,
        "rounds": len(tables),
        "device": str(device),
        "precision": precision,
        "max_batch": max_batch,
        "batch_size": batch_size,
        "world_size": store.world,
    }
    if dataset.levels is not None:
        # bpd = nll / (d ln 2) + log2((L - 1) / 2) (the dequantised density on the published scale)
        bpd = nll * to_bits + math.log2((dataset.levels - 1) / 2)
        res["bpd"] = float(bpd.mean())
        res["bpd_stderr"] = float(bpd.std() / math.sqrt(n))
    if dataset.mixture is not None:
        true = torch.stack([t["true_nll"] for t in tables]).mean(0)
        diff = nll - true
        res.update(
            true_nll=float(true.mean()),
            true_nll_stderr=float(true.std() / math.sqrt(n)),
            gap=float(diff.mean()),
            gap_stderr=float(diff.std() / math.sqrt(n)),
        )
    if target is not None:
        res["target_se"] = target
    store.finish(res, n)
    return res
