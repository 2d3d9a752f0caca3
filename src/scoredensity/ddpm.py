"""The discrete DDPM evidence lower bound ``-(L_T + sum_{k>=2} L_{k-1} + L_0)`` of a T-step model (Ho et al. 2020).

The model is read through canonical time (DESIGN.md §1, §3): step ``k`` (1-based) of a
:class:`~scoredensity.schedules.DDPMSchedule` sits at ``t_k = 1 - abar_k``, so ``x_k = sqrt(abar_k) x + sqrt(t_k) z``
and the network is called as ``eps_fn(x_k, t_k)``. With ``a_k = 1 - b_k`` and ``t_0 = 0``:

* reverse mean ``mu_k = (x_k - b_k / sqrt(t_k) eps) / sqrt(a_k)``; the forward posterior
  ``q(x_{k-1} | x_k, x)`` has the same form with the true ``z`` and variance ``sigma~_k^2 = b_k t_{k-1} / t_k``, so
  ``||mu~_k - mu_k||^2 = b_k^2 / (a_k t_k) ||z - eps||^2``;
* reverse variance ``sigma_k^2``: ``fixed_large`` = ``b_k`` (the KL weight on ``||z - eps||^2`` is
  ``b_k / (2 a_k t_k)``, a Riemann sum of ``dt / (2 t (1-t))``: seed 000 §4.1) or ``fixed_small`` =
  ``sigma~_k^2`` (diffusers' default; weight ``b_k / (2 a_k t_{k-1})``, a gap of about ``0.289 d`` nats remains
  as ``T -> inf``, DESIGN.md §3);
* ``L_{k-1} = KL(N(mu~_k, sigma~_k^2) || N(mu_k, sigma_k^2))`` for ``k >= 2``;
  ``L_T = KL(q(x_T | x) || N(0, I))``; ``L_0 = -log p(x | x_1)`` with decoder mean ``mu_1 = x0_hat(x_1)``.

``fixed_small`` at ``k = 1`` has ``sigma~_1^2 = 0``: like the published DDPM / improved-diffusion code
(``posterior_log_variance_clipped``) the decoder then uses ``sigma~_2^2`` instead.

Variance reduction (``norm_z=True``, unbiased): ``||z - eps||^2`` is replaced by ``||z - eps||^2 - ||z||^2 + d``
(``E||z||^2 = d``), which cancels the chi-square noise of the first steps where ``eps`` is small; the Gaussian
decoder term is treated the same way (its quadratic is ``t_1 / a_1 ||z - eps||^2``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .decoders import discretized_gaussian_log_likelihood, prior_kl
from .epsfn import EpsFn, call_eps, check_data
from .formula import example_generator
from .logdensity import LogDensity
from .schedules import DDPMSchedule

__all__ = ["ddpm_elbo", "reverse_variances", "discretized_gaussian_log_likelihood", "VARIANCES", "DECODERS"]

VARIANCES = ("fixed_large", "fixed_small")
DECODERS = ("gaussian", "discretized")
_LOG_2PI = math.log(2 * math.pi)


def reverse_variances(schedule: DDPMSchedule, variance: str, decoder_variance: str = "model") -> tuple[Tensor, Tensor]:
    """Reverse-process variances ``sigma_k^2`` and forward-posterior variances ``sigma~_k^2`` for steps ``k = 1..T``.

    Args:
        schedule: the T-step schedule.
        variance: ``"fixed_large"`` (``sigma_k^2 = b_k``) or ``"fixed_small"`` (``sigma_k^2 = sigma~_k^2 =
            b_k t_{k-1} / t_k``; at ``k = 1``, where ``sigma~_1^2 = 0``, the clipped ``sigma~_2^2`` as the published
            code's ``posterior_log_variance_clipped``).
        decoder_variance: the decoder's (step 1) variance: ``"model"`` (that of ``variance``) or ``"beta"`` (``b_1``).

    Returns:
        ``(model_var [T], post_var [T])`` float64; ``post_var[0] = 0``.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    beta = schedule.betas
    t = schedule.times
    big_t = len(beta)
    t_prev = torch.cat([t.new_zeros(1), t[:-1]])
    post_var = beta * t_prev / t  # sigma~_k^2 (0 at k = 1)
    if variance == "fixed_large":
        model_var = beta.clone()
    else:
        model_var = post_var.clone()
        model_var[0] = post_var[1] if big_t > 1 else beta[0]  # clipped, as the published code does
    if decoder_variance == "beta":
        model_var[0] = beta[0]
    elif decoder_variance != "model":
        raise ValueError(f"decoder_variance must be 'model' or 'beta', got {decoder_variance!r}")
    return model_var, post_var


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


def ddpm_elbo(
    eps_fn: EpsFn,
    x: Tensor,
    *,
    betas: Tensor | None = None,
    schedule: DDPMSchedule | None = None,
    alphas_cumprod: Tensor | None = None,
    variance: str = "fixed_large",
    decoder: str = "gaussian",
    levels: int = 256,
    n_steps_sampled: int | None = None,
    n_z: int = 1,
    decoder_variance: str = "model",
    decoder_draws: int = 8,
    norm_z: bool = True,
    seed: int = 0,
    chunk_size: int | None = None,
    example_ids: Tensor | None = None,
) -> LogDensity:
    """DDPM's ELBO ``-(L_T + sum L_{k-1} + L_0)`` per example in nats (see the module docstring).

    It bounds the log-likelihood of the T-step DDPM chain (with the chosen reverse variance and decoder),
    not ``log p_0``: with the exact ``eps`` its gap to ``log p_0`` has no fixed sign and, for ``fixed_large``
    with ``abar_k = abar(k/T)`` from one clock, shrinks roughly like ``1/T``.

    Args:
        eps_fn: noise predictor in canonical time.
        x: [B, *shape] data (in [-1, 1] for the discretised decoder).
        betas: [T] betas, or
        schedule: a :class:`DDPMSchedule` (e.g. ``DDPMSchedule.from_clock(VPLinearClock(), T)``).
            Or ``alphas_cumprod``: [T] ``abar_k`` (diffusers' name). None of them: DDPM's linear 1e-4..0.02, T = 1000.
        variance: ``"fixed_large"`` (``sigma_k^2 = b_k``) or ``"fixed_small"`` (posterior variance).
        decoder: ``"gaussian"`` (continuous data: ``log N(x; mu_1, sigma_1^2)``) or ``"discretized"`` (8-bit-like
            data on ``levels`` levels scaled to [-1, 1]; no dequantisation needed).
        n_steps_sampled: ``None`` sums all ``T - 1`` KL terms (each with ``n_z`` draws of z); an integer ``m >= 2``
            draws ``m`` steps uniformly from ``2..T`` (unbiased, ``(T - 1) *`` their mean).
        n_z: noise draws per step (``None`` mode). With ``n_z = 1`` the standard error of the sum pools adjacent
            steps in pairs (``(L_k - L_{k+1})^2`` estimates ``var_k + var_{k+1}``: conservative).
        decoder_variance: ``"model"`` (the step-1 variance of ``variance``: ``b_1`` for ``fixed_large``, the
            clipped ``sigma~_2^2`` for ``fixed_small``) or ``"beta"`` (``b_1`` for both).
        decoder_draws: draws of z for the decoder step (>= 2, gives its standard error).
        norm_z: replace ``||z - eps||^2`` by ``||z - eps||^2 - ||z||^2 + d`` (unbiased variance reduction).
        seed: randomness keyed by (seed, example index).
        chunk_size: rows per ``eps_fn`` call (default ~2^20 / d).
        example_ids: [B] integer keys of the examples' random streams (default ``0..B-1``); pass global indices
            when a data set is evaluated in batches or shards so that each example's result does not depend on it.

    ``x`` may live on any device (``eps_fn`` is called there); the result is on the CPU.

    Returns:
        :class:`LogDensity` with terms ``prior`` (``-L_T``), ``diffusion`` (``-sum L_{k-1}``), ``decoder`` (``-L_0``).
    """
    x = check_data(x)
    sch = _schedule(betas, schedule, alphas_cumprod)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "discretized":
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        out = (x.abs() > 1 + 1e-6).flatten(1).any(1)
        if out.any():
            raise ValueError(
                f"the discretised decoder needs data in [-1, 1]; rows {out.nonzero().flatten()[:10].tolist()}"
            )
    if n_steps_sampled is not None and n_steps_sampled < 2:
        raise ValueError(f"n_steps_sampled must be None or >= 2, got {n_steps_sampled}")
    if n_z < 1 or decoder_draws < 2:
        raise ValueError("need n_z >= 1 and decoder_draws >= 2")
    b, shape, d = x.shape[0], x.shape[1:], x[0].numel()
    T = sch.num_steps
    if float(sch.times[-1]) >= 1.0 or float(sch.betas.max()) >= 1.0:
        raise ValueError(
            "the DDPM ELBO is undefined for a zero-terminal-SNR schedule (b_T = 1, t_T = 1: the last reverse mean "
            "divides by sqrt(1 - b_T) = 0); clip the betas below 1 (e.g. 0.999) or use the density formula"
        )
    keys = torch.arange(b) if example_ids is None else torch.as_tensor(example_ids).long().flatten()
    if keys.shape != (b,):
        raise ValueError(f"example_ids must have one entry per example ({b}), got shape {tuple(keys.shape)}")
    if chunk_size is None:
        chunk_size = max(1, (1 << 20) // d)
    x_cpu = x.detach().cpu()

    beta = sch.betas  # [T], index k-1 for step k
    t = sch.times  # t_k = 1 - abar_k
    log_abar = sch.log_alphas_cumprod
    model_var, post_var = reverse_variances(sch, variance, decoder_variance)

    def sq_err(z: Tensor, eps: Tensor) -> Tensor:
        zf, ef = z.flatten(1).to(torch.float64), eps.flatten(1).to(torch.float64)
        e = (zf - ef).pow(2).sum(1)
        return e - zf.pow(2).sum(1) + d if norm_z else e

    def eval_steps(ex: Tensor, k: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Per row (example ex, 0-based step k, noise z): ``eps`` and x_k; returns (err [N], eps [N, *shape])."""
        errs, epss = [], []
        for s in range(0, len(ex), chunk_size):
            sl = slice(s, min(s + chunk_size, len(ex)))
            kk = k[sl]
            bshape = (-1,) + (1,) * len(shape)
            zc = z[sl].to(device=x.device, dtype=torch.float64)
            tk = t[kk].to(x.device)
            xk = (
                torch.exp(0.5 * log_abar[kk]).to(x.device).reshape(bshape) * x[ex[sl]].to(torch.float64)
                + tk.sqrt().reshape(bshape) * zc
            ).to(x.dtype)
            eps = call_eps(eps_fn, xk, tk)
            errs.append(sq_err(zc, eps).cpu())
            epss.append(eps.detach().cpu())
        return torch.cat(errs), torch.cat(epss)

    def kl_terms(k: Tensor, err: Tensor) -> Tensor:
        """``-L_{k-1}`` for 0-based steps ``k >= 1`` given the (norm-z corrected) squared errors."""
        ratio = post_var[k] / model_var[k]
        const = 0.5 * d * (ratio - 1 - torch.log(ratio))
        return -(const + beta[k] ** 2 / (1 - beta[k]) / t[k] * err / (2 * model_var[k]))

    diffusion = torch.empty(b, dtype=torch.float64)
    diff_var = torch.empty(b, dtype=torch.float64)
    dec = torch.empty(b, dtype=torch.float64)
    dec_var = torch.empty(b, dtype=torch.float64)
    per_ex = decoder_draws + (n_z * (T - 1) if n_steps_sampled is None else n_steps_sampled)
    block = max(1, chunk_size // per_ex)
    for s0 in range(0, b, block):
        idx = torch.arange(s0, min(s0 + block, b))
        ks, zs, zd = [], [], []
        for i in keys[idx].tolist():
            g = example_generator(seed, i, 5)
            zd.append(torch.randn((decoder_draws, *shape), generator=g, dtype=torch.float64))
            if n_steps_sampled is None:
                ks.append(torch.arange(1, T).repeat_interleave(n_z))
            else:
                ks.append(torch.randint(1, T, (n_steps_sampled,), generator=g))
            zs.append(torch.randn((len(ks[-1]), *shape), generator=g, dtype=torch.float64))
        nb = len(idx)
        # ---- decoder step (k = 1, index 0)
        ex_d = idx.repeat_interleave(decoder_draws)
        z_dec = torch.cat(zd).to(x.dtype)
        err_d, eps_d = eval_steps(ex_d, torch.zeros(len(ex_d), dtype=torch.long), z_dec)
        if decoder == "gaussian":
            # x - mu_1 = -sqrt(t_1 / a_1) (z - eps): the quadratic is t_1 / a_1 ||z - eps||^2
            quad = t[0] / (1 - beta[0]) * err_d
            ld = -0.5 * (d * (_LOG_2PI + torch.log(model_var[0])) + quad / model_var[0])
        else:
            x_d = x_cpu[ex_d].to(torch.float64)
            x1 = torch.exp(0.5 * log_abar[0]) * x_d + t[0].sqrt() * z_dec.to(torch.float64)
            mu1 = (x1 - t[0].sqrt() * eps_d.to(torch.float64)) / torch.exp(0.5 * log_abar[0])
            ld = discretized_gaussian_log_likelihood(x_d, mu1, 0.5 * torch.log(model_var[0]), levels)
        ld = ld.reshape(nb, decoder_draws)
        dec[idx] = ld.mean(1)
        dec_var[idx] = ld.var(1) / decoder_draws
        # ---- KL steps
        if T > 1:
            kk = torch.stack(ks)  # [nb, m]
            m = kk.shape[1]
            err, _ = eval_steps(idx.repeat_interleave(m), kk.flatten(), torch.cat(zs).to(x.dtype))
            terms = kl_terms(kk.flatten(), err).reshape(nb, m)
            if n_steps_sampled is not None:
                diffusion[idx] = (T - 1) * terms.mean(1)
                diff_var[idx] = (T - 1) ** 2 * terms.var(1) / m
            elif n_z > 1:
                per = terms.reshape(nb, T - 1, n_z)
                diffusion[idx] = per.mean(2).sum(1)
                diff_var[idx] = (per.var(2) / n_z).sum(1)
            else:
                diffusion[idx] = terms.sum(1)
                n_pair = (T - 1) // 2
                pairs = terms[:, : 2 * n_pair].reshape(nb, n_pair, 2)
                v = (pairs[:, :, 0] - pairs[:, :, 1]).pow(2).sum(1)
                if (T - 1) % 2:  # the odd last step: pair it with its neighbour once more
                    v = v + (terms[:, -1] - terms[:, -2]).pow(2) / 2
                diff_var[idx] = v
        else:
            diffusion[idx] = 0.0
            diff_var[idx] = 0.0

    # ---- L_T = KL(N(sqrt(abar_T) x, t_T I) || N(0, I)) = 1/2 [abar_T ||x||^2 - d abar_T - d log t_T]
    prior = -prior_kl(x_cpu, torch.log(t[-1]), log_abar[-1])
    steps_eval = decoder_draws + ((T - 1) * n_z if n_steps_sampled is None else n_steps_sampled)
    return LogDensity(
        logp=prior + diffusion + dec,
        stderr=(diff_var + dec_var).clamp_min(0).sqrt(),
        nfe=float(steps_eval if T > 1 else decoder_draws),
        dim=d,
        terms={"prior": prior, "diffusion": diffusion, "decoder": dec},
        method=f"ddpm-{variance}",
        info={
            "T": T,
            "variance": variance,
            "decoder": decoder,
            "levels": levels if decoder == "discretized" else None,
            "n_steps_sampled": n_steps_sampled,
            "n_z": n_z,
            "decoder_draws": decoder_draws,
            "decoder_variance": float(model_var[0]),
            "norm_z": norm_z,
            "seed": seed,
        },
    )
