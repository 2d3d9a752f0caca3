"""Samplers: the reverse-time family with the model's marginals, DDIM, DDPM ancestral, and the ODE by torchdiffeq.

All samplers are plain functions ``(eps_fn, noise, steps, *, options) -> samples``, where ``noise`` [N, *shape]
is the state at the noisy end (``N(0, I)``). They step in log-SNR ``lam`` (bounded coefficients over the
whole line, DESIGN.md §1, :mod:`scoredensity.mathutil`) on a uniform grid from ``lam_min`` to ``lam_max``:

* :func:`sample_ddim`: the exponential-integrator (DDIM) step of the family ``dx = [f - (1+eta^2)/2 g^2 s] dt
  + eta g dW``: exact in the linear part, ``x0_hat`` held fixed over the step (Song, Meng & Ermon 2021). ``eta = 0``
  is deterministic DDIM (the probability-flow ODE), ``eta = 1`` the ancestral step (the reverse SDE).
* :func:`sample_euler_maruyama`: plain Euler-Maruyama on the same family in log-SNR (reference). Measured on
  ring8 (docs/benchmarks.md): with ``eta = 1`` it needs about 4x the steps of :func:`sample_ddim` for a similar
  error; with ``eta = 0`` the two first-order steps are comparable (Euler slightly better on ring8, DDIM better on
  a narrow Gaussian's spread).
* :func:`sample_ode`: the probability-flow ODE integrated by torchdiffeq (adaptive dopri5 or a fixed grid).
* :func:`sample_ddpm`: DDPM ancestral sampling on a :class:`~scoredensity.schedules.DDPMSchedule`
  (by default ``abar_k = abar(k/T)`` of the VP-linear clock with ``T = steps``).

``eta`` is DDIM's: 0 is the ODE, 1 the reverse SDE. It is *not* sdeflow-light's ``lmbd`` (whose 1 is the ODE).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .epsfn import EpsFn, call_eps
from .mathutil import reverse_drift, reverse_noise_std
from .ode import solve_ode
from .schedules import DDPMSchedule, VPLinearClock

__all__ = [
    "sample",
    "sample_ddim",
    "sample_euler_maruyama",
    "sample_ode",
    "sample_ddpm",
    "logsnr_grid",
    "SAMPLERS",
    "SAMPLER_LAM_RANGE",
]

SAMPLERS = ("ddim", "euler_maruyama", "ode", "ddpm")
SAMPLER_LAM_RANGE = (-15.0, 15.0)


def logsnr_grid(steps: int, lam_min: float = SAMPLER_LAM_RANGE[0], lam_max: float = SAMPLER_LAM_RANGE[1]) -> Tensor:
    """Uniform log-SNR grid from ``lam_min`` (noisy end) to ``lam_max`` (clean end): [steps + 1] float64."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (math.isfinite(lam_min) and math.isfinite(lam_max)) or not lam_max > lam_min:
        raise ValueError(f"need finite lam_min < lam_max, got [{lam_min}, {lam_max}]")
    return torch.linspace(lam_min, lam_max, steps + 1, dtype=torch.float64)


def _check_noise(noise: Tensor) -> Tensor:
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.dim() < 2:
        raise ValueError("noise must be a floating tensor [N, *shape]")
    if not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or Inf")
    return noise


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal draws shaped like ``x``, drawn on the CPU from ``generator`` and moved to ``x``'s device."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float64).to(device=x.device, dtype=x.dtype)


def _reverse_family_loop(
    noise: Tensor,
    steps: int,
    eta: float,
    generator: torch.Generator | None,
    lam_min: float,
    lam_max: float,
    step: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
) -> Tensor:
    """The loop shared by the first-order samplers of the reverse-time family on a uniform log-SNR grid.

    ``step(x, lam_s, lam_t)`` maps the float64 state [N, *shape] at ``lam_s`` to the mean [N, *shape] and the
    standard deviation (a float64 scalar) of the state at ``lam_t``; the noise is drawn from ``generator`` only
    when ``eta > 0``. Returns the state at ``lam_max`` in ``noise``'s dtype.
    """
    x = _check_noise(noise)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    grid = logsnr_grid(steps, lam_min, lam_max)
    xd = x.to(torch.float64)
    for lam_s, lam_t in zip(grid[:-1], grid[1:], strict=True):
        xd, std = step(xd, lam_s, lam_t)
        if eta > 0:
            xd = xd + std * _randn_like(xd, generator)
    return xd.to(x.dtype)


