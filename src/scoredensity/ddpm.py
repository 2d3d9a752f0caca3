"""The discrete DDPM evidence lower bound ``-(L_T + sum_{k>=2} L_{k-1} + L_0)`` of a T-step model (Ho et al. 2020).

The model is read through canonical time (docs/design.md §1, §3): step ``k`` (1-based) of a
:class:`~scoredensity.schedules.DDPMSchedule` sits at ``t_k = 1 - abar_k``, so ``x_k = sqrt(abar_k) x + sqrt(t_k) z``
and the network is called as ``eps_fn(x_k, t_k)``. With ``a_k = 1 - b_k`` and ``t_0 = 0``:

* predicted data ``x0_hat = (x_k - sqrt(t_k) eps) / sqrt(abar_k)``, optionally clipped to [-1, 1]
  (``clip_denoised``, as the published evaluations do); the reverse mean is the forward posterior's mean with
  ``x0_hat`` in place of ``x``: ``mu_k = c1_k x0_hat + c2_k x_k``, ``c1_k = b_k sqrt(abar_{k-1}) / t_k``,
  ``c2_k = sqrt(a_k) t_{k-1} / t_k``. So ``||mu~_k - mu_k||^2 = c1_k^2 ||x - x0_hat||^2``, which without
  clipping is ``b_k^2 / (a_k t_k) ||z - eps||^2``;
* reverse variance ``sigma_k^2`` (:func:`reverse_variances`): ``fixed_large`` = ``b_k`` (the KL weight on
  ``||z - eps||^2`` is ``b_k / (2 a_k t_k)``, a Riemann sum of ``dt / (2 t (1-t))``: Li & Yan 2024, §4.1) or
  ``fixed_small`` = ``sigma~_k^2 = b_k t_{k-1} / t_k`` (weight ``b_k / (2 a_k t_{k-1})``, a gap of about
  ``0.289 d`` nats remains as ``T -> inf``, docs/design.md §3);
* the **KL terms** ``L_{k-1} = KL(N(mu~_k, sigma~_k^2) || N(mu_k, sigma_k^2))`` for ``k >= 2`` split into a
  model-free constant ``d/2 (r_k - 1 - log r_k)``, ``r_k = sigma~_k^2 / sigma_k^2``, summed exactly, and the
  model's part ``c1_k^2 ||x - x0_hat||^2 / (2 sigma_k^2)``, estimated (:func:`kl_constants`, :func:`kl_weights`);
* the **prior term** ``L_T = KL(q(x_T | x) || N(0, I))`` (:func:`scoredensity.decoders.prior_kl`);
* the **decoder term** ``L_0 = -log p(x | x_1)`` with mean ``mu_1 = x0_hat(x_1)`` (:func:`decoder_log_likelihood`):
  discretised Gaussian for data on a grid, Gaussian density for continuous data;
* learned variances (``learned_range`` / ``learned``, improved-diffusion): ``sigma_k^2`` per element from the
  model's variance channels; every ``L_{k-1}`` is then the model's (element-wise Gaussian KL) and the decoder uses
  the model's variance at step 1.

Published conventions (Ho et al.'s and improved-diffusion's ``calc_bpd_loop``: decoder variance ``sigma~_2^2``,
clipped ``x0_hat``, tanh CDF) are named in :mod:`scoredensity.conventions` and selected with ``convention=``.

Estimating the sum (``n_steps_sampled``):

* ``None``: every step ``k = 2..T`` with ``n_z`` draws of ``z`` each (default 2); the standard error is the
  unbiased per-step variance ``sum_k w_k^2 s_k^2 / n_z``. With ``n_z = 1`` no unbiased estimate exists (the
  old pooling of adjacent steps was 2-4x too large): the standard error is then NaN.
* ``m``: ``m`` steps per example drawn by stratified importance sampling from a proposal ``q(k)`` over
  ``k = 2..T`` (default :meth:`StepProposal.analytic`, ``q ∝`` the expected model part for ``N(0, I)`` data; or
  :func:`fit_step_proposal`: a pilot measures its RMS per band of steps; either mixed with 10% uniform, which
  bounds the weights), two or more draws per stratum, so the estimator
  ``(1/n_s) sum_j mean_j f(k)/q(k)`` is unbiased and its variance has the unbiased estimate
  ``(1/n_s^2) sum_j s_j^2 / n_j``. Uniformly sampled steps (``step_proposal="uniform"``) are heavy-tailed: a few
  small-k steps carry most of the sum. Measured with 50 steps per image on a trained digits U-Net (T = 1000,
  16 images, 17 levels): per-image standard error 2.29 / 0.096 / 0.156 bits/dim (uniform / analytic / pilot,
  fixed_large) and 5.23 / 0.108 / 0.233 (fixed_small); on a 12-d exact Gaussian the analytic proposal's
  per-example z-scores have spread 1.04-1.14 where uniform steps give 3.6-4.0.

Randomness goes through :mod:`scoredensity.rng` (streams ``DDPM_NOISE``, ``DDPM_STEPS``, ``DDPM_PILOT``,
``DECODER_NOISE``) keyed by example id and draw number, generated on ``x``'s device: results do not depend on
batch, chunk or shard boundaries, and a test can rebuild the exact ``z`` of every term ("matched noise").

``norm_z`` (unbiased control variate): ``||z - eps||^2 - c_k (||z||^2 - d)`` in place of ``||z - eps||^2`` (the
model's part of each KL term and the Gaussian decoder), with a fixed coefficient per step
(:func:`norm_z_coefficients`): ``False`` 0, ``True`` 1, ``"snr"`` (default) ``(1 - t_k)^2``. Measured
(benchmarks/norm_z.py, docs/bench_norm_z.md, per-example variance relative to ``False``): ``"snr"`` 0.02-0.22 with
exact Gaussian scores, 0.22-0.55 with a random-weight U-Net, 0.26 / 0.15 (fixed_large / fixed_small) with a
trained digits U-Net at its T = 1000, but 2.2 / 2.1 with that U-Net on every 10th step (T = 100), where ``False``
is best and ``True`` costs 5.8 / 3.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import rng
from .conventions import Convention, get_convention
from .decoders import CDFS, discretized_gaussian_log_likelihood, prior_kl
from .epsfn import EpsFn, autocast_context, call_eps, check_data, check_int, resolve_max_batch
from .logdensity import LogDensity
from .schedules import DDPMSchedule

__all__ = [
    "ddpm_elbo",
    "reverse_variances",
    "kl_constants",
    "kl_weights",
    "decoder_log_likelihood",
    "fit_step_proposal",
    "StepProposal",
    "step_noise",
    "NOISE_BLOCK",
    "discretized_gaussian_log_likelihood",
    "VARIANCES",
    "LEARNED_VARIANCES",
    "DECODERS",
    "DECODER_VARIANCES",
]

VARIANCES = ("fixed_large", "fixed_small")
LEARNED_VARIANCES = ("learned_range", "learned")
"""Reverse variances read from the model's variance channels (``eps_fn.eps_and_log_variance``)."""
DECODERS = ("gaussian", "discretized")
DECODER_VARIANCES = ("model", "beta", "posterior")
_LOG_2PI = math.log(2 * math.pi)
NOISE_BLOCK = 16  # draws generated per call of the keyed generator (fixed: the bits must not depend on batching)
_SELECT = 1 << 32  # rng step counter of the pilot's step choice (its noise uses draw numbers 0, 1, ...)
_DEFENSIVE = 0.1  # uniform share of a fitted step proposal (bounds the importance weights by 10 (T - 1))


