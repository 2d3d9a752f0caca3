"""The result type shared by every likelihood estimator, and the one bits-per-dimension conversion."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["LogDensity", "bits_per_dim"]


@dataclass(frozen=True)
class LogDensity:
    """Per-example log-density estimate in nats.

    Attributes:
        logp: [B] estimated log-density (nats, float64). For a learned model this is a lower bound
            in expectation (the continuous-time ELBO) unless the estimator says otherwise.
        stderr: [B] Monte Carlo standard error of ``logp`` (0 for deterministic estimators).
        nfe: calls of ``eps_fn`` per example (closed-form helpers are not counted).
        dim: number of elements ``d`` per example.
        terms: named per-example parts [B] that add up to ``logp`` (e.g. ``prior``, ``diffusion``,
            ``decoder``), so a figure can be traced to where it comes from.
        method: short name of the estimator that produced it.
        info: estimator settings worth recording (range, scheme, ...), JSON-serialisable.
    """

    logp: Tensor
    stderr: Tensor
    nfe: float
    dim: int
    terms: dict[str, Tensor] = field(default_factory=dict)
    method: str = ""
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.logp.shape[0]

    def mean(self) -> float:
        """Mean log-density over the batch (nats per example)."""
        return float(self.logp.mean())

    def mean_stderr(self) -> float:
        """Standard error of :meth:`mean` due to the estimator's own noise (examples held fixed)."""
        return float(self.stderr.pow(2).sum().sqrt() / len(self))

    def nll_stderr(self) -> float:
        """Standard error of the mean NLL as an estimate of the population mean: covers both the
        estimator's noise and the sampling of the examples (sample std of ``logp`` / sqrt(B))."""
        b = len(self)
        if b < 2:
            return float(self.stderr[0]) if b == 1 else float("nan")
        return float(self.logp.std() / math.sqrt(b))

    def bits_per_dim(self, levels: int | None = None) -> Tensor:
        """Per-example bits per dimension, see :func:`bits_per_dim`.

        ``levels`` converts a dequantised (continuous) density to the probability of the integer grid. A result
        of a discretised decoder is already a probability: passing ``levels`` then raises.
        """
        if levels is not None and self.info.get("decoder") == "discretized":
            raise ValueError(
                "this result comes from a discretised decoder (already log P(k)); call bits_per_dim() without levels"
            )
        return bits_per_dim(-self.logp, self.dim, levels)

    def __getitem__(self, idx) -> LogDensity:
        return LogDensity(
            logp=self.logp[idx],
            stderr=self.stderr[idx],
            nfe=self.nfe,
            dim=self.dim,
            terms={k: v[idx] for k, v in self.terms.items()},
            method=self.method,
            info=self.info,
        )

    @staticmethod
    def cat(parts: list[LogDensity]) -> LogDensity:
        """Concatenate results computed on consecutive chunks of one batch."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        total = sum(len(p) for p in parts)
        nfe = sum(p.nfe * len(p) for p in parts) / total
        return LogDensity(
            logp=torch.cat([p.logp for p in parts]),
            stderr=torch.cat([p.stderr for p in parts]),
            nfe=nfe,
            dim=first.dim,
            terms={k: torch.cat([p.terms[k] for p in parts]) for k in first.terms},
            method=first.method,
            info=first.info,
        )


def bits_per_dim(nll: Tensor | float, dim: int, levels: int | None = None) -> Tensor:
    """Convert a negative log-density in nats per example to bits per dimension.

    With ``levels=None`` this is plain ``nll / (d ln 2)``. For discrete data on ``L`` levels scaled to
    [-1, 1] as ``x = 2k/(L-1) - 1`` and uniformly dequantised (docs/design.md §2, units), the continuous density
    is converted to the probability of the integer grid: ``nll / (d ln 2) + log2((L - 1) / 2)``
    (the bin width in the [-1, 1] scale is ``2 / (L - 1)``).
    """
    nll = torch.as_tensor(nll, dtype=torch.float64)
    out = nll / (dim * math.log(2))
    if levels is not None:
        if levels < 2:
            raise ValueError("levels must be >= 2")
        out = out + math.log2((levels - 1) / 2)
    return out
