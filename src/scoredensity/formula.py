"""The score-based density formula (docs/design.md §2) as an estimator.

In log-SNR ``lam`` (``t = sigmoid(-lam)``) the formula reads

    log p_0(x) = -(d/2) log(2 pi e) + 1/2 ∫ [ d sigmoid(lam) - E_z || z - eps(x_t, t) ||^2 ] dlam.

It is exact for the exact noise predictor ``eps*`` and, with a learned ``eps``, the continuous-time ELBO of
the plug-in reverse SDE (Huang et al. 2021). We integrate over ``[lam_min, lam_max]`` and close both ends with the
exact terms of Variational Diffusion Models (Kingma et al. 2021):

* noisy end: ``-KL(q(x_{t_max} | x) || N(0, I))`` with ``t_max = sigmoid(-lam_min)``;
* clean end: the Gaussian reconstruction term ``-(d/2) log(2 pi e t_min / (1 - t_min))``, ``t_min = sigmoid(-lam_max)``
  (``decoder="gaussian"``), or a decoder of discrete data: DDPM's discretised Gaussian (``"discretized"``) or
  VDM's categorical Gaussian (``"categorical"``);
* in between: ``-1/2 ∫ E ||z - eps||^2 dlam`` (the likelihood-weighted denoising loss).

Their sum is a lower bound for any ``eps`` (decoder + reverse SDE + prior model) and tends to ``log p_0``
for ``eps*`` as the range widens (the missing tails are O(e^{lam_min}) and O(e^{-lam_max})). The result
is reported in the formula's own split, which adds up to the same number:

* ``noisy_end = -KL + (d/2) softplus(lam_min)``      (-> 0 as lam_min -> -inf)
* ``integral  = 1/2 ∫_{lam_min}^{lam_max} [d sigmoid(lam) - E||z - eps||^2] dlam``
* ``clean_end = -(d/2) log(2 pi e) - (d/2) softplus(-lam_max)``  (-> the Gaussian entropy constant)

Execution. Every draw comes from :mod:`scoredensity.rng`, keyed by (seed, stream, example id), generated in
batched tensor ops on the data's device: the bits do not depend on batch, ``max_batch`` or shard. The work runs
on ``x``'s device (float64 there, except on MPS, which has no float64: then on the CPU) under
``torch.inference_mode()``, in blocks of examples of at most ``max_batch`` rows, so memory does not grow with the
number of examples. Results come back on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from . import rng
from .conventions import Convention, get_convention
from .decoders import categorical_gaussian_log_likelihood, discretized_gaussian_log_likelihood, end_terms
from .epsfn import (
    DEFAULT_LAM_RANGE,
    EpsFn,
    call_eps,
    check_data,
    check_int,
    check_precision,
    resolve_lam_range,
    resolve_max_batch,
    row_blocks,
    work_device,
)
from .logdensity import LogDensity
from .mixtures import GaussianMixture, StandardNormal
from .proposals import LambdaProposal

__all__ = [
    "DECODERS",
    "log_density",
    "fit_proposal",
    "resolve_control_variate",
    "control_variate_integral",
    "stratified_mean_and_var",
    "end_terms",
    "integrate_expected_error",
    "formula_integrand",
    "DEFAULT_LAM_RANGE",
    "CONTROL_VARIATES",
]

SCHEMES = ("stratified", "mc", "quadrature")
CONTROL_VARIATES = ("auto", "batch", "prior", "batch_or_prior")
Reference = GaussianMixture | StandardNormal


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


def _gauss_legendre(n: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and weights on [0, 1] (float64, on ``device``)."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(0.5 * (nodes + 1)).to(device), torch.from_numpy(0.5 * weights).to(device)


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
    the t-integration apart from any z-noise. Computed on ``x``'s device; the result is returned there.

    Args:
        expected_error: ``(x [B, *shape], t [B] float64) -> E_z ||z - eps(x_t, t)||^2`` [B].
        x: [B, *shape] data.

    Returns:
        :class:`LogDensity` with zero stderr and ``nfe = 0`` (closed forms are not model calls).
    """
    b = x.shape[0]
    d = x[0].numel()
    dev = work_device(x)
    nodes_per_panel = check_int("nodes_per_panel", nodes_per_panel)
    if panels is None:
        lam, wts = _composite_nodes(lam_min, lam_max, nodes_per_panel, dev)
    else:
        panels = check_int("panels", panels)
        u, w = _gauss_legendre(nodes_per_panel, dev)
        edges = torch.linspace(lam_min, lam_max, panels + 1, dtype=torch.float64, device=dev)
        width = edges[1:] - edges[:-1]
        lam = (edges[:-1, None] + width[:, None] * u[None]).flatten()
        wts = (width[:, None] * w[None]).flatten()
    integral = torch.zeros(b, dtype=torch.float64, device=dev)
    for lam_j, w_j in zip(lam, wts, strict=True):  # a loop over quadrature nodes, vectorised over examples
        t = torch.sigmoid(-lam_j).expand(b)
        mse = expected_error(x, t)
        integral += w_j * 0.5 * (d * torch.sigmoid(lam_j) - mse)
    noisy, clean = end_terms(x, lam_min, lam_max)
    return LogDensity(
        logp=noisy + integral + clean,
        stderr=torch.zeros(b, dtype=torch.float64, device=dev),
        nfe=0.0,
        dim=d,
        terms={"noisy_end": noisy, "integral": integral, "clean_end": clean},
        method="formula-closed-form",
        info={"lam_min": lam_min, "lam_max": lam_max, "nodes": len(lam)},
    )


