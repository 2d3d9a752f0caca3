"""The end terms of every bound: the prior KL at the noisy end and the decoders at the clean end.

Both the density formula (:mod:`scoredensity.formula`) and the discrete DDPM bound (:mod:`scoredensity.ddpm`)
close their integral / sum with the same pieces, written once here (see docs/design.md, "End terms"):

* :func:`prior_kl`: ``KL(N(sqrt(1 - t) x, t I) || N(0, I))`` per example, the noisy end;
* :func:`end_terms`: the formula's exact end terms in its own split (``noisy_end``, ``clean_end``);
* :func:`discretized_gaussian_log_likelihood`: DDPM's discretised Gaussian decoder on a grid of ``levels``
  levels scaled to [-1, 1], with the exact normal CDF.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["prior_kl", "end_terms", "discretized_gaussian_log_likelihood", "LOG_2PI_E"]

LOG_2PI_E = math.log(2 * math.pi * math.e)


def prior_kl(x: Tensor, log_t: Tensor | float, log_one_minus_t: Tensor | float) -> Tensor:
    """``KL(N(a x, t I) || N(0, I)) = 1/2 [a^2 ||x||^2 - d a^2 - d log t]`` with ``a^2 = 1 - t``, per example.

    Args:
        x: [B, *shape] data. log_t, log_one_minus_t: logs of ``t`` and ``1 - t`` at the noisy end (scalars);
            passing both keeps ``1 - t`` accurate when ``t`` is close to 1.

    Returns:
        [B] float64, nats.
    """
    xf = x.flatten(1).to(torch.float64)
    d = xf.shape[1]
    a2 = torch.exp(torch.as_tensor(log_one_minus_t, dtype=torch.float64, device=xf.device))
    log_t = torch.as_tensor(log_t, dtype=torch.float64, device=xf.device)
    return 0.5 * (a2 * xf.pow(2).sum(1) - d * a2 - d * log_t)


def end_terms(x: Tensor, lam_min: float, lam_max: float) -> tuple[Tensor, Tensor]:
    """Exact end terms of the truncated formula, per example (float64, on ``x``'s device).

    Args:
        x: [B, *shape] data.
        lam_min, lam_max: integration range in log-SNR.

    Returns:
        ``(noisy_end [B], clean_end [B])``: ``noisy_end = -KL + (d/2) softplus(lam_min)`` and
        ``clean_end = -(d/2) log(2 pi e) - (d/2) softplus(-lam_max)`` (see :mod:`scoredensity.formula`).
    """
    d = x[0].numel()
    lo = torch.tensor(lam_min, dtype=torch.float64)
    hi = torch.tensor(lam_max, dtype=torch.float64)
    # t_max = sigmoid(-lam_min): log t = logsigmoid(-lam), log(1 - t) = logsigmoid(lam)
    kl = prior_kl(x, F.logsigmoid(-lo), F.logsigmoid(lo))
    noisy = -kl + 0.5 * d * float(F.softplus(lo))
    clean = torch.full_like(noisy, -0.5 * d * (LOG_2PI_E + float(F.softplus(-hi))))
    return noisy, clean


def _log_diff_ndtr(hi: Tensor, lo: Tensor) -> Tensor:
    """``log(Phi(hi) - Phi(lo))`` for ``hi > lo``, stable in both tails (mirrors to the left tail)."""
    flip = lo > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)  # now Phi(b) - Phi(a) with a <= 0 or both left of 0
    lb, la = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return lb + torch.log1p(-torch.exp((la - lb).clamp(max=0)).clamp(max=1 - 1e-16))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor | float, levels: int) -> Tensor:
    """Log-probability [B] (nats) of data on ``levels`` levels scaled to [-1, 1] under a Gaussian discretised to
    the bins ``x ± 1/(levels - 1)`` (outermost bins extended to ±inf), as DDPM's decoder (exact normal CDF).

    Args:
        x: [B, *shape] data in [-1, 1] (ideally on the grid ``2k/(levels-1) - 1``).
        mean: [B, *shape] decoder mean. log_scale: standard deviation's log (scalar or broadcastable).
    """
    xf = x.flatten(1).to(torch.float64)
    m = mean.flatten(1).to(torch.float64)
    inv_s = torch.exp(-torch.as_tensor(log_scale, dtype=torch.float64, device=xf.device))
    half = 1.0 / (levels - 1)
    hi = torch.where(xf > 1 - half, torch.full_like(xf, math.inf), (xf - m + half) * inv_s)
    lo = torch.where(xf < -1 + half, torch.full_like(xf, -math.inf), (xf - m - half) * inv_s)
    return _log_diff_ndtr(hi, lo).sum(1)
