"""Denoising score-matching losses in canonical time, and the per-example noise that feeds them.

Two weightings of the per-example denoising error ``||z - eps_theta(x_t, t)||^2``:

* ``elbo`` (likelihood weighting): in log-SNR the density formula's integrand is
  ``1/2 [D sigmoid(lam) - ||z - eps||^2] dlam`` (docs/design.md §2), so with ``lam ~ q`` the one-sample estimate
  ``noisy_end + clean_end + integrand / q(lam)`` is an unbiased estimate of the bound
  :func:`scoredensity.formula.log_density` computes, with *the same* end terms
  (:func:`scoredensity.formula.end_terms`). The ``elbo`` loss is minus that: the training loss *is* the
  negative bound, in nats per example. Its gradient is the gradient of ``||z - eps||^2 / (2 q(lam))``.
* ``simple`` (DDPM's ``L_simple``, Ho et al. 2020): the mean over dimensions of ``||z - eps||^2``, with
  ``t`` uniform on the DDPM grid (``"ddpm"``) or uniform in ``t`` over the training range (``"t_uniform"``).

Where log-SNR is drawn from (:class:`LamSampler`):

* ``uniform``: uniform in ``lam`` on ``[lam_min, lam_max]``. This *is* the importance sampling of Huang et al. (2021)
  (sdeflow-light draws VP time ``s`` with density ∝ ``g^2/sigma^2 = beta(s) / (1 - e^{-B(s)})``; since
  ``dlam = -beta ds / (1 - e^{-B})`` that is the uniform density in log-SNR).
* ``t_uniform``: uniform in canonical ``t`` (``q(lam) ∝ t (1 - t)``); the weight ``1/(t(1-t))`` then
  explodes at both ends (kept for the benchmark).
* ``adaptive``: piecewise constant, bin masses ∝ running RMS of the integrand per bin (the
  variance-optimal density for the loss estimate), 10% spread uniformly so weights stay bounded.

Randomness is counter-based (Philox4x32-10, Salmon et al. 2011): ``lam`` and ``z`` of an example are a
pure function of ``(seed, step, global example index)``, so results do not depend on how a batch is split
over processes or chunks, and resuming a run needs no generator state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import rng
from .epsfn import EpsFn
from .formula import end_terms, formula_integrand
from .proposals import LambdaProposal
from .rng import Stream, philox4x32
from .schedules import DDPMSchedule

__all__ = [
    "philox4x32",
    "keyed_uniforms",
    "keyed_normals",
    "LamSampler",
    "LossOutput",
    "dsm_loss",
    "elbo_loss",
    "WEIGHTINGS",
    "LAM_SAMPLINGS",
]

WEIGHTINGS = ("elbo", "simple")
LAM_SAMPLINGS = ("uniform", "t_uniform", "adaptive", "ddpm")


# ---------------------------------------------------------------------------------------- keyed randomness
def keyed_uniforms(seed: int, step: int, index: Tensor, n: int, stream: int = Stream.TRAIN_LAM) -> Tensor:
    """Uniforms [B, n] float64 in (0, 1) keyed by ``(seed, step, index[b], stream)``, on ``index``'s device.

    Kept for compatibility: the library draws through :mod:`scoredensity.rng` (same bits)."""
    return rng.uniforms(seed, stream, index, n, step=step, device=torch.as_tensor(index).device)


def keyed_normals(
    seed: int, step: int, index: Tensor, shape: tuple[int, ...], stream: int = Stream.TRAIN_NOISE
) -> Tensor:
    """Standard normals [B, *shape] float64 keyed like :func:`keyed_uniforms` (see :mod:`scoredensity.rng`)."""
    return rng.normals(seed, stream, index, shape, step=step, device=torch.as_tensor(index).device)


# ---------------------------------------------------------------------------------------- log-SNR sampling
class LamSampler:
    """Draws per-example log-SNR ``lam`` and its importance weight ``1/q(lam)`` for training.

    Args:
        kind: one of :data:`LAM_SAMPLINGS` (see the module docstring).
        lam_min, lam_max: training range of log-SNR.
        n_bins, floor, decay: ``adaptive`` only: bins, uniform share of the mass, EMA decay of the
            per-bin mean squared integrand.
        low_discrepancy: draw ``u_i = frac(u_0 + i / B)`` over the global batch (VDM's low-discrepancy
            sampler: each ``u_i`` is still uniform, so the loss stays unbiased) instead of independent ``u_i``.
    """

    def __init__(
        self,
        kind: str = "uniform",
        lam_min: float = -12.0,
        lam_max: float = 12.0,
        *,
        n_bins: int = 32,
        floor: float = 0.1,
        decay: float = 0.99,
        low_discrepancy: bool = True,
    ):
        if kind not in LAM_SAMPLINGS:
            raise ValueError(f"lam sampling must be one of {LAM_SAMPLINGS}, got {kind!r}")
        if not lam_max > lam_min:
            raise ValueError(f"need lam_max > lam_min, got [{lam_min}, {lam_max}]")
        self.kind = kind
        self.lam_min, self.lam_max = float(lam_min), float(lam_max)
        self.n_bins, self.floor, self.decay = int(n_bins), float(floor), float(decay)
        self.low_discrepancy = bool(low_discrepancy)
        # small; on the CPU until :meth:`to` moves them to the training device (then no step needs the host)
        self.mean_sq = torch.zeros(self.n_bins, dtype=torch.float64, device="cpu")
        self.seen = torch.zeros(self.n_bins, dtype=torch.float64, device="cpu")
        self._ddpm: DDPMSchedule | None = None
        self._ddpm_times: Tensor | None = None

    def to(self, device: torch.device | str) -> LamSampler:
        """Keep the adaptive statistics on ``device`` (the training data's), so that :meth:`sample` and
        :meth:`update` run there without a host round trip. Returns ``self``."""
        self.mean_sq = self.mean_sq.to(device)
        self.seen = self.seen.to(device)
        return self

    # -- the proposal
    def proposal(self) -> LambdaProposal:
        """The current piecewise-constant proposal (``adaptive``) or the uniform one."""
        if self.kind != "adaptive":
            return LambdaProposal.uniform(self.lam_min, self.lam_max)
        masses, ok = self._adaptive_masses()
        if not bool(ok):
            return LambdaProposal.uniform(self.lam_min, self.lam_max)
        return LambdaProposal(self.lam_min, self.lam_max, masses.cpu())

    def _adaptive_masses(self) -> tuple[Tensor, Tensor]:
        """``(masses [n_bins] float64, ok [] bool)`` of the adaptive proposal, on the statistics' device and with
        no host round trip; ``ok`` is False (masses meaningless) while no bin has been seen or the statistics are
        not finite (then the uniform proposal is used)."""
        has = self.seen > 0
        ms = torch.where(has, self.mean_sq, self.mean_sq.masked_fill(~has, -math.inf).max())
        padded = torch.cat([ms[:1], ms, ms[-1:]])
        rms = (0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]).sqrt()
        ok = has.any() & torch.isfinite(rms).all() & (rms.sum() > 0)
        return (1 - self.floor) * rms / rms.sum() + self.floor / self.n_bins, ok

    def sample(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Map uniforms ``u`` [B] to ``(lam [B], 1/q(lam) [B])`` (float64)."""
        u = u.to(torch.float64)
        if self.kind == "t_uniform":
            t_lo, t_hi = _sig(-self.lam_max), _sig(-self.lam_min)
            t = t_lo + (t_hi - t_lo) * u
            lam = torch.log1p(-t) - torch.log(t)
            return lam, (t_hi - t_lo) / (t * (1 - t))
        if self.kind == "ddpm":
            sched = self._ddpm = self._ddpm or DDPMSchedule()
            if self._ddpm_times is None or self._ddpm_times.device != u.device:
                self._ddpm_times = sched.times.to(u.device)  # once per device, not every step
            k = (u * sched.num_steps).floor().long().clamp(0, sched.num_steps - 1)
            t = self._ddpm_times[k]
            return torch.log1p(-t) - torch.log(t), torch.ones_like(t)  # weights unused by L_simple
        # uniform: LambdaProposal.uniform's icdf and pdf, written out (the same bits, no host tensor)
        width = self.lam_max - self.lam_min
        lam_u = self.lam_min + u * width
        inv_q_u = 1.0 / torch.full_like(u, 1.0 / width)
        if self.kind != "adaptive":
            return lam_u, inv_q_u
        # adaptive: LambdaProposal's icdf and pdf on u's device; the uniform draw where the statistics are not
        # usable yet, chosen on the device (both are computed: B numbers, cheaper than a synchronisation)
        masses, ok = self._adaptive_masses()
        masses = masses.to(u.device)
        m = masses / masses.sum()  # LambdaProposal normalises its masses
        cdf = torch.cat([m.new_zeros(1), torch.cumsum(m, 0)])
        cdf[-1] = 1.0
        idx = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(1, self.n_bins) - 1
        frac = ((u - cdf[idx]) / m[idx]).clamp(0.0, 1.0)
        bin_w = width / self.n_bins
        lam_a = self.lam_min + (idx.to(torch.float64) + frac) * bin_w
        j = ((lam_a - self.lam_min) / bin_w).floor().long().clamp(0, self.n_bins - 1)
        inv_q_a = 1.0 / (m[j] / bin_w)
        ok = ok.to(u.device)
        return torch.where(ok, lam_a, lam_u), torch.where(ok, inv_q_a, inv_q_u)

    # -- adaptive statistics
    def bin_stats(self, lam: Tensor, values: Tensor) -> Tensor:
        """Per-bin ``[sum of values^2, count]`` [2, n_bins] float64 of one batch, on ``lam``'s device (to be
        summed over processes)."""
        width = (self.lam_max - self.lam_min) / self.n_bins
        idx = ((lam.detach() - self.lam_min) / width).floor().long().clamp(0, self.n_bins - 1)
        zeros = torch.zeros(self.n_bins, dtype=torch.float64, device=lam.device)
        sq = zeros.index_add(0, idx, values.detach().to(device=lam.device, dtype=torch.float64) ** 2)
        cnt = zeros.index_add(0, idx, torch.ones_like(sq[idx]))
        return torch.stack([sq, cnt])

    def update(self, stats: Tensor) -> None:
        """Fold one step's summed :meth:`bin_stats` into the running per-bin mean squares (on the statistics'
        device; all-zero stats, e.g. of a skipped step, change nothing)."""
        if self.kind != "adaptive":
            return
        stats = stats.to(device=self.mean_sq.device, dtype=torch.float64)
        sq, cnt = stats[0], stats[1]
        has = cnt > 0
        batch_ms = sq / cnt.clamp_min(1)
        first = has & (self.seen == 0)
        later = has & (self.seen > 0)
        self.mean_sq = torch.where(first, batch_ms, self.mean_sq)
        self.mean_sq = torch.where(later, self.decay * self.mean_sq + (1 - self.decay) * batch_ms, self.mean_sq)
        self.seen = self.seen + cnt

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that make the sampler resumable."""
        return {"mean_sq": self.mean_sq.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`."""
        if state["mean_sq"].shape != (self.n_bins,):
            raise ValueError("lam sampler state has the wrong number of bins")
        dev = self.mean_sq.device
        self.mean_sq = state["mean_sq"].to(dev, torch.float64).clone()
        self.seen = state["seen"].to(dev, torch.float64).clone()

    def config(self) -> dict:
        """JSON-serialisable settings."""
        return dict(
            kind=self.kind,
            lam_min=self.lam_min,
            lam_max=self.lam_max,
            n_bins=self.n_bins,
            floor=self.floor,
            decay=self.decay,
            low_discrepancy=self.low_discrepancy,
        )


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# ---------------------------------------------------------------------------------------- losses
@dataclass
class LossOutput:
    """Per-example results of one loss evaluation.

    Attributes:
        loss: [B] differentiable per-example loss (mean it, or sum / global batch, to train).
        nll: [B] float64 detached ``elbo`` estimate of ``-log p`` (nats; unbiased for the negative bound),
            or ``None`` for ``simple``.
        lam: [B] float64 log-SNR used. integrand: [B] float64 formula integrand (unweighted), for
            the adaptive sampler.
    """

    loss: Tensor
    nll: Tensor | None
    lam: Tensor
    integrand: Tensor


def elbo_loss(eps_fn: EpsFn, x: Tensor, lam: Tensor, z: Tensor, inv_q: Tensor, lam_min: float, lam_max: float):
    """Negative bound, one-sample estimate per example (nats): ``-(noisy_end + clean_end + f(lam, z) / q(lam))``
    with ``f`` the formula's integrand :func:`scoredensity.formula.formula_integrand` (``D = ||z||^2``).

    Args:
        eps_fn: the model. x: [B, *shape] data. lam: [B] float64 log-SNR. z: [B, *shape] noise.
        inv_q: [B] ``1 / q(lam)``. lam_min, lam_max: the range the end terms close.

    Returns:
        ``(loss [B] float64 with graph, integrand [B] float64 detached)``.
    """
    t = torch.sigmoid(-lam)
    x64 = x.to(torch.float64)
    shape = (-1,) + (1,) * (x.dim() - 1)
    x_t = torch.sigmoid(lam).sqrt().reshape(shape) * x64 + t.sqrt().reshape(shape) * z
    eps = eps_fn(x_t.to(x.dtype), t)
    f = formula_integrand(z, eps, lam, True)
    noisy, clean = end_terms(x, lam_min, lam_max)
    return -(noisy + clean + f * inv_q), f.detach()


def dsm_loss(
    eps_fn: EpsFn,
    x: Tensor,
    *,
    weighting: str,
    sampler: LamSampler,
    seed: int,
    step: int,
    index: Tensor,
    position: Tensor | None = None,
    global_batch: int | None = None,
) -> LossOutput:
    """Denoising score-matching loss of a batch with keyed per-example noise.

    Args:
        eps_fn: the model (``(x_t, t) -> eps``).
        x: [B, *shape] model-space data (float32).
        weighting: ``"elbo"`` or ``"simple"``.
        sampler: where log-SNR is drawn from.
        seed, step: key of this step's randomness.
        index: [B] global example index (unique over the run, e.g. ``step * global_batch + position``).
        position, global_batch: [B] position in the global batch and its size, for the low-discrepancy
            sampler (which then depends on the global batch only, never on how it is split).

    Returns:
        :class:`LossOutput`.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "elbo" and sampler.kind == "ddpm":
        raise ValueError("the 'ddpm' grid is for the simple weighting; use uniform/adaptive/t_uniform with elbo")
    dev = torch.device("cpu") if x.device.type == "mps" else x.device  # float64 draws: on x's device
    index = torch.as_tensor(index).to(dev)
    if sampler.low_discrepancy and position is not None and global_batch:
        shared = torch.full((1,), -1, dtype=torch.int64, device=dev)
        u0 = rng.uniforms(seed, Stream.TRAIN_LAM_SHARED, shared, 1, step=step, device=dev)[0, 0]
        u = torch.frac(u0 + position.to(device=dev, dtype=torch.float64) / global_batch)
    else:
        u = rng.uniforms(seed, Stream.TRAIN_LAM, index, 1, step=step, device=dev)[:, 0]
    lam, inv_q = sampler.sample(u)
    z = rng.normals(seed, Stream.TRAIN_NOISE, index, tuple(x.shape[1:]), step=step, device=dev)
    if weighting == "elbo":
        loss, f = elbo_loss(eps_fn, x, lam, z, inv_q, sampler.lam_min, sampler.lam_max)
        return LossOutput(loss=loss, nll=loss.detach(), lam=lam, integrand=f)
    t = torch.sigmoid(-lam)
    shape = (-1,) + (1,) * (x.dim() - 1)
    x_t = torch.sigmoid(lam).sqrt().reshape(shape) * x.to(torch.float64) + t.sqrt().reshape(shape) * z
    eps = eps_fn(x_t.to(x.dtype), t)
    err = (z - eps.to(torch.float64)).flatten(1).pow(2)
    f = formula_integrand(z, eps.detach(), lam, True)
    return LossOutput(loss=err.mean(1), nll=None, lam=lam, integrand=f)
