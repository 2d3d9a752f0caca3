"""The end terms of every bound: the prior KL at the noisy end and the decoders at the clean end.

Both the density formula (:mod:`scoredensity.formula`) and the discrete DDPM bound (:mod:`scoredensity.ddpm`)
close their integral / sum with the same pieces, written once here (see docs/design.md, "End terms"):

* :func:`prior_kl`: ``KL(N(sqrt(1 - t) x, t I) || N(0, I))`` per example, the noisy end;
* :func:`end_terms`: the formula's exact end terms in its own split (``noisy_end``, ``clean_end``);
* :func:`discretized_gaussian_log_likelihood`: DDPM's discretised Gaussian decoder on a grid of ``levels``
  levels scaled to [-1, 1], with the exact normal CDF (or the published tanh approximation, ``cdf="tanh"``);
* :func:`categorical_gaussian_log_likelihood`: VDM's decoder, a Gaussian normalised over the data levels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "prior_kl",
    "end_terms",
    "discretized_gaussian_log_likelihood",
    "categorical_gaussian_log_likelihood",
    "approx_standard_normal_cdf",
    "CDFS",
    "LOG_2PI_E",
]

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
    if isinstance(log_one_minus_t, Tensor) or isinstance(log_t, Tensor):
        a2 = torch.exp(torch.as_tensor(log_one_minus_t, dtype=torch.float64, device=xf.device))
        log_t = torch.as_tensor(log_t, dtype=torch.float64, device=xf.device)
    else:  # Python floats: no tensor to copy to the device
        a2 = math.exp(log_one_minus_t)
    return 0.5 * (a2 * xf.pow(2).sum(1) - d * a2 - d * log_t)


def end_terms(x: Tensor, lam_min: float, lam_max: float) -> tuple[Tensor, Tensor]:
    """Exact end terms of the truncated formula, per example (float64, on ``x``'s device: no CPU tensor is made).

    Args:
        x: [B, *shape] data.
        lam_min, lam_max: integration range in log-SNR.

    Returns:
        ``(noisy_end [B], clean_end [B])``: ``noisy_end = -KL + (d/2) softplus(lam_min)`` and
        ``clean_end = -(d/2) log(2 pi e) - (d/2) softplus(-lam_max)`` (see :mod:`scoredensity.formula`).
    """
    d = x[0].numel()
    lam_min, lam_max = float(lam_min), float(lam_max)
    # t_max = sigmoid(-lam_min): log t = logsigmoid(-lam) = -softplus(lam), log(1 - t) = -softplus(-lam)
    kl = prior_kl(x, -_softplus(lam_min), -_softplus(-lam_min))
    noisy = -kl + 0.5 * d * _softplus(lam_min)
    clean = torch.full_like(noisy, -0.5 * d * (LOG_2PI_E + _softplus(-lam_max)))
    return noisy, clean


def _softplus(v: float) -> float:
    """``log(1 + e^v)`` of a Python float, stable for large ``|v|``."""
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def _log_diff_ndtr(hi: Tensor, lo: Tensor) -> Tensor:
    """``log(Phi(hi) - Phi(lo))`` for ``hi > lo``, stable in both tails (mirrors to the left tail)."""
    flip = lo > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)  # now Phi(b) - Phi(a) with a <= 0 or both left of 0
    lb, la = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return lb + torch.log1p(-torch.exp((la - lb).clamp(max=0)).clamp(max=1 - 1e-16))


CDFS = ("exact", "tanh")


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation ``0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` of the normal CDF used by the
    published DDPM / improved-diffusion decoders (for bit-faithful reproduction only; off by up to ~1e-3)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: Tensor, mean: Tensor, log_scale: Tensor | float, levels: int, *, cdf: str = "exact"
) -> Tensor:
    """Log-probability [B] (nats) of data on ``levels`` levels scaled to [-1, 1] under a Gaussian discretised to
    the bins ``x ± 1/(levels - 1)`` (outermost bins extended to ±inf), as DDPM's decoder.

    Args:
        x: [B, *shape] data in [-1, 1] (ideally on the grid ``2k/(levels-1) - 1``).
        mean: [B, *shape] decoder mean. log_scale: standard deviation's log (scalar or broadcastable).
        cdf: ``"exact"`` (default: the normal CDF, stable in both tails) or ``"tanh"``: the published code's
            approximation (:func:`approx_standard_normal_cdf`) with its edge test ``|x| > 0.999`` and its floor of
            1e-12 on every bin probability, which reproduces Ho et al.'s and improved-diffusion's decoder.
    """
    if cdf not in CDFS:
        raise ValueError(f"cdf must be one of {CDFS}, got {cdf!r}")
    xf = x.flatten(1).to(torch.float64)
    m = mean.flatten(1).to(torch.float64)
    inv_s = torch.exp(-torch.as_tensor(log_scale, dtype=torch.float64, device=xf.device))
    if inv_s.dim() == x.dim():  # a per-element (learned) scale [B, *shape]
        inv_s = inv_s.flatten(1)
    half = 1.0 / (levels - 1)
    if cdf == "tanh":
        c_hi = approx_standard_normal_cdf((xf - m + half) * inv_s)
        c_lo = approx_standard_normal_cdf((xf - m - half) * inv_s)
        log_hi = torch.log(c_hi.clamp_min(1e-12))
        log_one_minus_lo = torch.log((1.0 - c_lo).clamp_min(1e-12))
        log_mid = torch.log((c_hi - c_lo).clamp_min(1e-12))
        edge = 1.0 - 0.5 * half  # published: 0.999 for 256 levels
        out = torch.where(xf < -edge, log_hi, torch.where(xf > edge, log_one_minus_lo, log_mid))
        return out.sum(1)
    hi = torch.where(xf > 1 - half, torch.full_like(xf, math.inf), (xf - m + half) * inv_s)
    lo = torch.where(xf < -1 + half, torch.full_like(xf, -math.inf), (xf - m - half) * inv_s)
    return _log_diff_ndtr(hi, lo).sum(1)


def categorical_gaussian_log_likelihood(
    x: Tensor, mean: Tensor, log_scale: Tensor | float, levels: int, *, centres: str = "vdm"
) -> Tensor:
    """VDM's decoder: log-probability [B] (nats) of data on ``levels`` values under the categorical distribution
    ``p(k) ∝ N(mean; c_k, s^2)`` normalised over the levels' centres ``c_k`` (Kingma et al. 2021, ``EncDec``).

    Args:
        x: [B, *shape] data on the grid of ``centres``. mean: [B, *shape] the rescaled latent ``z_0 / alpha_0``.
        log_scale: log of ``s = sigma_0 / alpha_0`` (scalar). levels: number of values.
        centres: ``"vdm"``: ``c_k = 2 (k + 1/2) / levels - 1``; ``"grid"``: ``c_k = 2k / (levels - 1) - 1``.

    Memory: ``B * d * levels`` float64 numbers.
    """
    if centres not in ("vdm", "grid"):
        raise ValueError(f"centres must be 'vdm' or 'grid', got {centres!r}")
    xf = x.flatten(1).to(torch.float64)
    m = mean.flatten(1).to(torch.float64)
    k = torch.arange(levels, dtype=torch.float64, device=xf.device)
    c = 2 * (k + 0.5) / levels - 1 if centres == "vdm" else 2 * k / (levels - 1) - 1
    inv_s = float(math.exp(-float(log_scale)))
    idx = ((xf + 1) * levels / 2 - 0.5 if centres == "vdm" else (xf + 1) * (levels - 1) / 2).round().long()
    idx = idx.clamp(0, levels - 1)
    logits = -0.5 * ((m[..., None] - c) * inv_s).pow(2)  # [B, d, L]
    return (logits.gather(2, idx[..., None])[..., 0] - torch.logsumexp(logits, 2)).sum(1)