def _composite_nodes(lam_min: float, lam_max: float, nodes_per_panel: int, device) -> tuple[Tensor, Tensor]:
    """Composite Gauss-Legendre nodes and weights [N] in log-SNR on panels of width <= 1 (float64)."""
    panels = max(1, math.ceil(lam_max - lam_min))
    u, w = _gauss_legendre(nodes_per_panel, device)
    edges = torch.linspace(lam_min, lam_max, panels + 1, dtype=torch.float64, device=device)
    width = edges[1:] - edges[:-1]
    return (edges[:-1, None] + width[:, None] * u[None]).flatten(), (width[:, None] * w[None]).flatten()


def control_variate_integral(
    gauss: Reference, x: Tensor, lam_min: float, lam_max: float, nodes_per_panel: int = 16
) -> Tensor:
    """Exact ``1/2 ∫ [d sigmoid(lam) - E_z||z - eps_G||^2] dlam`` [B] of a control variate with closed-form
    denoising error: what the estimators add back after subtracting the control variate.

    The same composite Gauss-Legendre rule as :func:`integrate_expected_error`, evaluated for all nodes at once
    (``gauss.expected_denoising_error_grid``: one [B, N] matrix product), in blocks of rows so memory stays
    O(4096 N). Args: x [B, *shape] (on the reference's device). Returns [B] float64."""
    lam, wts = _composite_nodes(lam_min, lam_max, nodes_per_panel, work_device(x))
    t = torch.sigmoid(-lam)
    d = x[0].numel()
    out = []
    for sl in row_blocks(x.shape[0], 4096):
        err = gauss.expected_denoising_error_grid(x[sl].flatten(1), t)  # [b, N]
        out.append(0.5 * ((d * torch.sigmoid(lam))[None, :] - err) @ wts)
    return torch.cat(out)


def stratified_mean_and_var(pairs: Tensor) -> tuple[Tensor, Tensor]:
    """Estimate and variance from ``pairs`` [B, S, 2]: two independent draws in each of S equal-mass strata.

    The mean over strata of the pair means; the variance of that estimate, ``sum_s (g_s1 - g_s2)^2 / 4 / S^2``
    (each stratum's variance from its own two draws, so the standard error is honest)."""
    strata = pairs.shape[1]
    return pairs.mean(2).mean(1), ((pairs[:, :, 0] - pairs[:, :, 1]) ** 2 / 4).sum(1) / strata**2


def resolve_control_variate(control_variate, x: Tensor) -> Reference | None:
    """The reference model with closed-form ``eps`` that an estimator subtracts (and adds back exactly).

    One meaning for every estimator:

    * ``None`` / ``False``: none;
    * ``"auto"``: the Gaussian fitted to the batch when B > d (its covariance is then estimable), else none;
    * ``"batch"``: the Gaussian fitted to the batch;
    * ``"prior"``: the standard normal ``N(0, I)`` (:class:`~scoredensity.mixtures.StandardNormal`);
    * ``"batch_or_prior"``: the batch Gaussian when B > d, else ``N(0, I)`` (the divergence ELBO's default: there
      ``N(0, I)`` cancels the O(sqrt(d)) noise of ``||eps||^2`` at low SNR; for the formula it adds variance);
    * a single-Gaussian :class:`GaussianMixture`: used as is; a tensor of reference data: the Gaussian fitted to it.

    Args:
        x: [B, *shape] the data being evaluated.

    Returns:
        The reference on ``x``'s work device (CPU for MPS), or ``None``.

    Raises:
        ValueError: for an unknown value or a reference of the wrong dimension.
    """
    dev = work_device(x)
    b, d = x.shape[0], x[0].numel()
    if control_variate is None or control_variate is False:
        return None
    if isinstance(control_variate, GaussianMixture):
        if control_variate.num_components != 1:
            raise ValueError("control_variate must be a single Gaussian (GaussianMixture with K = 1)")
        if control_variate.dim != d:
            raise ValueError(f"control_variate has dimension {control_variate.dim}, data have {d}")
        return control_variate.to(dev)
    if isinstance(control_variate, StandardNormal):
        return control_variate
    if isinstance(control_variate, Tensor):
        ref = GaussianMixture.fit_gaussian(check_data(control_variate, "control_variate data"))
        if ref.dim != d:
            raise ValueError(f"control_variate data have dimension {ref.dim}, data have {d}")
        return ref.to(dev)
    if isinstance(control_variate, str) and control_variate in CONTROL_VARIATES:
        if control_variate == "batch" or (control_variate in ("auto", "batch_or_prior") and b > d):
            return GaussianMixture.fit_gaussian(x).to(dev)
        if control_variate in ("prior", "batch_or_prior"):
            return StandardNormal()
        return None
    raise ValueError(
        f"control_variate must be None, one of {CONTROL_VARIATES}, a single-Gaussian GaussianMixture or a tensor "
        f"of reference data, got {control_variate!r}"
    )


