"""The denoising objectives of certifying ELBO training (Li & Yan 2024, §4.1), written as sample-average
approximations over fixed draws, and the minibatch losses of the neural case.

The family is :class:`~scoredensity.apps.parametric.ParametricMixture`: every member is a Gaussian mixture and its
noise predictor is that mixture's exact ``eps*``. Three ways to fit it to data ``x_1..x_N``:

* **continuous ``elbo``** (the density formula's own loss, in log-SNR ``lam``)::

      L(theta) = -(noisy_end + clean_end) + 1/2 ∫ [ E||z - eps_theta||^2 - sigmoid(lam) E||z||^2 ] dlam.

  For an exact denoiser the formula is exact, so ``E L(theta) = -(1/N) sum log p_theta(x_i)`` for *every* theta:
  the fit must land on the maximum-likelihood fit;
* **discrete DDPM ELBO** with ``T`` steps, ``abar_k = abar(k/T)`` from one clock (docs/design.md §3): with
  ``a_k = 1 - b_k``, ``t_k = 1 - abar_k`` and the control-variate form ``e_k = ||z - eps||^2 - (1 - t_k)(||z||^2 - d)``
  (unbiased for ``E||z - eps||^2``; the coefficient ``1 - t_k`` is the formula's own: it cancels the chi-square noise
  of the clean steps, where ``eps`` is small, and leaves the noisy steps alone, where ``z - eps`` is small)::

      -ELBO(x) = KL(q(x_T|x) || N(0,I)) + sum_{k>=2} [ 1/2 d (rho_k - 1 - log rho_k) + w_k E e_k ]
                 + 1/2 d log(2 pi sigma_1^2) + t_1 / (2 a_1 sigma_1^2) E e_1,

  ``w_k = b_k^2 / (2 a_k t_k sigma_k^2)``, ``rho_k = sigma~_k^2 / sigma_k^2`` with ``sigma~_k^2 = b_k t_{k-1} / t_k``.
  ``fixed_large`` (``sigma_k^2 = b_k``) gives ``w_k = b_k / (2 a_k t_k)``, a Riemann sum of ``dt / (2 t (1-t))``;
  ``fixed_small`` (``sigma_k^2 = sigma~_k^2``, at ``k = 1`` clipped to ``sigma~_2^2`` as the published code does)
  gives ``w_k = b_k / (2 a_k t_{k-1})``. These are the per-step weights of docs/design.md §3, written here as a
  training loss over fixed draws (same definitions as :func:`scoredensity.ddpm.ddpm_elbo`, which the tests
  compare against);
* **maximum likelihood** by EM (scikit-learn's ``GaussianMixture``, several initialisations): the independent
  reference for the true objective ``-E log p_theta``.

Every denoising loss is minimised as a *sample-average approximation*: the noise draws (log-SNR or steps, and
``z``) are drawn once and kept, so the objective is a smooth deterministic function of theta and L-BFGS
converges to its minimiser; its distance to the exact-objective minimiser is Monte Carlo error of the draws
(``benchmarks/certify.py`` measures it by refitting with independent draws; the tests state a tolerance).

The neural case (:func:`denoising_loss` here, the loop :func:`scoredensity.apps.certify.fitting.train_denoiser`)
trains any network ``EpsFn`` by the same three losses with fresh draws per minibatch, so that it can be judged by
the true objective (``benchmarks/certify.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ... import rng
from ...ddpm import reverse_variances
from ...decoders import end_terms, prior_kl
from ...formula import formula_integrand
from ...losses import LamSampler, dsm_loss
from ...proposals import LambdaProposal
from ...rng import Stream
from ...schedules import CosineClock, DDPMSchedule, VPLinearClock

__all__ = [
    "DenoisingObjective",
    "check_points",
    "continuous_elbo_objective",
    "ddpm_elbo_objective",
    "ddpm_step_weights",
    "pilot_proposal",
    "denoising_loss",
    "NEURAL_LOSSES",
]

_LOG_2PI = math.log(2 * math.pi)


@dataclass
class DenoisingObjective:
    """A weighted denoising loss with its noise drawn once (a sample-average approximation).

    Rows are organised in ``G`` groups that share a time ``t[g]``; row ``(g, m)`` is example ``rows[g, m]`` noised
    with ``z[g, m]``. The per-example value is

        ``const[i] + sum_{(g, m): rows = i} coef[g, m] (||z - eps(x_t, t_g)||^2 - zcoef[g] ||z||^2 + offset[g])``.

    Attributes:
        x: [N, d] data (float64). t: [G] float64 times in (0, 1). rows: [G, M] example indices.
        z: [G, M, d] noise. coef: [G, M] weights (0 for padding rows). zcoef, offset: [G].
        const: [N] the parts that do not depend on the model (end terms, KL constants).
        name: short description. info: settings.
    """

    x: Tensor
    t: Tensor
    rows: Tensor
    z: Tensor
    coef: Tensor
    zcoef: Tensor
    offset: Tensor
    const: Tensor
    name: str = ""
    info: dict = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        """Model evaluations per call (padding included)."""
        return self.rows.numel()

    def predictions(self, model) -> Tensor:
        """The model's noise predictions [G, M, d] (float64) at the fixed draws, ``x_t = sqrt(1-t) x + sqrt(t) z``.

        ``model`` is a :class:`ParametricMixture` (evaluated group-wise) or any ``EpsFn``.
        """
        g, m, d = self.z.shape
        x_t = (1 - self.t).sqrt()[:, None, None] * self.x[self.rows] + self.t.sqrt()[:, None, None] * self.z
        if hasattr(model, "eps_grouped"):
            return model.eps_grouped(x_t, self.t).to(torch.float64)
        return model(x_t.reshape(g * m, d), self.t.repeat_interleave(m)).reshape(g, m, d).to(torch.float64)

    def per_example(self, model) -> Tensor:
        """Per-example loss [N] (nats, float64), differentiable in the model's parameters (see
        :meth:`predictions` for ``model``)."""
        err = (self.z - self.predictions(model)).pow(2).sum(-1)  # [G, M]
        val = self.coef * (err - self.zcoef[:, None] * self.z.pow(2).sum(-1) + self.offset[:, None])
        return self.const.index_add(0, self.rows.flatten(), val.flatten())

    def __call__(self, model) -> Tensor:
        """Mean loss over the examples (scalar, differentiable)."""
        return self.per_example(model).mean()


def _chunks(n: int, n_chunks: int, seed: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Split a random permutation of ``n`` examples into ``n_chunks`` rows of equal length.

    The permutation sorts keyed uniforms of the examples (:attr:`Stream.CERTIFY_NODES`, step 0).
    Returns ``(idx [C, M], mask [C, M])``; short chunks are padded with their last index and mask 0.
    """
    n_chunks = max(1, min(n_chunks, n))
    ids = torch.arange(n, device=device)
    perm = rng.uniforms(seed, Stream.CERTIFY_NODES, ids, 1, step=0, device=device)[:, 0].argsort().to(device)
    size = math.ceil(n / n_chunks)
    idx = torch.empty(n_chunks, size, dtype=torch.long, device=device)
    mask = torch.zeros(n_chunks, size, dtype=torch.float64, device=device)
    for c, part in enumerate(torch.tensor_split(perm, n_chunks)):  # one pass per chunk, not per example
        idx[c, : len(part)] = part
        idx[c, len(part) :] = part[-1]
        mask[c, : len(part)] = 1.0
    return idx, mask


