"""The continuous-time ELBO in divergence form (seed 001: Huang, Lim & Courville 2021, Theorem 3).

For the plug-in reverse SDE of ``eps`` (the ``eta = 1`` member of the reverse-time family,
:func:`scoredensity.mathutil.reverse_drift`), the bound of seed 001 reads, per unit of log-SNR,

    log p(x) >= E log N(x_1; 0, I) + ∫ E_{y ~ q(x_t | x)} [ -div b_1(y, lam) - ||eps(y, t)||^2 / 2 ] dlam,

with ``b_1 = t y / 2 - sqrt(t) eps`` the reverse drift per unit of log-SNR (``a = g s`` of seed 001 becomes
``-eps / sqrt(t)`` times ``g``, and ``dt = t (1-t) dlam`` turns its ``||a||^2 / 2`` into ``||eps||^2 / 2``).
By Stein's identity ``E[z . eps] = sqrt(t) E[div eps]`` the integrand has the same expectation as the density
formula's ``1/2 [d sigmoid(lam) - E ||z - eps||^2]``: the two are the same bound, estimated differently
(this one needs the divergence of ``eps``, i.e. autograd through ``eps_fn``).

Truncation to ``[lam_min, lam_max]`` and the end terms are those of the density formula
(:func:`scoredensity.formula.end_terms`: VDM's prior KL at the noisy end, Gaussian decoder at the clean end),
so both estimators target the same number for any ``eps``.

Variance. Where ``p_t`` is nearly ``N(0, I)`` (``lam << 0``) the integrand does *not* vanish as the formula's
does: ``||eps||^2 / 2 ≈ t ||y||^2 / 2`` fluctuates by ``O(sqrt(d))`` for every ``lam < 0`` (under uniform
``t`` its variance grows like ``1/(1-t)^2``). Two unbiased remedies, both on by default:

* a Gaussian control variate: the same integrand, same ``y`` and probe, on a Gaussian with closed-form
  ``eps`` (fitted to the batch, or ``N(0, I)``), minus its exact expectation; it cancels that noise;
* importance sampling of ``lam`` from a piecewise-constant proposal fitted to the integrand's RMS in a pilot
  (:class:`scoredensity.proposals.LambdaProposal`), with stratified draws (two per stratum).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .epsfn import (
    EpsFn,
    call_eps,
    check_data,
    check_int,
    check_precision,
    default_max_batch,
    resolve_lam_range,
    resolve_max_batch,
)
from .formula import (
    _resolve_control_variate,
    control_variate_integral,
    end_terms,
    example_generator,
    stratified_mean_and_var,
)
from .logdensity import LogDensity
from .mathutil import PROBES, divergence, make_probes, reverse_drift_divergence
from .mixtures import GaussianMixture
from .proposals import LambdaProposal

__all__ = ["elbo"]


class _StdNormal:
    """``N(0, I)`` as a control variate in closed form, without the d x d algebra of :class:`GaussianMixture`:
    ``eps*(y, t) = sqrt(t) y`` and ``E_z ||z - eps*||^2 = d (1-t)^2 + t (1-t) ||x||^2``."""

    @staticmethod
    def eps(y: Tensor, t: Tensor) -> Tensor:
        return t.to(y.dtype).sqrt()[:, None] * y

    @staticmethod
    def expected_denoising_error(x: Tensor, t: Tensor) -> Tensor:
        return _StdNormal.expected_denoising_error_fn(x)(t)

    @staticmethod
    def expected_denoising_error_fn(x: Tensor):
        xf = x.flatten(1).to(torch.float64)
        d, sq = xf.shape[1], xf.pow(2).sum(1)
        return lambda t: d * (1 - t) ** 2 + t * (1 - t) * sq


def _integrand(
    eps_fn: EpsFn,
    x0: Tensor,
    lam: Tensor,
    z: Tensor,
    probes: Tensor | None,
    gauss: GaussianMixture | _StdNormal | None,
    cond: Tensor | None = None,
    precision: str = "fp32",
) -> Tensor:
    """One-draw integrand ``-div b_1 - ||eps||^2 / 2`` (minus the control variate's), per row [N] float64.

    Args:
        x0: [N, *shape] data rows. lam: [N] float64. z: [N, *shape] noise.
        probes: [n, N, *shape] Hutchinson probes, or ``None`` for the exact divergence.
        cond: [N, ...] row-aligned condition or ``None``. precision: autocast of the network call.
    """
    lam = lam.to(x0.device)
    t = torch.sigmoid(-lam)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = torch.sigmoid(lam).sqrt().reshape(shape)
    s = t.sqrt().reshape(shape)
    with torch.enable_grad():
        y = (a * x0.to(torch.float64) + s * z.to(torch.float64)).to(x0.dtype).detach().requires_grad_(True)
        extra = () if cond is None else (cond,)
        eps = call_eps(eps_fn, y, t, *extra, precision=precision)
        sq = eps.flatten(1).to(torch.float64).pow(2).sum(1)
        if gauss is not None:
            # the reference Gaussian lives on the CPU; autograd follows the transfers
            eps_g = gauss.eps(y.flatten(1).cpu(), t.cpu()).reshape(y.shape).to(device=y.device, dtype=eps.dtype)
            sq = sq - eps_g.flatten(1).to(torch.float64).pow(2).sum(1)
            eps = eps - eps_g  # the divergence is linear: one vjp serves both
        div = divergence(eps, y, probes).mean(0)  # [N]
    d = 0 if gauss is not None else y[0].numel()  # the d t / 2 parts of the two drifts cancel
    return (-reverse_drift_divergence(div, lam, d, eta=1.0) - 0.5 * sq).detach().cpu()


def elbo(
    eps_fn: EpsFn,
    x: Tensor,
    *,
    n_t: int = 128,
    probe: str = "rademacher",
    n_probes: int = 1,
    lam_min: float | None = None,
    lam_max: float | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    importance: str | LambdaProposal = "adaptive",
    control_variate: str | GaussianMixture | Tensor | None = "auto",
    pilot_nodes: int = 16,
    pilot_examples: int = 64,
    example_ids: Tensor | None = None,
    cond: Tensor | None = None,
    precision: str = "fp32",
    max_batch: int | None = None,
) -> LogDensity:
    """Continuous-time ELBO of the plug-in reverse SDE in divergence form (seed 001), per example in nats.

    The same bound as :func:`scoredensity.formula.log_density` (equal to ``log p_0`` for the exact ``eps``, a
    lower bound on the reverse-SDE model's log-likelihood otherwise), written with the divergence of the
    reverse drift instead of the denoising error. See the module docstring.

    Args:
        eps_fn: noise predictor ``eps_fn(x_t [N, *shape], t [N] float64)``, differentiable in ``x_t``.
        x: [B, *shape] data.
        n_t: log-SNR draws per example (even: stratified, two independent draws per stratum of the proposal,
            so the standard error is honest).
        probe: ``"rademacher"``, ``"gaussian"`` (Hutchinson) or ``"exact"`` (``d`` vjps per draw: small d).
        n_probes: Hutchinson probes per draw (ignored for ``exact``).
        lam_min, lam_max: log-SNR range, closed by the formula's exact end terms; ``None``: the model's own
            ``eps_fn.lam_range``, else [-20, 20].
        seed: randomness keyed by (seed, example index): results do not depend on ``max_batch``.
        chunk_size: deprecated alias of ``max_batch``.
        max_batch: rows per ``eps_fn`` call (default from a memory budget; each row keeps its autograd graph
            until its chunk is done).
        importance: ``"adaptive"`` (pilot of ``pilot_nodes`` uniform draws on up to ``pilot_examples``
            examples, proposal ∝ RMS of the integrand; pilot values are not reused), ``"uniform"`` or a
            :class:`LambdaProposal`.
        control_variate: ``"auto"`` (Gaussian fitted to the batch when B > d, else ``N(0, I)``), ``"batch"``,
            ``"prior"`` (``N(0, I)``), a single-Gaussian :class:`GaussianMixture`, reference data, or ``None``.
        example_ids: [B] integer keys of the examples' random streams (default ``0..B-1``); pass global indices
            when a data set is evaluated in batches or shards (with a fixed ``importance=`` proposal and control
            variate, each example's result then does not depend on the batching).
        cond: [B, ...] per-example condition: ``eps_fn(x_t, t, cond_rows)`` with rows aligned to ``x_t``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: autocast of the network only (sums stay float64).

    ``x`` may live on any device (``eps_fn`` is called there); the result is on the CPU.

    Returns:
        :class:`LogDensity` (terms ``noisy_end``, ``integral``, ``clean_end``). ``nfe`` counts forward calls of
        ``eps_fn`` per example; ``info["vjp"]`` counts the vector-Jacobian products (backward passes, each
        about one to two forward calls in cost) and ``info["cost"] = nfe + vjp``.
    """
    x = check_data(x)
    if probe not in (*PROBES, "exact"):
        raise ValueError(f"probe must be one of {(*PROBES, 'exact')}, got {probe!r}")
    n_t = check_int("n_t", n_t, 2)
    if n_t % 2:
        raise ValueError(f"n_t must be even and >= 2 (two draws per stratum), got {n_t}")
    n_probes = check_int("n_probes", n_probes)
    pilot_nodes = check_int("pilot_nodes", pilot_nodes)
    pilot_examples = check_int("pilot_examples", pilot_examples)
    lam_min, lam_max = resolve_lam_range(eps_fn, lam_min, lam_max)
    precision = check_precision(precision)
    b, shape, d = x.shape[0], x.shape[1:], x[0].numel()
    if cond is not None and (not isinstance(cond, Tensor) or cond.shape[0] != b):
        raise ValueError(f"cond must be a tensor with one row per example ({b})")
    if max_batch is None and chunk_size is None:
        max_batch = default_max_batch(d, copies=32)  # autograd keeps the graph of a chunk: a smaller default
    chunk_size = resolve_max_batch(max_batch, d, chunk_size)
    keys = torch.arange(b) if example_ids is None else torch.as_tensor(example_ids).long().flatten().cpu()
    if keys.shape != (b,):
        raise ValueError(f"example_ids must have one entry per example ({b}), got shape {tuple(keys.shape)}")
    x_cpu = x.detach().cpu()
    gauss: GaussianMixture | _StdNormal | None
    if control_variate == "prior":
        gauss = _StdNormal()
    else:
        gauss = _resolve_control_variate(control_variate, x_cpu)
        if gauss is None and control_variate == "auto":
            gauss = _StdNormal()
    n_p = 0 if probe == "exact" else n_probes
    vjp_per_row = d if probe == "exact" else n_probes

    def draw(n: int, g: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """``n`` noise draws [n, *shape] and their probes [n_p, n, *shape] (None for the exact trace)."""
        z = torch.randn((n, *shape), generator=g, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
        return z, (None if probe == "exact" else make_probes(z, n_p, probe, g))

    def evaluate(ex: Tensor, lam: Tensor, z: Tensor, probes: Tensor | None) -> Tensor:
        out = torch.empty(len(ex), dtype=torch.float64)
        for s in range(0, len(ex), chunk_size):
            sl = slice(s, min(s + chunk_size, len(ex)))
            pr = None if probes is None else probes[:, sl]
            c = None if cond is None else cond[ex[sl]]
            out[sl] = _integrand(eps_fn, x[ex[sl]], lam[sl], z[sl], pr, gauss, c, precision)
        return out

    # ---- proposal over log-SNR
    pilot_rows = 0
    if isinstance(importance, LambdaProposal):
        proposal = importance
        if (proposal.lam_min, proposal.lam_max) != (lam_min, lam_max):
            raise ValueError("the proposal's range differs from [lam_min, lam_max]")
    elif importance == "uniform":
        proposal = LambdaProposal.uniform(lam_min, lam_max)
    elif importance == "adaptive":
        g = example_generator(seed, -1, 11)
        pick = torch.linspace(0, b - 1, min(b, pilot_examples)).round().long().unique()
        m = len(pick)
        u = torch.arange(pilot_nodes, dtype=torch.float64)[None] + torch.rand(
            m, pilot_nodes, generator=g, dtype=torch.float64
        )
        lam_p = lam_min + (lam_max - lam_min) * (u / pilot_nodes).flatten()
        z_p, pr_p = draw(m * pilot_nodes, g)
        f_p = evaluate(pick.repeat_interleave(pilot_nodes), lam_p, z_p, pr_p)
        proposal = LambdaProposal.fit(lam_p, f_p, lam_min, lam_max)
        pilot_rows = m * pilot_nodes
    else:
        raise ValueError(f"importance must be 'adaptive', 'uniform' or a LambdaProposal, got {importance!r}")

    # ---- stratified draws: n_t/2 equal-mass strata of the proposal, two draws each
    strata = n_t // 2
    integral = torch.empty(b, dtype=torch.float64)
    var = torch.empty(b, dtype=torch.float64)
    per_block = max(1, chunk_size // n_t)
    for s0 in range(0, b, per_block):
        idx = torch.arange(s0, min(s0 + per_block, b))
        us, zs, prs = [], [], []
        for i in keys[idx].tolist():
            g = example_generator(seed, i, 1)
            offsets = torch.rand(n_t, generator=g, dtype=torch.float64)
            us.append((torch.arange(strata, dtype=torch.float64).repeat_interleave(2) + offsets) / strata)
            z_i, pr_i = draw(n_t, g)
            zs.append(z_i)
            prs.append(pr_i)
        lam = proposal.icdf(torch.stack(us))  # [b', n_t]
        z = torch.cat(zs)  # [b' n_t, *shape]
        probes = None if probe == "exact" else torch.cat(prs, dim=1)  # [n_p, b' n_t, *shape]
        f = evaluate(idx.repeat_interleave(n_t), lam.flatten(), z, probes).reshape(len(idx), n_t)
        integral[idx], var[idx] = stratified_mean_and_var((f / proposal.pdf(lam)).reshape(len(idx), strata, 2))

    if gauss is not None:
        integral = integral + control_variate_integral(gauss, x_cpu.flatten(1), lam_min, lam_max)
    noisy, clean = end_terms(x_cpu, lam_min, lam_max)
    nfe = n_t + pilot_rows / b
    vjp = nfe * vjp_per_row
    return LogDensity(
        logp=noisy + integral + clean,
        stderr=var.clamp_min(0).sqrt(),
        nfe=nfe,
        dim=d,
        terms={"noisy_end": noisy, "integral": integral, "clean_end": clean},
        method=f"elbo-div-{probe}",
        info={
            "lam_min": lam_min,
            "lam_max": lam_max,
            "n_t": n_t,
            "probe": probe,
            "n_probes": n_p,
            "importance": importance if isinstance(importance, str) else "proposal",
            "control_variate": gauss is not None,
            "seed": seed,
            "vjp": vjp,
            "cost": nfe + vjp,
            "precision": precision,
            "max_batch": chunk_size,
        },
    )