class _Evaluator:
    """Evaluates the (control-variated) integrand on rows (example, lam, z) in chunks of ``max_batch`` rows."""

    def __init__(self, eps_fn, x, gauss, norm_z, work_dtype, max_batch, progress, cond=None, precision="fp32"):
        self.eps_fn = eps_fn
        self.cond = cond
        self.x = x
        self.dev = work_device(x)
        self.gauss = gauss
        self.norm_z = norm_z
        self.work_dtype = work_dtype
        self.max_batch = max_batch
        self.progress = progress
        self.precision = precision
        self.calls = 0

    def eps(self, ex_idx: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The model's ``eps`` [N, *shape] float64 (work device) at ``x_t`` [N, *shape] float64, ``t`` [N].

        The network gets fresh copies of ``x_t`` and ``t`` (an ``eps_fn`` that writes into its inputs cannot
        corrupt the estimate) and the condition rows of ``ex_idx``."""
        outs = []
        for sl in row_blocks(len(t), self.max_batch):
            extra = () if self.cond is None else (self.cond[ex_idx[sl].to(self.cond.device)],)
            x_in = x_t[sl].to(device=self.x.device, dtype=self.work_dtype, copy=True)
            out = call_eps(self.eps_fn, x_in, t[sl].clone(), *extra, precision=self.precision)
            outs.append(out.to(device=self.dev, dtype=torch.float64))
        self.calls += len(t)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def __call__(self, ex_idx: Tensor, lam: Tensor, z: Tensor, desc: str = "") -> Tensor:
        """Integrand values [N] for rows ``ex_idx`` [N], ``lam`` [N] float64, ``z`` [N, *shape] float64."""
        n = len(ex_idx)
        out = torch.empty(n, dtype=torch.float64, device=self.dev)
        starts = range(0, n, self.max_batch)
        bar = tqdm(starts, desc=desc, disable=not self.progress or len(starts) < 2, leave=False)
        for s in bar:
            sl = slice(s, min(s + self.max_batch, n))
            lam_c, zc = lam[sl], z[sl]
            t = torch.sigmoid(-lam_c)
            x0 = self.x[ex_idx[sl].to(self.x.device)].to(device=self.dev, dtype=torch.float64)
            shape = (-1,) + (1,) * (x0.dim() - 1)
            x_t = torch.sigmoid(lam_c).sqrt().reshape(shape) * x0 + t.sqrt().reshape(shape) * zc
            f = formula_integrand(zc, self.eps(ex_idx[sl], x_t, t), lam_c, self.norm_z)
            if self.gauss is not None:
                f = f - formula_integrand(zc, self.gauss.eps(x_t.flatten(1), t), lam_c, self.norm_z)
            out[sl] = f
        return out


def _check_on_grid(x: Tensor, levels: int | None, rows_per_block: int, decoder: str = "discretized") -> None:
    """Data for a discrete decoder must lie on its grid in [-1, 1] (checked in blocks): ``2k/(L-1) - 1`` for
    ``"discretized"``, VDM's centres ``2(k + 1/2)/L - 1`` for ``"categorical"``."""
    if levels is None:
        raise ValueError(f"decoder={decoder!r} needs levels >= 2 (e.g. 256 for 8-bit data)")
    levels = check_int("levels", levels, 2)
    bad: list[int] = []
    lo, hi = math.inf, -math.inf
    for sl in row_blocks(x.shape[0], rows_per_block):
        xf = x[sl].flatten(1).to(device=work_device(x), dtype=torch.float64)
        lo, hi = min(lo, float(xf.min())), max(hi, float(xf.max()))
        k = (xf + 1) * (levels - 1) / 2 if decoder == "discretized" else (xf + 1) * levels / 2 - 0.5
        off = (k - k.round()).abs().amax(1)
        bad += (sl.start + (off > 1e-3).nonzero().flatten()).tolist()[: 10 - len(bad)]
    if lo < -1 - 1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"data out of range for decoder={decoder!r}: values in [{lo:.4g}, {hi:.4g}], expected [-1, 1]")
    if bad and decoder == "discretized":
        raise ValueError(
            f"rows {bad} are not on the grid of {levels} levels 2k/(L-1) - 1 (dequantised data? "
            "use decoder='gaussian' for those)"
        )
    if bad:
        raise ValueError(
            f"rows {bad} are not on VDM's grid of {levels} levels 2(k + 1/2)/L - 1 that decoder='categorical' "
            "(convention 'vdm') scores: encode level k as 2(k + 1/2)/L - 1, not 2k/(L-1) - 1"
        )


DECODERS = ("gaussian", "discretized", "categorical")