def _node_uniforms(seed: int, chunks: int, n: int, device: torch.device) -> Tensor:
    """Uniforms [chunks, n] of each chunk's nodes (:attr:`Stream.CERTIFY_NODES`, step 1, keyed by chunk)."""
    ids = torch.arange(chunks, device=device)
    return rng.uniforms(seed, Stream.CERTIFY_NODES, ids, n, step=1, device=device).to(device)


def _draw_z(idx: Tensor, nodes: int, n_z: int, d: int, antithetic: bool, seed: int) -> Tensor:
    """Noise [C * nodes, S * n_z, d] for the chunks ``idx`` [C, S]: row ``(c, node)``, column ``(j, r)`` is draw
    ``r`` of example ``idx[c, j]`` at that node, keyed by the example (:attr:`Stream.CERTIFY_NOISE`), so it does
    not depend on the chunking. With ``antithetic`` the draws of each example come in pairs ``(z, -z)``."""
    if antithetic and n_z % 2:
        raise ValueError(f"antithetic draws need an even n_z, got {n_z}")
    c, s = idx.shape
    per = n_z // 2 if antithetic else n_z
    z = rng.normals(seed, Stream.CERTIFY_NOISE, idx.flatten(), (nodes, per, d), device=idx.device).to(idx.device)
    z = z.reshape(c, s, nodes, per, d).transpose(1, 2)  # [C, nodes, S, per, d]
    if antithetic:
        z = torch.cat([z, -z], 3)
    return z.reshape(c * nodes, s * n_z, d)