# ---------------------------------------------------------------------------------------------- the paper's terms
def reverse_variances(schedule: DDPMSchedule, variance: str, decoder_variance: str = "model") -> tuple[Tensor, Tensor]:
    """Reverse-process variances ``sigma_k^2`` and forward-posterior variances ``sigma~_k^2`` for steps ``k = 1..T``.

    Args:
        schedule: the T-step schedule.
        variance: ``"fixed_large"`` (``sigma_k^2 = b_k``) or ``"fixed_small"`` (``sigma_k^2 = sigma~_k^2 =
            b_k t_{k-1} / t_k``; at ``k = 1``, where ``sigma~_1^2 = 0``, the clipped ``sigma~_2^2`` as the published
            code's ``posterior_log_variance_clipped``).
        decoder_variance: the decoder's (step 1) variance: ``"model"`` (that of ``variance``), ``"beta"``
            (``b_1``) or ``"posterior"`` (``sigma~_2^2``: the published ``fixed_large`` decoder variance,
            ``np.append(posterior_variance[1], betas[1:])`` in Ho et al.'s and improved-diffusion's code).

    Returns:
        ``(model_var [T], post_var [T])`` float64; ``post_var[0] = 0``.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if decoder_variance not in DECODER_VARIANCES:
        raise ValueError(f"decoder_variance must be one of {DECODER_VARIANCES}, got {decoder_variance!r}")
    beta = schedule.betas
    t = schedule.times
    big_t = len(beta)
    t_prev = torch.cat([t.new_zeros(1), t[:-1]])
    post_var = beta * t_prev / t  # sigma~_k^2 (0 at k = 1)
    post_2 = post_var[1] if big_t > 1 else beta[0]
    if variance == "fixed_large":
        model_var = beta.clone()
    else:
        model_var = post_var.clone()
        model_var[0] = post_2  # clipped, as the published code does
    if decoder_variance == "beta":
        model_var[0] = beta[0]
    elif decoder_variance == "posterior":
        model_var[0] = post_2
    return model_var, post_var


def posterior_mean_coefficients(schedule: DDPMSchedule) -> tuple[Tensor, Tensor]:
    """``(c1 [T], c2 [T])`` of the forward posterior mean ``mu~_k = c1_k x + c2_k x_k`` (float64)."""
    beta, t = schedule.betas, schedule.times
    t_prev = torch.cat([t.new_zeros(1), t[:-1]])
    abar_prev = torch.exp(torch.cat([t.new_zeros(1), schedule.log_alphas_cumprod[:-1]]))
    return beta * abar_prev.sqrt() / t, (1 - beta).sqrt() * t_prev / t


def kl_constants(model_var: Tensor, post_var: Tensor, d: int) -> Tensor:
    """Model-free part of ``L_{k-1}``, ``d/2 (r_k - 1 - log r_k)`` with ``r_k = sigma~_k^2 / sigma_k^2`` [T]
    (nats; entry 0, the decoder step, is 0)."""
    r = post_var / model_var
    out = 0.5 * d * (r - 1 - torch.log(r.clamp_min(1e-300)))
    out[0] = 0.0
    return out


def kl_weights(schedule: DDPMSchedule, model_var: Tensor) -> Tensor:
    """Weight ``c1_k^2 / (2 sigma_k^2)`` [T] of ``||x - x0_hat||^2`` in ``L_{k-1}`` (entry 0 unused)."""
    c1, _ = posterior_mean_coefficients(schedule)
    return c1.pow(2) / (2 * model_var)


def decoder_log_likelihood(
    x: Tensor, x0_hat: Tensor, variance: Tensor, decoder: str, levels: int, cdf: str = "exact"
) -> Tensor:
    """``-L_0 = log p(x | x_1)`` per row [N] (nats), mean ``x0_hat`` and variance ``sigma_1^2``.

    Args:
        x: [N, *shape] data. x0_hat: [N, *shape] decoder mean (the model's clipped or raw ``x0_hat(x_1)``).
        variance: scalar ``sigma_1^2``. decoder: ``"gaussian"`` (density) or ``"discretized"`` (bin masses).
        levels: data levels of the discretised decoder. cdf: ``"exact"`` or ``"tanh"``.
    """
    if decoder == "discretized":
        return discretized_gaussian_log_likelihood(x, x0_hat, 0.5 * torch.log(variance), levels, cdf=cdf)
    diff = (x.flatten(1).to(torch.float64) - x0_hat.flatten(1).to(torch.float64)).pow(2).sum(1)
    d = x[0].numel()
    return -0.5 * (d * (_LOG_2PI + torch.log(variance)) + diff / variance)


NORM_Z = (False, True, "snr")


def norm_z_coefficients(schedule: DDPMSchedule, norm_z: bool | str) -> Tensor:
    """Coefficients ``c_k`` [T] of the control variate ``c_k (||z||^2 - d)`` subtracted from ``||z - eps||^2``.

    ``False``: 0; ``True``: 1 (``norm_z`` of the density formula); ``"snr"``: ``(1 - t_k)^2``, the
    variance-optimal coefficient ``Cov(||z - eps||^2, ||z||^2) / Var(||z||^2)`` for data ``N(0, I)`` with its
    exact ``eps`` (1 at high SNR where ``eps`` is unrelated to ``z``, 0 at low SNR where ``eps ≈ z``). Any fixed
    coefficient keeps the estimator unbiased.
    """
    if norm_z is True or norm_z is False:
        return torch.full_like(schedule.times, float(norm_z))
    if norm_z == "snr":
        return (1 - schedule.times).pow(2)
    raise ValueError(f"norm_z must be one of {NORM_Z}, got {norm_z!r}")


# ---------------------------------------------------------------------------------------------- step proposal
@dataclass(frozen=True)
class StepProposal:
    """A distribution ``q`` over the KL steps ``k = 2..T`` (0-based indices ``1..T-1``) for importance sampling.

    Attributes:
        probs: [T - 1] float64 probabilities (positive, sum 1) of steps ``k = 2..T``.
        kind: ``"uniform"``, ``"analytic"``, ``"pilot"`` or ``"given"``.
    """

    probs: Tensor
    kind: str = "given"

    def __post_init__(self):
        p = torch.as_tensor(self.probs, dtype=torch.float64).flatten().cpu()
        if len(p) == 0 or (p <= 0).any() or not torch.isfinite(p).all():
            raise ValueError("a step proposal needs positive finite probabilities for every step k = 2..T")
        object.__setattr__(self, "probs", p / p.sum())

    @classmethod
    def uniform(cls, num_steps: int) -> StepProposal:
        """Uniform over ``k = 2..T``."""
        return cls(torch.full((num_steps - 1,), 1.0 / (num_steps - 1), dtype=torch.float64), "uniform")

    @classmethod
    def analytic(cls, schedule: DDPMSchedule, variance: str, decoder_variance: str = "model") -> StepProposal:
        """No pilot, independent of the data: ``q(k) ∝ w_k t_k``, the expected model part of ``L_{k-1}`` when the
        data are ``N(0, I)`` and ``eps`` is exact (``E||x - x0_hat||^2 = d t_k``), mixed with 10% uniform."""
        model_var, _ = reverse_variances(schedule, variance, decoder_variance)
        f = (kl_weights(schedule, model_var) * schedule.times)[1:]
        big_t = schedule.num_steps
        return cls((1 - _DEFENSIVE) * f / f.sum() + _DEFENSIVE / (big_t - 1), "analytic")

    def sample(self, u: Tensor) -> Tensor:
        """0-based step indices (``1..T-1``) at uniforms ``u`` (inverse CDF; any shape)."""
        cdf = torch.cumsum(self.probs.to(u.device), 0)
        idx = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=len(self.probs) - 1)
        return idx + 1


def _band_edges(num_kl: int, n_bands: int) -> Tensor:
    """Edges [n+1] of bands of 0-based KL indices ``0..num_kl-1``, geometric in ``k`` (fine at small k)."""
    e = torch.unique(torch.round(torch.logspace(0, math.log10(num_kl + 1), n_bands + 1, dtype=torch.float64)) - 1)
    e = e.long().clamp(0, num_kl)
    e[0], e[-1] = 0, num_kl
    return torch.unique(e)


# ---------------------------------------------------------------------------------------------- the estimator
@dataclass
class _Setup:
    """Everything a row evaluation needs, on the compute device (float64)."""

    eps_fn: EpsFn
    x: Tensor  # [B, *shape] data as given
    x64: Tensor  # [B, *shape] float64
    keys: Tensor  # [B] int64 example keys
    cond: Tensor | None
    sqrt_abar: Tensor  # [T]
    sqrt_t: Tensor  # [T]
    t: Tensor  # [T] canonical times
    weights: Tensor  # [T] c1^2 / (2 sigma^2)
    clip: bool
    learned: bool  # reverse variance from the model's variance channels
    post_lv: Tensor  # [T] log of the clipped posterior variance (sigma~_1^2 -> sigma~_2^2)
    c1: Tensor  # [T] posterior-mean coefficient of x
    cv: Tensor  # [T] coefficient of the ||z||^2 - d control variate per step (0: off)
    precision: str
    max_batch: int
    seed: int


def _step_rows(s: _Setup, ex: Tensor, k: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """For rows (example ``ex`` [N], 0-based step ``k`` [N], noise ``z`` [N, *shape] float64): the model's part of
    the step and ``x0_hat``.

    Fixed variances: ``sq`` = ``||x - x0_hat||^2`` less the control variate ``c_k t_k / abar_k (||z||^2 - d)``
    (:func:`norm_z_coefficients`), to be multiplied by :func:`kl_weights`. Learned variances: ``sq`` is the whole
    ``L_{k-1}`` (element-wise Gaussian KL with the model's log-variance ``lv``), returned with ``lv``.

    Returns ``(sq [N], x0_hat [N, *shape], lv [N, *shape] or None)`` float64.
    """
    bshape = (-1,) + (1,) * (s.x.dim() - 1)
    x0 = s.x64[ex]
    a, sd = s.sqrt_abar[k].reshape(bshape), s.sqrt_t[k].reshape(bshape)
    xk = a * x0 + sd * z
    extra = () if s.cond is None else (s.cond[ex],)
    lv = None
    if s.learned:
        with autocast_context(s.precision, s.x.device):
            eps, lv = s.eps_fn.eps_and_log_variance(xk.to(s.x.dtype), s.t[k], *extra)
        eps, lv = eps.to(torch.float64), lv.to(torch.float64)
    else:
        eps = call_eps(s.eps_fn, xk.to(s.x.dtype), s.t[k], *extra, precision=s.precision).to(torch.float64)
    x0_hat = (xk - sd * eps) / a
    if s.clip:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    if s.learned:  # KL(N(mu~, sigma~^2) || N(mu, e^lv)) element-wise, mu~ - mu = c1 (x - x0_hat)
        plv = s.post_lv[k].reshape(bshape)
        diff2 = (s.c1[k].reshape(bshape) * (x0 - x0_hat)).pow(2)
        kl = 0.5 * (-1.0 + lv - plv + torch.exp(plv - lv) + diff2 * torch.exp(-lv))
        return kl.flatten(1).sum(1), x0_hat, lv
    if s.clip:
        sq = (x0 - x0_hat).flatten(1).pow(2).sum(1)
    else:  # x - x0_hat = -sqrt(t_k / abar_k) (z - eps), without cancellation
        sq = (sd / a).flatten().pow(2) * (z - eps).flatten(1).pow(2).sum(1)
    d = z[0].numel()  # the control variate is unbiased: E ||z||^2 = d, and c_k does not depend on z
    sq = sq - s.cv[k] * (sd / a).flatten().pow(2) * (z.flatten(1).pow(2).sum(1) - d)
    return sq, x0_hat, None


def step_noise(
    seed: int,
    stream: int,
    keys: Tensor,
    shape: tuple[int, ...],
    draw: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """The standard normals [len(keys), *shape] float64 of draw number ``draw`` (the matched noise of a term).

    Draws come in fixed blocks of :data:`NOISE_BLOCK`: draw ``j`` is entry ``j % NOISE_BLOCK`` of
    ``rng.normals(seed, stream, keys, (NOISE_BLOCK, *shape), step=j // NOISE_BLOCK)``, so one generator call serves
    a block of draws and every draw is a pure function of ``(seed, stream, key, j)``. In :func:`ddpm_elbo` the
    KL terms use ``Stream.DDPM_NOISE`` with ``j = i * n_z + r`` for the ``r``-th draw of its ``i``-th step (all
    steps: step ``k = 2 + i``), the decoder ``Stream.DECODER_NOISE`` with ``j = r``.
    """
    blk = rng.normals(seed, stream, keys, (NOISE_BLOCK, *shape), step=draw // NOISE_BLOCK, device=device)
    return blk[:, draw % NOISE_BLOCK]


class _Noise:
    """Block cache of :func:`step_noise` for a fixed set of examples (draws requested in increasing order)."""

    def __init__(self, s: _Setup, stream: rng.Stream, ex: Tensor):
        self.s, self.stream, self.keys = s, stream, s.keys[ex]
        self.block, self.cache = -1, None

    def __call__(self, draw: int) -> Tensor:
        if draw // NOISE_BLOCK != self.block:
            self.block = draw // NOISE_BLOCK
            shape = (NOISE_BLOCK, *self.s.x.shape[1:])
            dev = self.s.x.device
            self.cache = rng.normals(self.s.seed, self.stream, self.keys, shape, step=self.block, device=dev).to(dev)
        return self.cache[:, draw % NOISE_BLOCK]


def _example_block(s: _Setup) -> int:
    """Examples handled together: their cached noise block (``NOISE_BLOCK`` draws each) stays within ``max_batch``
    rows, the memory a network call is sized for."""
    return min(s.x.shape[0], max(1, s.max_batch // NOISE_BLOCK))


def _evaluate(s: _Setup, k_of: Callable[[int], Tensor], n_draws: int, stream: rng.Stream) -> Tensor:
    """Model part ``w_k ||x - x0_hat||^2`` of every (example, draw) [B, n_draws]: draw ``j`` of every example sits
    at 0-based step ``k_of(j)`` [B] with the noise ``step_noise(..., stream, j)``. Rows go to the network
    ``max_batch`` at a time (no loop over examples)."""
    b = s.x.shape[0]
    out = torch.empty(b, n_draws, dtype=torch.float64, device=s.x.device)
    ex_all = torch.arange(b, device=s.x.device)
    eb = _example_block(s)
    for e0 in range(0, b, eb):
        ex = ex_all[e0 : e0 + eb]
        noise = _Noise(s, stream, ex)
        per_call = max(1, s.max_batch // len(ex))
        for j0 in range(0, n_draws, per_call):
            js = range(j0, min(j0 + per_call, n_draws))
            rows_ex = ex.repeat(len(js))
            rows_k = torch.cat([k_of(j)[ex] for j in js])
            z = torch.cat([noise(j) for j in js])
            sq, _, _ = _step_rows(s, rows_ex, rows_k, z)
            out[ex, j0 : j0 + len(js)] = (s.weights[rows_k] * sq).reshape(len(js), -1).T
    return out


def _decoder_term(
    s: _Setup, draws: int, variance: Tensor, decoder: str, levels: int, cdf: str
) -> tuple[Tensor, Tensor]:
    """``-L_0`` per example and its variance [B], from ``draws`` draws of ``x_1`` (stream ``DECODER_NOISE``)."""
    b = s.x.shape[0]
    vals = torch.empty(b, draws, dtype=torch.float64, device=s.x.device)
    ex_all = torch.arange(b, device=s.x.device)
    d = s.x[0].numel()
    for e0 in range(0, b, _example_block(s)):
        ex = ex_all[e0 : e0 + _example_block(s)]
        noise = _Noise(s, rng.Stream.DECODER_NOISE, ex)
        per_call = max(1, s.max_batch // len(ex))
        for j0 in range(0, draws, per_call):
            js = range(j0, min(j0 + per_call, draws))
            rows_ex = ex.repeat(len(js))
            z = torch.cat([noise(j) for j in js])
            sq, x0_hat, lv = _step_rows(s, rows_ex, torch.zeros_like(rows_ex), z)
            if lv is not None:  # the model's own decoder variance, element-wise
                xr = s.x64[rows_ex]
                if decoder == "gaussian":
                    v = -0.5 * (_LOG_2PI + lv + (xr - x0_hat).pow(2) * torch.exp(-lv)).flatten(1).sum(1)
                else:
                    v = discretized_gaussian_log_likelihood(xr, x0_hat, 0.5 * lv, levels, cdf=cdf)
            elif decoder == "gaussian":  # the quadratic is ||x - x0_hat||^2 (norm_z-corrected)
                v = -0.5 * (d * (_LOG_2PI + torch.log(variance)) + sq / variance)
            else:
                v = decoder_log_likelihood(s.x64[rows_ex], x0_hat, variance, decoder, levels, cdf)
            vals[ex, j0 : j0 + len(js)] = v.reshape(len(js), -1).T
    return vals.mean(1), vals.var(1) / draws


@torch.inference_mode()
def fit_step_proposal(
    eps_fn: EpsFn,
    x: Tensor,
    *,
    schedule: DDPMSchedule,
    variance: str = "fixed_large",
    decoder_variance: str = "model",
    clip_denoised: bool = False,
    norm_z: bool | str = False,
    seed: int = 0,
    pilot_examples: int = 8,
    pilot_steps: int = 64,
    n_bands: int = 24,
    cond: Tensor | None = None,
    precision: str = "fp32",
    max_batch: int | None = None,
) -> tuple[StepProposal, int]:
    """Fit an importance proposal over the KL steps from a pilot (stream ``DDPM_PILOT``).

    ``pilot_steps`` stratified-uniform steps on each of up to ``pilot_examples`` evenly spaced examples measure the
    model's part ``w_k ||x - x0_hat||^2`` of the KL terms; the proposal is proportional to its root mean square in
    ``n_bands`` bands of steps geometric in ``k`` (the variance-optimal density for a noisy summand is
    ``∝ sqrt(E f_k^2)``), uniform inside a band, mixed with 10% of the uniform proposal. Pass the result to
    :func:`ddpm_elbo` (``step_proposal=``) to use one proposal for a whole data set.

    Returns:
        ``(proposal, calls)``: the :class:`StepProposal` and the ``eps_fn`` calls spent.
    """
    x = check_data(x)
    big_t = schedule.num_steps
    if big_t < 2:
        raise ValueError("a step proposal needs T >= 2")
    pick = torch.linspace(0, x.shape[0] - 1, min(x.shape[0], pilot_examples)).round().long().unique()
    xs = x[pick.to(x.device)]
    s = _setup(
        eps_fn,
        xs,
        pick,
        schedule,
        variance,
        decoder_variance,
        clip_denoised,
        norm_z,
        seed,
        cond,
        precision,
        max_batch,
        rows_per_example=pilot_steps,
    )
    if cond is not None:
        s.cond = cond[pick.to(cond.device)]
    u = rng.uniforms(seed, rng.Stream.DDPM_PILOT, s.keys, pilot_steps, step=_SELECT, device=x.device).to(x.device)
    strata = torch.arange(pilot_steps, dtype=torch.float64, device=x.device)
    ks = 1 + ((strata + u) / pilot_steps * (big_t - 1)).floor().long().clamp(max=big_t - 2)  # [m, pilot_steps]
    f = _evaluate(s, lambda j: ks[:, j], pilot_steps, rng.Stream.DDPM_PILOT)
    edges = _band_edges(big_t - 1, n_bands).to(x.device)
    band = torch.bucketize(ks.flatten() - 1, edges[1:-1], right=True)
    ms = torch.zeros(len(edges) - 1, dtype=torch.float64, device=x.device).index_add_(0, band, f.flatten().pow(2))
    cnt = torch.zeros_like(ms).index_add_(0, band, torch.ones_like(f.flatten()))
    rms = (ms / cnt.clamp_min(1)).sqrt()
    filled = cnt > 0
    if not filled.any() or float(rms[filled].max()) <= 0:
        return StepProposal.uniform(big_t), f.numel()
    rms[~filled] = rms[filled].max()  # an unseen band keeps a generous share
    widths = (edges[1:] - edges[:-1]).to(torch.float64)
    per_step = torch.repeat_interleave(rms, widths.long())  # density per step within its band
    per_step = per_step.clamp_min(1e-12 * float(per_step.max()))
    probs = (1 - _DEFENSIVE) * per_step / per_step.sum() + _DEFENSIVE / (big_t - 1)
    return StepProposal(probs.cpu(), "pilot"), f.numel()


def _setup(
    eps_fn,
    x,
    keys,
    sch,
    variance,
    decoder_variance,
    clip,
    norm_z,
    seed,
    cond,
    precision,
    max_batch,
    rows_per_example=1,
    chunk_size=None,
) -> _Setup:
    dev = x.device
    learned = variance in LEARNED_VARIANCES
    if learned and not callable(getattr(eps_fn, "eps_and_log_variance", None)):
        raise ValueError(
            f"variance={variance!r} needs a model with variance channels (eps_fn.eps_and_log_variance, e.g. a "
            f"DiffusersEps of a learned-variance scheduler)"
        )
    model_var, post_var = reverse_variances(sch, "fixed_small" if learned else variance, decoder_variance)
    post_clipped = post_var.clone()
    post_clipped[0] = post_var[1] if len(post_var) > 1 else sch.betas[0]
    c1, _ = posterior_mean_coefficients(sch)
    weights = torch.ones_like(model_var) if learned else kl_weights(sch, model_var)
    return _Setup(
        eps_fn=eps_fn,
        x=x,
        x64=x.to(torch.float64),
        keys=torch.as_tensor(keys, dtype=torch.int64).to(dev),
        cond=cond,
        sqrt_abar=torch.exp(0.5 * sch.log_alphas_cumprod).to(dev),
        sqrt_t=sch.times.sqrt().to(dev),
        t=sch.times.to(dev),
        weights=weights.to(dev),
        clip=clip,
        learned=learned,
        post_lv=torch.log(post_clipped).to(dev),
        c1=c1.to(dev),
        cv=(torch.zeros_like(c1) if learned else norm_z_coefficients(sch, norm_z)).to(dev),
        precision=precision,
        max_batch=resolve_max_batch(max_batch, x[0].numel(), chunk_size),
        seed=seed,
    )


def _schedule(betas: Tensor | None, schedule: DDPMSchedule | None, alphas_cumprod: Tensor | None) -> DDPMSchedule:
    if sum(v is not None for v in (betas, schedule, alphas_cumprod)) > 1:
        raise ValueError("give one of betas, alphas_cumprod or schedule, not both")
    if schedule is not None:
        if not isinstance(schedule, DDPMSchedule):
            raise TypeError(f"schedule must be a DDPMSchedule, got {type(schedule).__name__}")
        return schedule
    if alphas_cumprod is not None:
        return DDPMSchedule(alphas_cumprod=alphas_cumprod)
    return DDPMSchedule(betas)


def _resolve_choices(convention, variance, decoder_variance, clip_denoised, cdf, decoder, levels) -> dict:
    """The bound's choices: explicit arguments, else the convention's, else this library's defaults."""
    conv: Convention | None = None if convention is None else get_convention(convention)
    if conv is not None and conv.variance is None:
        raise ValueError(
            f"convention {conv.name!r} is a continuous-time convention ({conv.estimator}); ddpm_elbo evaluates the "
            f"discrete ones: ddpm, improved-diffusion, scoredensity"
        )
    base = {
        "variance": "fixed_large" if conv is None else conv.variance,
        "decoder_variance": "model" if conv is None else conv.decoder_variance,
        "clip_denoised": False if conv is None else conv.clip_denoised,
        "cdf": "exact" if conv is None else conv.cdf,
        "decoder": "gaussian" if conv is None else ("gaussian" if conv.clean_end == "gaussian" else "discretized"),
        "levels": 256 if conv is None else conv.levels,
    }
    given = {
        "variance": variance,
        "decoder_variance": decoder_variance,
        "clip_denoised": clip_denoised,
        "cdf": cdf,
        "decoder": decoder,
        "levels": levels,
    }
    changed = {k: v for k, v in given.items() if v is not None and v != base[k]}
    out = {**base, **{k: v for k, v in given.items() if v is not None}}
    name = "scoredensity" if conv is None else conv.name
    if conv is not None and changed:
        name += "+" + ",".join(f"{k}={v}" for k, v in sorted(changed.items()))
    out["convention"] = name
    return out


def ddpm_elbo(
    eps_fn: EpsFn,
    x: Tensor,
    *,
    betas: Tensor | None = None,
    schedule: DDPMSchedule | None = None,
    alphas_cumprod: Tensor | None = None,
    convention: str | Convention | None = None,
    variance: str | None = None,
    decoder: str | None = None,
    levels: int | None = None,
    decoder_variance: str | None = None,
    clip_denoised: bool | None = None,
    cdf: str | None = None,
    n_steps_sampled: int | None = None,
    step_proposal: str | StepProposal | Tensor = "analytic",
    n_z: int | None = None,
    decoder_draws: int = 8,
    norm_z: bool | str = "snr",
    seed: int = 0,
    example_ids: Tensor | None = None,
    cond: Tensor | None = None,
    precision: str = "fp32",
    max_batch: int | None = None,
    progress: bool = False,
    pilot_examples: int = 8,
    pilot_steps: int = 64,
    chunk_size: int | None = None,
) -> LogDensity:
    """DDPM's ELBO ``-(L_T + sum L_{k-1} + L_0)`` per example in nats (see the module docstring).

    It bounds the log-likelihood of the T-step DDPM chain (with the chosen reverse variance and decoder),
    not ``log p_0``: with the exact ``eps`` its gap to ``log p_0`` has no fixed sign and, for ``fixed_large``
    with ``abar_k = abar(k/T)`` from one clock, shrinks roughly like ``1/T``.

    Args:
        eps_fn: noise predictor in canonical time.
        x: [B, *shape] data (in [-1, 1] for the discretised decoder); computed on ``x``'s device.
        betas: [T] betas, or
        schedule: a :class:`DDPMSchedule` (e.g. ``DDPMSchedule.from_clock(VPLinearClock(), T)``).
            Or ``alphas_cumprod``: [T] ``abar_k`` (diffusers' name). None of them: DDPM's linear 1e-4..0.02, T = 1000.
        convention: a discrete :class:`~scoredensity.conventions.Convention` or its name (``"ddpm"``,
            ``"improved-diffusion"``, ``"scoredensity"``): sets ``variance``, ``decoder_variance``,
            ``clip_denoised``, ``cdf``, ``decoder`` and ``levels``; explicit arguments override it (the result's
            ``info["convention"]`` then lists the change). ``None``: this library's defaults below.
        variance: ``"fixed_large"`` (default, ``sigma_k^2 = b_k``), ``"fixed_small"`` (posterior variance), or
            ``"learned_range"`` / ``"learned"``: the model's own variance per element, read with
            ``eps_fn.eps_and_log_variance(x_t, t)`` (:class:`~scoredensity.adapters.DiffusersEps` of a
            learned-variance model); then ``decoder_variance`` and ``norm_z`` do not apply.
        decoder: ``"gaussian"`` (default; continuous data: ``log N(x; mu_1, sigma_1^2)``) or ``"discretized"``
            (data on ``levels`` levels scaled to [-1, 1]; no dequantisation needed).
        levels: levels of the discretised decoder (default 256).
        decoder_variance: ``"model"`` (default: the step-1 variance of ``variance``: ``b_1`` for
            ``fixed_large``, the clipped ``sigma~_2^2`` for ``fixed_small``), ``"beta"`` (``b_1``) or
            ``"posterior"`` (``sigma~_2^2``, the published ``fixed_large`` decoder).
        clip_denoised: clip ``x0_hat`` to [-1, 1] before forming every reverse mean (default False).
        cdf: the discretised decoder's normal CDF, ``"exact"`` (default) or ``"tanh"`` (published approximation).
        n_steps_sampled: ``None`` (default) sums all ``T - 1`` KL terms; an integer ``m >= 4`` samples ``m`` steps
            per example by stratified importance sampling (module docstring).
        step_proposal: with ``n_steps_sampled``: ``"analytic"`` (default; :meth:`StepProposal.analytic`, no pilot,
            independent of the batch), ``"pilot"`` (:func:`fit_step_proposal` on this batch: its results then depend
            on the batch), ``"uniform"`` (heavy-tailed, for comparison), a :class:`StepProposal` or [T-1]
            probabilities of steps ``2..T`` (fit once per data set with :func:`fit_step_proposal`).
        n_z: noise draws per step: default 2 when all steps are summed (needed for an unbiased standard error;
            with 1 the standard error is NaN), 1 with sampled steps.
        decoder_draws: draws of z for the decoder step (>= 2, gives its standard error).
        norm_z: the ``c_k (||z||^2 - d)`` control variate: ``False``, ``True`` or ``"snr"`` (default; unbiased
            for every choice; measurements in the module docstring).
        seed: key of all randomness. example_ids: [B] integer keys of the examples (default ``0..B-1``); pass
            global indices when a data set is evaluated in batches or shards.
        cond: [B, ...] row-aligned condition passed to ``eps_fn(x_t, t, cond)``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: autocast of the network only (sums in float64).
        max_batch: rows per network call (default from a memory budget). chunk_size: deprecated alias.
        progress: unused (kept for the shared estimator vocabulary).
        pilot_examples, pilot_steps: size of the pilot of ``step_proposal="pilot"``.

    Returns:
        :class:`LogDensity` (on the CPU) with terms ``prior`` (``-L_T``), ``diffusion`` (``-sum L_{k-1}``),
        ``decoder`` (``-L_0``); ``info`` names the convention and every choice.
    """
    del progress
    x = check_data(x)
    sch = _schedule(betas, schedule, alphas_cumprod)
    ch = _resolve_choices(convention, variance, decoder_variance, clip_denoised, cdf, decoder, levels)
    variance, decoder, levels = ch["variance"], ch["decoder"], ch["levels"]
    if variance not in VARIANCES + LEARNED_VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES + LEARNED_VARIANCES}, got {variance!r}")
    learned = variance in LEARNED_VARIANCES
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if ch["cdf"] not in CDFS:
        raise ValueError(f"cdf must be one of {CDFS}, got {ch['cdf']!r}")
    if ch["decoder_variance"] not in DECODER_VARIANCES:
        raise ValueError(f"decoder_variance must be one of {DECODER_VARIANCES}, got {ch['decoder_variance']!r}")
    check_int("levels", levels, 2)
    if decoder == "discretized" or ch["clip_denoised"]:
        out = (x.abs() > 1 + 1e-6).flatten(1).any(1)
        if out.any():
            what = "the discretised decoder" if decoder == "discretized" else "clip_denoised"
            raise ValueError(f"{what} needs data in [-1, 1]; rows {out.nonzero().flatten()[:10].tolist()}")
    n_steps_sampled = check_int("n_steps_sampled", n_steps_sampled, 2, allow_none=True)
    if n_z is None:
        n_z = 2 if n_steps_sampled is None else 1
    n_z = check_int("n_z", n_z, 1)
    decoder_draws = check_int("decoder_draws", decoder_draws, 2)
    b, d = x.shape[0], x[0].numel()
    T = sch.num_steps
    if float(sch.times[-1]) >= 1.0 or float(sch.betas.max()) >= 1.0:
        raise ValueError(
            "the DDPM ELBO is undefined for a zero-terminal-SNR schedule (b_T = 1, t_T = 1: the last reverse mean "
            "divides by sqrt(1 - b_T) = 0); clip the betas below 1 (e.g. 0.999) or use the density formula"
        )
    if n_steps_sampled is not None and n_steps_sampled < 4:
        raise ValueError(f"n_steps_sampled must be None or >= 4 (two strata of two draws), got {n_steps_sampled}")
    keys = rng.example_keys(example_ids, b, x.device).to(x.device)
    if cond is not None and cond.shape[0] != b:
        raise ValueError(f"cond must have one row per example ({b}), got shape {tuple(cond.shape)}")
    model_var, post_var = reverse_variances(sch, "fixed_small" if learned else variance, ch["decoder_variance"])
    consts = kl_constants(model_var, post_var, d)  # [T], model-free part, summed exactly
    if learned:  # the whole KL is the model's
        consts = torch.zeros_like(consts)
    with torch.inference_mode():
        s = _setup(
            eps_fn,
            x,
            keys,
            sch,
            variance,
            ch["decoder_variance"],
            ch["clip_denoised"],
            norm_z,
            seed,
            cond,
            precision,
            max_batch,
            chunk_size=chunk_size,
        )
        dec, dec_var = _decoder_term(s, decoder_draws, model_var[0].to(x.device), decoder, levels, ch["cdf"])
        pilot_calls = 0
        proposal_kind = None
        if T < 2:
            diffusion = torch.zeros(b, dtype=torch.float64, device=x.device)
            diff_var = torch.zeros_like(diffusion)
            calls = 0
        elif n_steps_sampled is None:
            diffusion, diff_var = _kl_sum_all(s, T, n_z)
            diffusion = diffusion - float(consts[1:].sum())
            calls = n_z * (T - 1)
        else:
            prop, pilot_calls = _resolve_proposal(
                step_proposal,
                s,
                x,
                sch,
                variance,
                ch,
                norm_z,
                seed,
                cond,
                precision,
                max_batch,
                pilot_examples,
                pilot_steps,
            )
            proposal_kind = prop.kind
            diffusion, diff_var = _kl_sum_sampled(s, prop, consts, n_steps_sampled, n_z)
            calls = n_steps_sampled * n_z
        prior = -prior_kl(s.x64, torch.log(sch.times[-1]), sch.log_alphas_cumprod[-1])
    stderr = (diff_var + dec_var).clamp_min(0).sqrt()
    return LogDensity(
        logp=(prior + diffusion + dec).cpu(),
        stderr=stderr.cpu(),
        nfe=float(calls + decoder_draws + pilot_calls / b),
        dim=d,
        terms={"prior": prior.cpu(), "diffusion": diffusion.cpu(), "decoder": dec.cpu()},
        method=f"ddpm-{variance}",
        info={
            "convention": ch["convention"],
            "T": T,
            "variance": variance,
            "decoder": decoder,
            "levels": levels if decoder == "discretized" else None,
            "cdf": ch["cdf"] if decoder == "discretized" else None,
            "clip_denoised": ch["clip_denoised"],
            "decoder_variance": ch["decoder_variance"],
            "decoder_variance_value": None if learned else float(model_var[0]),
            "n_steps_sampled": n_steps_sampled,
            "step_proposal": proposal_kind,
            "pilot_calls": pilot_calls,
            "n_z": n_z,
            "decoder_draws": decoder_draws,
            "norm_z": norm_z,
            "seed": seed,
            "precision": precision,
            "max_batch": s.max_batch,
            "lam_min": float(torch.log1p(-sch.times[-1]) - torch.log(sch.times[-1])),  # the grid's log-SNR range
            "lam_max": float(torch.log1p(-sch.times[0]) - torch.log(sch.times[0])),
            "stderr": "unbiased per-step variance" if (n_z > 1 or n_steps_sampled) else "none (n_z = 1: NaN)",
        },
    )


def _kl_sum_all(s: _Setup, big_t: int, n_z: int) -> tuple[Tensor, Tensor]:
    """Model part of ``-sum_{k>=2} L_{k-1}`` with all steps, ``n_z`` draws each: (sum [B], variance [B])."""
    b = s.x.shape[0]
    steps = torch.arange(1, big_t, device=s.x.device).repeat_interleave(n_z)  # draw j sits at step steps[j]

    def k_of(j: int) -> Tensor:
        return steps[j].expand(b)

    f = _evaluate(s, k_of, len(steps), rng.Stream.DDPM_NOISE).reshape(b, big_t - 1, n_z)
    total = -f.mean(2).sum(1)
    var = (f.var(2) / n_z).sum(1) if n_z > 1 else torch.full_like(total, math.nan)
    return total, var


def _kl_sum_sampled(s: _Setup, prop: StepProposal, consts: Tensor, m: int, n_z: int) -> tuple[Tensor, Tensor]:
    """``-sum_{k>=2} L_{k-1}`` by stratified importance sampling of ``m`` steps (module docstring)."""
    b = s.x.shape[0]
    dev = s.x.device
    n_s = m // 2
    stratum = torch.arange(m, device=dev) // 2
    stratum = stratum.clamp(max=n_s - 1)  # an odd m puts three draws in the last stratum
    u = rng.uniforms(s.seed, rng.Stream.DDPM_STEPS, s.keys, m, device=dev).to(dev)  # [B, m]
    ks = prop.sample((stratum + u) / n_s)  # [B, m] 0-based 1..T-1
    q = prop.probs.to(dev)[ks - 1]
    draw_k = ks.repeat_interleave(n_z, 1)  # draw j = (i, r)

    f = _evaluate(s, lambda j: draw_k[:, j], m * n_z, rng.Stream.DDPM_NOISE).reshape(b, m, n_z).mean(2)
    g = -f / q  # unbiased for the model part of -sum L, given its stratum
    sizes = torch.bincount(stratum, minlength=n_s).to(torch.float64)
    sums = torch.zeros(b, n_s, dtype=torch.float64, device=dev).index_add_(1, stratum, g)
    means = sums / sizes
    dev2 = (g - means[:, stratum]).pow(2)
    ss = torch.zeros_like(sums).index_add_(1, stratum, dev2) / (sizes - 1)
    total = means.sum(1) / n_s - float(consts[1:].sum())  # the model-free part is summed exactly
    var = (ss / sizes).sum(1) / n_s**2
    return total, var


def _resolve_proposal(
    step_proposal, s, x, sch, variance, ch, norm_z, seed, cond, precision, max_batch, pilot_examples, pilot_steps
) -> tuple[StepProposal, int]:
    T = sch.num_steps
    if isinstance(step_proposal, StepProposal):
        prop = step_proposal
    elif isinstance(step_proposal, Tensor):
        prop = StepProposal(step_proposal, "given")
    elif step_proposal == "uniform":
        prop = StepProposal.uniform(T)
    elif step_proposal == "analytic":
        fixed = "fixed_small" if variance in LEARNED_VARIANCES else variance
        prop = StepProposal.analytic(sch, fixed, ch["decoder_variance"])
    elif step_proposal == "pilot":
        return fit_step_proposal(
            s.eps_fn,
            x,
            schedule=sch,
            variance=variance,
            decoder_variance=ch["decoder_variance"],
            clip_denoised=ch["clip_denoised"],
            norm_z=norm_z,
            seed=seed,
            pilot_examples=pilot_examples,
            pilot_steps=pilot_steps,
            cond=cond,
            precision=precision,
            max_batch=max_batch,
        )
    else:
        raise ValueError(
            f"step_proposal must be 'analytic', 'pilot', 'uniform', a StepProposal or a tensor, got {step_proposal!r}"
        )
    if len(prop.probs) != T - 1:
        raise ValueError(f"step_proposal has {len(prop.probs)} probabilities; this schedule has {T - 1} KL steps")
    return prop, 0
