"""Samplers: the reverse-time family with the model's marginals, DDIM, DDPM ancestral, and the ODE by torchdiffeq.

All samplers are plain functions ``(eps_fn, noise, steps, *, options) -> samples``, where ``noise`` [N, *shape]
is the state at the noisy end (``N(0, I)``). They step in log-SNR ``lam`` (bounded coefficients over the
whole line, docs/design.md §1, :mod:`scoredensity.mathutil`) on a uniform grid from ``lam_min`` to ``lam_max``:

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
* :func:`ancestral_sample`: DDPM ancestral steps on a cosine log-SNR grid with a temperature ``tau`` multiplying
  the step noise (MAR's sampler, used by :class:`~scoredensity.apps.diffusion_loss.DiffusionLoss`), and
  :func:`gaussian_temperature_law`, its exact output law for a Gaussian target.

**What the temperature does.** Scaling the reverse-step noise does *not* sample ``p^(1/tau)``. For a Gaussian
target ``N(mu, S)`` and the exact denoiser every quantity is linear, and the moments obey (per eigen-direction
of ``S`` with variance ``v``; ``m(t) = (1-t) v + t`` is the true marginal variance)

* mean: ``E x`` is unchanged by ``tau`` (the posterior mean is consistent: ``A_k a_t + B_k = a_s``);
* variance, one ancestral step ``t -> s``: ``V_s = (A + B kappa_t)^2 V_t + tau^2 (P [+ B^2 v t / m(t)])``, with
  ``A, B, P`` the DDPM posterior coefficients, ``kappa_t = a_t v / m(t)`` the denoiser's gain and the bracket
  for the Tweedie step (:func:`gaussian_temperature_law` iterates this exactly for any grid);
* continuous-time limit (the reverse SDE ``dx = [f - g^2 s] dt + tau g dW``): ``dV/dt = a(t) V - tau^2/(1-t)``
  with ``a = (2 - m) / ((1-t) m)``, whose only solution that stays finite at ``t = 1`` is ``V(t) = tau^2 m(t)``
  (the general solution adds ``C m^2 / (1-t)``, and any finite start near ``t = 1`` forces ``C -> 0``).

So the sampler gives ``N(mu, tau^2 S)``: the standard deviation scales by ``tau``, which for a Gaussian is
``p^(1/tau^2)`` (not ``p^(1/tau)``, whose variance is ``tau S``). With Tweedie steps ``V = tau^2 m`` is preserved
by every step, so this holds exactly at any step count; with posterior steps only as the grid is refined (at
100 cosine steps and ``tau = 1`` the variance is already 5-23% short for ``v`` from 1 down to 0.01). For
non-Gaussian targets there is no closed form: low temperatures shrink each mode (and, through the drift, move
mass between modes in a path-dependent way).

``eta`` is DDIM's: 0 is the ODE, 1 the reverse SDE. It is *not* sdeflow-light's ``lmbd`` (whose 1 is the ODE).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .ddpm import reverse_variances
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
    "ancestral_sample",
    "cosine_lam_grid",
    "gaussian_temperature_law",
    "check_temperature",
    "ANCESTRAL_VARIANCES",
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
    max_step: float | None = 4.0,
) -> Tensor:
    """The probability-flow ODE ``dx/dlam = t x / 2 - sqrt(t) eps / 2`` integrated by torchdiffeq from ``lam_min``
    to ``lam_max`` (adaptive ``method`` with ``rtol``/``atol``, or a fixed rk4 grid of ``steps`` steps).

    ``generator`` is accepted for a uniform signature and unused (the map is deterministic). An adaptive solve that
    needs more than ``max_num_steps`` steps raises. No adaptive step is longer than ``max_step`` log-SNR units
    (``None``: no cap), as in :func:`scoredensity.ode.ode_log_likelihood`: the flow's features are about one
    log-SNR unit wide, and an uncapped solver can accept one long step over the flat noisy end whose stages miss
    them. The error norm is torchdiffeq's RMS over the batch (samples are judged in distribution, not one by one).

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
        max_step=max_step,
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
        variance: ``"fixed_large"`` (``sigma_k^2 = b_k``) or ``"fixed_small"`` (posterior variance), DDPM's reverse
            variances (:func:`scoredensity.ddpm.reverse_variances`). The last step (k = 1) adds no noise: the output
            is the mean ``x0_hat(x_1)``.
    """
    x = _check_noise(noise)
    sch = schedule if schedule is not None else DDPMSchedule.from_clock(VPLinearClock(), steps)
    beta, t = sch.betas, sch.times
    var, _ = reverse_variances(sch, variance)  # step k = 1 adds no noise, so its (clipped) variance is unused
    n = x.shape[0]
    xd = x.to(torch.float64)
    for k in range(sch.num_steps - 1, -1, -1):
        eps = call_eps(eps_fn, xd.to(x.dtype), t[k].expand(n).to(x.device)).to(torch.float64)
        xd = (xd - beta[k] / t[k].sqrt() * eps) / torch.sqrt(1 - beta[k])
        if k > 0:
            xd = xd + var[k].sqrt() * _randn_like(xd, generator)
    return xd.to(x.dtype)


# ---------------------------------------------------------------------------- ancestral sampling with temperature
def cosine_lam_grid(steps: int, lam_min: float = -20.0, lam_max: float = 20.0) -> Tensor:
    """Decreasing-noise grid of ``steps + 1`` log-SNRs from ``lam_min`` to ``lam_max`` (float64).

    Uniform in ``u`` for the cosine clock ``t = sin^2(pi u / 2)`` (``lam = -2 log tan(pi u / 2)``), cut to the
    range, so the steps are dense where the cosine schedule puts them (Nichol & Dhariwal 2021).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lam_max > lam_min:
        raise ValueError(f"need lam_max > lam_min, got [{lam_min}, {lam_max}]")
    u_hi = (2 / math.pi) * math.atan(math.exp(-lam_min / 2))
    u_lo = (2 / math.pi) * math.atan(math.exp(-lam_max / 2))
    u = torch.linspace(u_hi, u_lo, steps + 1, dtype=torch.float64)
    return -2 * torch.log(torch.tan(0.5 * math.pi * u))


