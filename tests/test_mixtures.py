"""Analytic mixtures: eps, score and log_prob_t agree with each other and with sampling."""

import math

import pytest
import torch

from scoredensity.mixtures import GaussianMixture, mixture_preset


@pytest.fixture(autouse=True)
def _on_cpu():
    """Every tensor of these tests is made on the CPU explicitly (the estimators compute where x lives)."""
    with torch.device("cpu"):
        yield


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name,kw", [("ring8", {}), ("grid25", {}), ("blobs2d", {}), ("anisotropic", {"d": 10})])
def test_score_is_gradient_of_log_prob_t_and_eps_is_scaled_score(name, kw):
    gm = mixture_preset(name, **kw)
    x = gm.sample(64, generator=_gen())
    t = torch.rand(64, dtype=torch.float64, generator=_gen(1)) * 0.98 + 0.01
    z = torch.randn(x.shape, dtype=torch.float64, generator=_gen(2))
    xt = ((1 - t).sqrt()[:, None] * x + t.sqrt()[:, None] * z).requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob_t(xt, t).sum(), xt)
    score = gm.score(xt.detach(), t)
    assert torch.allclose(score, grad, rtol=1e-8, atol=1e-8)
    assert torch.allclose(gm.eps(xt.detach(), t), -t.sqrt()[:, None] * score, rtol=1e-10, atol=1e-12)


def test_log_prob_t_tends_to_log_prob_and_to_standard_normal():
    gm = mixture_preset("anisotropic", d=5)
    x = gm.sample(20, generator=_gen())
    lp0 = gm.log_prob(x)
    assert torch.allclose(gm.log_prob_t(x, torch.full((20,), 1e-12, dtype=torch.float64)), lp0, atol=1e-6)
    lp1 = gm.log_prob_t(x, torch.full((20,), 1 - 1e-12, dtype=torch.float64))
    std = -0.5 * (x**2).sum(1) - 2.5 * math.log(2 * math.pi)
    assert torch.allclose(lp1, std, atol=1e-6)


def test_log_prob_matches_scipy():
    from scipy.stats import multivariate_normal

    gm = mixture_preset("anisotropic", d=4)
    x = gm.sample(50, generator=_gen())
    ref = sum(
        float(gm.weights[k]) * multivariate_normal(gm.means[k].numpy(), gm.covs[k].numpy()).pdf(x.numpy())
        for k in range(3)
    )
    assert torch.allclose(gm.log_prob(x), torch.as_tensor(ref).log(), rtol=1e-8)


def test_marginal_at_t_matches_noised_samples():
    """Moments of sqrt(1-t) x + sqrt(t) z from samples match the analytic marginal's mixture moments."""
    gm = mixture_preset("ring8")
    n = 200_000
    x = gm.sample(n, generator=_gen())
    t = 0.3
    xt = math.sqrt(1 - t) * x + math.sqrt(t) * torch.randn(x.shape, dtype=torch.float64, generator=_gen(3))
    cov = gm.covariance() * (1 - t) + t * torch.eye(2, dtype=torch.float64)
    emp = torch.cov(xt.T)
    # standard error of a covariance entry ~ sqrt(2/n) * variance
    assert torch.allclose(emp, cov, atol=5 * math.sqrt(2 / n) * float(cov.diagonal().max()))
    # and the density integrates to one on a grid
    g = torch.linspace(-6, 6, 301, dtype=torch.float64)
    grid = torch.cartesian_prod(g, g)
    mass = gm.log_prob_t(grid, torch.full((len(grid),), t, dtype=torch.float64)).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(float(mass) - 1) < 1e-3


def test_sampling_moments():
    gm = mixture_preset("anisotropic", d=3)
    n = 100_000
    x = gm.sample(n, generator=_gen())
    cov = gm.covariance()
    se = (cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - gm.mean()).abs() < 5 * se).all()


def test_high_dimension_is_finite_and_consistent():
    gm = mixture_preset("anisotropic", d=1000)
    x = gm.sample(8, generator=_gen())
    t = torch.full((8,), 0.5, dtype=torch.float64)
    eps = gm.eps(x, t)
    assert torch.isfinite(eps).all() and torch.isfinite(gm.log_prob(x)).all()
    # log_prob_t at tiny t approaches log_prob even with eigenvalues down to 1e-3
    assert torch.allclose(gm.log_prob_t(x, torch.full((8,), 1e-13, dtype=torch.float64)), gm.log_prob(x), rtol=1e-6)


def test_single_gaussian_closed_form_error_matches_monte_carlo():
    g = GaussianMixture.gaussian(torch.tensor([0.5, -1.0]), torch.tensor([[1.0, 0.3], [0.3, 0.2]]))
    x = g.sample(3, generator=_gen())
    t = torch.full((3,), 0.4, dtype=torch.float64)
    n = 200_000
    z = torch.randn(n, 3, 2, dtype=torch.float64, generator=_gen(5))
    xt = (0.6**0.5) * x + (0.4**0.5) * z
    err = (z - g.eps(xt.reshape(-1, 2), t.repeat(n)).reshape(n, 3, 2)).pow(2).sum(-1)
    mc, se = err.mean(0), err.std(0) / n**0.5
    assert ((mc - g.expected_denoising_error(x, t)).abs() < 5 * se).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.zeros(1, 2), torch.tensor([[[1.0, 0.0], [0.0, -1.0]]]), torch.ones(1))
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixture(torch.zeros(1, 2), torch.tensor([[[1.0, 0.5], [0.0, 1.0]]]), torch.ones(1))
    with pytest.raises(ValueError, match="covs must be"):
        GaussianMixture(torch.zeros(1, 2), torch.eye(3)[None], torch.ones(1))
    gm = mixture_preset("ring8")
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="open interval"):
        gm.eps(x, torch.tensor([0.5, 1.0, 0.2]))
    with pytest.raises(ValueError, match="open interval"):
        gm.score(x, 0.0)
    bad = torch.zeros(4, 2)
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        gm.log_prob(bad)
    with pytest.raises(ValueError, match="shape"):
        gm.log_prob(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="unknown mixture preset"):
        mixture_preset("nope")