@torch.no_grad()
def sample_ddim(
    eps_fn: EpsFn,
    noise: Tensor,
    steps: int = 50,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    lam_min: float = SAMPLER_LAM_RANGE[0],
    lam_max: float = SAMPLER_LAM_RANGE[1],
) -> Tensor:
    """DDIM / exponential-integrator steps of the reverse-time family on a uniform log-SNR grid.

    From ``lam_s`` to ``lam_t > lam_s`` with ``alpha = sqrt(sigmoid(lam))``, ``sigma = sqrt(sigmoid(-lam))``:
    ``x0 = (x - sigma_s eps) / alpha_s``, ``c = eta sigma_t sqrt(1 - exp(lam_s - lam_t))`` (``eta`` times the
    forward posterior's standard deviation), ``x <- alpha_t x0 + sqrt(sigma_t^2 - c^2) eps + c z``.

    Args:
        noise: [N, *shape] starting state at ``lam_min`` (standard normal draws).
        steps: number of steps (= calls of ``eps_fn``).
        eta: 0 deterministic (probability-flow ODE), 1 ancestral (reverse SDE); values in between interpolate.

    Returns:
        [N, *shape] samples at ``lam_max`` in ``noise``'s dtype.
    """

    def step(xd: Tensor, lam_s: Tensor, lam_t: Tensor) -> tuple[Tensor, Tensor]:
        t_s = torch.sigmoid(-lam_s).expand(xd.shape[0]).to(xd.device)
        eps = call_eps(eps_fn, xd.to(noise.dtype), t_s).to(torch.float64)
        a_s, s_s = torch.sigmoid(lam_s).sqrt(), torch.sigmoid(-lam_s).sqrt()
        a_t, s_t = torch.sigmoid(lam_t).sqrt(), torch.sigmoid(-lam_t).sqrt()
        x0 = (xd - s_s * eps) / a_s
        c = eta * s_t * torch.sqrt(-torch.expm1(lam_s - lam_t))
        c = torch.minimum(c, s_t)  # eta > 1 cannot exceed the total noise budget
        return a_t * x0 + torch.sqrt(s_t**2 - c**2) * eps, c

    return _reverse_family_loop(noise, steps, eta, generator, lam_min, lam_max, step)


@torch.no_grad()
def sample_euler_maruyama(
    eps_fn: EpsFn,
    noise: Tensor,
    steps: int = 200,
    *,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    lam_min: float = SAMPLER_LAM_RANGE[0],
    lam_max: float = SAMPLER_LAM_RANGE[1],
) -> Tensor:
    """Euler-Maruyama on ``dx = b_eta(x, lam) dlam + eta sqrt(t) dW_lam`` (the reverse-time family in log-SNR,
    :func:`scoredensity.mathutil.reverse_drift`), on a uniform log-SNR grid.

    Args:
        noise: [N, *shape] starting state at ``lam_min``. steps: number of steps (= calls of ``eps_fn``).
        eta: 1 the reverse SDE (default), 0 Euler on the probability-flow ODE.

    Returns:
        [N, *shape] samples at ``lam_max``.
    """

    def step(xd: Tensor, lam_s: Tensor, lam_t: Tensor) -> tuple[Tensor, Tensor]:
        lam_b = lam_s.expand(xd.shape[0]).to(xd.device)
        eps = call_eps(eps_fn, xd.to(noise.dtype), torch.sigmoid(-lam_b))
        return xd + reverse_drift(xd, eps, lam_b, eta) * (lam_t - lam_s), reverse_noise_std(lam_s, lam_t, eta)

    return _reverse_family_loop(noise, steps, eta, generator, lam_min, lam_max, step)


@torch.no_grad()
def sample_ode(
    eps_fn: EpsFn,
    noise: Tensor,
    steps: int | None = None,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    method: str = "dopri5",
    lam_min: float = SAMPLER_LAM_RANGE[0],
    lam_max: float = SAMPLER_LAM_RANGE[1],
    generator: torch.Generator | None = None,
    max_num_steps: int = 10_000,
) -> Tensor:
    """The probability-flow ODE ``dx/dlam = t x / 2 - sqrt(t) eps / 2`` integrated by torchdiffeq from ``lam_min``
    to ``lam_max`` (adaptive ``method`` with ``rtol``/``atol``, or a fixed rk4 grid of ``steps`` steps).

    ``generator`` is accepted for a uniform signature and unused (the map is deterministic). An adaptive solve that
    needs more than ``max_num_steps`` steps raises.

    Raises:
        scoredensity.ode.ODESolverError: the adaptive solver failed; the message names the tolerance.
    """
    x = _check_noise(noise)
    n = x.shape[0]

    def func(lam: Tensor, y: Tensor) -> Tensor:
        lam_b = lam.to(torch.float64).clamp(lam_min, lam_max).expand(n)
        eps = call_eps(eps_fn, y.to(x.dtype), torch.sigmoid(-lam_b))
        return reverse_drift(y, eps, lam_b, eta=0.0)

    y = solve_ode(
        func,
        x.to(torch.float64),
        (lam_min, lam_max),
        rtol=rtol,
        atol=atol,
        method=method,
        steps=steps,
        max_num_steps=max_num_steps,
    )
    return y.to(x.dtype)