def check_points(x: Tensor) -> Tensor:
    """Check and convert a point set: [N, d] with N >= 2, finite; returned as float64 (one-line ValueError)."""
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"x must be [N, d] with N >= 2, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        rows = (~torch.isfinite(x).all(1)).nonzero().flatten()[:10].tolist()
        raise ValueError(f"x contains NaN or Inf in rows {rows}")
    return x.to(torch.float64)


def continuous_elbo_objective(
    x: Tensor,
    *,
    n_t: int = 32,
    n_z: int = 1,
    n_chunks: int = 8,
    lam_min: float = -20.0,
    lam_max: float = 20.0,
    proposal: LambdaProposal | None = None,
    antithetic: bool = False,
    seed: int = 0,
) -> DenoisingObjective:
    """The continuous ``elbo`` loss (minus the density formula's bound) with fixed draws.

    The examples are split into ``n_chunks`` random chunks; each chunk gets its own ``n_t`` log-SNR nodes,
    stratified under ``proposal`` (two per stratum), each with ``n_z`` draws of ``z`` per example. Per example
    that is ``n_t * n_z`` model calls and an unbiased estimate of ``-formula(x)`` (docs/design.md §2).

    Args:
        x: [N, d] data. n_t: even number of log-SNR nodes per chunk. proposal: density of the nodes on
            ``[lam_min, lam_max]`` (default uniform; a fitted :class:`LambdaProposal` lowers the variance).
        seed: key of every draw (:mod:`scoredensity.rng`, streams ``CERTIFY_NODES`` and ``CERTIFY_NOISE``; the
            noise of an example does not depend on how the examples are chunked).
    """
    x = check_points(x)
    if n_t < 2 or n_t % 2 or n_z < 1:
        raise ValueError(f"need an even n_t >= 2 and n_z >= 1, got n_t={n_t}, n_z={n_z}")
    proposal = proposal or LambdaProposal.uniform(lam_min, lam_max)
    if (proposal.lam_min, proposal.lam_max) != (lam_min, lam_max):
        raise ValueError("the proposal's range differs from [lam_min, lam_max]")
    n, d = x.shape
    idx, mask = _chunks(n, n_chunks, seed, x.device)  # [C, S]
    c, s = idx.shape
    strata = n_t // 2
    jitter = _node_uniforms(seed, c, n_t, x.device)
    u = (torch.arange(strata, dtype=torch.float64).repeat_interleave(2) + jitter) / strata
    lam = proposal.icdf(u)  # [C, n_t]
    inv_q = 1 / proposal.pdf(lam)
    # group (chunk, node): rows are the chunk's examples, n_z draws each
    rows = idx[:, None, :, None].expand(c, n_t, s, n_z).reshape(c * n_t, s * n_z)
    coef = (0.5 * inv_q / (n_t * n_z))[:, :, None, None] * mask[:, None, :, None]
    coef = coef.expand(c, n_t, s, n_z).reshape(c * n_t, s * n_z)
    z = _draw_z(idx, n_t, n_z, d, antithetic, seed)
    lam = lam.flatten()
    noisy, clean = end_terms(x, lam_min, lam_max)
    return DenoisingObjective(
        x=x,
        t=torch.sigmoid(-lam),
        rows=rows,
        z=z,
        coef=coef,
        zcoef=torch.sigmoid(lam),
        offset=torch.zeros_like(lam),
        const=-(noisy + clean),
        name="continuous elbo",
        info={"n_t": n_t, "n_z": n_z, "n_chunks": c, "lam_min": lam_min, "lam_max": lam_max, "seed": seed},
    )


