"""Honest standard errors of the DDPM bound, against its closed form for a Gaussian model (issue 13, items 4 and 6).

For the exact ``eps`` of a Gaussian ``N(mu, Sigma)`` the network is linear in ``x_k``:
``eps(x_k) = sqrt(t) S^{-1} (x_k - alpha mu)`` with ``S = alpha^2 Sigma + t I``, so for a fixed example ``x`` and
``z ~ N(0, I)``

    E ||z - eps||^2 = tr((I - t S^{-1})^2) + t alpha^2 ||S^{-1} (x - mu)||^2,

and every term of the T-step bound (Gaussian decoder, no clipping) has a closed-form expectation. The estimator's
per-example z-scores ``(logp - exact) / stderr`` must then have unit spread.
"""

from __future__ import annotations

import math

import pytest
import torch

from scoredensity.ddpm import ddpm_elbo, kl_constants, kl_weights, reverse_variances
from scoredensity.decoders import prior_kl
from scoredensity.mixtures import GaussianMixture
from scoredensity.schedules import DDPMSchedule, linear_betas

pytestmark = pytest.mark.usefixtures("one_thread")

D = 12
T = 1000
N = 200


def _model() -> GaussianMixture:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    cov = 0.3 * a @ a.T + 0.05 * torch.eye(D, dtype=torch.float64)
    return GaussianMixture.gaussian(0.2 * torch.randn(D, generator=g, dtype=torch.float64), cov)


def _data(n: int) -> torch.Tensor:
    # the data need not come from the model: a wider Gaussian exercises the x-dependent part
    return 0.8 * torch.randn(n, D, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def exact_ddpm_bound(gm: GaussianMixture, x: torch.Tensor, sch: DDPMSchedule, variance: str) -> torch.Tensor:
    """E over all noise of the T-step bound with the Gaussian decoder, per example [B] (nats), in closed form."""
    mu, cov = gm.means[0].to(torch.float64), gm.covs[0].to(torch.float64)
    lam, u = torch.linalg.eigh(cov)
    y = (x - mu) @ u  # [B, D] in the eigenbasis
    t = sch.times
    abar = 1 - t
    s_eig = abar[:, None] * lam[None] + t[:, None]  # [T, D]
    tr = ((abar[:, None] * lam[None]) / s_eig).pow(2).sum(1)  # tr((I - t S^-1)^2)
    quad = (y[:, None, :].pow(2) / s_eig[None].pow(2)).sum(2)  # [B, T]
    e_err = tr[None] + (t * abar)[None] * quad  # E||z - eps||^2 [B, T]
    model_var, post_var = reverse_variances(sch, variance)
    w = kl_weights(sch, model_var) * t / abar  # weight of ||z - eps||^2
    consts = kl_constants(model_var, post_var, D)
    diffusion = -(consts[1:].sum() + (w[1:] * e_err[:, 1:]).sum(1))
    v1 = model_var[0]
    decoder = -0.5 * (D * (math.log(2 * math.pi) + torch.log(v1)) + t[0] / abar[0] * e_err[:, 0] / v1)
    prior = -prior_kl(x, torch.log(t[-1]), sch.log_alphas_cumprod[-1])
    return prior + diffusion + decoder


def _zscores(est, exact):
    return ((est.logp - exact) / est.stderr).to(torch.float64)


@pytest.fixture(scope="module")
def setting():
    gm = _model()
    x = _data(N)
    sch = DDPMSchedule(linear_betas(T))
    return gm, x, sch, {v: exact_ddpm_bound(gm, x, sch, v) for v in ("fixed_large", "fixed_small")}


def test_closed_form_matches_a_many_draw_estimate(setting):
    # the closed form itself, checked by brute force on 4 examples (n_z = 64: the mean is within a few se)
    gm, x, sch, exact = setting
    est = ddpm_elbo(gm.eps, x[:4], schedule=sch, variance="fixed_small", n_z=16, decoder_draws=16, seed=3)
    z = (est.logp - exact["fixed_small"][:4]) / est.stderr
    assert (z.abs() < 4.5).all(), z


@pytest.mark.parametrize("variance,norm_z", [("fixed_large", False), ("fixed_small", False), ("fixed_small", "snr")])
def test_all_steps_zscores_have_unit_spread(setting, variance, norm_z):
    gm, x, sch, exact = setting
    est = ddpm_elbo(gm.eps, x, schedule=sch, variance=variance, norm_z=norm_z, seed=1)  # n_z = 2 per step
    z = _zscores(est, exact[variance])
    assert 0.8 <= float(z.std()) <= 1.25, float(z.std())
    assert abs(float(z.mean())) < 4 / math.sqrt(N)


@pytest.mark.parametrize("proposal,norm_z", [("analytic", False), ("pilot", False), ("analytic", "snr")])
def test_sampled_steps_zscores_have_unit_spread(setting, proposal, norm_z):
    # the case: 50 sampled steps per example, fixed_small, T = 1000, d = 12 (uniform sampling gave 2.23)
    gm, x, sch, exact = setting
    kw = dict(schedule=sch, variance="fixed_small", n_steps_sampled=50, step_proposal=proposal, norm_z=norm_z)
    est = ddpm_elbo(gm.eps, x, seed=2, **kw)
    z = _zscores(est, exact["fixed_small"])
    assert 0.8 <= float(z.std()) <= 1.25, float(z.std())
    assert abs(float(z.mean())) < 4 / math.sqrt(N)


@pytest.mark.parametrize("steps", [50, None])
def test_data_set_spread_over_seeds_matches_the_stated_error(setting, steps):
    # across seeds the data-set mean moves by its stated standard error: the seed-level z-scores have RMS ~ 1
    # (10 seeds: RMS^2 ~ chi2_10 / 10, whose 99.9% range is [0.18, 2.96]); all steps on a 200-step grid
    gm, x, sch, _ = setting
    if steps is None:
        x = x[:100]
        sch = DDPMSchedule(linear_betas(200, 5e-4, 0.1))
    target = float(exact_ddpm_bound(gm, x, sch, "fixed_small").mean())
    zs = []
    for seed in range(10):
        est = ddpm_elbo(gm.eps, x, schedule=sch, variance="fixed_small", n_steps_sampled=steps, seed=100 + seed)
        zs.append((est.mean() - target) / est.mean_stderr())
    rms = math.sqrt(sum(z * z for z in zs) / len(zs))
    assert 0.43 <= rms <= 1.72, zs


def test_uniform_steps_are_the_heavy_tailed_case(setting):
    # the same budget with uniform steps: its stated error is several times the analytic proposal's
    gm, x, sch, _ = setting
    kw = dict(schedule=sch, variance="fixed_small", n_steps_sampled=50, seed=2)
    uni = ddpm_elbo(gm.eps, x[:50], step_proposal="uniform", **kw)
    ana = ddpm_elbo(gm.eps, x[:50], **kw)
    assert ana.mean_stderr() < 0.5 * uni.mean_stderr()


def test_one_draw_per_step_has_no_stderr(setting):
    gm, x, sch, _ = setting
    est = ddpm_elbo(gm.eps, x[:2], schedule=DDPMSchedule(linear_betas(20)), n_z=1)
    assert torch.isnan(est.stderr).all() and "NaN" in est.info["stderr"]
