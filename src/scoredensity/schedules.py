"""Canonical time, log-SNR, and the clocks other codebases use (docs/design.md §1).

Canonical ("Li-Yan") time: ``x_t = sqrt(1 - t) x + sqrt(t) z`` for ``t`` in [0, 1]; ``t = 0`` is data,
``t = 1`` pure noise. Signal-to-noise ratio ``snr = (1 - t) / t`` and log-SNR
``lam = log(1 - t) - log(t)``, so ``t = sigmoid(-lam)``.

Every variance-preserving schedule is this process after a change of clock; each clock below maps its
own variable ``s`` to ``t`` and back. This is the only module that knows about time conventions;
foreign *model* conventions are converted in :mod:`scoredensity.adapters`.

All functions are batched, work in float32 and float64, and keep the input dtype. Where precision
matters (``1 - t`` near ``t = 1``), pass float64 or work in log-SNR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "logsnr_from_t",
    "t_from_logsnr",
    "alpha_sigma",
    "alpha_sigma_from_logsnr",
    "drift",
    "diffusion_squared",
    "add_noise",
    "batch_expand",
    "VPLinearClock",
    "CosineClock",
    "VEClock",
    "DDPMSchedule",
    "linear_betas",
]


def _as_tensor(x: Tensor | float, dtype: torch.dtype = torch.float64) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(x, dtype=dtype)


def logsnr_from_t(t: Tensor) -> Tensor:
    """Log signal-to-noise ratio ``log((1 - t) / t)`` of canonical time ``t`` in (0, 1)."""
    t = _as_tensor(t)
    return torch.log1p(-t) - torch.log(t)


def t_from_logsnr(lam: Tensor) -> Tensor:
    """Canonical time ``t = sigmoid(-lam)`` of log-SNR ``lam``."""
    return torch.sigmoid(-_as_tensor(lam))


def alpha_sigma_from_logsnr(lam: Tensor) -> tuple[Tensor, Tensor]:
    """``(sqrt(1 - t), sqrt(t))`` computed stably from log-SNR: ``sqrt(sigmoid(lam))``, ``sqrt(sigmoid(-lam))``."""
    lam = _as_tensor(lam)
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def alpha_sigma(t: Tensor) -> tuple[Tensor, Tensor]:
    """Signal and noise scales ``(sqrt(1 - t), sqrt(t))`` of canonical time ``t``."""
    t = _as_tensor(t)
    return (1 - t).sqrt(), t.sqrt()


def drift(x: Tensor, t: Tensor) -> Tensor:
    """Forward SDE drift ``f(x, t) = -x / (2 (1 - t))``; ``t`` is [B] and broadcasts over x's trailing dims."""
    t = _as_tensor(t)
    return -x / (2 * batch_expand(1 - t, x))


def diffusion_squared(t: Tensor) -> Tensor:
    """Forward SDE squared diffusion ``g(t)^2 = 1 / (1 - t)``."""
    t = _as_tensor(t)
    return 1 / (1 - t)


def add_noise(x: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """``x_t = sqrt(1 - t) x + sqrt(t) z`` with per-example ``t`` [B] broadcast over ``x`` [B, *shape]."""
    a, s = alpha_sigma(t)
    return batch_expand(a, x).to(x.dtype) * x + batch_expand(s, x).to(x.dtype) * z


def batch_expand(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-example vector [B] to broadcast against ``like`` [B, *shape] (the one such helper)."""
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


@dataclass(frozen=True)
class VPLinearClock:
    """VP-SDE with ``beta(s)`` linear from ``beta_min`` to ``beta_max`` on ``s`` in [0, 1] (score_sde).

    ``t(s) = 1 - exp(-B(s))`` with ``B(s) = beta_min s + (beta_max - beta_min) s^2 / 2``.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def integrated_beta(self, s: Tensor) -> Tensor:
        """``B(s) = ∫_0^s beta``."""
        s = _as_tensor(s)
        return self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2

    def to_t(self, s: Tensor) -> Tensor:
        """Canonical time of VP-SDE time ``s``."""
        return -torch.expm1(-self.integrated_beta(s))

    def from_t(self, t: Tensor) -> Tensor:
        """VP-SDE time of canonical ``t`` (root of the quadratic ``B(s) = -log(1 - t)``)."""
        b = -torch.log1p(-_as_tensor(t))
        db = self.beta_max - self.beta_min
        if db == 0:
            return b / self.beta_min
        # s = 2B / (beta_min + sqrt(beta_min^2 + 2 db B)): the stable form of the quadratic root
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * db * b))

    def logsnr(self, s: Tensor) -> Tensor:
        """Log-SNR at VP time ``s``: ``-B - log(1 - exp(-B))``."""
        b = self.integrated_beta(s)
        return -b - torch.log(-torch.expm1(-b))