def _apply_convention(convention: str | Convention | None, o: dict) -> str | None:
    """Fill the options of :func:`log_density` that the caller left as ``None`` from a named convention.

    ``lam_min``/``lam_max`` from its ``lam_range`` (the prior sits at ``lam_min``), ``decoder`` and ``levels``
    from its clean end. Explicit arguments win; the returned name then lists them (``"vdm+lam_min=-4"``).
    Returns ``None`` without a convention.

    Raises:
        ValueError: for a discrete-time convention (``ddpm_elbo`` evaluates those) or a CDF other than exact.
    """
    if convention is None:
        o["decoder"] = o["decoder"] or "gaussian"
        return None
    conv = get_convention(convention)
    if conv.time != "continuous" and conv.name != "scoredensity":
        raise ValueError(
            f"convention {conv.name!r} is a discrete-time (T-step) bound: evaluate it with ddpm_elbo; log_density "
            "takes the continuous ones: scoredensity, score-sde, vdm"
        )
    if conv.cdf != "exact":
        raise ValueError(f"convention {conv.name!r}: log_density's discretised decoder uses the exact normal CDF only")
    decoder = {"discretized": "discretized", "categorical": "categorical"}.get(conv.clean_end, "gaussian")
    base = {
        "lam_min": None if conv.lam_range is None else conv.lam_range[0],
        "lam_max": None if conv.lam_range is None else conv.lam_range[1],
        "decoder": decoder,
        "levels": conv.levels if decoder != "gaussian" else None,
    }
    changed = {k: o[k] for k in base if o[k] is not None and o[k] != base[k]}
    for k, v in base.items():
        if o[k] is None:
            o[k] = v
    return conv.name + ("+" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) if changed else "")


# ---------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class _Settings:
    """The checked options of one :func:`log_density` call."""

    n_t: int
    n_z: int
    units: int  # independent z draws per node (n_z / 2 with antithetic pairs)
    lam_min: float
    lam_max: float
    scheme: str
    antithetic: bool
    norm_z: bool
    seed: int
    work_dtype: torch.dtype
    max_batch: int
    precision: str
    progress: bool
    decoder: str
    levels: int | None
    decoder_draws: int


def _check_options(eps_fn: EpsFn, x: Tensor, cond: Tensor | None, o: dict) -> _Settings:
    """Validate the options of :func:`log_density` (one-line errors naming the option) and resolve defaults."""
    if o["scheme"] not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {o['scheme']!r}")
    scheme = o["scheme"]
    lam_min, lam_max = resolve_lam_range(eps_fn, o["lam_min"], o["lam_max"])
    precision = check_precision(o["precision"])
    n_t, n_z = check_int("n_t", o["n_t"]), check_int("n_z", o["n_z"])
    max_batch = resolve_max_batch(o["max_batch"], x[0].numel(), o["chunk_size"])
    seed = check_int("seed", o["seed"], minimum=-(1 << 63))
    if scheme == "stratified" and n_t % 2:
        raise ValueError("scheme='stratified' needs an even n_t (two draws per stratum for an honest stderr)")
    if o["decoder"] not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {o['decoder']!r}")
    decoder_draws = check_int("decoder_draws", o["decoder_draws"])
    if o["decoder"] != "gaussian":
        _check_on_grid(x, o["levels"], max_batch, o["decoder"])
        if decoder_draws < 2:
            raise ValueError("decoder_draws must be >= 2 for a standard error")
    if o["antithetic"] and n_z % 2:
        raise ValueError("antithetic=True needs an even n_z")
    units = n_z // 2 if o["antithetic"] else n_z
    if scheme == "mc" and n_t < 2:
        raise ValueError("scheme='mc' needs n_t >= 2 independent nodes for a standard error")
    if scheme == "quadrature" and units < 2:
        raise ValueError("scheme='quadrature' needs n_z >= 2 (>= 4 with antithetic) for a standard error")
    if cond is not None and (not isinstance(cond, Tensor) or cond.shape[0] != x.shape[0]):
        raise ValueError(f"cond must be a tensor with one row per example ({x.shape[0]})")
    progress = o["progress"]
    if progress is None:
        progress = x.shape[0] * n_t * n_z > 4 * max_batch
    return _Settings(
        n_t=n_t,
        n_z=n_z,
        units=units,
        lam_min=lam_min,
        lam_max=lam_max,
        scheme=scheme,
        antithetic=bool(o["antithetic"]),
        norm_z=bool(o["norm_z"]),
        seed=seed,
        work_dtype=torch.float64 if o["double"] else x.dtype,
        max_batch=max_batch,
        precision=precision,
        progress=bool(progress),
        decoder=o["decoder"],
        levels=o["levels"],
        decoder_draws=decoder_draws,
    )


