"""The continuous-time ELBO in divergence form (Huang, Lim & Courville 2021, Theorem 3).

For the plug-in reverse SDE of ``eps`` (the ``eta = 1`` member of the reverse-time family,
:func:`scoredensity.mathutil.reverse_drift`), the bound of Huang et al. (2021) reads, per unit of log-SNR,

    log p(x) >= E log N(x_1; 0, I) + ∫ E_{y ~ q(x_t | x)} [ -div b_1(y, lam) - ||eps(y, t)||^2 / 2 ] dlam,

with ``b_1 = t y / 2 - sqrt(t) eps`` the reverse drift per unit of log-SNR (``a = g s`` of Huang et al. (2021) becomes
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
from tqdm.auto import tqdm

from . import rng
from .decoders import end_terms
from .epsfn import (
    EpsFn,
    call_eps,
    check_data,
    check_int,
    check_precision,
    default_max_batch,
    resolve_lam_range,
    resolve_max_batch,
    row_blocks,
    work_device,
)
from .formula import control_variate_integral, resolve_control_variate, stratified_mean_and_var
from .logdensity import LogDensity
from .mathutil import PROBES, divergence, reverse_drift_divergence
from .mixtures import GaussianMixture, StandardNormal
from .proposals import LambdaProposal

__all__ = ["elbo"]

Reference = GaussianMixture | StandardNormal


def _integrand(
    eps_fn: EpsFn,
    x0: Tensor,
    lam: Tensor,
    z: Tensor,
    probes: Tensor | None,
    gauss: Reference | None,
    cond: Tensor | None = None,
    precision: str = "fp32",
) -> Tensor:
    """One-draw integrand ``-div b_1 - ||eps||^2 / 2`` (minus the control variate's), per row [N] float64.

    The autograd graph of the call lives only inside this function (the result is detached), so memory is one
    chunk's graph whatever the number of examples.

    Args:
        x0: [N, *shape] data rows (on the model's device). lam: [N] float64. z: [N, *shape] float64 noise.
        probes: [n, N, *shape] Hutchinson probes, or ``None`` for the exact divergence.
        cond: [N, ...] row-aligned condition or ``None``. precision: autocast of the network call.

    Returns:
        [N] float64 on ``lam``'s device.
    """
    t = torch.sigmoid(-lam)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = torch.sigmoid(lam).sqrt().reshape(shape)
    s = t.sqrt().reshape(shape)
    extra = () if cond is None else (cond,)
    with torch.enable_grad():
        y64 = a * x0.to(device=lam.device, dtype=torch.float64) + s * z
        y = y64.to(device=x0.device, dtype=x0.dtype).detach().requires_grad_(True)
        # the network gets a copy (a non-leaf): writing into it cannot corrupt y; autograd detects a write
        # after use and divergence() reports it
        eps = call_eps(eps_fn, y.clone(), t.to(x0.device, copy=True), *extra, precision=precision)
        sq = eps.flatten(1).to(torch.float64).pow(2).sum(1)
        if gauss is not None:
            eps_g = gauss.eps(y.flatten(1).to(lam.device), t).reshape(y.shape).to(device=y.device, dtype=eps.dtype)
            sq = sq - eps_g.flatten(1).to(torch.float64).pow(2).sum(1)
            eps = eps - eps_g  # the divergence is linear: one vjp serves both
        div = divergence(eps, y, None if probes is None else probes.to(y.device)).mean(0)  # [N]
    d = 0 if gauss is not None else y[0].numel()  # the d t / 2 parts of the two drifts cancel
    out = -reverse_drift_divergence(div.detach(), lam.to(div.device), d, eta=1.0) - 0.5 * sq.detach()
    return out.to(lam.device)


def _draws(
    seed: int,
    keys_of: tuple[tuple[int, int], ...],
    keys: Tensor,
    n: int,
    shape: torch.Size,
    probe: str,
    n_probes: int,
    n_z: int = 1,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per example of ``keys`` [b]: ``n`` uniforms [b, n], noise [b, n n_z, *shape] (``n_z`` draws per node) and
    probes [n_p, b n n_z, *shape] (``None`` for the exact trace), keyed by the three ``(stream, step)`` pairs of
    ``keys_of``."""
    dev = keys.device
    (s_u, k_u), (s_z, k_z), (s_v, k_v) = keys_of
    u = rng.uniforms(seed, s_u, keys, n, step=k_u, device=dev)
    n = n * n_z
    z = rng.normals(seed, s_z, keys, (n, *shape), step=k_z, device=dev)
    if probe == "exact":
        return u, z, None
    draw = rng.rademacher if probe == "rademacher" else rng.normals
    v = draw(seed, s_v, keys, (n, n_probes, *shape), step=k_v, device=dev)  # [b, n, n_p, *shape]
    return u, z, v.movedim(2, 0).reshape(n_probes, -1, *shape)


def elbo(
    eps_fn: EpsFn,
    x: Tensor,
    *,
    n_t: int = 128,
    n_z: int = 1,
    probe: str = "rademacher",
    n_probes: int = 1,
    lam_min: float | None = None,
    lam_max: float | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    importance: str | LambdaProposal = "adaptive",
    control_variate: str | GaussianMixture | Tensor | None = "batch_or_prior",
    pilot_nodes: int = 16,
    pilot_examples: int = 64,
    example_ids: Tensor | None = None,
    cond: Tensor | None = None,
    precision: str = "fp32",
    max_batch: int | None = None,
    progress: bool | None = None,
) -> LogDensity:
    """Continuous-time ELBO of the plug-in reverse SDE in divergence form (Huang et al. 2021), per example in nats.

    The same bound as :func:`scoredensity.formula.log_density` (equal to ``log p_0`` for the exact ``eps``, a
    lower bound on the reverse-SDE model's log-likelihood otherwise), written with the divergence of the
    reverse drift instead of the denoising error. See the module docstring.

    Args:
        eps_fn: noise predictor ``eps_fn(x_t [N, *shape], t [N] float64)``, differentiable in ``x_t``.
        x: [B, *shape] data, on the model's device.
        n_t: log-SNR draws per example (even: stratified, two independent draws per stratum of the proposal,
            so the standard error is honest). Default 128, as the formula's.
        n_z: noise draws (each with its own probes) per node; calls per example ``n_t * n_z`` (plus the pilot).
        probe: ``"rademacher"``, ``"gaussian"`` (Hutchinson) or ``"exact"`` (``d`` vjps per draw: small d).
        n_probes: Hutchinson probes per draw (ignored for ``exact``).
        lam_min, lam_max: log-SNR range, closed by the formula's exact end terms; ``None``: the model's own
            ``eps_fn.lam_range``, else [-20, 20].
        seed: key of all randomness (:mod:`scoredensity.rng`, streams ELBO_*): results do not depend on
            ``max_batch``.
        chunk_size: deprecated alias of ``max_batch``.
        importance: ``"adaptive"`` (pilot of ``pilot_nodes`` uniform draws on up to ``pilot_examples``
            examples, proposal ∝ RMS of the integrand; pilot values are not reused), ``"uniform"`` or a
            :class:`LambdaProposal`.
        control_variate: as in :func:`scoredensity.formula.resolve_control_variate` (the same meaning for every
            estimator). The default ``"batch_or_prior"`` is the Gaussian fitted to the batch when B > d, else
            ``N(0, I)``, which cancels the O(sqrt(d)) noise of ``||eps||^2`` at low SNR; ``"auto"`` falls back to
            no control variate instead (noisier here).
        example_ids: [B] integer keys of the examples' random streams (default ``0..B-1``); pass global indices
            when a data set is evaluated in batches or shards (with a fixed ``importance=`` proposal and control
            variate, each example's result then does not depend on the batching).
        cond: [B, ...] per-example condition: ``eps_fn(x_t, t, cond_rows)`` with rows aligned to ``x_t``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: autocast of the network only (sums stay float64).
        max_batch: rows per ``eps_fn`` call (default from a memory budget; each chunk's autograd graph is freed
            before the next).
        progress: tqdm bar over blocks of examples (default: when more than 4 blocks).

    Computed on ``x``'s device (float64 work there, except MPS); the result is on the CPU and carries no graph.

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
    n_z = check_int("n_z", n_z)
    n_probes = check_int("n_probes", n_probes)
    seed = check_int("seed", seed, minimum=-(1 << 63))
    lam_min, lam_max = resolve_lam_range(eps_fn, lam_min, lam_max)
    precision = check_precision(precision)
    b, shape, d = x.shape[0], x.shape[1:], x[0].numel()
    if cond is not None and (not isinstance(cond, Tensor) or cond.shape[0] != b):
        raise ValueError(f"cond must be a tensor with one row per example ({b})")
    if max_batch is None and chunk_size is None:
        max_batch = default_max_batch(d, copies=32)  # autograd keeps the graph of a chunk: a smaller default
    max_batch = resolve_max_batch(max_batch, d, chunk_size)
    dev = work_device(x)
    n_p = 0 if probe == "exact" else n_probes
    vjp_per_row = d if probe == "exact" else n_probes

    with torch.no_grad():  # only _integrand builds a graph, one chunk at a time
        keys = rng.example_keys(example_ids, b, dev)
        gauss = resolve_control_variate(control_variate, x)

        def evaluate(ex: Tensor, lam: Tensor, z: Tensor, probes: Tensor | None) -> Tensor:
            """Integrand [N] at rows (example ``ex``, ``lam``, ``z``, ``probes`` [n_p, N, *shape])."""
            out = torch.empty(len(ex), dtype=torch.float64, device=dev)
            for sl in row_blocks(len(ex), max_batch):
                pr = None if probes is None else probes[:, sl]
                rows = ex[sl].to(x.device)
                c = None if cond is None else cond[rows.to(cond.device)]
                out[sl] = _integrand(eps_fn, x[rows], lam[sl], z[sl], pr, gauss, c, precision)
            return out

        # ---- proposal over log-SNR
        pilot_rows = 0
        if isinstance(importance, LambdaProposal):
            proposal = importance
            if (proposal.lam_min, proposal.lam_max) != (lam_min, lam_max):
                raise ValueError(
                    f"the proposal's range [{proposal.lam_min}, {proposal.lam_max}] differs from "
                    f"[lam_min, lam_max] = [{lam_min}, {lam_max}]"
                )
        elif importance == "uniform":
            proposal = LambdaProposal.uniform(lam_min, lam_max)
        elif importance == "adaptive":
            pilot_nodes = check_int("pilot_nodes", pilot_nodes)
            pilot_examples = check_int("pilot_examples", pilot_examples)
            pick = torch.linspace(0, b - 1, min(b, pilot_examples), device=dev).round().long().unique()
            m = len(pick)
            pilot = ((rng.Stream.ELBO_PILOT, 0), (rng.Stream.ELBO_PILOT, 1), (rng.Stream.ELBO_PILOT, 2))
            u, z, pr = _draws(seed, pilot, torch.arange(m, device=dev), pilot_nodes, shape, probe, n_p)
            u = (torch.arange(pilot_nodes, dtype=torch.float64, device=dev)[None] + u) / pilot_nodes
            lam_p = lam_min + (lam_max - lam_min) * u.flatten()
            f_p = evaluate(pick.repeat_interleave(pilot_nodes), lam_p, z.reshape(-1, *shape), pr)
            proposal = LambdaProposal.fit(lam_p, f_p, lam_min, lam_max)
            pilot_rows = m * pilot_nodes
        else:
            raise ValueError(f"importance must be 'adaptive', 'uniform' or a LambdaProposal, got {importance!r}")

        # ---- stratified draws: n_t/2 equal-mass strata of the proposal, two draws each; blocks of examples
        strata = n_t // 2
        integral = torch.empty(b, dtype=torch.float64, device=dev)
        var = torch.empty(b, dtype=torch.float64, device=dev)
        offsets = torch.arange(strata, dtype=torch.float64, device=dev).repeat_interleave(2)[None]
        streams = ((rng.Stream.ELBO_LAM, 0), (rng.Stream.ELBO_NOISE, 0), (rng.Stream.ELBO_PROBE, 0))
        blocks = row_blocks(b, max(1, max_batch // (n_t * n_z)))
        if progress is None:
            progress = len(blocks) > 4
        for sl in tqdm(blocks, desc="elbo", disable=not progress or len(blocks) < 2):
            u, z, probes = _draws(seed, streams, keys[sl], n_t, shape, probe, n_p, n_z)
            lam = proposal.icdf((offsets + u) / strata)  # [b', n_t]
            idx = torch.arange(sl.start, sl.stop, device=dev).repeat_interleave(n_t * n_z)
            lam_rows = lam.repeat_interleave(n_z, dim=1).flatten()
            f = evaluate(idx, lam_rows, z.reshape(-1, *shape), probes).reshape(-1, n_t, n_z).mean(2)
            integral[sl], var[sl] = stratified_mean_and_var((f / proposal.pdf(lam)).reshape(-1, strata, 2))

        noisy = torch.empty(b, dtype=torch.float64, device=dev)
        clean = torch.empty(b, dtype=torch.float64, device=dev)
        for sl in row_blocks(b, max_batch):
            x_blk = x[sl].flatten(1).to(device=dev, dtype=torch.float64)
            if gauss is not None:
                integral[sl] += control_variate_integral(gauss, x_blk, lam_min, lam_max)
            noisy[sl], clean[sl] = end_terms(x_blk, lam_min, lam_max)

    nfe = n_t * n_z + pilot_rows / b
    vjp = nfe * vjp_per_row
    return LogDensity(
        logp=(noisy + integral + clean).cpu(),
        stderr=var.clamp_min(0).sqrt().cpu(),
        nfe=nfe,
        dim=d,
        terms={"noisy_end": noisy.cpu(), "integral": integral.cpu(), "clean_end": clean.cpu()},
        method=f"elbo-div-{probe}",
        info={
            "lam_min": lam_min,
            "lam_max": lam_max,
            "n_t": n_t,
            "n_z": n_z,
            "probe": probe,
            "n_probes": n_p,
            "importance": importance if isinstance(importance, str) else "proposal",
            "control_variate": gauss is not None,
            "seed": seed,
            "vjp": vjp,
            "cost": nfe + vjp,
            "precision": precision,
            "max_batch": max_batch,
        },
    )
