"""DiffusionLoss: the temperature law, a trained head's bound and samples on a conditional Gaussian, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from scoredensity.apps.diffusion_loss import (
    CausalTransformerAR,
    DiffusionLoss,
    ancestral_sample,
    cosine_lam_grid,
    gaussian_temperature_law,
)
from scoredensity.mixtures import GaussianMixture

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
COV = torch.tensor([[0.3, 0.1], [0.1, 0.05]], dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _check_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, k: float = 4.5) -> None:
    """Sample mean and covariance of x [N, D] against (mean, cov) within k standard errors (Gaussian formulas:
    Var(S_ij) = (C_ij^2 + C_ii C_jj) / N)."""
    n = x.shape[0]
    x = x.to(torch.float64)
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - mean).abs() <= k * se_mean).all(), (x.mean(0), mean, se_mean)
    s = torch.cov(x.T)
    se_cov = ((cov**2 + torch.outer(cov.diagonal(), cov.diagonal())) / n).sqrt()
    assert ((s - cov).abs() <= k * se_cov).all(), (s, cov, se_cov)


# ------------------------------------------------------------------------------------------ temperature law
def test_cosine_grid_is_increasing_and_hits_the_ends():
    g = cosine_lam_grid(30, -20.0, 15.0)
    assert g.shape == (31,) and (g[1:] > g[:-1]).all()
    assert abs(float(g[0]) + 20) < 1e-6 and abs(float(g[-1]) - 15) < 1e-6


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.6])
def test_sampler_with_exact_eps_follows_the_linear_moment_law(tau):
    g = GaussianMixture.gaussian(MU, COV)
    x = ancestral_sample(
        g.eps,
        (20000, 2),
        steps=12,
        temperature=tau,
        variance="posterior",
        generator=torch.Generator().manual_seed(1),
        dtype=torch.float64,
    )
    mean, cov = gaussian_temperature_law(MU, COV, tau, steps=12, variance="posterior")
    _check_moments(x, mean, cov)
    # mean never depends on tau; covariance is not tau^2 COV on a coarse grid (the ancestral step loses variance)
    assert torch.allclose(mean, MU, atol=1e-8)
    assert (cov.diagonal() < 0.9 * tau**2 * COV.diagonal()).all()


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.6])
def test_law_limits(tau):
    # continuous-time limit of the noise-scaled reverse SDE: N(mu, tau^2 S) -- i.e. p^(1/tau^2), not p^(1/tau)
    _, cov = gaussian_temperature_law(MU, COV, tau, steps=4000, variance="posterior")
    assert torch.allclose(cov, tau**2 * COV, rtol=0.01)
    # the Tweedie step is the exact Gaussian transition: tau^2 S at any step count
    m5, cov5 = gaussian_temperature_law(MU, COV, tau, steps=5, variance="tweedie")
    assert torch.allclose(m5, MU, atol=1e-6) and torch.allclose(cov5, tau**2 * COV, rtol=1e-6)


def test_tweedie_sampler_with_exact_eps_is_exact_at_few_steps():
    g = GaussianMixture.gaussian(MU, COV)
    x = ancestral_sample(
        g.eps, (8000, 2), steps=8, temperature=0.7, variance="tweedie", generator=torch.Generator().manual_seed(2)
    )
    _check_moments(x, MU, 0.49 * COV)


# ------------------------------------------------------------------------------------------ trained head
def _task(n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """x | c ~ N(mu(c), L(c) L(c)^T) with c ~ N(0, I_2): smooth, c-dependent mean and covariance."""
    c = torch.randn(n, 2, generator=g)
    mu = torch.stack([c[:, 0] + 0.5 * c[:, 1], 0.5 * torch.sin(2 * c[:, 0])], 1)
    chol = torch.zeros(n, 2, 2)
    chol[:, 0, 0] = 0.3 * torch.exp(0.3 * c[:, 1])
    chol[:, 1, 0] = 0.2 * torch.tanh(c[:, 0])
    chol[:, 1, 1] = 0.2
    x = mu + torch.einsum("nij,nj->ni", chol, torch.randn(n, 2, generator=g))
    return x, c, mu, chol


def _exact_logp(x, mu, chol):
    r = torch.linalg.solve_triangular(chol.double(), (x - mu).double()[:, :, None], upper=False)[:, :, 0]
    return -0.5 * (r**2).sum(1) - chol.double().diagonal(dim1=1, dim2=2).log().sum(1) - math.log(2 * math.pi)


@pytest.fixture(scope="module")
def trained_head():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    head = DiffusionLoss(2, 2, width=64, depth=2, data_std=0.7, lam_min=-15.0, lam_max=15.0)
    steps = 2000  # enough that the head's model error falls below the sampling error of 3000 samples
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x, c, _, _ = _task(256, g)
        loss = head(x, c)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    head.eval()
    torch.set_num_threads(old)
    return head


def test_trained_head_log_prob_is_a_tight_bound(trained_head):
    x, c, mu, chol = _task(200, torch.Generator().manual_seed(99))
    ld = trained_head.log_prob(x, c, n_t=48)
    assert ld.logp.shape == (200,) and (ld.stderr > 0).all()
    diff = ld.logp - _exact_logp(x, mu, chol)  # paired: estimate minus exact, per pair
    se = float(diff.std() / math.sqrt(len(diff)))
    gap = -float(diff.mean())
    # a bound: not above the exact value; and within 0.1 nats per dimension below it
    assert gap > -4 * se, (gap, se)
    assert gap < 0.1 * 2 + 4 * se, (gap, se)


def _gauss_kl(m0, s0, m1, s1) -> float:
    """KL(N(m0, s0) || N(m1, s1)) in nats."""
    d = m0.shape[0]
    s1_inv = torch.linalg.inv(s1)
    dm = m1 - m0
    return 0.5 * float(torch.trace(s1_inv @ s0) + dm @ s1_inv @ dm - d + torch.logdet(s1) - torch.logdet(s0))


@pytest.mark.parametrize("cval", [[0.0, 0.0], [1.0, -1.0]])
def test_trained_head_samples_follow_the_law(trained_head, cval):
    """Samples at temperature 1 match the exact conditional mean and covariance within sampling error (4.5
    standard errors per entry); other temperatures follow the documented law tau^2 S relative to temperature 1
    within sampling error (the model error cancels there)."""
    n = 3000
    c = torch.tensor([cval]).expand(n, 2)
    cc = torch.tensor([cval])
    mu = torch.stack([cc[:, 0] + 0.5 * cc[:, 1], 0.5 * torch.sin(2 * cc[:, 0])], 1)[0].double()
    sd = torch.tensor([[0.3 * math.exp(0.3 * cval[1]), 0.0], [0.2 * math.tanh(cval[0]), 0.2]], dtype=torch.float64)
    cov = sd @ sd.T
    x1 = trained_head.sample(c, steps=20, temperature=1.0, generator=torch.Generator().manual_seed(5)).double()
    assert x1.shape == (n, 2) and torch.isfinite(x1).all()
    # standard errors of a sample mean and of sample covariance entries under the exact Gaussian law
    se_cov = ((cov**2 + torch.outer(cov.diagonal(), cov.diagonal())) / n).sqrt()
    assert ((torch.cov(x1.T) - cov).abs() <= 4.5 * se_cov).all(), (torch.cov(x1.T), cov)
    assert ((x1.mean(0) - mu).abs() <= 4.5 * (cov.diagonal() / n).sqrt()).all(), (x1.mean(0), mu)
    assert _gauss_kl(mu, cov, x1.mean(0), torch.cov(x1.T)) < 0.1 * 2
    for tau in (0.5, 0.75):
        xt = trained_head.sample(c, steps=20, temperature=tau, generator=torch.Generator().manual_seed(6)).double()
        s1, st = torch.cov(x1.T), torch.cov(xt.T)
        target = tau**2 * s1
        se = ((target**2 + torch.outer(target.diagonal(), target.diagonal())) / n).sqrt()
        se_ref = tau**2 * ((s1**2 + torch.outer(s1.diagonal(), s1.diagonal())) / n).sqrt()
        assert ((st - target).abs() <= 4.5 * (se**2 + se_ref**2).sqrt()).all(), (st, target)
        se_mean = ((st.diagonal() + s1.diagonal()) / n).sqrt()
        assert ((xt.mean(0) - x1.mean(0)).abs() <= 4.5 * se_mean).all()


def test_elbo_loss_is_minus_the_reported_bound():
    torch.manual_seed(3)
    head = DiffusionLoss(3, 4, width=32, depth=1, t_per_token=256, lam_min=-10.0, lam_max=10.0)
    with torch.no_grad():  # a non-trivial, untrained head
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, c = torch.randn(8, 3), torch.randn(8, 4)
    with torch.no_grad():
        per = torch.stack([head(x, c, reduction="none") for _ in range(8)])  # 8 x 256 draws per token
    ld = head.log_prob(x, c, n_t=256, importance="uniform", scheme="mc")
    est, se_loss = per.mean(0).double(), per.std(0).double() / math.sqrt(8)
    z = (est + ld.logp) / (se_loss**2 + ld.stderr**2).sqrt()
    assert (z.abs() < 4.5).all(), z


def test_simple_weighting_and_mask():
    head = DiffusionLoss(2, 3, width=16, depth=1, weighting="simple")
    x, c = torch.randn(4, 5, 2), torch.randn(4, 5, 3)

    def g():
        return torch.Generator().manual_seed(0)  # the same noise in every call below

    per = head(x, c, reduction="none", generator=g())
    assert per.shape == (4, 5) and (per >= 0).all()
    mask = torch.zeros(4, 5)
    mask[0, 0] = 1
    loss = head(x, c, mask=mask, generator=g())
    loss.backward()
    # the mask selects: the loss is that one token's, and the other tokens do not enter it
    torch.testing.assert_close(loss, per[0, 0])
    x2 = x.clone()
    x2[1:] += 3.0
    torch.testing.assert_close(head(x2, c, mask=mask, generator=g()), loss)
    # a weighted mask gives the weighted mean of the per-token losses
    w = torch.rand(4, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(head(x, c, mask=w, generator=g()), (per * w).sum() / w.sum())


# ------------------------------------------------------------------------------------------ AR backbone
def test_causal_transformer_conditions_are_causal():
    torch.manual_seed(0)
    head = DiffusionLoss(3, 16, width=16, depth=1)
    model = CausalTransformerAR(3, 5, head, width=16, depth=1, heads=2)
    x = torch.randn(2, 5, 3)
    c1 = model.conditions(x)
    x2 = x.clone()
    x2[:, 2] += 1.0
    c2 = model.conditions(x2)
    assert torch.allclose(c1[:, :3], c2[:, :3], atol=1e-6)  # c_k sees x_<k only
    assert not torch.allclose(c1[:, 3:], c2[:, 3:])
    loss = model(x)
    loss.backward()
    ld = model.log_prob(x, n_t=8)
    assert ld.logp.shape == (10,)
    s = model.sample(3, steps=4, generator=torch.Generator().manual_seed(0), variance="posterior")
    assert s.shape == (3, 5, 3) and torch.isfinite(s).all()


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_errors():
    head = DiffusionLoss(2, 3, width=16, depth=1)
    x, c = torch.randn(4, 2), torch.randn(4, 3)
    with pytest.raises(ValueError, match="cond_dim"):
        head(x, torch.randn(4, 5))
    with pytest.raises(ValueError, match="token_dim"):
        head(torch.randn(4, 3), c)
    xn = x.clone()
    xn[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"tokens x contains NaN or Inf in rows \[2\]"):
        head(xn, c)
    with pytest.raises(ValueError, match=r"tokens x contains NaN"):
        head.log_prob(xn, c)
    cn = c.clone()
    cn[0, 0] = float("inf")
    with pytest.raises(ValueError, match="condition c contains NaN"):
        head.sample(cn)
    for tau in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            head.sample(c, temperature=tau)
    with pytest.raises(ValueError, match="leading dimensions"):
        head(torch.randn(5, 2), c)
    with pytest.raises(ValueError, match="weighting"):
        DiffusionLoss(2, 3, weighting="vlb")
    with pytest.raises(ValueError, match="variance"):
        head.sample(c, variance="large")