# ---------------------------------------------------------------------------------------- the proposal
def _pilot_proposal(
    evaluate: _Evaluator,
    b: int,
    shape: torch.Size,
    lam_range: tuple[float, float],
    seed: int,
    pilot_examples: int,
    pilot_nodes: int,
) -> tuple[LambdaProposal, int]:
    """Pilot run: ``pilot_nodes`` stratified-uniform log-SNR draws on up to ``pilot_examples`` evenly spaced
    examples (stream FORMULA_PILOT, keyed by the pilot slot); the fitted proposal and the ``eps_fn`` calls spent."""
    dev = evaluate.dev
    lam_min, lam_max = lam_range
    pick = torch.linspace(0, b - 1, min(b, pilot_examples), device=dev).round().long().unique()
    slot = torch.arange(len(pick), device=dev)
    u = rng.uniforms(seed, rng.Stream.FORMULA_PILOT, slot, pilot_nodes, device=dev)  # [m, nodes]
    u = (torch.arange(pilot_nodes, dtype=torch.float64, device=dev)[None] + u) / pilot_nodes
    lam_p = lam_min + (lam_max - lam_min) * u.flatten()
    z_p = rng.normals(seed, rng.Stream.FORMULA_PILOT, slot, (pilot_nodes, *shape), step=1, device=dev)
    ex_p = pick.repeat_interleave(pilot_nodes)
    f_p = evaluate(ex_p, lam_p, z_p.reshape(-1, *shape), desc="pilot")
    return LambdaProposal.fit(lam_p, f_p, lam_min, lam_max), len(ex_p)


def _resolve_proposal(
    importance, evaluate: _Evaluator, x: Tensor, s: _Settings, pilot_examples: int, pilot_nodes: int
) -> tuple[LambdaProposal, int]:
    """The log-SNR proposal of an estimate and the pilot calls it cost."""
    if isinstance(importance, LambdaProposal):
        if (importance.lam_min, importance.lam_max) != (s.lam_min, s.lam_max):
            raise ValueError(
                f"the proposal's range [{importance.lam_min}, {importance.lam_max}] differs from "
                f"[lam_min, lam_max] = [{s.lam_min}, {s.lam_max}]"
            )
        return importance, 0
    if importance == "uniform":
        return LambdaProposal.uniform(s.lam_min, s.lam_max), 0
    if importance == "adaptive":
        pilot_examples = check_int("pilot_examples", pilot_examples)
        pilot_nodes = check_int("pilot_nodes", pilot_nodes)
        lam_range = (s.lam_min, s.lam_max)
        return _pilot_proposal(evaluate, x.shape[0], x.shape[1:], lam_range, s.seed, pilot_examples, pilot_nodes)
    raise ValueError(f"importance must be 'adaptive', 'uniform' or a LambdaProposal, got {importance!r}")


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
    same ``control_variate`` and ``norm_z`` as to :func:`log_density`. Runs under ``torch.inference_mode()``.

    Args:
        eps_fn: the model. x: [B, *shape] pilot examples (up to ``pilot_examples`` evenly spaced are used).
        lam_min, lam_max, cond, precision, max_batch: as in :func:`log_density` (``chunk_size``: deprecated
            alias of ``max_batch``).

    Returns:
        A :class:`~scoredensity.proposals.LambdaProposal` on ``[lam_min, lam_max]`` (CPU).
    """
    x = check_data(x)
    opts = dict(locals())
    opts.update(n_t=2, n_z=1, scheme="stratified", antithetic=False, progress=False)
    opts.update(decoder="gaussian", levels=None, decoder_draws=2)
    s = _check_options(eps_fn, x, cond, opts)
    with torch.inference_mode():
        gauss = resolve_control_variate(control_variate, x)
        evaluate = _Evaluator(eps_fn, x, gauss, s.norm_z, s.work_dtype, s.max_batch, False, cond, s.precision)
        proposal, _ = _resolve_proposal("adaptive", evaluate, x, s, pilot_examples, pilot_nodes)
    return LambdaProposal(proposal.lam_min, proposal.lam_max, proposal.masses.clone())


# ---------------------------------------------------------------------------------------- the three terms
def _node_uniforms(s: _Settings, keys: Tensor, dev: torch.device) -> Tensor:
    """[b, n_t] float64 positions in [0, 1) of the log-SNR nodes in the proposal's CDF variable."""
    if s.scheme == "quadrature":
        return _gauss_legendre(s.n_t, dev)[0].expand(len(keys), s.n_t)
    u = rng.uniforms(s.seed, rng.Stream.FORMULA_LAM, keys, s.n_t, device=dev)
    if s.scheme == "mc":
        return u
    strata = s.n_t // 2
    return (torch.arange(strata, dtype=torch.float64, device=dev).repeat_interleave(2)[None] + u) / strata


