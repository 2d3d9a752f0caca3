"""Bits per dimension of an image model: the density formula (discrete and dequantised) and the DDPM ELBO.

For a discrete-time model trained on ``[t_1, t_T]`` (DESIGN.md §2, issue 6) the network is only evaluated
inside that range: the formula runs on ``[lam(t_T), lam(t_1)]`` with its exact end terms, and

* **discrete** (no dequantisation): the clean end is DDPM's discretised Gaussian decoder at ``t_1``, so
  ``-log P(k) <= E[-log p_dec(k | x_{t_1})] + 1/2 ∫ E||z - eps||^2 dlam + KL(q(x_{t_T} | x) || N(0, I))``;
* **dequantised**: data ``x = 2(k + u - 1/2)/(L - 1) - 1``, ``u ~ U[0, 1)``, with the Gaussian reconstruction
  term of VDM at the clean end; bits/dim add ``log2((L - 1) / 2)`` (the bin width on the [-1, 1] scale);
* **ddpm**: the T-step DDPM ELBO with the model's own reverse variance and the discretised decoder.

Per-example results are keyed by the example's global index, the log-SNR proposal is fitted once on the
first examples, so the figures are the same in one batch, many batches, or sharded over processes
(``torch.distributed``): each process evaluates ``index % world == rank`` and the per-example values are
gathered before the mean and its standard error are taken.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .data.dataset import levels_to_unit_scale
from .ddpm import ddpm_elbo
from .epsfn import EpsFn
from .formula import example_generator, fit_proposal, log_density
from .schedules import DDPMSchedule, logsnr_from_t

__all__ = ["evaluate_images", "IMAGE_METHODS", "data_hash"]

IMAGE_METHODS = ("formula-discrete", "formula-dequantized", "ddpm")
_T_MAX_CAP = 1 - 1e-9  # a zero-terminal-SNR grid ends at t = 1 (log-SNR -inf); stay just inside it


def data_hash(levels_data: Tensor) -> str:
    """SHA-256 of integer image data (as int64, C order) with its shape: identifies the evaluated set."""
    a = levels_data.to(torch.int64).contiguous().numpy()
    h = hashlib.sha256(str(tuple(a.shape)).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(local: dict[str, Tensor], idx: Tensor, n: int, world: int) -> dict[str, Tensor]:
    """Reassemble per-example tensors computed on shards into full [N] tensors ordered by global index."""
    if world == 1:
        return local
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, (idx, local))
    out = {k: torch.empty(n, dtype=torch.float64) for k in local}
    for pidx, pvals in parts:
        for k, v in pvals.items():
            out[k][pidx] = v
    return out


def _dequantize(k: Tensor, ids: Tensor, levels: int, seed: int) -> Tensor:
    u = torch.stack(
        [torch.rand(k.shape[1:], generator=example_generator(seed, i, 9), dtype=torch.float64) for i in ids.tolist()]
    )
    return levels_to_unit_scale(k, levels, u).float()


def _summary(vals: dict[str, Tensor], d: int, kind: str, nfe: float, levels: int, extra: dict) -> dict:
    nll = -vals["logp"]
    offset = math.log2((levels - 1) / 2) if kind == "dequantized" else 0.0
    bpd = nll / (d * math.log(2)) + offset
    n = len(bpd)
    to_bits = 1.0 / (d * math.log(2))
    return {
        "kind": kind,
        "bpd": float(bpd.mean()),
        "bpd_stderr": float(bpd.std() / math.sqrt(n)) if n > 1 else float(vals["stderr"][0] * to_bits),
        "bpd_estimator_stderr": float(vals["stderr"].pow(2).sum().sqrt() / n * to_bits),
        "nll_nats": float(nll.mean()),
        "nfe_per_example": nfe,
        # VDM-style split, in bits per dimension (each a cost: positive is worse)
        "terms_bpd": {k: float(-vals[k].mean() * to_bits) for k in ("prior", "diffusion", "reconstruction")},
        **({"bpd_offset_dequantization": offset} if kind == "dequantized" else {}),
        **extra,
    }


@torch.no_grad()
def evaluate_images(
    eps_fn: EpsFn,
    images: Tensor,
    *,
    levels: int = 256,
    t_range: tuple[float, float] | None = None,
    methods: Sequence[str] = IMAGE_METHODS,
    schedule: DDPMSchedule | None = None,
    variance: str | None = None,
    n_t: int = 32,
    decoder_draws: int = 4,
    ddpm_steps: int | None = 50,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Bits per dimension of integer images under a canonical-time model, by several estimators.

    Args:
        eps_fn: the model in canonical time (e.g. :class:`~scoredensity.adapters.DiffusersEps`; its ``t_range``,
            ``schedule`` and ``variance_type`` are used when not given).
        images: [N, C, H, W] integer levels in ``0..levels-1``.
        levels: ``L`` (256 for 8-bit images); the model sees ``x = 2k/(L-1) - 1``.
        t_range: ``(t_1, t_T)``, the trained range; the network is never called outside it.
        methods: subset of ``formula-discrete``, ``formula-dequantized``, ``ddpm``.
        schedule: the T-step grid for ``ddpm`` (default ``eps_fn.schedule``).
        variance: ``fixed_small`` / ``fixed_large`` for ``ddpm`` (default the model's ``variance_type``).
        n_t: log-SNR nodes per example for the formula (each one network call).
        decoder_draws: z draws for the discretised decoder term.
        ddpm_steps: KL terms sampled per example for ``ddpm`` (unbiased); ``None`` sums all T.
        seed: keys every random stream together with the example's index.
        batch_size: examples per call (bounds memory).

    Returns:
        A JSON-serialisable dict: per method ``bpd`` (mean), ``bpd_stderr`` (standard error of the mean over the
        examples, covering the estimator's noise too), ``bpd_estimator_stderr``, ``nfe_per_example``, ``kind``
        (*discrete* or *dequantized*) and ``terms_bpd`` (prior, diffusion, reconstruction); plus
        ``preprocessing``, ``data_sha256``, ``n`` and the log-SNR range used.
    """
    if images.dtype.is_floating_point or images.dim() < 2:
        raise TypeError("images must be an integer tensor of levels [N, *shape]")
    if int(images.min()) < 0 or int(images.max()) > levels - 1:
        raise ValueError(f"image levels must lie in 0..{levels - 1}; found [{int(images.min())}, {int(images.max())}]")
    unknown = set(methods) - set(IMAGE_METHODS)
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {IMAGE_METHODS}; unknown: {sorted(unknown)}")
    if t_range is None:
        t_range = getattr(eps_fn, "t_range", None)
        if t_range is None:
            raise ValueError("t_range=(t_1, t_T) is required for a model without a .t_range")
    t_lo, t_hi = float(t_range[0]), min(float(t_range[1]), _T_MAX_CAP)
    lam_min = float(logsnr_from_t(torch.tensor(t_hi, dtype=torch.float64)))
    lam_max = float(logsnr_from_t(torch.tensor(t_lo, dtype=torch.float64)))
    if "ddpm" in methods:
        schedule = schedule if schedule is not None else getattr(eps_fn, "schedule", None)
        if schedule is None:
            raise ValueError("the 'ddpm' method needs schedule= (a DDPMSchedule) for a model without .schedule")
        if getattr(eps_fn, "zero_terminal_snr", False):
            raise ValueError(
                "the DDPM ELBO is undefined for a zero-terminal-SNR schedule (t_T = 1); use the formula methods only"
            )
        variance = variance or getattr(eps_fn, "variance_type", "fixed_small")
        variance = {"fixed_small_log": "fixed_small", "fixed_large_log": "fixed_large"}.get(variance, variance)
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(
                f"the DDPM ELBO of a model with variance_type {variance!r} needs its learned reverse variances, "
                "which this evaluation does not support yet; use methods without 'ddpm'"
            )

    n = images.shape[0]
    d = images[0].numel()
    rank, world = _dist()
    if n < world:
        raise ValueError(f"{n} images cannot be sharded over {world} processes")
    grid = lambda k: levels_to_unit_scale(k, levels).float()  # noqa: E731
    # one proposal for every batch and process: fitted on the same first examples everywhere
    proposal = fit_proposal(
        eps_fn,
        grid(images[: min(n, 16)]),
        lam_min=lam_min,
        lam_max=lam_max,
        seed=seed,
        pilot_examples=16,
        pilot_nodes=8,
    )
    pilot_nfe = min(n, 16) * 8 / n
    sp_min, sp_max = (float(F.softplus(torch.tensor(v, dtype=torch.float64))) for v in (lam_min, lam_max))
    mine = torch.arange(n)[rank::world]
    local: dict[str, dict[str, list[Tensor]]] = {m: {} for m in methods}
    nfe: dict[str, float] = {}
    common = dict(
        lam_min=lam_min, lam_max=lam_max, n_t=n_t, seed=seed, importance=proposal, control_variate=None, progress=False
    )
    for s in tqdm(range(0, len(mine), batch_size), desc="evaluate", disable=not progress or rank != 0):
        ids = mine[s : s + batch_size]
        k = images[ids]
        results = {}
        if "formula-discrete" in methods:
            results["formula-discrete"] = log_density(
                eps_fn,
                grid(k),
                decoder="discretized",
                levels=levels,
                decoder_draws=decoder_draws,
                example_ids=ids,
                **common,
            )
        if "formula-dequantized" in methods:
            results["formula-dequantized"] = log_density(
                eps_fn, _dequantize(k, ids, levels, seed), example_ids=ids, **common
            )
        if "ddpm" in methods:
            results["ddpm"] = ddpm_elbo(
                eps_fn,
                grid(k),
                schedule=schedule,
                variance=variance,
                decoder="discretized",
                levels=levels,
                n_steps_sampled=ddpm_steps,
                seed=seed,
                example_ids=ids,
            )
        for m, r in results.items():
            if m.startswith("formula"):
                terms = {
                    "prior": r.terms["noisy_end"] - 0.5 * d * sp_min,
                    "diffusion": r.terms["integral"] - 0.5 * d * (sp_max - sp_min),
                    "reconstruction": r.terms["clean_end"] + 0.5 * d * sp_max,
                }
                nfe[m] = r.nfe + pilot_nfe
            else:
                terms = {
                    "prior": r.terms["prior"],
                    "diffusion": r.terms["diffusion"],
                    "reconstruction": r.terms["decoder"],
                }
                nfe[m] = r.nfe
            for key, v in {"logp": r.logp, "stderr": r.stderr, **terms}.items():
                local[m].setdefault(key, []).append(v)
    out: dict = {
        "n": n,
        "shape": list(images.shape[1:]),
        "levels": levels,
        "data_sha256": data_hash(images),
        "lam_range": [lam_min, lam_max],
        "t_range": [t_lo, t_hi],
        "seed": seed,
        "world_size": world,
        "preprocessing": {
            "scaling": f"x = 2k/({levels}-1) - 1 (k integer levels in 0..{levels - 1})",
            "dequantization": "formula-dequantized only: x = 2(k + u - 1/2)/(L-1) - 1, u ~ U[0,1) keyed by "
            "(seed, example index); bpd adds log2((L-1)/2)",
            "discrete": "formula-discrete and ddpm: discretised Gaussian decoder, no dequantisation",
        },
        "methods": {},
    }
    for m in methods:
        vals = {k: torch.cat(v) if v else torch.empty(0, dtype=torch.float64) for k, v in local[m].items()}
        vals = _gather(vals, mine, n, world)
        kind = "dequantized" if m == "formula-dequantized" else "discrete"
        extra = (
            {"n_t": n_t}
            if m.startswith("formula")
            else {"variance": variance, "T": schedule.num_steps, "steps_sampled": ddpm_steps}
        )
        out["methods"][m] = _summary(vals, d, kind, nfe.get(m, float("nan")), levels, extra)
    return out