@dataclass(frozen=True)
class CosineClock:
    """Cosine schedule (Nichol & Dhariwal): ``t(s) = 1 - alpha_bar(s)``,
    ``alpha_bar(s) = cos^2(((s + offset) / (1 + offset)) pi/2) / cos^2((offset / (1 + offset)) pi/2)``.
    """

    offset: float = 0.008

    def _f0(self) -> float:
        return math.cos(self.offset / (1 + self.offset) * math.pi / 2)

    def to_t(self, s: Tensor) -> Tensor:
        """Canonical time of cosine-schedule time ``s`` in [0, 1]."""
        s = _as_tensor(s)
        c = torch.cos((s + self.offset) / (1 + self.offset) * math.pi / 2) / self._f0()
        return (1 - c**2).clamp(0.0, 1.0)

    def from_t(self, t: Tensor) -> Tensor:
        """Cosine-schedule time of canonical ``t``."""
        t = _as_tensor(t)
        c = (torch.sqrt((1 - t).clamp_min(0)) * self._f0()).clamp(-1.0, 1.0)
        return torch.arccos(c) * 2 / math.pi * (1 + self.offset) - self.offset


@dataclass(frozen=True)
class VEClock:
    """Variance-exploding ``x + sigma z``: ``t = sigma^2 / (1 + sigma^2)`` and ``x_VP = x_VE / sqrt(1 + sigma^2)``.

    Here the clock variable is ``sigma`` itself (log-SNR ``= -2 log sigma``).
    """

    def to_t(self, sigma: Tensor) -> Tensor:
        """Canonical time of noise level ``sigma``."""
        s2 = _as_tensor(sigma) ** 2
        return s2 / (1 + s2)

    def from_t(self, t: Tensor) -> Tensor:
        """Noise level ``sigma = sqrt(t / (1 - t))`` of canonical ``t``."""
        t = _as_tensor(t)
        return torch.sqrt(t / (1 - t))

    @staticmethod
    def scale(sigma: Tensor) -> Tensor:
        """Factor ``1 / sqrt(1 + sigma^2)`` that maps a VE input onto the canonical (VP) input."""
        return torch.rsqrt(1 + _as_tensor(sigma) ** 2)


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear betas ``b_1..b_T`` (float64, [T])."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