def _integral_block(
    evaluate: _Evaluator, proposal: LambdaProposal, idx: Tensor, keys: Tensor, shape: torch.Size, s: _Settings
) -> tuple[Tensor, Tensor]:
    """Integral estimate and its variance [b] for the examples ``idx`` [b] (randomness keyed by ``keys`` [b])."""
    dev = evaluate.dev
    b = len(idx)
    lam = proposal.icdf(_node_uniforms(s, keys, dev))  # [b, n_t]
    inv_q = 1.0 / proposal.pdf(lam)
    z = rng.normals(s.seed, rng.Stream.FORMULA_NOISE, keys, (s.n_t, s.units, *shape), device=dev)
    if s.antithetic:
        z = torch.cat([z, -z], dim=2)  # [b, n_t, n_z, *shape]
    ex = idx.repeat_interleave(s.n_t * s.n_z)
    lam_rows = lam.repeat_interleave(s.n_z, dim=1).flatten()
    f = evaluate(ex, lam_rows, z.reshape(-1, *shape)).reshape(b, s.n_t, s.n_z)
    if s.antithetic:
        f = 0.5 * (f[:, :, : s.units] + f[:, :, s.units :])  # [b, n_t, units]
    g_val = f * inv_q[:, :, None]  # importance-weighted integrand per draw
    # combine per scheme; the variance comes from independent randomisations
    if s.scheme == "stratified":
        return stratified_mean_and_var(g_val.mean(2).reshape(b, s.n_t // 2, 2))
    if s.scheme == "mc":
        draws = g_val.mean(2)  # the n_z draws at one node share lam: average them first
        return draws.mean(1), draws.var(1) / s.n_t
    w = _gauss_legendre(s.n_t, dev)[1][None, :]
    return (w * g_val.mean(2)).sum(1), (w**2 * g_val.var(2) / s.units).sum(1)


def _integral(
    evaluate: _Evaluator, proposal: LambdaProposal, x: Tensor, keys: Tensor, s: _Settings
) -> tuple[Tensor, Tensor]:
    """``1/2 ∫ [d sigmoid(lam) - E||z - eps||^2] dlam`` and its variance [B] (work device), in blocks of
    examples of at most ``max_batch`` rows; the control variate's exact integral is added back per block."""
    b, shape, dev = x.shape[0], x.shape[1:], evaluate.dev
    per_block = max(1, s.max_batch // (s.n_t * s.n_z))
    integral = torch.empty(b, dtype=torch.float64, device=dev)
    var = torch.empty(b, dtype=torch.float64, device=dev)
    blocks = row_blocks(b, per_block)
    for sl in tqdm(blocks, desc="log_density", disable=not s.progress or len(blocks) < 2):
        idx = torch.arange(sl.start, sl.stop, device=dev)
        integral[sl], var[sl] = _integral_block(evaluate, proposal, idx, keys[sl], shape, s)
    if evaluate.gauss is not None:  # add back the reference's exact integral, in blocks of rows
        for sl in row_blocks(b, s.max_batch):
            x_blk = x[sl].flatten(1).to(device=dev, dtype=torch.float64)
            integral[sl] += control_variate_integral(evaluate.gauss, x_blk, s.lam_min, s.lam_max)
    return integral, var


def _end_terms(x: Tensor, s: _Settings, dev: torch.device) -> tuple[Tensor, Tensor]:
    """:func:`scoredensity.decoders.end_terms` [B] on the work device, in blocks of ``max_batch`` rows."""
    parts = [end_terms(x[sl].to(device=dev), s.lam_min, s.lam_max) for sl in row_blocks(x.shape[0], s.max_batch)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _discretized_clean_end(evaluate: _Evaluator, x: Tensor, keys: Tensor, s: _Settings) -> tuple[Tensor, Tensor]:
    """Clean-end term with DDPM's discretised decoder, and its variance, per example [B].

    ``E_z log P(k | x_{t_min}) - (d/2) softplus(lam_max)``: the second part removes the share of
    ``(d/2) sigmoid(lam)`` that the integral term carries above ``lam_max``'s complement, so that the total is
    ``log P_dec - KL - 1/2 ∫ E||z - eps||^2 dlam`` with no ``(d/2) log(2 pi e)`` counted. The decoder's z are
    ``decoder_draws`` draws of stream DECODER_NOISE per example.
    """
    b, shape, d, dev = x.shape[0], x.shape[1:], x[0].numel(), evaluate.dev
    draws = s.decoder_draws
    lam = torch.tensor(s.lam_max, dtype=torch.float64, device=dev)
    t = torch.sigmoid(-lam)
    a = torch.sigmoid(lam).sqrt()
    log_sd = -0.5 * lam  # sd^2 = t / (1 - t) = e^{-lam}
    term = torch.empty(b, dtype=torch.float64, device=dev)
    var = torch.empty(b, dtype=torch.float64, device=dev)
    for sl in row_blocks(b, max(1, s.max_batch // draws)):
        n = sl.stop - sl.start
        z = rng.normals(s.seed, rng.Stream.DECODER_NOISE, keys[sl], (draws, *shape), device=dev)
        rows_x = x[sl].to(device=dev, dtype=torch.float64).repeat_interleave(draws, 0)
        x_t = a * rows_x + t.sqrt() * z.reshape(n * draws, *shape)
        ex = torch.arange(sl.start, sl.stop, device=dev).repeat_interleave(draws)
        eps = evaluate.eps(ex, x_t, t.expand(n * draws))
        x0_hat = (x_t - t.sqrt() * eps) / a
        vals = discretized_gaussian_log_likelihood(rows_x, x0_hat, log_sd, s.levels).reshape(n, draws)
        term[sl] = vals.mean(1) - 0.5 * d * float(F.softplus(lam))
        var[sl] = vals.var(1) / draws
    return term, var


def _categorical_clean_end(x: Tensor, keys: Tensor, s: _Settings, dev: torch.device) -> tuple[Tensor, Tensor]:
    """Clean-end term with VDM's categorical decoder, and its variance, per example [B].

    ``E_z log P_cat(k | z_0 / alpha_0) - (d/2) softplus(lam_max)`` with ``z_0 / alpha_0 = x + e^{-lam_max/2} z``
    (VDM's ``z_0_rescaled``; the decoder reads the latent itself, no network call) and ``P_cat(k | m)``
    proportional to ``N(m; c_k, e^{-lam_max})`` over the level centres ``c_k = 2(k + 1/2)/L - 1``
    (:func:`~scoredensity.decoders.categorical_gaussian_log_likelihood`). The second part removes the share of
    ``(d/2) sigmoid(lam)`` the integral term carries, as in :func:`_discretized_clean_end`, so that the total is
    VDM's ``-KL_prior - diffusion loss - reconstruction loss``. The z are ``decoder_draws`` draws of stream
    DECODER_NOISE per example; rows are blocked so that the [rows, d, L] logits stay below 2^25 numbers.
    """
    b, shape, d = x.shape[0], x.shape[1:], x[0].numel()
    draws, levels = s.decoder_draws, int(s.levels)
    log_sd = -0.5 * s.lam_max
    sd = math.exp(log_sd)
    soft = max(s.lam_max, 0.0) + math.log1p(math.exp(-abs(s.lam_max)))  # softplus(lam_max)
    term = torch.empty(b, dtype=torch.float64, device=dev)
    var = torch.empty(b, dtype=torch.float64, device=dev)
    rows = max(1, min(s.max_batch // draws, (1 << 25) // (d * levels * draws)))
    for sl in row_blocks(b, rows):
        n = sl.stop - sl.start
        z = rng.normals(s.seed, rng.Stream.DECODER_NOISE, keys[sl], (draws, *shape), device=dev)
        rows_x = x[sl].to(device=dev, dtype=torch.float64).repeat_interleave(draws, 0)
        mean = rows_x + sd * z.reshape(n * draws, *shape)
        vals = categorical_gaussian_log_likelihood(rows_x, mean, log_sd, levels, centres="vdm").reshape(n, draws)
        term[sl] = vals.mean(1) - 0.5 * d * soft
        var[sl] = vals.var(1) / draws
    return term, var


def _cpu(v: Tensor) -> Tensor:
    """A normal (not inference-mode) CPU copy of a result tensor."""
    return v.detach().to("cpu").clone()


# ---------------------------------------------------------------------------------------- the estimator
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
    decoder: str | None = None,
    levels: int | None = None,
    decoder_draws: int = 4,
    example_ids: Tensor | None = None,
    cond: Tensor | None = None,
    progress: bool | None = None,
    precision: str = "fp32",
    max_batch: int | None = None,
    convention: str | Convention | None = None,
) -> LogDensity:
    """Log-density of ``x`` under the model ``eps_fn`` by the score-based density formula (docs/design.md §2).

    Exact (up to Monte Carlo error) for the exact noise predictor; for a learned ``eps_fn`` an unbiased
    estimate of a lower bound (the continuous-time ELBO with VDM end terms, see the module docstring).

    Args:
        eps_fn: noise predictor in canonical time, ``eps_fn(x_t [N, *shape], t [N] float64) -> [N, *shape]``.
        x: [B, *shape] data (any shape; d = elements per example) on the model's device. Must be finite.
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
        control_variate: the same formula, same lam and z, on a reference with closed-form ``eps``,
            subtracted and its exact expectation added back; never biases the result. ``"auto"`` (default) is
            the Gaussian fitted to the batch when B > d, else none; see :func:`resolve_control_variate` for
            ``"batch"``, ``"prior"``, ``"batch_or_prior"``, a single-Gaussian :class:`GaussianMixture` or a
            tensor of reference data; ``None`` turns it off.
        norm_z: use ``||z||^2`` in place of ``d`` inside the integrand (unbiased, cancels noise at high SNR).
        antithetic: draw z in pairs (z, -z) at the same lam (needs even ``n_z``; measured to help little).
        seed: key of all randomness (:mod:`scoredensity.rng`): results do not depend on ``max_batch``.
        double: hand ``x_t`` to ``eps_fn`` in float64 (else in x's dtype). ``t`` is always float64.
        chunk_size: deprecated alias of ``max_batch``.
        pilot_examples, pilot_nodes: size of the adaptive proposal's pilot.
        decoder: the clean-end term (``None``: the convention's, else ``"gaussian"``). ``"gaussian"`` (continuous
            or dequantised data): the Gaussian
            reconstruction term of VDM, equal to the formula with ``eps = 0`` above ``lam_max``.
            ``"discretized"`` (data on ``levels`` levels scaled to [-1, 1], no dequantisation): the
            probability of the data's bin under ``N(x0_hat(x_{t_min}), t_min / (1 - t_min))`` discretised
            to the bins (DDPM's decoder), averaged over ``decoder_draws`` draws of z; then ``logp`` is a
            lower bound on ``log P(k)`` (a probability, nats) and carries no ``(d/2) log(2 pi e)``.
            ``"categorical"`` (VDM's decoder, data on the centres ``2(k + 1/2)/L - 1``): ``P(k | z_0)``
            proportional to ``N(z_0 / alpha_0; c_k, e^{-lam_max})`` normalised over the ``levels`` centres, read
            from the latent itself (no network call), averaged over ``decoder_draws`` draws; ``logp`` is then
            VDM's ELBO of ``log P(k)``.
        levels: number of levels ``L`` of a discrete decoder (``"discretized"``: grid ``2k/(L-1) - 1``).
        decoder_draws: draws of z for the discretised decoder (>= 2 gives its standard error).
        example_ids: [B] integer keys of the examples' random streams (default ``0..B-1``). Pass global
            indices when a data set is evaluated in batches or shards: with a fixed ``importance=`` proposal and
            ``control_variate``, each example's result is then the same whatever the batching.
        cond: [B, ...] per-example condition of a conditional model (class labels, a context vector): then
            ``eps_fn`` is called as ``eps_fn(x_t, t, cond_rows)`` with the rows of ``cond`` aligned to ``x_t``.
        progress: tqdm bar over blocks (default: when more than 4 network calls).
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: autocast of the network call only; the
            integrand, end terms and sums stay in float64.
        max_batch: rows of ``x_t`` per ``eps_fn`` call (bounds memory); default from a memory budget,
            :func:`scoredensity.epsfn.default_max_batch`.
        convention: a continuous :class:`~scoredensity.conventions.Convention` or its name. It fills the
            options left as ``None``: ``lam_min``/``lam_max`` from its range (the prior KL sits at ``lam_min``),
            ``decoder`` and ``levels`` from its clean end. ``"score-sde"``: the VP-SDE range
            ``[lambda(s=1), lambda(s=1e-5)] = [-10.05, 13.8]`` with the Gaussian clean end (dequantised data; add
            the convention's ``bits_offset`` of 7 to its bits/dim); ``"vdm"``: ``[-5, 13.3]`` with the
            categorical decoder on 256 levels; ``"scoredensity"``: the model's range and the discretised decoder
            on 256 levels. Explicit arguments override it, and ``info["convention"]`` then lists them
            (``"vdm+lam_min=-6.0"``). Discrete-time conventions (``ddpm``, ``improved-diffusion``) raise: they
            are :func:`scoredensity.ddpm_elbo`'s.

    Returns:
        :class:`LogDensity` on the CPU with ``logp`` and ``stderr`` [B] in nats, ``nfe`` per example and terms
        ``noisy_end``, ``integral``, ``clean_end``; ``info`` records the range, precision and max_batch used, and
        the convention's name (``None`` without one).

    Defaults were chosen by ``benchmarks/density_formula.py`` (see docs/benchmarks.md). Runs under
    ``torch.inference_mode()``: no autograd graph is kept, whatever the model.
    """
    x = check_data(x)
    opts = dict(locals())
    convention_name = _apply_convention(convention, opts)
    s = _check_options(eps_fn, x, cond, opts)
    with torch.inference_mode():
        keys = rng.example_keys(example_ids, x.shape[0], work_device(x))
        gauss = resolve_control_variate(control_variate, x)
        evaluate = _Evaluator(eps_fn, x, gauss, s.norm_z, s.work_dtype, s.max_batch, s.progress, cond, s.precision)
        proposal, pilot_calls = _resolve_proposal(importance, evaluate, x, s, pilot_examples, pilot_nodes)
        noisy, clean = _end_terms(x, s, evaluate.dev)
        integral, var = _integral(evaluate, proposal, x, keys, s)
        nfe = s.n_t * s.n_z + pilot_calls / x.shape[0]
        if s.decoder == "discretized":
            clean, clean_var = _discretized_clean_end(evaluate, x, keys, s)
            var = var + clean_var
            nfe += s.decoder_draws
        elif s.decoder == "categorical":
            clean, clean_var = _categorical_clean_end(x, keys, s, evaluate.dev)
            var = var + clean_var
    return LogDensity(
        logp=_cpu(noisy + integral + clean),
        stderr=_cpu(var.clamp_min(0).sqrt()),
        nfe=nfe,
        dim=x[0].numel(),
        terms={"noisy_end": _cpu(noisy), "integral": _cpu(integral), "clean_end": _cpu(clean)},
        method="formula",
        info={
            "lam_min": s.lam_min,
            "lam_max": s.lam_max,
            "n_t": s.n_t,
            "n_z": s.n_z,
            "scheme": s.scheme,
            "importance": importance if isinstance(importance, str) else "proposal",
            "control_variate": gauss is not None,
            "norm_z": s.norm_z,
            "antithetic": s.antithetic,
            "seed": s.seed,
            "decoder": s.decoder,
            "levels": s.levels,
            "precision": s.precision,
            "max_batch": s.max_batch,
            "convention": convention_name,
        },
    )
