"""Certifying ELBO training (seed 000 §4.1, DESIGN.md §3-§4): fit one family by denoising losses and by maximum
likelihood, and measure how far apart the fits land.

The family is :class:`~scoredensity.apps.parametric.ParametricMixture`: every member is a Gaussian mixture and its
noise predictor is that mixture's exact ``eps*``. Three ways to fit it to data ``x_1..x_N``:

* **continuous ``elbo``** (the density formula's own loss, in log-SNR ``lam``)::

      L(theta) = -(noisy_end + clean_end) + 1/2 ∫ [ E||z - eps_theta||^2 - sigmoid(lam) E||z||^2 ] dlam.

  For an exact denoiser the formula is exact, so ``E L(theta) = -(1/N) sum log p_theta(x_i)`` for *every* theta:
  the fit must land on the maximum-likelihood fit;
* **discrete DDPM ELBO** with ``T`` steps, ``abar_k = abar(k/T)`` from one clock (DESIGN.md §3): with ``a_k = 1 - b_k``,
  ``t_k = 1 - abar_k`` and the control-variate form ``e_k = ||z - eps||^2 - (1 - t_k)(||z||^2 - d)`` (unbiased for
  ``E||z - eps||^2``; the coefficient ``1 - t_k`` is the formula's own: it cancels the chi-square noise of the clean
  steps, where ``eps`` is small, and leaves the noisy steps alone, where ``z - eps`` is small)::

      -ELBO(x) = KL(q(x_T|x) || N(0,I)) + sum_{k>=2} [ 1/2 d (rho_k - 1 - log rho_k) + w_k E e_k ]
                 + 1/2 d log(2 pi sigma_1^2) + t_1 / (2 a_1 sigma_1^2) E e_1,

  ``w_k = b_k^2 / (2 a_k t_k sigma_k^2)``, ``rho_k = sigma~_k^2 / sigma_k^2`` with ``sigma~_k^2 = b_k t_{k-1} / t_k``.
  ``fixed_large`` (``sigma_k^2 = b_k``) gives ``w_k = b_k / (2 a_k t_k)``, a Riemann sum of ``dt / (2 t (1-t))``;
  ``fixed_small`` (``sigma_k^2 = sigma~_k^2``, at ``k = 1`` clipped to ``sigma~_2^2`` as the published code does)
  gives ``w_k = b_k / (2 a_k t_{k-1})``. These are the per-step weights of DESIGN.md §3, written here as a
  training loss over fixed draws (same definitions as :func:`scoredensity.ddpm.ddpm_elbo`, which the tests
  compare against);
* **maximum likelihood** by EM (scikit-learn's ``GaussianMixture``, several initialisations): the independent
  reference for the true objective ``-E log p_theta``.

Every denoising loss is minimised as a *sample-average approximation*: the noise draws (log-SNR or steps, and
``z``) are drawn once and kept, so the objective is a smooth deterministic function of theta and L-BFGS
converges to its minimiser; its distance to the exact-objective minimiser is Monte Carlo error of the draws
(``benchmarks/certify.py`` measures it by refitting with independent draws; the tests state a tolerance).

The neural case (:func:`train_denoiser`) trains any network ``EpsFn`` by the same three losses with fresh draws
per minibatch, so that it can be judged by the true objective (``benchmarks/certify.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..ddpm import VARIANCES, reverse_variances
from ..formula import end_terms
from ..mixtures import GaussianMixture
from ..proposals import LambdaProposal
from ..schedules import CosineClock, DDPMSchedule, VPLinearClock
from .parametric import ParametricMixture, _sklearn_to_mixture

__all__ = [
    "DenoisingObjective",
    "continuous_elbo_objective",
    "ddpm_elbo_objective",
    "ddpm_step_weights",
    "fit_objective",
    "pilot_proposal",
    "plot_gap",
    "fit_em",
    "kmeans_init",
    "match_components",
    "parameter_distance",
    "CertifyRow",
    "CertifyReport",
    "certify_mixture",
    "certify_data",
    "denoising_loss",
    "train_denoiser",
    "NEURAL_LOSSES",
    "VARIANCES",
]

_LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------- objectives
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

    def per_example(self, model) -> Tensor:
        """Per-example loss [N] (nats, float64), differentiable in the model's parameters.

        ``model`` is a :class:`ParametricMixture` (evaluated group-wise) or any ``EpsFn``.
        """
        g, m, d = self.z.shape
        a = (1 - self.t).sqrt()[:, None, None]
        x_t = a * self.x[self.rows] + self.t.sqrt()[:, None, None] * self.z  # [G, M, d]
        if hasattr(model, "eps_grouped"):
            eps = model.eps_grouped(x_t, self.t)
        else:
            eps = model(x_t.reshape(g * m, d), self.t.repeat_interleave(m)).reshape(g, m, d)
        err = (self.z - eps.to(torch.float64)).pow(2).sum(-1)  # [G, M]
        val = self.coef * (err - self.zcoef[:, None] * self.z.pow(2).sum(-1) + self.offset[:, None])
        return self.const.index_add(0, self.rows.flatten(), val.flatten())

    def __call__(self, model) -> Tensor:
        """Mean loss over the examples (scalar, differentiable)."""
        return self.per_example(model).mean()


def _chunks(n: int, n_chunks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Split a random permutation of ``n`` examples into ``n_chunks`` rows of equal length.

    Returns ``(idx [C, M], mask [C, M])``; short chunks are padded with their last index and mask 0.
    """
    n_chunks = max(1, min(n_chunks, n))
    perm = torch.randperm(n, generator=generator)
    size = math.ceil(n / n_chunks)
    idx = torch.empty(n_chunks, size, dtype=torch.long)
    mask = torch.zeros(n_chunks, size, dtype=torch.float64)
    for c, part in enumerate(torch.tensor_split(perm, n_chunks)):
        idx[c, : len(part)] = part
        idx[c, len(part) :] = part[-1]
        mask[c, : len(part)] = 1.0
    return idx, mask