def _step_coefficients(lam_t: Tensor, lam_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DDPM posterior ``q(x_s | x_t, x0) = N(A x_t + B x0, P)`` for ``s < t`` given by log-SNRs (float64).

    With ``a^2 = 1 - t``: ``A = (a_t / a_s) s / t``, ``B = a_s (t - s) / ((1 - s) t)``, ``P = (t - s) s / ((1 - s) t)``.
    """
    t, s = torch.sigmoid(-lam_t), torch.sigmoid(-lam_s)
    a_t, a_s = torch.sigmoid(lam_t).sqrt(), torch.sigmoid(lam_s).sqrt()
    one_m_s = torch.sigmoid(lam_s)
    diff = t - s
    return (a_t / a_s) * s / t, a_s * diff / (one_m_s * t), diff * s / (one_m_s * t)


ANCESTRAL_VARIANCES = ("posterior", "tweedie")
"""Step noises of :func:`ancestral_sample` (not DDPM's reverse variances, :data:`scoredensity.ddpm.VARIANCES`)."""


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float, checked finite and > 0 (one-line ``ValueError`` otherwise)."""
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return float(temperature)


def _tweedie_cov(eps_fn: EpsFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``eps`` [N, D] and the posterior covariance ``Cov[x0 | x_t] = t/(1-t) (I - sqrt(t) dEps/dx_t)`` [N, D, D]
    (second-order Tweedie), with the Jacobian by D vector-Jacobian products, symmetrised, eigenvalues clamped >= 0."""
    with torch.enable_grad():
        xg = x.detach().to(torch.float64).requires_grad_(True)
        eps = call_eps(eps_fn, xg, t).to(torch.float64)
        d = x.shape[1]
        rows = [torch.autograd.grad(eps[:, i].sum(), xg, retain_graph=i < d - 1)[0] for i in range(d)]
    jac = torch.stack(rows, 1)  # [N, D_out, D_in]
    jac = 0.5 * (jac + jac.transpose(1, 2))
    eye = torch.eye(d, dtype=torch.float64, device=x.device)
    one_m_t = 1 - t
    cov = (t / one_m_t)[:, None, None] * (eye - t.sqrt()[:, None, None] * jac)
    evals, evecs = torch.linalg.eigh(cov)
    cov = (evecs * evals.clamp_min(0)[:, None, :]) @ evecs.transpose(1, 2)
    return eps.detach(), cov


def ancestral_sample(
    eps_fn: EpsFn,
    shape: tuple[int, ...],
    *,
    steps: int = 100,
    temperature: float = 1.0,
    variance: str = "posterior",
    lam_min: float = -20.0,
    lam_max: float = 20.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """DDPM ancestral sampling with temperature, in canonical time (Li & Yan 2024, §4.4; MAR's sampler).

    Starts from ``N(0, I)`` at ``lam_min``, steps along :func:`cosine_lam_grid` with
    ``x_s = A x_t + B x0_hat + tau * noise`` and returns ``x0_hat`` at the last node (no noise there).

    ``variance="posterior"`` (DDPM's ``fixed_small``, MAR): noise ``N(0, P I)``, the posterior given ``x0``. It
    ignores the uncertainty of ``x0_hat``, so coarse grids lose variance (measured for a Gaussian with the exact
    denoiser: at 100 cosine steps 0.95 of the variance for unit variance, 0.77 for variance 0.01; see
    :func:`gaussian_temperature_law`). ``"tweedie"``: noise ``N(0, P I + B^2 Cov[x0 | x_t])`` with the posterior
    covariance from the denoiser's Jacobian (second-order Tweedie; D extra vector-Jacobian products per step,
    for flat tokens ``[N, D]``): every step is then the exact transition for a Gaussian target, at any step count.

    Args:
        eps_fn: ``(x_t [N, *shape], t [N] float64) -> eps``.
        shape: ``(N, *per-example shape)`` of the output.
        steps: grid intervals (model calls = steps + 1). temperature: ``tau > 0`` multiplying the reverse-step
            noise (see the module docstring for the law it gives). variance: as above.
        lam_min, lam_max: grid ends. generator: a CPU generator for reproducible noise (drawn on the CPU, so
            results do not depend on the device). device: where ``eps_fn`` runs (default CPU).

    Returns:
        [N, *shape] samples in ``dtype`` on ``device``.
    """
    tau = check_temperature(temperature)
    if variance not in ANCESTRAL_VARIANCES:
        raise ValueError(f"variance must be one of {ANCESTRAL_VARIANCES}, got {variance!r}")
    if variance == "tweedie" and len(shape) != 2:
        raise ValueError(f"variance='tweedie' needs flat tokens, shape (N, D); got {tuple(shape)}")
    grid = cosine_lam_grid(steps, lam_min, lam_max).to(device)
    n = shape[0]
    bshape = (n,) + (1,) * (len(shape) - 1)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
    for k in range(steps):
        lam_t = grid[k].expand(n)
        t = torch.sigmoid(-lam_t)
        a, b, p = (v.reshape(bshape) for v in _step_coefficients(lam_t, grid[k + 1].expand(n)))
        noise = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
        if variance == "tweedie":
            eps, cov0 = _tweedie_cov(eps_fn, x, t)
            eye = torch.eye(shape[1], dtype=torch.float64, device=x.device)
            cov = p[:, :, None] * eye + b[:, :, None] ** 2 * cov0
            evals, evecs = torch.linalg.eigh(cov)
            noise = torch.einsum("nij,nj->ni", evecs * evals.clamp_min(0).sqrt()[:, None, :], noise)
        else:
            eps = call_eps(eps_fn, x.to(dtype), t).to(torch.float64)
            noise = p.sqrt() * noise
        x0 = (x - t.sqrt().reshape(bshape) * eps) / torch.sigmoid(lam_t).sqrt().reshape(bshape)
        x = a * x + b * x0 + tau * noise
    t = torch.sigmoid(-grid[-1]).expand(n)
    eps = call_eps(eps_fn, x.to(dtype), t).to(torch.float64)
    x0 = (x - t.sqrt().reshape(bshape) * eps) / torch.sigmoid(grid[-1]).sqrt()
    return x0.to(dtype)


def gaussian_temperature_law(
    mean: Tensor,
    cov: Tensor,
    temperature: float,
    *,
    steps: int = 100,
    variance: str = "posterior",
    lam_min: float = -20.0,
    lam_max: float = 20.0,
) -> tuple[Tensor, Tensor]:
    """Exact law of :func:`ancestral_sample` with the exact denoiser of ``N(mean, cov)`` (linear moment equations).

    Every step is linear in ``x_t`` and Gaussian, so the output is ``N(m_out, U diag(V_out) U^T)`` in the
    eigenbasis ``cov = U diag(v) U^T``, with ``V_s = (A + B kappa_t)^2 V_t + tau^2 (P + [B^2 v t / m(t)])``
    (the bracket for ``variance="tweedie"`` only) and the mean independent of ``tau``. As ``steps -> inf`` both
    variances tend to ``N(mean, temperature^2 cov)``; with ``"tweedie"`` and ``tau = 1`` the law is
    ``N(mean, cov)`` at any step count.

    Args:
        mean: [D]. cov: [D, D] symmetric positive definite. temperature: ``tau > 0``. The rest as in
            :func:`ancestral_sample`.

    Returns:
        ``(mean [D], cov [D, D])`` float64.
    """
    tau = check_temperature(temperature)
    if variance not in ANCESTRAL_VARIANCES:
        raise ValueError(f"variance must be one of {ANCESTRAL_VARIANCES}, got {variance!r}")
    mean = torch.as_tensor(mean, dtype=torch.float64)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    v, u = torch.linalg.eigh(cov)
    mu = u.T @ mean  # eigen-coordinates
    grid = cosine_lam_grid(steps, lam_min, lam_max)
    m = torch.zeros_like(mu)  # the sampler starts at N(0, I)
    var = torch.ones_like(v)

    def gain(lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = torch.sigmoid(lam).sqrt()
        marg = a**2 * v + torch.sigmoid(-lam)
        return a * v / marg, a, v * torch.sigmoid(-lam) / marg  # kappa, a_t, Var[x0 | x_t]

    for k in range(steps):
        kap, a_t, post = gain(grid[k])
        ca, cb, cp = _step_coefficients(grid[k], grid[k + 1])
        m = ca * m + cb * (mu + kap * (m - a_t * mu))
        noise_var = cp + (cb**2 * post if variance == "tweedie" else 0.0)
        var = (ca + cb * kap) ** 2 * var + tau**2 * noise_var
    kap, a_t, _ = gain(grid[-1])
    m = mu + kap * (m - a_t * mu)
    var = kap**2 * var
    return u @ m, (u * var) @ u.T


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
