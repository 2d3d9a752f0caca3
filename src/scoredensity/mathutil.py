"""Mathematics shared by the likelihood estimators and the samplers, written once (STYLE.md item 4).

* :func:`std_normal_logp`: the prior ``log N(x; 0, I)`` per example.
* :func:`reverse_drift` / :func:`reverse_drift_divergence`: the family of reverse-time processes with the
  model's marginals, ``dx = [f - (1 + eta^2)/2 g^2 s] dt + eta g dW`` (docs/design.md §3), written in log-SNR.
* :func:`make_probes` / :func:`divergence`: Hutchinson probes and the divergence of ``eps_fn`` (exact or
  estimated) by vector-Jacobian products.

**The reverse-time family in log-SNR.** With ``f = -x / (2(1-t))``, ``g^2 = 1/(1-t)``, ``s = -eps / sqrt(t)``
and ``dt = -t (1-t) dlam`` (``lam`` grows towards the data), the drift per unit of log-SNR is

    dx/dlam = t x / 2 - (1 + eta^2)/2 sqrt(t) eps(x, t),

and the noise ``eta g dW`` has variance ``eta^2 t |dlam|``. ``eta = 0`` is the probability-flow ODE,
``eta = 1`` the reverse SDE of Song et al. (DDIM's eta; *not* sdeflow-light's ``lmbd``, whose 1 is the ODE).
Both coefficients stay bounded over the whole line, unlike the canonical-time drift, which is singular at
``t = 1``. Its divergence is ``d t / 2 - (1 + eta^2)/2 sqrt(t) div eps``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import batch_expand

__all__ = [
    "std_normal_logp",
    "reverse_drift",
    "reverse_drift_divergence",
    "reverse_noise_std",
    "make_probes",
    "divergence",
    "PROBES",
]

PROBES = ("rademacher", "gaussian")
_LOG_2PI = math.log(2 * math.pi)


def std_normal_logp(x: Tensor) -> Tensor:
    """``log N(x; 0, I)`` per example: [B, *shape] -> [B] float64 nats."""
    xf = x.flatten(1).to(torch.float64)
    return -0.5 * (xf.shape[1] * _LOG_2PI + xf.pow(2).sum(1))


def reverse_drift(x: Tensor, eps: Tensor, lam: Tensor, eta: float = 0.0) -> Tensor:
    """Drift per unit of log-SNR of the reverse-time family: ``t x / 2 - (1 + eta^2)/2 sqrt(t) eps``.

    Args:
        x: [B, *shape] current state ``x_t``.
        eps: [B, *shape] the model's ``eps(x_t, t)``.
        lam: [B] log-SNR (float64); ``t = sigmoid(-lam)``.
        eta: 0 for the probability-flow ODE, 1 for the reverse SDE.

    Returns:
        [B, *shape] ``dx/dlam`` in ``x``'s dtype (integrate with increasing ``lam`` to go towards the data).
    """
    t = batch_expand(torch.sigmoid(-lam), x)
    out = 0.5 * t * x.to(torch.float64) - 0.5 * (1 + eta**2) * t.sqrt() * eps.to(torch.float64)
    return out.to(x.dtype)


def reverse_drift_divergence(div_eps: Tensor, lam: Tensor, dim: int, eta: float = 0.0) -> Tensor:
    """Divergence of :func:`reverse_drift` in ``x``: ``d t / 2 - (1 + eta^2)/2 sqrt(t) div eps`` ([B] float64)."""
    t = torch.sigmoid(-lam.to(torch.float64))
    return 0.5 * dim * t - 0.5 * (1 + eta**2) * t.sqrt() * div_eps.to(torch.float64)


def reverse_noise_std(lam_from: Tensor, lam_to: Tensor, eta: float) -> Tensor:
    """Standard deviation ``eta sqrt(∫ t dlam)`` of the family's noise over ``[lam_from, lam_to]`` (Euler-Maruyama
    uses ``t`` at the left end: ``eta sqrt(t |dlam|)``); [B] float64."""
    t = torch.sigmoid(-lam_from.to(torch.float64))
    return eta * (t * (lam_to - lam_from).abs()).sqrt()


def make_probes(like: Tensor, n: int, kind: str = "rademacher", generator: torch.Generator | None = None) -> Tensor:
    """``n`` Hutchinson probes per example, ``E[v v^T] = I``: [n, B, *shape] in ``like``'s dtype and device (drawn on
    the CPU from ``generator``, so a seed gives the same probes on any device).

    ``rademacher`` (entries ±1: the lowest variance for a fixed Jacobian, exact for a diagonal one) or
    ``gaussian`` (N(0, 1) entries).
    """
    if kind not in PROBES:
        raise ValueError(f"probe must be one of {PROBES} (or 'exact' where supported), got {kind!r}")
    if n < 1:
        raise ValueError(f"the number of probes must be >= 1, got {n}")
    shape = (n, *like.shape)
    if kind == "gaussian":
        v = torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        v = torch.randint(0, 2, shape, generator=generator, dtype=torch.int64) * 2 - 1
    return v.to(device=like.device, dtype=like.dtype)


def divergence(out: Tensor, y: Tensor, probes: Tensor | None = None, create_graph: bool = False) -> Tensor:
    """Divergence ``sum_i d out_i / d y_i`` per example by vector-Jacobian products through autograd.

    Args:
        out: [B, *shape] a function of ``y`` (per-example: row b depends on ``y[b]`` only).
        y: [B, *shape] with ``requires_grad``.
        probes: [n, B, *shape] Hutchinson probes (estimate ``mean_j v_j^T J v_j``, one vjp per probe), or
            ``None`` for the exact trace (``d`` vjps, one per coordinate: low dimension only).
        create_graph: keep the graph (to differentiate the result).

    Returns:
        [n, B] per-probe estimates (float64), or [1, B] for the exact trace.

    Raises:
        ValueError: when the function that made ``out`` wrote into its input after using it (autograd's
            version check), which would otherwise be a cryptic RuntimeError.
    """
    try:
        return _divergence(out, y, probes, create_graph)
    except RuntimeError as e:
        if "inplace" not in str(e):
            raise
        raise ValueError(
            "eps_fn modified its input x_t in place after using it, so its divergence cannot be computed; "
            "make eps_fn leave its inputs unchanged"
        ) from None


def _divergence(out: Tensor, y: Tensor, probes: Tensor | None, create_graph: bool) -> Tensor:
    """:func:`divergence` without the translation of autograd's in-place error."""
    d = y[0].numel()
    if probes is None:
        flat_out = out.flatten(1)
        cols = []
        for i in range(d):
            (g,) = torch.autograd.grad(flat_out[:, i].sum(), y, retain_graph=True, create_graph=create_graph)
            cols.append(g.flatten(1)[:, i])
        return torch.stack(cols, 1).to(torch.float64).sum(1, keepdim=True).T
    ests = []
    for v in probes:
        (g,) = torch.autograd.grad(out, y, grad_outputs=v.to(out.dtype), retain_graph=True, create_graph=create_graph)
        ests.append((g * v).flatten(1).to(torch.float64).sum(1))
    return torch.stack(ests)