def _draw_z(groups: int, size: int, n_z: int, d: int, antithetic: bool, gen: torch.Generator) -> Tensor:
    """Noise [groups, size * n_z, d]; with ``antithetic`` the draws of each example come in pairs ``(z, -z)``."""
    if not antithetic:
        return torch.randn(groups, size * n_z, d, generator=gen, dtype=torch.float64)
    if n_z % 2:
        raise ValueError(f"antithetic draws need an even n_z, got {n_z}")
    half = torch.randn(groups, size, n_z // 2, d, generator=gen, dtype=torch.float64)
    return torch.cat([half, -half], 2).reshape(groups, size * n_z, d)


def _check_x(x: Tensor) -> Tensor:
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
    that is ``n_t * n_z`` model calls and an unbiased estimate of ``-formula(x)`` (DESIGN.md §2).

    Args:
        x: [N, d] data. n_t: even number of log-SNR nodes per chunk. proposal: density of the nodes on
            ``[lam_min, lam_max]`` (default uniform; a fitted :class:`LambdaProposal` lowers the variance).
        seed: fixes every draw.
    """
    x = _check_x(x)
    if n_t < 2 or n_t % 2 or n_z < 1:
        raise ValueError(f"need an even n_t >= 2 and n_z >= 1, got n_t={n_t}, n_z={n_z}")
    proposal = proposal or LambdaProposal.uniform(lam_min, lam_max)
    if (proposal.lam_min, proposal.lam_max) != (lam_min, lam_max):
        raise ValueError("the proposal's range differs from [lam_min, lam_max]")
    gen = torch.Generator().manual_seed(seed)
    n, d = x.shape
    idx, mask = _chunks(n, n_chunks, gen)  # [C, S]
    c, s = idx.shape
    strata = n_t // 2
    jitter = torch.rand(c, n_t, generator=gen, dtype=torch.float64)
    u = (torch.arange(strata, dtype=torch.float64).repeat_interleave(2) + jitter) / strata
    lam = proposal.icdf(u)  # [C, n_t]
    inv_q = 1 / proposal.pdf(lam)
    # group (chunk, node): rows are the chunk's examples, n_z draws each
    rows = idx[:, None, :, None].expand(c, n_t, s, n_z).reshape(c * n_t, s * n_z)
    coef = (0.5 * inv_q / (n_t * n_z))[:, :, None, None] * mask[:, None, :, None]
    coef = coef.expand(c, n_t, s, n_z).reshape(c * n_t, s * n_z)
    z = _draw_z(c * n_t, s, n_z, d, antithetic, gen)
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
    x = _check_x(x)
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if max_groups < 2 or n_z < 1:
        raise ValueError("need max_groups >= 2 and n_z >= 1")
    clock = clock or VPLinearClock()
    sched = DDPMSchedule.from_clock(clock, num_steps)
    n, d = x.shape
    w, const, t = ddpm_step_weights(sched, variance, d)
    gen = torch.Generator().manual_seed(seed)
    abar_big_t = 1 - t[-1]
    prior_kl = 0.5 * (abar_big_t * x.pow(2).sum(1) - d * abar_big_t - d * torch.log(t[-1]))
    total_const = prior_kl + const.sum()
    if num_steps <= max_groups:
        idx, mask = _chunks(n, 1, gen)
        steps = torch.arange(num_steps)[None]  # [1, T]
        step_coef = w[None, :] / n_z
    else:
        idx, mask = _chunks(n, n_chunks, gen)
        m = max_groups - 1
        p = w[1:] / w[1:].sum()
        cdf = torch.cumsum(p, 0)
        u = (torch.arange(m, dtype=torch.float64) + torch.rand(idx.shape[0], m, generator=gen, dtype=torch.float64)) / m
        k = torch.searchsorted(cdf, u.contiguous() * cdf[-1]).clamp(max=num_steps - 2) + 1  # 0-based steps 1..T-1
        steps = torch.cat([torch.zeros(idx.shape[0], 1, dtype=torch.long), k], 1)  # decoder always included
        step_coef = torch.cat([w[:1].expand(idx.shape[0], 1), (w[1:].sum() / m).expand_as(k)], 1) / n_z
    c, s = idx.shape
    gsteps = steps.shape[1]
    steps = steps.expand(c, gsteps)
    rows = idx[:, None, :, None].expand(c, gsteps, s, n_z).reshape(c * gsteps, s * n_z)
    coef = step_coef.expand(c, gsteps)[:, :, None, None] * mask[:, None, :, None]
    coef = coef.expand(c, gsteps, s, n_z).reshape(c * gsteps, s * n_z)
    z = _draw_z(c * gsteps, s, n_z, d, antithetic, gen)
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
    draw per example and node). Fitted once and reused for every theta, the objectives stay unbiased."""
    o = continuous_elbo_objective(x, n_t=n_t, n_chunks=x.shape[0], lam_min=lam_min, lam_max=lam_max, seed=seed)
    with torch.no_grad():
        x_t = (1 - o.t).sqrt()[:, None, None] * o.x[o.rows] + o.t.sqrt()[:, None, None] * o.z
        if hasattr(model, "eps_grouped"):
            eps = model.eps_grouped(x_t, o.t)
        else:
            g, m, d = o.z.shape
            eps = model(x_t.reshape(g * m, d), o.t.repeat_interleave(m)).reshape(g, m, d).to(torch.float64)
        f = 0.5 * (o.zcoef[:, None] * o.z.pow(2).sum(-1) - (o.z - eps).pow(2).sum(-1))
    lam = torch.log1p(-o.t) - torch.log(o.t)
    return LambdaProposal.fit(lam.repeat_interleave(f.shape[1]), f.flatten(), lam_min, lam_max)


# ---------------------------------------------------------------------------------------- fitting
def fit_objective(
    model: ParametricMixture,
    objective: DenoisingObjective,
    *,
    max_iter: int = 300,
    tol: float = 1e-10,
) -> dict:
    """Minimise ``objective(model)`` over the model's parameters by L-BFGS (strong Wolfe line search), in place.

    Returns:
        ``{"loss": final value, "iterations": outer steps, "seconds": wall time, "grad_norm": final gradient norm}``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=20, tolerance_grad=tol, tolerance_change=1e-14, history_size=50,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = objective(model)
        loss.backward()
        return loss

    start = time.perf_counter()
    prev = math.inf
    it = 0
    for it in range(1, max(1, max_iter // 20) + 1):
        loss = float(opt.step(closure).detach())
        if not math.isfinite(loss):
            raise RuntimeError(f"the objective became {loss} during the fit (step {it})")
        if abs(prev - loss) < 1e-12 * max(1.0, abs(loss)):
            break
        prev = loss
    opt.zero_grad()
    final = objective(model)
    final.backward()
    final = final.detach()
    gnorm = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in params)))
    opt.zero_grad()
    return {"loss": float(final), "iterations": it, "seconds": time.perf_counter() - start, "grad_norm": gnorm}


def kmeans_init(x: Tensor, k: int, seed: int = 0) -> ParametricMixture:
    """A starting member from k-means: cluster means, covariances and shares (a ridge keeps them positive)."""
    from sklearn.cluster import KMeans

    x = _check_x(x)
    xn = x.numpy()
    labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(xn).labels_
    d = x.shape[1]
    ridge = 1e-3 * float(np.var(xn, axis=0).mean())
    means, covs, w = [], [], []
    for j in range(k):
        pts = xn[labels == j]
        means.append(pts.mean(0))
        cov = np.cov(pts.T).reshape(d, d) if len(pts) > 1 else np.zeros((d, d))
        covs.append(cov + ridge * np.eye(d))
        w.append(max(len(pts), 1))
    gm = GaussianMixture(torch.tensor(np.array(means)), torch.tensor(np.array(covs)), torch.tensor(w) / sum(w))
    return ParametricMixture.from_mixture(gm)


def fit_em(x: Tensor, k: int, *, n_init: int = 8, seed: int = 0, tol: float = 1e-10) -> GaussianMixture:
    """Maximum-likelihood fit by EM: scikit-learn's ``GaussianMixture`` (full covariances, ``n_init`` starts,
    a negligible ``reg_covar`` so the answer is the MLE), returned as a :class:`GaussianMixture`."""
    from sklearn.mixture import GaussianMixture as SkGM

    x = _check_x(x)
    sk = SkGM(k, covariance_type="full", n_init=n_init, tol=tol, max_iter=5000, reg_covar=1e-10, random_state=seed)
    sk.fit(x.numpy())
    return _sklearn_to_mixture(sk)


# ---------------------------------------------------------------------------------------- comparing fits
def match_components(a: GaussianMixture, b: GaussianMixture) -> np.ndarray:
    """Permutation ``perm`` with ``b``'s component ``perm[j]`` matched to ``a``'s component ``j`` (label switching),
    minimising the summed squared distance of means (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    if a.num_components != b.num_components or a.dim != b.dim:
        raise ValueError(f"cannot match {a} with {b}")
    cost = torch.cdist(a.means, b.means).pow(2).numpy()
    _, perm = linear_sum_assignment(cost)
    return perm


def parameter_distance(a: GaussianMixture, b: GaussianMixture) -> dict[str, float]:
    """Largest parameter differences between two mixtures after matching components:
    ``mean`` (Euclidean norm of a mean difference), ``cov`` (Frobenius norm of a covariance difference),
    ``weight`` (absolute weight difference)."""
    perm = torch.as_tensor(match_components(a, b))
    return {
        "mean": float((a.means - b.means[perm]).norm(dim=1).max()),
        "cov": float((a.covs - b.covs[perm]).flatten(1).norm(dim=1).max()),
        "weight": float((a.weights - b.weights[perm]).abs().max()),
    }


# ---------------------------------------------------------------------------------------- neural case
NEURAL_LOSSES = ("elbo", "ddpm", "simple")


def denoising_loss(model, xb: Tensor, loss: str, *, seed: int, lam_range=(-12.0, 12.0), num_steps: int = 1000):
    """One minibatch loss (scalar, differentiable) with fresh draws keyed by ``seed``.

    ``elbo``: the continuous ``elbo`` loss (:func:`continuous_elbo_objective`, one stratified pair of log-SNR nodes
    per example, uniform on ``lam_range``); ``ddpm``: minus the DDPM ELBO with ``fixed_large`` variances and
    ``num_steps`` steps from the VP-linear clock (the decoder step and one step drawn in proportion to its weight,
    per example); ``simple``: DDPM's ``L_simple``, the unweighted mean of ``||z - eps||^2 / d`` over uniformly
    drawn steps of the same clock.
    """
    b = xb.shape[0]
    if loss == "elbo":
        return continuous_elbo_objective(xb, n_t=2, n_chunks=b, lam_min=lam_range[0], lam_max=lam_range[1], seed=seed)(
            model
        )
    if loss == "ddpm":
        return ddpm_elbo_objective(xb, num_steps=num_steps, max_groups=2, n_chunks=b, seed=seed)(model)
    if loss == "simple":
        g = torch.Generator().manual_seed(seed)
        t = DDPMSchedule.from_clock(VPLinearClock(), num_steps).times
        tk = t[torch.randint(0, num_steps, (b,), generator=g)]
        z = torch.randn(xb.shape, generator=g, dtype=torch.float64)
        x_t = (1 - tk).sqrt()[:, None] * xb + tk.sqrt()[:, None] * z
        return (z - model(x_t, tk).to(torch.float64)).pow(2).mean()
    raise ValueError(f"loss must be one of {NEURAL_LOSSES}, got {loss!r}")


def train_denoiser(
    model: torch.nn.Module,
    x: Tensor,
    loss: str,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` (an ``EpsFn`` module) on ``x`` [N, d] by one of :data:`NEURAL_LOSSES` with a plain loop (AdamW,
    cosine decay, gradient clipping at 1, the same data order and budget for every loss). Returns the loss history."""
    if loss not in NEURAL_LOSSES:
        raise ValueError(f"loss must be one of {NEURAL_LOSSES}, got {loss!r}")
    x = _check_x(x)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    hist = []
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
        value = denoising_loss(model, x[idx], loss, seed=seed * 1_000_003 + step)
        opt.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        hist.append(float(value.detach()))
    return hist


# ---------------------------------------------------------------------------------------- data
def certify_data(name: str, n: int = 1000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """2-D train and test points for the experiment (float64).

    ``name``: a mixture preset (``blobs2d``, ``ring8``, ``grid25``; ``n`` train and ``n`` test points sampled with
    ``seed``), ``digits-pca2`` (scikit-learn's digits scaled to [-1, 1], projected on the first two principal
    components of the training split and standardised; the loader's split), or a ``.npy`` file of [N, d] points
    (a seeded 80/20 split).
    """
    from ..mixtures import MIXTURE_PRESETS, mixture_preset

    if name in MIXTURE_PRESETS:
        g = torch.Generator().manual_seed(seed)
        gm = mixture_preset(name)
        return gm.sample(n, generator=g), gm.sample(n, generator=g)
    if name == "digits-pca2":
        from ..data import load_dataset

        ds = load_dataset("digits", seed=seed)

        def scale(k: Tensor) -> Tensor:
            return (2 * k.to(torch.float64) / (ds.levels - 1) - 1).flatten(1)

        xtr, xte = scale(ds.x_train), scale(ds.x_test)
        mean = xtr.mean(0)
        _, _, v = torch.linalg.svd(xtr - mean, full_matrices=False)
        ptr, pte = (xtr - mean) @ v[:2].T, (xte - mean) @ v[:2].T
        std = ptr.std(0)
        return ptr / std, pte / std
    if name.endswith(".npy"):
        arr = torch.as_tensor(np.load(name)).to(torch.float64)
        if arr.dim() != 2:
            raise ValueError(f"{name}: expected an [N, d] array of points, got shape {tuple(arr.shape)}")
        perm = torch.randperm(len(arr), generator=torch.Generator().manual_seed(seed))
        cut = int(0.8 * len(arr))
        return _check_x(arr[perm[:cut]]), _check_x(arr[perm[cut:]])
    raise ValueError(
        f"unknown data {name!r}: use a mixture preset (blobs2d, ring8, grid25), 'digits-pca2' or a .npy file of points"
    )


# ---------------------------------------------------------------------------------------- the experiment
@dataclass
class CertifyRow:
    """One fit of the experiment.

    Attributes:
        method: ``"em"``, ``"continuous"`` or ``"ddpm"``. steps: ``T`` (None unless ddpm). variance: ddpm variance.
        train_nll, test_nll: exact mean negative log-likelihood of the fitted mixture (nats per example).
        excess_train, excess_test: the same minus the EM fit's (train: >= 0 up to EM's own tolerance).
        test_nll_stderr: standard error of the paired test difference to EM (sampling of test points).
        distance: :func:`parameter_distance` to the EM fit.
        objective_test: the method's own loss at its fit on the test points (minus its ELBO, nats per example)
            and ``objective_stderr`` its Monte Carlo standard error; ``gap`` = ``objective_test - test_nll``
            (how far the bound sits from the exact held-out NLL of the same parameters; no fixed sign for ddpm).
        seconds: fitting time.
    """

    method: str
    steps: int | None
    variance: str | None
    train_nll: float
    test_nll: float
    excess_train: float
    excess_test: float
    test_nll_stderr: float
    distance: dict[str, float]
    objective_test: float
    objective_stderr: float
    gap: float
    seconds: float


@dataclass
class CertifyReport:
    """Result of :func:`certify_mixture`: the rows, the EM fit, and a one-sentence verdict."""

    rows: list[CertifyRow]
    em: GaussianMixture
    n_train: int
    n_test: int
    num_params: int
    resolution: float
    verdict: str
    fits: dict[str, GaussianMixture] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown table of the rows."""
        head = (
            "| fit | T | variance | train NLL | test NLL | excess train | excess test (± se) | max Δmean | max Δcov "
            "| max Δw | loss at fit (test) | gap loss - NLL | s |\n|" + "---|" * 13
        )
        lines = [head]
        for r in self.rows:
            lines.append(
                f"| {r.method} | {r.steps or ''} | {r.variance or ''} | {r.train_nll:.4f} | {r.test_nll:.4f} "
                f"| {r.excess_train:.2e} | {r.excess_test:+.4f} ± {r.test_nll_stderr:.4f} | {r.distance['mean']:.3f} "
                f"| {r.distance['cov']:.3f} | {r.distance['weight']:.3f} "
                f"| {r.objective_test:.4f} ± {r.objective_stderr:.4f} "
                f"| {r.gap:+.4f} | {r.seconds:.1f} |"
            )
        return "\n".join(lines)


def _objective_on(make, model, x: Tensor, seeds: int, base_seed: int) -> tuple[float, float]:
    """Mean of an objective on ``x`` with ``seeds`` independent sets of draws, and its Monte Carlo stderr."""
    vals = []
    with torch.no_grad():
        for s in range(seeds):
            vals.append(float(make(x, base_seed + 1000 + s)(model)))
    v = torch.tensor(vals, dtype=torch.float64)
    return float(v.mean()), float(v.std() / math.sqrt(seeds)) if seeds > 1 else float("nan")


def certify_mixture(
    x_train: Tensor,
    x_test: Tensor,
    k: int,
    *,
    steps: tuple[int, ...] = (10, 100, 1000),
    variances: tuple[str, ...] = VARIANCES,
    clock: VPLinearClock | CosineClock | None = None,
    n_t: int = 32,
    max_groups: int = 128,
    n_init: int = 8,
    eval_seeds: int = 4,
    seed: int = 0,
    max_iter: int = 300,
) -> CertifyReport:
    """Fit a K-component mixture by EM, by the continuous ``elbo`` loss and by the DDPM ELBO for each ``T`` and
    reverse variance, and compare every fit with the EM fit (parameters up to label switching, exact train and
    test log-likelihoods, the loss at the fit against the exact NLL at the fit).

    All denoising fits start from the same k-means initialisation. ``resolution = num_params / (2 n_train)`` is
    the expected excess test NLL of the maximum-likelihood fit itself (the statistical resolution of the data);
    the verdict calls the claim held when the ``fixed_large`` fit at the largest ``T`` costs less than that.

    Returns:
        :class:`CertifyReport`.
    """
    x_train = _check_x(x_train)
    x_test = _check_x(x_test)
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError("train and test data have different dimensions")
    clock = clock or VPLinearClock()
    n, d = x_train.shape
    em = fit_em(x_train, k, n_init=n_init, seed=seed)
    em_train = em.log_prob(x_train)
    em_test = em.log_prob(x_test)
    num_params = k * d + k * d * (d + 1) // 2 + (k - 1)
    init = kmeans_init(x_train, k, seed=seed)
    init_state = {name: p.detach().clone() for name, p in init.named_parameters()}
    # one proposal for every continuous objective: fitted to the integrand of the initial member
    proposal = pilot_proposal(init, x_train[: min(n, 256)], seed=seed + 7)

    def make_cont(xx, s):
        return continuous_elbo_objective(xx, n_t=n_t, n_z=2, antithetic=True, proposal=proposal, seed=s)

    def make_ddpm(big_t, var):
        return lambda xx, s: ddpm_elbo_objective(
            xx, num_steps=big_t, variance=var, clock=clock, max_groups=max_groups, n_z=2, antithetic=True, seed=s
        )

    plans: list[tuple[str, int | None, str | None, object]] = [("continuous", None, None, make_cont)]
    for big_t in steps:
        for var in variances:
            plans.append(("ddpm", big_t, var, make_ddpm(big_t, var)))

    rows = [
        CertifyRow(
            "em", None, None, float(-em_train.mean()), float(-em_test.mean()), 0.0, 0.0, 0.0,
            {"mean": 0.0, "cov": 0.0, "weight": 0.0}, float(-em_test.mean()), 0.0, 0.0, 0.0,
        )
    ]  # fmt: skip
    fits = {"em": em}
    for method, big_t, var, make in plans:
        model = ParametricMixture(init.means, init.chols(), init.weights())
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(init_state[name])
        res = fit_objective(model, make(x_train, seed), max_iter=max_iter)
        gm = model.to_mixture()
        tr = gm.log_prob(x_train)
        te = gm.log_prob(x_test)
        diff = em_test - te
        obj, obj_se = _objective_on(make, model, x_test, eval_seeds, seed)
        key = method if big_t is None else f"ddpm-T{big_t}-{var}"
        fits[key] = gm
        rows.append(
            CertifyRow(
                method=method,
                steps=big_t,
                variance=var,
                train_nll=float(-tr.mean()),
                test_nll=float(-te.mean()),
                excess_train=float((em_train - tr).mean()),
                excess_test=float(diff.mean()),
                test_nll_stderr=float(diff.std() / math.sqrt(len(diff))),
                distance=parameter_distance(em, gm),
                objective_test=obj,
                objective_stderr=obj_se,
                gap=obj - float(-te.mean()),
                seconds=res["seconds"],
            )
        )
    resolution = num_params / (2 * n)
    return CertifyReport(
        rows=rows,
        em=em,
        n_train=n,
        n_test=x_test.shape[0],
        num_params=num_params,
        resolution=resolution,
        verdict=_verdict(rows, resolution),
        fits=fits,
    )


def _verdict(rows: list[CertifyRow], resolution: float) -> str:
    """One sentence: did minimising the DDPM ELBO nearly minimise -E log p on these data, and by how much."""
    ddpm = [r for r in rows if r.method == "ddpm"]
    if not ddpm:
        cont = [r for r in rows if r.method == "continuous"]
        if not cont:
            return "No denoising fit was run."
        r = cont[0]
        return (
            f"The continuous elbo fit costs {r.excess_train:.2e} nats/example of training log-likelihood against EM "
            f"(statistical resolution p/2N = {resolution:.2e})."
        )
    big_t = max(r.steps for r in ddpm)
    large = [r for r in ddpm if r.steps == big_t and r.variance == "fixed_large"]
    ref = large[0] if large else [r for r in ddpm if r.steps == big_t][0]
    held = ref.excess_train < resolution
    worst = max(ddpm, key=lambda r: r.excess_train)
    return (
        f"The claim {'held' if held else 'did not hold'} on these data: the DDPM-ELBO fit ({ref.variance}, T={big_t}) "
        f"costs {ref.excess_train:.2e} nats/example of training log-likelihood against the maximum-likelihood (EM) "
        "fit, "
        f"{'below' if held else 'above'} the statistical resolution p/(2N) = {resolution:.2e}; the worst discrete fit "
        f"(T={worst.steps}, {worst.variance}) costs {worst.excess_train:.2e}."
    )


def plot_gap(report: CertifyReport, path) -> None:
    """Plot, against ``T``, the excess training NLL of each DDPM fit over EM and the gap (loss at fit minus exact
    test NLL), one line per reverse variance; the continuous fit as a horizontal reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ddpm = [r for r in report.rows if r.method == "ddpm"]
    cont = [r for r in report.rows if r.method == "continuous"]
    for var in sorted({r.variance for r in ddpm}):
        rs = sorted((r for r in ddpm if r.variance == var), key=lambda r: r.steps)
        ts = [r.steps for r in rs]
        axes[0].plot(ts, [max(r.excess_train, 1e-12) for r in rs], "o-", label=var)
        axes[1].errorbar(ts, [r.gap for r in rs], yerr=[2 * r.objective_stderr for r in rs], fmt="o-", label=var)
    if cont:
        axes[0].axhline(max(cont[0].excess_train, 1e-12), color="k", ls=":", label="continuous elbo")
        axes[1].axhline(cont[0].gap, color="k", ls=":", label="continuous elbo")
    axes[0].axhline(report.resolution, color="grey", ls="--", label="p/(2N) resolution")
    axes[0].set(xscale="log", yscale="log", xlabel="T (steps)", ylabel="excess train NLL vs EM (nats/example)")
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set(xscale="log", xlabel="T (steps)", ylabel="-ELBO - exact NLL at the fit, test (nats/example)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("Certifying ELBO training on a Gaussian-mixture family")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