def ddpm_step_weights(schedule: DDPMSchedule, variance: str, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step pieces of the DDPM ELBO (see the module docstring), for steps ``k = 1..T``.

    Returns:
        ``(w [T], const [T], t [T])``: ``w_k`` multiplies ``E e_k`` (``w_1`` is the decoder's
        ``t_1 / (2 a_1 sigma_1^2)``), ``const_k`` is the model-independent part of step ``k`` (``k = 1``: the
        decoder's ``1/2 d log(2 pi sigma_1^2)``), ``t_k = 1 - abar_k``. All float64; the prior KL is separate.
    """
    beta = schedule.betas
    t = schedule.times
    if float(beta.max()) >= 1.0:
        raise ValueError("the DDPM ELBO is undefined for a zero-terminal-SNR schedule (b_T = 1); clip the betas")
    var, post = reverse_variances(schedule, variance)
    w = beta**2 / ((1 - beta) * t * 2 * var)
    rho = post / var
    const = 0.5 * d * (rho - 1 - torch.log(rho.clamp_min(1e-300)))
    w[0] = t[0] / (2 * (1 - beta[0]) * var[0])
    const[0] = 0.5 * d * (_LOG_2PI + torch.log(var[0]))
    return w, const, t


def ddpm_elbo_objective(
    x: Tensor,
    *,
    num_steps: int,
    variance: str = "fixed_large",
    clock: VPLinearClock | CosineClock | None = None,
    max_groups: int = 128,
    n_z: int = 1,
    n_chunks: int = 8,
    antithetic: bool = False,
    seed: int = 0,
) -> DenoisingObjective:
    """Minus the discrete DDPM ELBO (module docstring) with fixed draws, ``abar_k = abar(k/T)`` from ``clock``.

    When ``T <= max_groups`` every step is evaluated (``n_z`` draws of ``z`` per example and step); otherwise each
    of ``n_chunks`` chunks of examples gets ``max_groups - 1`` steps from ``2..T``, stratified in proportion to
    ``w_k`` (so each draw carries the same weight), plus the decoder step. Unbiased for ``-ELBO(x)`` either way.

    Args:
        x: [N, d] continuous data (Gaussian decoder). num_steps: ``T >= 2``.
        variance: ``"fixed_large"`` or ``"fixed_small"``. clock: default ``VPLinearClock()`` (beta 0.1..20).
    """
    x = check_points(x)
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if max_groups < 2 or n_z < 1:
        raise ValueError("need max_groups >= 2 and n_z >= 1")
    clock = clock or VPLinearClock()
    sched = DDPMSchedule.from_clock(clock, num_steps)
    n, d = x.shape
    w, const, t = ddpm_step_weights(sched, variance, d)
    total_const = prior_kl(x, torch.log(t[-1]), torch.log1p(-t[-1])) + const.sum()
    if num_steps <= max_groups:
        idx, mask = _chunks(n, 1, seed, x.device)
        steps = torch.arange(num_steps)[None]  # [1, T]
        step_coef = w[None, :] / n_z
    else:
        idx, mask = _chunks(n, n_chunks, seed, x.device)
        m = max_groups - 1
        p = w[1:] / w[1:].sum()
        cdf = torch.cumsum(p, 0)
        u = (torch.arange(m, dtype=torch.float64) + _node_uniforms(seed, idx.shape[0], m, x.device)) / m
        k = torch.searchsorted(cdf, u.contiguous() * cdf[-1]).clamp(max=num_steps - 2) + 1  # 0-based steps 1..T-1
        steps = torch.cat([torch.zeros(idx.shape[0], 1, dtype=torch.long), k], 1)  # decoder always included
        step_coef = torch.cat([w[:1].expand(idx.shape[0], 1), (w[1:].sum() / m).expand_as(k)], 1) / n_z
    c, s = idx.shape
    gsteps = steps.shape[1]
    steps = steps.expand(c, gsteps)
    rows = idx[:, None, :, None].expand(c, gsteps, s, n_z).reshape(c * gsteps, s * n_z)
    coef = step_coef.expand(c, gsteps)[:, :, None, None] * mask[:, None, :, None]
    coef = coef.expand(c, gsteps, s, n_z).reshape(c * gsteps, s * n_z)
    z = _draw_z(idx, gsteps, n_z, d, antithetic, seed)
    tg = t[steps.flatten()]
    return DenoisingObjective(
        x=x,
        t=tg,
        rows=rows,
        z=z,
        coef=coef,
        zcoef=1 - tg,
        offset=(1 - tg) * d,
        const=total_const,
        name=f"ddpm elbo T={num_steps} {variance}",
        info={"T": num_steps, "variance": variance, "clock": type(clock).__name__, "n_z": n_z, "seed": seed},
    )


def pilot_proposal(model, x: Tensor, *, n_t: int = 64, lam_min: float = -20.0, lam_max: float = 20.0, seed: int = 0):
    """A :class:`LambdaProposal` fitted to the RMS of the formula's integrand of ``model`` on ``x`` (one pilot
    draw per example and node). Fitted once and reused for every theta, the objectives stay unbiased.

    The integrand is :func:`scoredensity.formula.formula_integrand` with ``D = ||z||^2``, the one the continuous
    objective's rows carry (``zcoef = sigmoid(lam)``).
    """
    o = continuous_elbo_objective(x, n_t=n_t, n_chunks=x.shape[0], lam_min=lam_min, lam_max=lam_max, seed=seed)
    g, m, d = o.z.shape
    with torch.no_grad():
        eps = o.predictions(model)
    lam = (torch.log1p(-o.t) - torch.log(o.t)).repeat_interleave(m)  # [G * M]
    f = formula_integrand(o.z.reshape(g * m, d), eps.reshape(g * m, d), lam, True)
    return LambdaProposal.fit(lam, f, lam_min, lam_max)


# ---------------------------------------------------------------------------------------- neural case
NEURAL_LOSSES = ("elbo", "ddpm", "simple")


def denoising_loss(
    model,
    xb: Tensor,
    loss: str,
    *,
    seed: int,
    step: int = 0,
    lam_range: tuple[float, float] = (-12.0, 12.0),
    num_steps: int = 1000,
) -> Tensor:
    """One minibatch loss (scalar, differentiable) with fresh draws keyed by ``(seed, step)``.

    ``elbo`` and ``simple`` are the trainer's own losses, :func:`scoredensity.losses.dsm_loss` (keyed Philox draws,
    :mod:`scoredensity.rng`): ``elbo`` is minus the density formula's one-sample bound with log-SNR uniform on
    ``lam_range``, two draws per example (the same model calls per example as ``ddpm``); ``simple`` is DDPM's
    ``L_simple``, the unweighted mean of ``||z - eps||^2 / d`` over uniformly drawn steps of DDPM's grid (linear
    betas, ``T = 1000``; the grid of :class:`~scoredensity.losses.LamSampler` ``"ddpm"``). ``ddpm``: minus the DDPM
    ELBO with ``fixed_large`` variances and ``num_steps`` steps from the VP-linear clock (the decoder step and one
    step drawn in proportion to its weight, per example; :func:`ddpm_elbo_objective`).

    Args:
        model: an ``EpsFn`` module. xb: [B, d] float64 points. loss: one of :data:`NEURAL_LOSSES`.
        seed, step: key of the draws. lam_range: log-SNR range of ``elbo``. num_steps: ``T`` of ``ddpm``.

    Returns:
        Scalar loss (nats per example for ``elbo`` and ``ddpm``).
    """
    b = xb.shape[0]
    if loss in ("elbo", "simple"):
        kind = "uniform" if loss == "elbo" else "ddpm"
        sampler = LamSampler(kind, lam_range[0], lam_range[1], low_discrepancy=False)
        draws = 2 if loss == "elbo" else 1
        out = dsm_loss(
            model,
            xb.repeat(draws, 1),
            weighting=loss,
            sampler=sampler,
            seed=seed,
            step=step,
            index=torch.arange(draws * b, device=xb.device),
        )
        return out.loss.mean()
    if loss == "ddpm":
        return ddpm_elbo_objective(xb, num_steps=num_steps, max_groups=2, n_chunks=b, seed=seed * 1_000_003 + step)(
            model
        )
    raise ValueError(f"loss must be one of {NEURAL_LOSSES}, got {loss!r}")
