"""The score-based density formula (DESIGN.md §2) as an estimator.

In log-SNR ``lam`` (``t = sigmoid(-lam)``) the formula reads

    log p_0(x) = -(d/2) log(2 pi e) + 1/2 ∫ [ d sigmoid(lam) - E_z || z - eps(x_t, t) ||^2 ] dlam.

It is exact for the exact noise predictor ``eps*`` and, with a learned ``eps``, the continuous-time ELBO of
the plug-in reverse SDE (seed 001). We integrate over ``[lam_min, lam_max]`` and close both ends with the
exact terms of Variational Diffusion Models (Kingma et al. 2021):

* noisy end: ``-KL(q(x_{t_max} | x) || N(0, I))`` with ``t_max = sigmoid(-lam_min)``;
* clean end: the Gaussian reconstruction term ``-(d/2) log(2 pi e t_min / (1 - t_min))``, ``t_min = sigmoid(-lam_max)``;
* in between: ``-1/2 ∫ E ||z - eps||^2 dlam`` (the likelihood-weighted denoising loss).

Their sum is a lower bound for any ``eps`` (decoder + reverse SDE + prior model) and tends to ``log p_0``
for ``eps*`` as the range widens (the missing tails are O(e^{lam_min}) and O(e^{-lam_max})). The result
is reported in the formula's own split, which adds up to the same number:

* ``noisy_end = -KL + (d/2) softplus(lam_min)``      (-> 0 as lam_min -> -inf)
* ``integral  = 1/2 ∫_{lam_min}^{lam_max} [d sigmoid(lam) - E||z - eps||^2] dlam``
* ``clean_end = -(d/2) log(2 pi e) - (d/2) softplus(-lam_max)``  (-> the Gaussian entropy constant)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .decoders import discretized_gaussian_log_likelihood, end_terms
from .epsfn import (
    DEFAULT_LAM_RANGE,
    EpsFn,
    call_eps,
    check_data,
    check_int,
    check_precision,
    resolve_lam_range,
    resolve_max_batch,
)
from .logdensity import LogDensity
from .mixtures import GaussianMixture
from .proposals import LambdaProposal

__all__ = [
    "log_density",
    "fit_proposal",
    "control_variate_integral",
    "stratified_mean_and_var",
    "example_generator",
    "end_terms",
    "integrate_expected_error",
    "formula_integrand",
    "DEFAULT_LAM_RANGE",
]

SCHEMES = ("stratified", "mc", "quadrature")


def formula_integrand(z: Tensor, eps: Tensor, lam: Tensor, norm_z: bool = True) -> Tensor:
    """One-sample integrand ``1/2 [D sigmoid(lam) - ||z - eps||^2]`` of the formula in log-SNR, per row.

    ``D`` is ``||z||^2`` (unbiased for ``d``; cancels most of the noise at high SNR) or ``d``.

    Args:
        z, eps: [N, *shape] noise and prediction. lam: [N] log-SNR.

    Returns:
        [N] float64.
    """
    z = z.flatten(1).to(torch.float64)
    err = (z - eps.flatten(1).to(torch.float64)).pow(2).sum(1)
    big_d = z.pow(2).sum(1) if norm_z else torch.full_like(err, z.shape[1])
    return 0.5 * (torch.sigmoid(lam) * big_d - err)


def _gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and weights on [0, 1] (float64)."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(0.5 * (nodes + 1)), torch.from_numpy(0.5 * weights)


def integrate_expected_error(
    expected_error: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    *,
    lam_min: float = DEFAULT_LAM_RANGE[0],
    lam_max: float = DEFAULT_LAM_RANGE[1],
    panels: int | None = None,
    nodes_per_panel: int = 16,
) -> LogDensity:
    """The truncated formula with the z-expectation given in closed form: only the lam-integral is numerical.

    Composite Gauss-Legendre in log-SNR (panels of width <= 1 by default), so it is accurate to
    ~1e-10 for smooth integrands. This is how the Gaussian control variate is added back, and it tests
    the t-integration apart from any z-noise.

    Args:
        expected_error: ``(x [B, *shape], t [B] float64) -> E_z ||z - eps(x_t, t)||^2`` [B].
        x: [B, *shape] data.

    Returns:
        :class:`LogDensity` with zero stderr and ``nfe = 0`` (closed forms are not model calls).
    """
    b = x.shape[0]
    d = x[0].numel()
    if panels is None:
        panels = max(1, math.ceil(lam_max - lam_min))
    u, w = _gauss_legendre(nodes_per_panel)
    edges = torch.linspace(lam_min, lam_max, panels + 1, dtype=torch.float64)
    width = edges[1:] - edges[:-1]
    lam = (edges[:-1, None] + width[:, None] * u[None]).flatten()
    wts = (width[:, None] * w[None]).flatten()
    integral = torch.zeros(b, dtype=torch.float64)
    for lam_j, w_j in zip(lam, wts, strict=True):
        t = torch.sigmoid(-lam_j).expand(b)
        mse = expected_error(x, t)
        integral += w_j * 0.5 * (d * torch.sigmoid(lam_j) - mse)
    noisy, clean = end_terms(x, lam_min, lam_max)
    return LogDensity(
        logp=noisy + integral + clean,
        stderr=torch.zeros(b, dtype=torch.float64),
        nfe=0.0,
        dim=d,
        terms={"noisy_end": noisy, "integral": integral, "clean_end": clean},
        method="formula-closed-form",
        info={"lam_min": lam_min, "lam_max": lam_max, "nodes": len(lam)},
    )


def control_variate_integral(gauss, x: Tensor, lam_min: float, lam_max: float) -> Tensor:
    """Exact ``1/2 ∫ [d sigmoid(lam) - E_z||z - eps_G||^2] dlam`` [B] of a control variate with closed-form
    denoising error (``gauss.expected_denoising_error_fn(x)`` gives it as a function of ``t``), by
    :func:`integrate_expected_error`: what the estimators add back after subtracting the control variate."""
    error_at = gauss.expected_denoising_error_fn(x)
    return integrate_expected_error(lambda _x, t: error_at(t), x, lam_min=lam_min, lam_max=lam_max).terms["integral"]


def stratified_mean_and_var(pairs: Tensor) -> tuple[Tensor, Tensor]:
    """Estimate and variance from ``pairs`` [B, S, 2]: two independent draws in each of S equal-mass strata.

    The mean over strata of the pair means; the variance of that estimate, ``sum_s (g_s1 - g_s2)^2 / 4 / S^2``
    (each stratum's variance from its own two draws, so the standard error is honest)."""
    strata = pairs.shape[1]
    return pairs.mean(2).mean(1), ((pairs[:, :, 0] - pairs[:, :, 1]) ** 2 / 4).sum(1) / strata**2


def example_generator(seed: int, index: int, stream: int) -> torch.Generator:
    """A ``torch.Generator`` keyed by (seed, example index, stream), so results do not depend on chunking.

    Every estimator draws an example's randomness from its own key; distinct ``stream`` numbers keep the
    draws of different estimators (and of the pilot, index -1) apart."""
    h = hashlib.blake2b(f"{seed}/{index}/{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))


def _resolve_control_variate(control_variate, x: Tensor) -> GaussianMixture | None:
    if control_variate is None or control_variate is False:
        return None
    if isinstance(control_variate, GaussianMixture):
        if control_variate.num_components != 1:
            raise ValueError("control_variate must be a single Gaussian (GaussianMixture with K = 1)")
        if control_variate.dim != x[0].numel():
            raise ValueError(f"control_variate has dimension {control_variate.dim}, data have {x[0].numel()}")
        return control_variate
    if isinstance(control_variate, Tensor):
        return GaussianMixture.fit_gaussian(check_data(control_variate, "control_variate data"))
    if control_variate == "auto":
        b, d = x.shape[0], x[0].numel()
        return GaussianMixture.fit_gaussian(x) if b > d else None
    if control_variate == "batch":
        return GaussianMixture.fit_gaussian(x)
    raise ValueError(
        "control_variate must be None, 'auto', 'batch', a single-Gaussian GaussianMixture or a tensor of reference data"
    )


class _Evaluator:
    """Evaluates the (control-variated) integrand on rows (example, lam, z) in memory-bounded chunks."""

    def __init__(self, eps_fn, x, gauss, norm_z, work_dtype, chunk_size, progress, cond=None, precision="fp32"):
        self.eps_fn = eps_fn
        self.cond = cond
        self.x = x
        self.gauss = gauss
        self.norm_z = norm_z
        self.work_dtype = work_dtype
        self.chunk_size = chunk_size
        self.progress = progress
        self.precision = precision
        self.calls = 0

    def __call__(self, ex_idx: Tensor, lam: Tensor, z: Tensor, desc: str = "") -> Tensor:
        """Integrand values [N] for rows ``ex_idx`` [N], ``lam`` [N] float64, ``z`` [N, *shape]."""
        n = len(ex_idx)
        out = torch.empty(n, dtype=torch.float64)
        starts = range(0, n, self.chunk_size)
        bar = tqdm(starts, desc=desc, disable=not self.progress or len(starts) < 2, leave=False)
        for s in bar:
            sl = slice(s, min(s + self.chunk_size, n))
            lam_c = lam[sl]
            t = torch.sigmoid(-lam_c)
            x0 = self.x[ex_idx[sl]].to(torch.float64)
            zc = z[sl].to(torch.float64)
            shape = (-1,) + (1,) * (x0.dim() - 1)
            a = torch.sigmoid(lam_c).sqrt().reshape(shape)
            sg = t.sqrt().reshape(shape)
            x_t = a * x0 + sg * zc
            extra = () if self.cond is None else (self.cond[ex_idx[sl]],)
            eps = call_eps(self.eps_fn, x_t.to(self.work_dtype), t, *extra, precision=self.precision)
            self.calls += len(lam_c)
            f = formula_integrand(zc, eps, lam_c, self.norm_z)
            if self.gauss is not None:
                eps_g = self.gauss.eps(x_t.flatten(1), t)
                f = f - formula_integrand(zc, eps_g, lam_c, self.norm_z)
            out[sl] = f
        return out


def _check_on_grid(x: Tensor, levels: int | None) -> None:
    """Data for a discretised decoder must lie on the grid ``2k/(L-1) - 1`` in [-1, 1]."""
    if levels is None or levels < 2:
        raise ValueError("decoder='discretized' needs levels >= 2 (e.g. 256 for 8-bit data)")
    xf = x.flatten(1).to(torch.float64)
    if xf.min() < -1 - 1e-6 or xf.max() > 1 + 1e-6:
        raise ValueError(
            f"data out of range for a discretised decoder: values in [{float(xf.min()):.4g}, "
            f"{float(xf.max()):.4g}], expected [-1, 1]"
        )
    k = (xf + 1) * (levels - 1) / 2
    off = (k - k.round()).abs().amax(1)
    if (off > 1e-3).any():
        rows = (off > 1e-3).nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"rows {rows} are not on the grid of {levels} levels 2k/(L-1) - 1 (dequantised data? "
            "use decoder='gaussian' for those)"
        )


def _discretized_clean_end(
    eps_fn: EpsFn,
    x: Tensor,
    lam_max: float,
    levels: int,
    draws: int,
    seed: int,
    work_dtype: torch.dtype,
    chunk_size: int,
    keys: Tensor,
    cond: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Clean-end term with DDPM's discretised decoder, and its variance, per example.

    ``E_z log P(k | x_{t_min}) - (d/2) softplus(lam_max)``: the second part removes the share of
    ``(d/2) sigmoid(lam)`` that the integral term carries above ``lam_max``'s complement, so that the total is
    ``log P_dec - KL - 1/2 ∫ E||z - eps||^2 dlam`` with no ``(d/2) log(2 pi e)`` counted.
    """
    b = x.shape[0]
    d = x[0].numel()
    lam = torch.tensor(lam_max, dtype=torch.float64)
    t = torch.sigmoid(-lam)
    a = torch.sigmoid(lam).sqrt()
    log_sd = -0.5 * lam  # sd^2 = t / (1 - t) = e^{-lam}
    zs = torch.stack(
        [
            torch.randn((draws, *x.shape[1:]), generator=example_generator(seed, i, 2), dtype=torch.float64)
            for i in keys.tolist()
        ]
    )  # [B, draws, *shape]
    x64 = x.to(torch.float64)
    rows_x = x64.repeat_interleave(draws, 0)
    rows_z = zs.reshape(b * draws, *x.shape[1:])
    vals = torch.empty(b * draws, dtype=torch.float64)
    for s in range(0, b * draws, chunk_size):
        sl = slice(s, min(s + chunk_size, b * draws))
        x_t = a * rows_x[sl] + t.sqrt() * rows_z[sl]
        tt = t.expand(x_t.shape[0])
        extra = () if cond is None else (cond.repeat_interleave(draws, 0)[sl],)
        eps = call_eps(eps_fn, x_t.to(work_dtype), tt, *extra).to(torch.float64)
        x0_hat = (x_t - t.sqrt() * eps) / a
        vals[sl] = discretized_gaussian_log_likelihood(rows_x[sl], x0_hat, log_sd, levels)
    vals = vals.reshape(b, draws)
    term = vals.mean(1) - 0.5 * d * float(F.softplus(lam))
    return term, vals.var(1) / draws


def _fit_proposal(
    evaluate: _Evaluator,
    b: int,
    shape: torch.Size,
    lam_min: float,
    lam_max: float,
    seed: int,
    pilot_examples: int,
    pilot_nodes: int,
) -> tuple[LambdaProposal, int]:
    """Pilot run: ``pilot_nodes`` stratified-uniform log-SNR draws on up to ``pilot_examples`` evenly spaced
    examples; returns the fitted proposal and the number of ``eps_fn`` calls spent."""
    pick = torch.linspace(0, b - 1, min(b, pilot_examples)).round().long().unique()
    g = example_generator(seed, -1, 7)
    m = len(pick)
    u = (
        torch.arange(pilot_nodes, dtype=torch.float64)[None]
        + torch.rand(m, pilot_nodes, generator=g, dtype=torch.float64)
    ) / pilot_nodes
    lam_p = lam_min + (lam_max - lam_min) * u.flatten()
    z_p = torch.randn((m * pilot_nodes, *shape), generator=g, dtype=torch.float64)
    ex_p = pick.repeat_interleave(pilot_nodes)
    f_p = evaluate(ex_p, lam_p, z_p, desc="pilot")
    return LambdaProposal.fit(lam_p, f_p, lam_min, lam_max), len(ex_p)


def fit_proposal(
    eps_fn: EpsFn,
    x: Tensor,
    *,
    lam_min: float | None = None,
    lam_max: float | None = None,
    control_variate: str | GaussianMixture | Tensor | None = None,
    norm_z: bool = True,
    seed: int = 0,
    pilot_examples: int = 64,
    pilot_nodes: int = 16,
    double: bool = False,
    cond: Tensor | None = None,
    precision: str = "fp32",
    max_batch: int | None = None,
    chunk_size: int | None = None,
) -> LambdaProposal:
    """Fit the adaptive log-SNR proposal of :func:`log_density` once, to reuse across calls.

    Reusing one proposal makes results independent of how a data set is split into batches or processes,
    and gives common random numbers across models (e.g. the classes of a diffusion classifier). Pass the
    same ``control_variate`` and ``norm_z`` as to :func:`log_density`.

    Args:
        eps_fn: the model. x: [B, *shape] pilot examples (up to ``pilot_examples`` evenly spaced are used).
        lam_min, lam_max, cond, precision, max_batch: as in :func:`log_density` (``chunk_size``: deprecated
            alias of ``max_batch``).

    Returns:
        A :class:`~scoredensity.proposals.LambdaProposal` on ``[lam_min, lam_max]``.
    """
    x = check_data(x)
    lam_min, lam_max = resolve_lam_range(eps_fn, lam_min, lam_max)
    precision = check_precision(precision)
    max_batch = resolve_max_batch(max_batch, x[0].numel(), chunk_size)
    pilot_examples = check_int("pilot_examples", pilot_examples)
    pilot_nodes = check_int("pilot_nodes", pilot_nodes)
    gauss = _resolve_control_variate(control_variate, x)
    work_dtype = torch.float64 if double else x.dtype
    evaluate = _Evaluator(eps_fn, x, gauss, norm_z, work_dtype, max_batch, False, cond, precision)
    proposal, _ = _fit_proposal(evaluate, x.shape[0], x.shape[1:], lam_min, lam_max, seed, pilot_examples, pilot_nodes)
    return proposal


def _integrate_block(
    evaluate: _Evaluator,
    proposal: LambdaProposal,
    idx: Tensor,
    shape: torch.Size,
    n_t: int,
    n_z: int,
    units: int,
    scheme: str,
    antithetic: bool,
    seed: int,
    keys: Tensor,
) -> tuple[Tensor, Tensor]:
    """Integral estimate and its variance [len(idx)] for the examples ``idx`` (randomness keyed by ``keys[idx]``)."""
    b = len(idx)
    us, zs = [], []
    for i in keys[idx].tolist():
        g = example_generator(seed, i, 0)
        if scheme == "stratified":
            strata = n_t // 2
            u = (
                torch.arange(strata, dtype=torch.float64).repeat_interleave(2)
                + torch.rand(n_t, generator=g, dtype=torch.float64)
            ) / strata
        elif scheme == "mc":
            u = torch.rand(n_t, generator=g, dtype=torch.float64)
        else:
            u = _gauss_legendre(n_t)[0]
        z = torch.randn((n_t, units, *shape), generator=g, dtype=torch.float64)
        if antithetic:
            z = torch.cat([z, -z], dim=1)
        us.append(u)
        zs.append(z)
    u = torch.stack(us)  # [b, n_t]
    lam = proposal.icdf(u)
    inv_q = 1.0 / proposal.pdf(lam)  # [b, n_t]
    z = torch.stack(zs)  # [b, n_t, n_z, *shape]
    ex = idx.repeat_interleave(n_t * n_z)
    lam_rows = lam.repeat_interleave(n_z, dim=1).flatten()
    f = evaluate(ex, lam_rows, z.reshape(-1, *shape)).reshape(b, n_t, n_z)
    if antithetic:
        f = 0.5 * (f[:, :, :units] + f[:, :, units:])  # [b, n_t, units]
    g_val = f * inv_q[:, :, None]  # importance-weighted integrand per draw

    # combine per scheme; the variance comes from independent randomisations
    if scheme == "stratified":
        integral, var = stratified_mean_and_var(g_val.mean(2).reshape(b, n_t // 2, 2))
    elif scheme == "mc":
        draws = g_val.mean(2)  # the n_z draws at one node share lam: average them first
        integral = draws.mean(1)
        var = draws.var(1) / n_t
    else:
        w = _gauss_legendre(n_t)[1][None, :]
        integral = (w * g_val.mean(2)).sum(1)
        var = (w**2 * g_val.var(2) / units).sum(1)
    return integral, var


def log_density(
    eps_fn: EpsFn,
    x: Tensor,
    *,
    n_t: int = 128,
    n_z: int = 1,
    lam_min: float | None = None,
    lam_max: float | None = None,
    scheme: str = "stratified",
    importance: str | LambdaProposal = "adaptive",
    control_variate: str | GaussianMixture | Tensor | None = "auto",
    norm_z: bool = True,
    antithetic: bool = False,
    seed: int = 0,
    double: bool = False,
    chunk_size: int | None = None,
    pilot_examples: int = 64,
    pilot_nodes: int = 16,
    decoder: str = "gaussian",
    levels: int | None = None,
    decoder_draws: int = 4,
    example_ids: Tensor | None = None,
    cond: Tensor | None = None,
    progress: bool | None = None,
    precision: str = "fp32",
    max_batch: int | None = None,
) -> LogDensity:
    """Log-density of ``x`` under the model ``eps_fn`` by the score-based density formula (DESIGN.md §2).

    Exact (up to Monte Carlo error) for the exact noise predictor; for a learned ``eps_fn`` an unbiased
    estimate of a lower bound (the continuous-time ELBO with VDM end terms, see the module docstring).

    Args:
        eps_fn: noise predictor in canonical time, ``eps_fn(x_t [N, *shape], t [N] float64) -> [N, *shape]``.
        x: [B, *shape] data (any shape; d = elements per example). Must be finite.
        n_t: log-SNR nodes per example (even for ``stratified``).
        n_z: noise draws per node. ``eps_fn`` calls per example = ``n_t * n_z`` (plus the shared pilot).
        lam_min, lam_max: log-SNR range; the ends are closed by exact terms. ``None`` (default): the range the
            model carries as ``eps_fn.lam_range`` (a trained network from ``load_run``), else [-20, 20]: the
            truncation error is O(e^-20 * (d + |Δ log p|)), negligible for densities with feature scales
            above ~1e-3; t is passed to ``eps_fn`` in float64 so ``1 - t`` is resolved there.
        scheme: ``"stratified"`` (default; n_t/2 equal-mass strata of the proposal, two independent draws
            each, so the standard error is honest), ``"mc"`` (independent draws) or ``"quadrature"``
            (Gauss-Legendre in the proposal's CDF variable; needs ``n_z >= 2``; its standard error covers the
            z-noise only, not the deterministic quadrature error, which is small with the adaptive proposal but
            not with ``importance="uniform"`` at few nodes: prefer ``stratified`` when the error bar matters).
        importance: ``"adaptive"`` (default: a pilot of ``pilot_nodes`` uniform draws on up to
            ``pilot_examples`` examples fits a piecewise-constant proposal ∝ RMS of the integrand; pilot
            values are not reused, so the estimate stays unbiased), ``"uniform"``, or a fitted
            :class:`~scoredensity.proposals.LambdaProposal` to reuse across calls.
        control_variate: the same formula, same lam and z, on a Gaussian with closed-form ``eps``,
            subtracted and its exact expectation added back. ``"auto"`` (default) fits it to the batch when
            B > d, ``"batch"`` always, a tensor of reference data fits it to them, a single-Gaussian
            :class:`GaussianMixture` is used as is, ``None`` turns it off. Never biases the result.
        norm_z: use ``||z||^2`` in place of ``d`` inside the integrand (unbiased, cancels noise at high SNR).
        antithetic: draw z in pairs (z, -z) at the same lam (needs even ``n_z``; measured to help little).
        seed: all randomness derives from (seed, example index): results do not depend on ``chunk_size``.
        double: hand ``x_t`` to ``eps_fn`` in float64 (else in x's dtype). ``t`` is always float64.
        chunk_size: deprecated alias of ``max_batch``.
        max_batch: rows of ``x_t`` per ``eps_fn`` call (bounds memory); default from a memory budget,
            :func:`scoredensity.epsfn.default_max_batch`.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: autocast of the network call only; the
            integrand, end terms and sums stay in float64.
        decoder: the clean-end term. ``"gaussian"`` (default; continuous or dequantised data): the Gaussian
            reconstruction term of VDM, equal to the formula with ``eps = 0`` above ``lam_max``.
            ``"discretized"`` (data on ``levels`` levels scaled to [-1, 1], no dequantisation): the
            probability of the data's bin under ``N(x0_hat(x_{t_min}), t_min / (1 - t_min))`` discretised
            to the bins (DDPM's decoder), averaged over ``decoder_draws`` draws of z; then ``logp`` is a
            lower bound on ``log P(k)`` (a probability, nats) and carries no ``(d/2) log(2 pi e)``.
        levels: number of levels ``L`` for the discretised decoder (grid ``2k/(L-1) - 1``).
        decoder_draws: draws of z for the discretised decoder (>= 2 gives its standard error).
        example_ids: [B] integer keys of the examples' random streams (default ``0..B-1``). Pass global
            indices when a data set is evaluated in batches or shards: with a fixed ``importance=`` proposal and
            ``control_variate``, each example's result is then the same whatever the batching.
        cond: [B, ...] per-example condition of a conditional model (class labels, a context vector): then
            ``eps_fn`` is called as ``eps_fn(x_t, t, cond_rows)`` with the rows of ``cond`` aligned to ``x_t``.
        progress: tqdm bar over chunks (default: when more than 4 chunks).

    Returns:
        :class:`LogDensity` with ``logp`` and ``stderr`` [B] in nats, ``nfe`` per example and terms
        ``noisy_end``, ``integral``, ``clean_end``; ``info`` records the range, precision and max_batch used.

    Defaults were chosen by ``benchmarks/density_formula.py`` (see docs/benchmarks.md).
    """
    x = check_data(x)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    lam_min, lam_max = resolve_lam_range(eps_fn, lam_min, lam_max)
    precision = check_precision(precision)
    n_t = check_int("n_t", n_t)
    n_z = check_int("n_z", n_z)
    chunk_size = resolve_max_batch(max_batch, x[0].numel(), chunk_size)
    if scheme == "stratified" and n_t % 2:
        raise ValueError("scheme='stratified' needs an even n_t (two draws per stratum for an honest stderr)")
    if decoder not in ("gaussian", "discretized"):
        raise ValueError(f"decoder must be 'gaussian' or 'discretized', got {decoder!r}")
    if decoder == "discretized":
        _check_on_grid(x, levels)
        if decoder_draws < 2:
            raise ValueError("decoder_draws must be >= 2 for a standard error")
    if antithetic and n_z % 2:
        raise ValueError("antithetic=True needs an even n_z")
    units = n_z // 2 if antithetic else n_z
    if scheme == "mc" and n_t < 2:
        raise ValueError("scheme='mc' needs n_t >= 2 independent nodes for a standard error")
    if scheme == "quadrature" and units < 2:
        raise ValueError("scheme='quadrature' needs n_z >= 2 (>= 4 with antithetic) for a standard error")

    b = x.shape[0]
    shape = x.shape[1:]
    d = x[0].numel()
    work_dtype = torch.float64 if double else x.dtype
    total_rows = b * n_t * n_z
    if progress is None:
        progress = total_rows > 4 * chunk_size
    gauss = _resolve_control_variate(control_variate, x)
    if cond is not None and (not isinstance(cond, Tensor) or cond.shape[0] != b):
        raise ValueError(f"cond must be a tensor with one row per example ({b})")
    evaluate = _Evaluator(eps_fn, x, gauss, norm_z, work_dtype, chunk_size, progress, cond, precision)
    if example_ids is None:
        keys = torch.arange(b)
    else:
        keys = torch.as_tensor(example_ids).long().flatten()
        if keys.shape != (b,):
            raise ValueError(f"example_ids must have one entry per example ({b}), got shape {tuple(keys.shape)}")

    # ---- the proposal over log-SNR
    if isinstance(importance, LambdaProposal):
        proposal = importance
        if (proposal.lam_min, proposal.lam_max) != (lam_min, lam_max):
            raise ValueError("the proposal's range differs from [lam_min, lam_max]")
        pilot_calls = 0
    elif importance == "uniform":
        proposal = LambdaProposal.uniform(lam_min, lam_max)
        pilot_calls = 0
    elif importance == "adaptive":
        proposal, pilot_calls = _fit_proposal(evaluate, b, shape, lam_min, lam_max, seed, pilot_examples, pilot_nodes)
    else:
        raise ValueError(f"importance must be 'adaptive', 'uniform' or a LambdaProposal, got {importance!r}")

    # ---- examples in blocks so that memory stays bounded by chunk_size rows
    per_example = n_t * n_z
    block = max(1, chunk_size // per_example)
    integral = torch.empty(b, dtype=torch.float64)
    var = torch.empty(b, dtype=torch.float64)
    for s in tqdm(range(0, b, block), desc="log_density", disable=not progress or b <= block):
        idx = torch.arange(s, min(s + block, b))
        integral[idx], var[idx] = _integrate_block(
            evaluate, proposal, idx, shape, n_t, n_z, units, scheme, antithetic, seed, keys
        )

    if gauss is not None:
        integral = integral + control_variate_integral(gauss, x.flatten(1), lam_min, lam_max)
    noisy, clean = end_terms(x, lam_min, lam_max)
    nfe = n_t * n_z + pilot_calls / b
    if decoder == "discretized":
        clean, dec_var = _discretized_clean_end(
            eps_fn, x, lam_max, levels, decoder_draws, seed, work_dtype, chunk_size, keys, cond
        )
        var = var + dec_var
        nfe += decoder_draws
    return LogDensity(
        logp=noisy + integral + clean,
        stderr=var.clamp_min(0).sqrt(),
        nfe=nfe,
        dim=d,
        terms={"noisy_end": noisy, "integral": integral, "clean_end": clean},
        method="formula",
        info={
            "lam_min": lam_min,
            "lam_max": lam_max,
            "n_t": n_t,
            "n_z": n_z,
            "scheme": scheme,
            "importance": importance if isinstance(importance, str) else "proposal",
            "control_variate": gauss is not None,
            "norm_z": norm_z,
            "antithetic": antithetic,
            "seed": seed,
            "decoder": decoder,
            "levels": levels,
            "precision": precision,
            "max_batch": chunk_size,
        },
    )
