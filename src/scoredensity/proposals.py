"""Proposal densities over log-SNR for Monte Carlo integration of the density formula.

A proposal ``q(lam)`` on ``[lam_min, lam_max]`` is piecewise constant on equal bins, so it is sampled by an
exact inverse CDF (which keeps stratification in the uniform variable ``u`` meaningful) and its density is
cheap to evaluate. ``uniform`` is the plain choice; :func:`fit_proposal` adapts the bin masses to the
root-mean-square of the integrand measured in a pilot run (the variance-optimal importance density for a
noisy integrand is proportional to ``sqrt(E[f(lam, z)^2 | lam])``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LambdaProposal"]


@dataclass(frozen=True)
class LambdaProposal:
    """Piecewise-constant density on ``[lam_min, lam_max]`` with ``len(masses)`` equal bins.

    Attributes:
        lam_min, lam_max: range of log-SNR.
        masses: [n_bins] float64 probabilities of the bins (positive, sum 1).
    """

    lam_min: float
    lam_max: float
    masses: Tensor

    def __post_init__(self):
        if not self.lam_max > self.lam_min:
            raise ValueError(f"need lam_max > lam_min, got [{self.lam_min}, {self.lam_max}]")
        m = torch.as_tensor(self.masses, dtype=torch.float64).cpu()
        if m.dim() != 1 or len(m) == 0 or (m <= 0).any() or not torch.isfinite(m).all():
            raise ValueError("proposal masses must be a non-empty vector of positive finite numbers")
        object.__setattr__(self, "masses", m / m.sum())

    @classmethod
    def uniform(cls, lam_min: float, lam_max: float) -> LambdaProposal:
        """The uniform density on ``[lam_min, lam_max]``."""
        return cls(lam_min, lam_max, torch.ones(1, dtype=torch.float64, device="cpu"))

    @property
    def n_bins(self) -> int:
        return len(self.masses)

    @property
    def width(self) -> float:
        return (self.lam_max - self.lam_min) / self.n_bins

    def icdf(self, u: Tensor) -> Tensor:
        """Map ``u`` in [0, 1) to log-SNR by the exact inverse CDF (float64, same shape and device as ``u``)."""
        u = torch.as_tensor(u, dtype=torch.float64)
        masses = self.masses.to(u.device)
        cdf = torch.cat([masses.new_zeros(1), torch.cumsum(masses, 0)])
        cdf[-1] = 1.0
        idx = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(1, self.n_bins) - 1
        frac = ((u - cdf[idx]) / masses[idx]).clamp(0.0, 1.0)
        return self.lam_min + (idx.to(torch.float64) + frac) * self.width

    def pdf(self, lam: Tensor) -> Tensor:
        """Density ``q(lam)`` (float64, on ``lam``'s device); lam outside the range gets the edge bin's density."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        idx = ((lam - self.lam_min) / self.width).floor().long().clamp(0, self.n_bins - 1)
        return self.masses.to(lam.device)[idx] / self.width

    @classmethod
    def fit(
        cls,
        lam: Tensor,
        values: Tensor,
        lam_min: float,
        lam_max: float,
        n_bins: int = 32,
        floor: float = 0.1,
    ) -> LambdaProposal:
        """Fit bin masses proportional to the RMS of pilot integrand ``values`` observed at ``lam``.

        Args:
            lam: [N] log-SNR of the pilot evaluations, drawn uniformly on the range.
            values: [N] integrand values there (one draw of z each).
            n_bins: number of bins.
            floor: fraction of mass spread uniformly, so that ``q > 0`` everywhere (keeps the
                importance weights bounded by ``n_bins / floor`` times the uniform ones).

        Returns:
            The proposal, its masses on the CPU (pilot values from any device are moved there).
        """
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
        if not 0 < floor <= 1:
            raise ValueError(f"floor must be in (0, 1], got {floor!r}")
        lam = torch.as_tensor(lam, dtype=torch.float64).flatten().cpu()
        values = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
        width = (lam_max - lam_min) / n_bins
        idx = ((lam - lam_min) / width).floor().long().clamp(0, n_bins - 1)
        sq = torch.zeros(n_bins, dtype=torch.float64, device="cpu").index_add_(0, idx, values**2)
        cnt = torch.zeros(n_bins, dtype=torch.float64, device="cpu").index_add_(0, idx, torch.ones_like(values))
        ms = sq / cnt.clamp_min(1)
        # share information with neighbours: bins are narrow and pilot counts small
        padded = torch.cat([ms[:1], ms, ms[-1:]])
        ms = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
        rms = ms.sqrt()
        if not torch.isfinite(rms).all() or rms.sum() <= 0:
            return cls.uniform(lam_min, lam_max)
        masses = (1 - floor) * rms / rms.sum() + floor / n_bins
        return cls(lam_min, lam_max, masses)
