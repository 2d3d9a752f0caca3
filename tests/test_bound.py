"""The bound is a bound: a time-inconsistent eps whose reverse SDE and probability-flow ODE are linear.

``eps`` is the exact noise predictor of Gaussian A for t < 1/2 and of Gaussian B for t >= 1/2. Both generative
processes are then linear in x, so their laws at the clean end are Gaussians whose mean and covariance follow
from linear moment ODEs, solved independently with scipy (``helpers.gaussian_law``, in log-SNR, split at the
switch lam = 0).
"""

from __future__ import annotations

import pytest
import torch
from helpers import GAUSS_A, LAM_MAX, gaussian_law, switched_eps

from scoredensity.elbo import elbo
from scoredensity.formula import log_density
from scoredensity.mixtures import GaussianMixture
from scoredensity.ode import ode_log_likelihood

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_logpdf(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return GaussianMixture.gaussian(mean, 0.5 * (cov + cov.T)).log_prob(x)


def sde_model_logp(x: torch.Tensor) -> torch.Tensor:
    """Exact log-density of the truncated reverse-SDE model whose ELBO the formula computes: N(0, I) at lam_min,
    reverse SDE to lam_max, then the Gaussian decoder x = x_{lam_max} / alpha + (sigma / alpha) xi."""
    m, c = gaussian_law(eta=1.0)
    alpha2 = torch.sigmoid(torch.tensor(LAM_MAX, dtype=torch.float64))
    snr_inv = torch.exp(torch.tensor(-LAM_MAX, dtype=torch.float64))
    return gaussian_logpdf(x, m / alpha2.sqrt(), c / alpha2 + snr_inv * torch.eye(2, dtype=torch.float64))


def test_moment_ode_reproduces_a_time_consistent_model():
    # sanity check of the independent solver: with one Gaussian throughout, both laws are that Gaussian (up to
    # the prior's misplacement at lam_min, O(e^{lam_min / 2}): take lam_min = -40 to see the solver's own accuracy)
    for eta in (0.0, 1.0):
        m, c = gaussian_law(eta, lam_min=-40.0, gauss_lo=GAUSS_A, gauss_hi=GAUSS_A)
        assert torch.allclose(m, GAUSS_A.means[0], atol=1e-7)
        assert torch.allclose(c, GAUSS_A.covs[0], atol=1e-7)


def _test_points() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return 1.5 * torch.randn(12, 2, generator=g, dtype=torch.float64)


def test_formula_and_divergence_elbo_bound_the_sde_model():
    x = _test_points()
    exact = sde_model_logp(x)
    for est in (
        log_density(switched_eps, x, n_t=256, seed=1),
        elbo(switched_eps, x, n_t=256, probe="exact", seed=2),
    ):
        # below at every point (allowing 4 standard errors of Monte Carlo noise) ...
        assert (est.logp - 4 * est.stderr <= exact).all(), (est.method, est.logp - exact, est.stderr)
        # ... and strictly, significantly below somewhere
        assert (est.logp + 4 * est.stderr < exact).any(), (est.method, est.logp - exact, est.stderr)


def test_ode_estimator_matches_the_ode_model():
    x = _test_points()
    m, c = gaussian_law(eta=0.0)
    exact = gaussian_logpdf(x, m, c)
    est = ode_log_likelihood(switched_eps, x, rtol=1e-7, atol=1e-7)
    # the ODE model differs from the SDE model here, and the estimator follows the ODE model
    assert (est.logp - exact).abs().max() < 1e-3
    assert (sde_model_logp(x) - exact).abs().max() > 0.05