@torch.no_grad()
def sample_ddpm(
    eps_fn: EpsFn,
    noise: Tensor,
    steps: int = 1000,
    *,
    schedule: DDPMSchedule | None = None,
    variance: str = "fixed_large",
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDPM ancestral sampling ``x_{k-1} = (x_k - b_k / sqrt(t_k) eps) / sqrt(a_k) + sigma_k z`` (Ho et al. 2020).

    Args:
        noise: [N, *shape] the state ``x_T``.
        steps: ``T`` when ``schedule`` is None: ``DDPMSchedule.from_clock(VPLinearClock(), steps)``.
        schedule: a :class:`DDPMSchedule`; the model is called at ``t_k = 1 - abar_k``.
        variance: ``"fixed_large"`` (``sigma_k^2 = b_k``) or ``"fixed_small"`` (posterior variance).
            The last step (k = 1) adds no noise: the output is the mean ``x0_hat(x_1)``.
    """
    x = _check_noise(noise)
    if variance not in ("fixed_large", "fixed_small"):
        raise ValueError(f"variance must be 'fixed_large' or 'fixed_small', got {variance!r}")
    sch = schedule if schedule is not None else DDPMSchedule.from_clock(VPLinearClock(), steps)
    beta, t = sch.betas, sch.times
    t_prev = torch.cat([t.new_zeros(1), t[:-1]])
    var = beta if variance == "fixed_large" else beta * t_prev / t
    n = x.shape[0]
    xd = x.to(torch.float64)
    for k in range(sch.num_steps - 1, -1, -1):
        eps = call_eps(eps_fn, xd.to(x.dtype), t[k].expand(n).to(x.device)).to(torch.float64)
        xd = (xd - beta[k] / t[k].sqrt() * eps) / torch.sqrt(1 - beta[k])
        if k > 0:
            xd = xd + var[k].sqrt() * _randn_like(xd, generator)
    return xd.to(x.dtype)


def sample(
    eps_fn: EpsFn,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float | None = None,
    generator: torch.Generator | None = None,
    lam_min: float = SAMPLER_LAM_RANGE[0],
    lam_max: float = SAMPLER_LAM_RANGE[1],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    noise: Tensor | None = None,
    **options,
) -> Tensor:
    """Draw samples [N, *shape] from the model ``eps_fn`` with the named sampler.

    Args:
        shape: ``(N, *shape)`` of the output.
        sampler: ``"ddim"`` (default; exponential integrator, 50 steps, ``eta=0``), ``"euler_maruyama"``
            (200 steps, ``eta=1``), ``"ode"`` (torchdiffeq; adaptive unless ``steps``), ``"ddpm"`` (ancestral,
            1000 steps of the VP-linear clock).
        steps: number of steps (sampler's default if None).
        eta: 0 the probability-flow ODE, 1 the reverse SDE (``ddim``, ``euler_maruyama`` only).
        generator: seeds the starting noise and the sampler's noise.
        lam_min, lam_max: log-SNR range for the log-SNR samplers (default [-15, 15]).
        dtype, device: of the fresh starting noise (drawn on the CPU from ``generator``, then moved); the
            sampler runs on the noise's device.
        noise: starting state instead of fresh standard normal draws.
        options: passed to the sampler (``rtol``, ``atol``, ``method`` for ``ode``; ``schedule``, ``variance``
            for ``ddpm``).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if noise is None:
        if len(shape) < 2 or any(int(s) < 1 for s in shape):
            raise ValueError(f"shape must be (N, *shape) with positive sizes, got {tuple(shape)}")
        noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    if eta is not None and sampler in ("ode", "ddpm"):
        raise ValueError(f"eta does not apply to sampler {sampler!r} (use 'ddim' or 'euler_maruyama')")
    if options and sampler in ("ddim", "euler_maruyama"):
        raise ValueError(f"sampler {sampler!r} takes no options {sorted(options)}")
    if sampler == "ddim":
        return sample_ddim(
            eps_fn, noise, 50 if steps is None else steps, eta=0.0 if eta is None else eta, generator=generator,
            lam_min=lam_min, lam_max=lam_max,
        )  # fmt: skip
    if sampler == "euler_maruyama":
        return sample_euler_maruyama(
            eps_fn, noise, 200 if steps is None else steps, eta=1.0 if eta is None else eta, generator=generator,
            lam_min=lam_min, lam_max=lam_max,
        )  # fmt: skip
    if sampler == "ode":
        return sample_ode(eps_fn, noise, steps, lam_min=lam_min, lam_max=lam_max, **options)
    return sample_ddpm(eps_fn, noise, 1000 if steps is None else steps, generator=generator, **options)
