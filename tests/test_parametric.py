"""The parametric mixture-denoiser family equals the reference GaussianMixture and is differentiable."""

import math

import pytest
import torch

from scoredensity.apps.parametric import ParametricMixture
from scoredensity.formula import log_density
from scoredensity.mixtures import GaussianMixture, mixture_preset


@pytest.mark.parametrize("gm", [mixture_preset("blobs2d"), mixture_preset("anisotropic", d=4, seed=1)])
def test_matches_reference_mixture(gm):
    pm = ParametricMixture.from_mixture(gm)
    g = torch.Generator().manual_seed(0)
    x = gm.sample(300, generator=g)
    t = torch.rand(300, generator=g, dtype=torch.float64) * 0.998 + 0.001
    assert torch.allclose(pm.log_prob(x), gm.log_prob(x), atol=1e-9, rtol=0)
    assert torch.allclose(pm.eps(x, t), gm.eps(x, t), atol=1e-9, rtol=0)
    back = pm.to_mixture()
    assert torch.allclose(back.covs, gm.covs, atol=1e-12)
    assert torch.allclose(back.weights, gm.weights, atol=1e-12)
    # grouped evaluation is the same function
    xg = x[:60].reshape(3, 20, -1)
    tg = t[:3]
    ref = torch.cat([gm.eps(xg[i], tg[i].expand(20)) for i in range(3)]).reshape(3, 20, -1)
    assert torch.allclose(pm.eps_grouped(xg, tg), ref, atol=1e-9)


def test_gradients_match_finite_differences():
    gm = mixture_preset("blobs2d")
    model = ParametricMixture.from_mixture(gm)
    x = gm.sample(10, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.05, 0.95, 10, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def eps_of(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x, t))

    def logp_of(*ps):
        state = dict(zip(names, ps, strict=True))
        return _logp(model, state, x)

    assert torch.autograd.gradcheck(eps_of, params, eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(logp_of, params, eps=1e-6, atol=1e-6)


def _logp(model, state, x):
    class _Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.log_prob(x)

    return torch.func.functional_call(_Wrap(model), {f"inner.{k}": v for k, v in state.items()}, (x,))


def test_log_prob_gradient_is_mle_stationary_at_em_fit():
    """At an EM fit the gradient of the mean log-likelihood vanishes (EM converged)."""
    from scoredensity.apps.certify import fit_em

    gm = mixture_preset("blobs2d")
    x = gm.sample(500, generator=torch.Generator().manual_seed(2))
    pm = ParametricMixture.from_mixture(fit_em(x, 3, n_init=2))
    pm.log_prob(x).mean().backward()
    for p in pm.parameters():
        assert p.grad.abs().max() < 1e-5


def test_is_an_eps_fn_for_the_density_formula():
    gm = mixture_preset("blobs2d")
    pm = ParametricMixture.from_mixture(gm)
    x = gm.sample(8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        res = log_density(pm.eps, x, n_t=64, seed=0)
    z = (res.logp - gm.log_prob(x)) / res.stderr
    assert z.abs().max() < 5


def test_sklearn_conversion():
    from sklearn.mixture import GaussianMixture as SkGM

    gm = mixture_preset("blobs2d")
    x = gm.sample(400, generator=torch.Generator().manual_seed(4))
    for kind in ("full", "diag", "spherical", "tied"):
        sk = SkGM(3, covariance_type=kind, random_state=0).fit(x.numpy())
        pm = ParametricMixture.from_sklearn(sk)
        ref = torch.as_tensor(sk.score_samples(x.numpy()), dtype=torch.float64)
        assert torch.allclose(pm.log_prob(x).detach(), ref, atol=1e-8)


def test_bad_input():
    with pytest.raises(ValueError, match="means must be"):
        ParametricMixture(torch.zeros(3))
    with pytest.raises(ValueError, match="positive diagonal"):
        ParametricMixture(torch.zeros(2, 2), torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="weights must be positive"):
        ParametricMixture(torch.zeros(2, 2), None, torch.tensor([1.0, 0.0]))
    pm = ParametricMixture(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"shape \[B, 2\]"):
        pm.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="NaN"):
        pm.eps(torch.tensor([[0.0, math.nan]]), torch.tensor([0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="open interval"):
        pm.eps(torch.zeros(1, 2), torch.tensor([1.0], dtype=torch.float64))
    assert isinstance(pm.to_mixture(), GaussianMixture)