class DDPMSchedule:
    """A discrete DDPM schedule seen in canonical time: step ``k`` (1-based) sits at
    ``t_k = 1 - prod_{i<=k} (1 - b_i)``.

    Args:
        betas: [T] betas in (0, 1], or ``None`` for DDPM's linear 1e-4..0.02 with ``T = 1000``.
        alphas_cumprod: [T] cumulative products instead of betas (diffusers' ``alphas_cumprod``).
    """

    def __init__(self, betas: Tensor | None = None, *, alphas_cumprod: Tensor | None = None):
        if alphas_cumprod is not None:
            abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
            prev = torch.cat([abar.new_ones(1), abar[:-1]])
            betas = 1 - abar / prev
        elif betas is None:
            betas = linear_betas()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or len(betas) == 0:
            raise ValueError("betas must be a non-empty 1-D tensor")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        # 1 - abar via expm1/log1p keeps precision for the tiny t_1
        self.log_alphas_cumprod = torch.cumsum(torch.log1p(-betas.clamp(max=1 - 1e-300)), 0)
        self.times = -torch.expm1(self.log_alphas_cumprod)

    @property
    def num_steps(self) -> int:
        """Number of steps ``T``."""
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> Tensor:
        """``abar_k`` for k = 1..T, [T] float64."""
        return torch.exp(self.log_alphas_cumprod)

    def t_of_step(self, k: Tensor) -> Tensor:
        """Canonical time of a (possibly fractional) 0-based timestep index ``k`` in [0, T-1]: the one map between
        discrete steps and canonical time (diffusers' timestep ``j`` is index ``j``).

        Between grid points the log-SNR is interpolated linearly (exact at the grid points). A zero-terminal-SNR
        grid (``t_T = 1``, log-SNR ``-inf``) interpolates its last interval linearly in ``sqrt(1 - t) =
        sqrt(abar)`` instead, the coordinate in which Lin et al.'s rescaling is affine; e.g. at ``k = T - 1.5``,
        ``sqrt(abar) = sqrt(abar_{T-1}) / 2``.
        """
        k = _as_tensor(k).to(torch.float64).clamp(0, self.num_steps - 1)
        lam = logsnr_from_t(self.times)
        k0 = k.floor().clamp(0, self.num_steps - 1).long()
        k1 = (k0 + 1).clamp(max=self.num_steps - 1)
        w = (k - k0.to(k.dtype)).clamp(0, 1)
        l0, l1 = lam[k0], lam[k1]
        by_lam = t_from_logsnr(torch.where(w > 0, l0 * (1 - w) + l1 * w, l0))
        a0, a1 = (1 - self.times[k0]).clamp_min(0).sqrt(), (1 - self.times[k1]).clamp_min(0).sqrt()
        by_sqrt_abar = 1 - (a0 * (1 - w) + a1 * w).pow(2)
        return torch.where(torch.isfinite(l0) & torch.isfinite(l1), by_lam, by_sqrt_abar)

    def step_of_t(self, t: Tensor) -> Tensor:
        """Fractional 0-based timestep index whose canonical time is ``t``: the inverse of :meth:`t_of_step`
        (log-SNR interpolation; ``sqrt(1 - t)`` on a zero-terminal-SNR last interval), clamped to [0, T-1]."""
        t = _as_tensor(t).to(torch.float64)
        lam_grid = -logsnr_from_t(self.times)  # increasing in k
        target = -logsnr_from_t(t)
        idx = torch.searchsorted(lam_grid, target.contiguous()).clamp(1, self.num_steps - 1)
        lo, hi = lam_grid[idx - 1], lam_grid[idx]
        w = ((target - lo) / (hi - lo)).clamp(0, 1)
        # zero terminal SNR: the last grid point is t = 1 (infinite -lam); interpolate sqrt(1 - t) there
        a_lo, a_hi = (1 - self.times[idx - 1]).clamp_min(0).sqrt(), (1 - self.times[idx]).clamp_min(0).sqrt()
        w_a = ((a_lo - (1 - t).clamp_min(0).sqrt()) / (a_lo - a_hi)).clamp(0, 1)
        w = torch.where(torch.isfinite(lo) & torch.isfinite(hi), w, w_a)
        out = (idx - 1).to(torch.float64) + w
        out = torch.where(target <= lam_grid[0], torch.zeros_like(out), out)
        return torch.where(target >= lam_grid[-1], torch.full_like(out, self.num_steps - 1), out)

    @classmethod
    def from_clock(cls, clock: VPLinearClock | CosineClock, num_steps: int) -> DDPMSchedule:
        """``abar_k = abar(k / T)`` taken from one continuous clock (docs/design.md §3), so step counts compare.

        Betas are clipped at 0.999 as in Nichol & Dhariwal's cosine schedule (whose ``abar(1) = 0`` would give
        ``b_T = 1``, a zero-terminal-SNR step with an undefined reverse mean); only that last step moves.
        """
        s = torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps
        abar = 1 - clock.to_t(s).clamp(max=1.0)
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        betas = torch.where(prev > 0, 1 - abar / prev.clamp_min(1e-300), torch.ones_like(abar))
        return cls(betas.clamp(1e-12, 0.999))
