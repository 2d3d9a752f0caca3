"""The bound is a bound: a time-inconsistent eps whose reverse SDE and probability-flow ODE are linear.

``eps`` is the exact noise predictor of Gaussian A for t < 1/2 and of Gaussian B for t >= 1/2. Both generative
processes are then linear in x, so their laws at the clean end are Gaussians whose mean and covariance follow
from linear moment ODEs, solved here independently with scipy (in log-SNR, split at the switch lam = 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from scoredensity.elbo import elbo
from scoredensity.formula import log_density
from scoredensity.mixtures import GaussianMixture
from scoredensity.ode import ode_log_likelihood

LAM_MIN, LAM_MAX = -20.0, 20.0


@pytest.fixture(autouse=True)
def _one_thread():
    # many small tensor ops: intra-op threads only add contention on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


GAUSS_A = GaussianMixture.gaussian(torch.tensor([1.0, -0.5]), torch.tensor([[0.5, 0.2], [0.2, 0.3]]))
GAUSS_B = GaussianMixture.gaussian(torch.tensor([-0.5, 0.5]), torch.tensor([[2.0, 0.0], [0.0, 0.7]]))


def switched_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact eps of GAUSS_A for t < 1/2 and of GAUSS_B for t >= 1/2 (time-inconsistent)."""
    early = (t < 0.5)[:, None]
    return torch.where(early, GAUSS_A.eps(x_t, t), GAUSS_B.eps(x_t, t))


def gaussian_law(eta: float, lam_min: float = LAM_MIN, lam_max: float = LAM_MAX, gauss_lo=GAUSS_A, gauss_hi=GAUSS_B):
    """Mean [d] and covariance [d, d] at ``lam_max`` of ``dx = b_eta dlam + eta sqrt(t) dW`` started at N(0, I) at
    ``lam_min``, with eps the exact eps of ``gauss_lo`` for t < 1/2 (lam > 0) and of ``gauss_hi`` for t >= 1/2.

    For ``eps = sqrt(t) S_t^{-1} (x - alpha mu)``, ``S_t = alpha^2 S + t I``, the drift
    ``t x / 2 - (1 + eta^2)/2 sqrt(t) eps`` is ``A x + c`` with ``A = t/2 I - k t S_t^{-1}``,
    ``c = k t alpha S_t^{-1} mu``, ``k = (1 + eta^2) / 2``; then ``m' = A m + c``, ``C' = A C + C A^T + eta^2 t I``.
    """
    d = gauss_lo.dim
    k = (1 + eta**2) / 2

    def rhs_for(g: GaussianMixture):
        mu = g.means[0].numpy()
        cov = g.covs[0].numpy()

        def rhs(lam, state):
            t = 1 / (1 + np.exp(lam))
            a = np.sqrt(1 - t)
            s_inv = np.linalg.inv(a**2 * cov + t * np.eye(d))
            amat = 0.5 * t * np.eye(d) - k * t * s_inv
            c = k * t * a * s_inv @ mu
            m = state[:d]
            cmat = state[d:].reshape(d, d)
            dm = amat @ m + c
            dc = amat @ cmat + cmat @ amat.T + eta**2 * t * np.eye(d)
            return np.concatenate([dm, dc.ravel()])

        return rhs

    state = np.concatenate([np.zeros(d), np.eye(d).ravel()])
    for (lo, hi), g in (((lam_min, 0.0), gauss_hi), ((0.0, lam_max), gauss_lo)):
        sol = solve_ivp(rhs_for(g), (lo, hi), state, method="DOP853", rtol=1e-11, atol=1e-12)
        assert sol.success, sol.message
        state = sol.y[:, -1]
    return torch.from_numpy(state[:d].copy()), torch.from_numpy(state[d:].reshape(d, d).copy())


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
