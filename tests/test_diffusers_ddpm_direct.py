"""The DDPM ELBO read through the diffusers adapter equals a direct step-by-step computation (issue 6)."""

import math

import diffusers
import torch
from helpers import tiny_unet

from scoredensity import DiffusersEps, ddpm_elbo


def _log_discretized(x, mean, sd, levels=256):
    """log P(bin of x) under N(mean, sd^2), bins of width 2/(L-1), outer bins to +-inf; summed per image."""
    half = 1.0 / (levels - 1)
    normal = torch.distributions.Normal(mean, sd)
    hi = torch.where(x > 1 - half, torch.ones_like(x), normal.cdf(x + half))
    lo = torch.where(x < -1 + half, torch.zeros_like(x), normal.cdf(x - half))
    return torch.log((hi - lo).clamp_min(1e-300)).flatten(1).sum(1)


def _direct_elbo(unet, betas, x, n_draws, gen):
    """-(L_T + sum_{k>=2} L_{k-1} + L_0) with fixed_large variances, written from Ho et al. (2020), eq. 5-12."""
    T = len(betas)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    d = x[0].numel()
    b = x.shape[0]
    # L_T: KL(N(sqrt(abar_T) x, (1 - abar_T) I) || N(0, I))
    m2 = abar[-1] * x.flatten(1).pow(2).sum(1)
    l_t = 0.5 * (m2 + d * (1 - abar[-1]) - d - d * torch.log(1 - abar[-1]))
    total = -l_t
    var = torch.zeros(b, dtype=torch.float64)
    for j in range(T):  # diffusers timestep j = step k = j + 1
        vals = []
        for _ in range(n_draws):
            z = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            x_k = abar[j].sqrt() * x + (1 - abar[j]).sqrt() * z
            eps = unet(x_k.float(), torch.full((b,), j)).sample.double()
            mu = (x_k - betas[j] / (1 - abar[j]).sqrt() * eps) / alphas[j].sqrt()
            if j == 0:
                vals.append(_log_discretized(x, mu, betas[0].sqrt()))
                continue
            post_var = (1 - abar[j - 1]) / (1 - abar[j]) * betas[j]
            post_mean = (abar[j - 1].sqrt() * betas[j] / (1 - abar[j])) * x + (
                alphas[j].sqrt() * (1 - abar[j - 1]) / (1 - abar[j])
            ) * x_k
            kl = 0.5 * (
                d * torch.log(betas[j] / post_var)
                + (d * post_var + (post_mean - mu).flatten(1).pow(2).sum(1)) / betas[j]
                - d
            )
            vals.append(-kl)
        v = torch.stack(vals)
        total = total + v.mean(0)
        var = var + v.var(0) / n_draws
    return total, var.sqrt()


def test_ddpm_elbo_through_the_adapter_equals_a_direct_computation():
    unet = tiny_unet().requires_grad_(False)
    sched = diffusers.DDPMScheduler(num_train_timesteps=10, beta_start=1e-3, beta_end=0.3, variance_type="fixed_large")
    eps = DiffusersEps(unet, sched.config)
    gen = torch.Generator().manual_seed(1)
    k = torch.randint(0, 256, (3, 1, 8, 8), generator=gen)
    x = 2 * k.double() / 255 - 1
    with torch.no_grad():
        ours = ddpm_elbo(
            eps,
            x.float(),
            schedule=eps.schedule,
            variance="fixed_large",
            decoder="discretized",
            levels=256,
            n_z=32,
            decoder_draws=32,
            norm_z=False,
            seed=3,
        )
        direct, direct_se = _direct_elbo(unet, eps.schedule.betas, x, 12, gen)
    se = (ours.stderr**2 + direct_se**2).sqrt()
    gap = (ours.logp - direct).abs()
    assert (gap < 4 * se + 1e-6).all(), (ours.logp, direct, se)
    assert math.isfinite(float(ours.logp.sum())) and float(se.max()) < 0.05 * float(ours.logp.abs().min())
