"""Exact log-likelihood of the probability-flow ODE model by the instantaneous change of variables.

The ODE model maps ``N(0, I)`` at the noisy end through the probability-flow ODE (the ``eta = 0`` member of
the reverse-time family, :func:`scoredensity.mathutil.reverse_drift`). In log-SNR ``lam`` its velocity is

    v(y, lam) = t y / 2 - sqrt(t) eps(y, t) / 2,      div v = d t / 2 - sqrt(t) div eps / 2,

bounded on the whole line (in canonical time the drift is singular at ``t = 1``). Integrating from the data
at ``lam_max`` down to ``lam_min`` with ``dc/dlam = div v``, ``c(lam_max) = 0``, gives (FFJORD; Song et al. 2021)

    log p^ODE(x) = log N(y(lam_min); 0, I) + c(lam_min).

The data sit at ``lam_max`` (``t_min = sigmoid(-lam_max) ≈ 2e-9`` by default), so the flow between ``t_min``
and ``t = 0`` is dropped (an O(e^{-lam_max}) change); the prior ``N(0, I)`` is placed at ``lam_min``, where the
true marginal is ``N(alpha m, alpha^2 S + t I)`` with ``alpha = e^{lam_min / 2}`` to first order: the model's mean is
off by about ``alpha S^{1/2} m`` (5e-5 |m| at ``lam_min = -20``), an error of order 1e-4 nats for data of unit
scale. (The density formula closes its noisy end with the exact KL given x, so its truncation error is only
O(e^{lam_min}).) Take ``lam_min = -30`` for a tighter prior: the adaptive solver crosses the flat noisy region in a
few steps.

Cost accounting: ``nfe`` counts forward calls of ``eps_fn`` per example (one per solver stage); the trace
adds, per call, ``d`` vector-Jacobian products (exact) or ``n_probes`` (Hutchinson): ``info["vjp"]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchdiffeq import odeint

from .epsfn import EpsFn, call_eps, check_data
from .formula import example_generator
from .logdensity import LogDensity
from .mathutil import PROBES, divergence, make_probes, reverse_drift, reverse_drift_divergence, std_normal_logp

__all__ = ["ode_log_likelihood", "ODESolverError", "ADAPTIVE_METHODS", "FIXED_METHODS"]

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_METHODS = ("euler", "midpoint", "rk4", "heun3")


class ODESolverError(RuntimeError):
    """The ODE solver did not converge; the message names the tolerance to relax."""


def solve_ode(func, y0, lam_span: tuple[float, float], *, rtol, atol, method, steps, max_num_steps):
    """Integrate ``dy/dlam = func(lam, y)`` over ``lam_span`` with torchdiffeq, returning the final state.

    Adaptive ``method`` unless ``steps`` is given (then a fixed uniform grid of ``steps`` steps, the same
    number of calls for every input: required under torchrun). Raises :class:`ODESolverError` naming
    ``rtol``/``atol`` when an adaptive solve exceeds ``max_num_steps`` or its step size underflows.
    """
    lo, hi = lam_span
    dev = (y0[0] if isinstance(y0, tuple) else y0).device
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if method not in FIXED_METHODS:
            method = "rk4"
        grid = torch.linspace(lo, hi, steps + 1, dtype=torch.float64, device=dev)
        sol = odeint(func, y0, grid, method=method)
        return tuple(s[-1] for s in sol) if isinstance(sol, tuple) else sol[-1]
    if method not in ADAPTIVE_METHODS:
        raise ValueError(f"method must be one of {ADAPTIVE_METHODS} (or {FIXED_METHODS} with steps=N), got {method!r}")
    span = torch.tensor([lo, hi], dtype=torch.float64, device=dev)
    try:
        sol = odeint(func, y0, span, rtol=rtol, atol=atol, method=method, options={"max_num_steps": max_num_steps})
    except AssertionError as e:  # torchdiffeq signals both failures by assertions
        raise ODESolverError(
            f"ODE solver {method!r} failed ({e}) with rtol={rtol:g}, atol={atol:g}: relax the tolerance "
            f"(larger rtol/atol), raise max_num_steps={max_num_steps}, or use a fixed grid (steps=N)"
        ) from None
    return tuple(s[-1] for s in sol) if isinstance(sol, tuple) else sol[-1]


def ode_log_likelihood(
    eps_fn: EpsFn,
    x: Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    trace: str = "exact",
    probe: str = "rademacher",
    n_probes: int = 1,
    seed: int = 0,
    lam_min: float = -20.0,
    lam_max: float = 20.0,
    steps: int | None = None,
    max_num_steps: int = 10_000,
    example_ids: Tensor | None = None,
) -> LogDensity:
    """Log-likelihood of ``x`` under the probability-flow ODE model of ``eps_fn`` (nats per example).

    Exact for the ODE model up to the solver tolerance (and the Hutchinson noise with ``trace="hutchinson"``);
    equal to ``log p_0`` for the exact ``eps``. Not a bound: for a learned ``eps`` the ODE model and the
    reverse-SDE model whose ELBO the density formula gives are different models.

    Args:
        eps_fn: noise predictor ``eps_fn(x_t [B, *shape], t [B] float64)``, differentiable in ``x_t``.
        x: [B, *shape] data.
        rtol, atol: tolerances of the adaptive solver (error norm over the whole batch state, torchdiffeq).
        method: ``"dopri5"`` (default) or another torchdiffeq adaptive method; with ``steps`` a fixed-grid
            method (``"rk4"`` if an adaptive name is given).
        trace: ``"exact"`` (``d`` vjps per call: small d) or ``"hutchinson"`` (``n_probes`` vjps per call).
        probe: Hutchinson probe, ``"rademacher"`` or ``"gaussian"``; probes are fixed along the trajectory.
        n_probes: probes per example; each gets its own accumulator, so ``stderr`` is their standard error
            (NaN with one probe: no estimate of the trace noise is available). With few probes that standard
            error is itself noisy (z-scores follow a Student t with ``n_probes - 1`` degrees of freedom; in
            d = 2 Rademacher probes take two values, so it can even be 0): use >= 8 probes for error bars.
        seed: seeds the probes (keyed by example index).
        lam_min, lam_max: the prior sits at ``lam_min``, the data at ``lam_max``.
        steps: fixed uniform grid in log-SNR with this many steps (identical call counts on every process).
        max_num_steps: cap of the adaptive solver; exceeding it raises :class:`ODESolverError`.
        example_ids: [B] integer keys of the examples' probes (default ``0..B-1``; pass global indices when
            evaluating in batches or shards). The adaptive step size is shared by the batch, so only fixed-grid
            results (``steps=``) are exactly independent of the batching.

    ``x`` may live on any device (``eps_fn`` is called there); the result is on the CPU.

    Returns:
        :class:`LogDensity` with terms ``prior`` (``log N(y(lam_min); 0, I)``) and ``flow`` (``c(lam_min)``);
        ``nfe`` = forward ``eps_fn`` calls per example, ``info["vjp"]`` the vector-Jacobian products.

    Raises:
        ODESolverError: the adaptive solver failed; the message names rtol/atol.
    """
    x = check_data(x)
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
    if trace == "hutchinson" and probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    if not (math.isfinite(lam_min) and math.isfinite(lam_max)) or not lam_max > lam_min:
        raise ValueError(f"need finite lam_min < lam_max, got [{lam_min}, {lam_max}]")
    b, d = x.shape[0], x[0].numel()
    keys = torch.arange(b) if example_ids is None else torch.as_tensor(example_ids).long().flatten().cpu()
    if keys.shape != (b,):
        raise ValueError(f"example_ids must have one entry per example ({b}), got shape {tuple(keys.shape)}")
    probes = None
    if trace == "hutchinson":
        probes = torch.stack(
            [
                make_probes(x[i : i + 1], n_probes, probe, example_generator(seed, int(k), 3))[:, 0]
                for i, k in enumerate(keys.tolist())
            ],
            dim=1,
        ).to(torch.float64)  # [n, B, *shape]
    n_acc = 1 if probes is None else n_probes
    calls = [0]

    def func(lam: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        y, _ = state
        # torchdiffeq's initial-step probe may look past the range (where t rounds to 1): clamp
        lam_b = lam.to(torch.float64).clamp(lam_min, lam_max).expand(b)
        t = torch.sigmoid(-lam_b)
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            eps = call_eps(eps_fn, y_.to(x.dtype), t)
            div_eps = divergence(eps, y_, probes)  # [n_acc, B]
        calls[0] += 1
        dy = reverse_drift(y, eps.detach(), lam_b, eta=0.0)
        dc = reverse_drift_divergence(div_eps, lam_b, d, eta=0.0)
        return dy, dc

    y0 = x.detach().to(torch.float64)
    c0 = torch.zeros(n_acc, b, dtype=torch.float64, device=x.device)
    y_end, c_end = solve_ode(
        func,
        (y0, c0),
        (lam_max, lam_min),
        rtol=rtol,
        atol=atol,
        method=method,
        steps=steps,
        max_num_steps=max_num_steps,
    )
    prior = std_normal_logp(y_end).cpu()
    c_end = c_end.cpu()
    flow = c_end.mean(0)
    if n_acc > 1:
        stderr = c_end.std(0) / math.sqrt(n_acc)
    elif probes is not None:
        stderr = torch.full((b,), float("nan"), dtype=torch.float64)
    else:
        stderr = torch.zeros(b, dtype=torch.float64)
    nfe = float(calls[0])
    vjp = nfe * (d if probes is None else n_probes)
    return LogDensity(
        logp=prior + flow,
        stderr=stderr,
        nfe=nfe,
        dim=d,
        terms={"prior": prior, "flow": flow},
        method=f"ode-{trace}",
        info={
            "lam_min": lam_min,
            "lam_max": lam_max,
            "rtol": rtol,
            "atol": atol,
            "method": method if steps is None else (method if method in FIXED_METHODS else "rk4"),
            "steps": steps,
            "trace": trace,
            "probe": probe if probes is not None else None,
            "n_probes": n_probes if probes is not None else 0,
            "seed": seed,
            "vjp": vjp,
            "cost": nfe + vjp,
        },
    )
