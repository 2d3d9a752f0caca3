"""The density formula against exact answers (issue 3 must-show)."""

import math

import pytest
import torch

from scoredensity import GaussianMixture, mixture_preset
from scoredensity.formula import integrate_expected_error, log_density
from scoredensity.proposals import LambdaProposal


@pytest.fixture(autouse=True)
def _on_cpu():
    """Every tensor of these tests is made on the CPU explicitly (the estimators compute where x lives)."""
    with torch.device("cpu"):
        yield


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _isotropic_mixture(d: int) -> GaussianMixture:
    g = _gen(11)
    means = torch.randn(3, d, dtype=torch.float64, generator=g) * 1.5
    covs = torch.stack([s * torch.eye(d, dtype=torch.float64) for s in (0.3, 1.0, 2.0)])
    return GaussianMixture(means, covs, torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64))


CASES = [
    ("iso", 1, 2000),
    ("aniso", 1, 2000),
    ("iso", 2, 2000),
    ("aniso", 2, 2000),
    ("iso", 10, 1000),
    ("aniso", 10, 1000),
    ("iso", 100, 300),
    ("aniso", 100, 300),
]


@pytest.mark.parametrize("kind,d,n", CASES)
def test_exact_eps_recovers_log_prob_with_honest_stderr(kind, d, n):
    gm = _isotropic_mixture(d) if kind == "iso" else mixture_preset("anisotropic", d=d)
    if kind == "aniso" and d > 1:
        ev = gm.evals
        assert ev.min() <= 1.01e-3 and ev.max() >= 9.9  # eigenvalues span 1e-3..10
    x = gm.sample(n, generator=_gen(d)).float()
    exact = gm.log_prob(x)
    est = log_density(gm.eps, x, seed=d)
    z = (est.logp - exact) / est.stderr
    # honest standard errors: z-scores look standard normal
    assert abs(float(z.mean())) < 0.15, float(z.mean())
    assert 0.8 < float(z.std()) < 1.2, float(z.std())
    assert float((z.abs() > 4).float().mean()) <= 0.01
    # and the batch mean agrees with the exact mean within its own standard error
    gap = float((est.logp - exact).mean())
    assert abs(gap) < 4 * est.mean_stderr() + 1e-6, (gap, est.mean_stderr())


@pytest.mark.parametrize("kind,d", [("iso", 2), ("aniso", 2), ("aniso", 10), ("aniso", 100)])
def test_default_budget_mean_stderr_per_dim(kind, d):
    gm = _isotropic_mixture(d) if kind == "iso" else mixture_preset("anisotropic", d=d)
    x = gm.sample(1000, generator=_gen(1)).float()
    est = log_density(gm.eps, x)
    assert est.mean_stderr() / d <= 0.01
    assert est.nfe <= 130


@pytest.mark.parametrize("lam_range", [(-30.0, 30.0), (-35.0, 35.0)])
def test_t_integration_alone_is_exact_for_gaussians(lam_range):
    """With the z-expectation in closed form, the lam-quadrature reproduces log N(x) to 1e-6 in float64."""
    for d, evs in [(1, [0.5]), (3, [1e-3, 1.0, 10.0]), (20, torch.logspace(-3, 1, 20).tolist())]:
        q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=_gen(d)))
        cov = (q * torch.tensor(evs, dtype=torch.float64)) @ q.T
        g = GaussianMixture.gaussian(torch.linspace(-1, 2, d, dtype=torch.float64), 0.5 * (cov + cov.T))
        x = g.sample(20, generator=_gen(2))
        r = integrate_expected_error(g.expected_denoising_error, x, lam_min=lam_range[0], lam_max=lam_range[1])
        assert (r.logp - g.log_prob(x)).abs().max() < 1e-6
        # far off the data (log p ~ -1e4) the error stays at float64's relative precision
        far = 5 * torch.randn(5, d, dtype=torch.float64, generator=_gen(3))
        r = integrate_expected_error(g.expected_denoising_error, far, lam_min=lam_range[0], lam_max=lam_range[1])
        exact = g.log_prob(far)
        assert ((r.logp - exact).abs() / exact.abs().clamp_min(1)).max() < 1e-9


def test_standard_normal_integrand_is_one_minus_x_squared():
    """docs/design.md §2 check: for N(0,1) data the formula gives -1/2 log(2 pi) - x^2/2."""
    g = GaussianMixture.gaussian(torch.zeros(1), torch.eye(1))
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    r = integrate_expected_error(g.expected_denoising_error, x)
    assert torch.allclose(r.logp, -0.5 * math.log(2 * math.pi) - 0.5 * x[:, 0] ** 2, atol=1e-7)
    assert torch.allclose(r.terms["noisy_end"] + r.terms["integral"] + r.terms["clean_end"], r.logp)


def test_variance_reduction_pays_at_equal_nfe():
    """Best option vs plain MC (lam ~ U[-16, 16], one z each, d in the integrand) on the anisotropic preset."""
    for d in (16, 64):
        gm = mixture_preset("anisotropic", d=d)
        x = gm.sample(400, generator=_gen(3)).float()
        n_t = 32
        plain = log_density(
            gm.eps,
            x,
            n_t=n_t,
            scheme="mc",
            importance="uniform",
            control_variate=None,
            norm_z=False,
            lam_min=-16.0,
            lam_max=16.0,
        )
        best = log_density(gm.eps, x, n_t=n_t - 4, control_variate="batch")
        assert best.nfe <= plain.nfe  # pilot included
        ratio = float(plain.stderr.pow(2).mean() / best.stderr.pow(2).mean())
        assert ratio >= 5, (d, ratio)


def test_measures_the_model_not_the_data():
    """With the exact eps of a different mixture q, the estimate is log q(x)."""
    data = mixture_preset("ring8")
    model = mixture_preset("blobs2d")
    x = data.sample(500, generator=_gen(4)).float()
    est = log_density(model.eps, x)
    exact_q = model.log_prob(x)
    assert abs(float((est.logp - exact_q).mean())) < 4 * est.mean_stderr()
    assert float((est.logp - data.log_prob(x)).mean()) < -1.0


@pytest.mark.parametrize(
    "scheme,kw",
    [("mc", {}), ("quadrature", {"n_z": 2, "n_t": 64}), ("stratified", {"antithetic": True, "n_z": 2, "n_t": 64})],
)
def test_other_schemes_are_unbiased(scheme, kw):
    gm = mixture_preset("anisotropic", d=4)
    x = gm.sample(500, generator=_gen(6)).float()
    est = log_density(gm.eps, x, scheme=scheme, **kw)
    gap = float((est.logp - gm.log_prob(x)).mean())
    assert abs(gap) < 4 * est.mean_stderr() + 1e-3


def test_reproducible_and_independent_of_chunking_and_shape():
    gm = mixture_preset("blobs2d")
    x = gm.sample(37, generator=_gen(7)).float()
    prop = LambdaProposal.uniform(-20.0, 20.0)
    a = log_density(gm.eps, x, importance=prop, control_variate=None, seed=3)
    b = log_density(gm.eps, x, importance=prop, control_variate=None, seed=3, max_batch=17)
    assert torch.equal(a.logp, b.logp) and torch.equal(a.stderr, b.stderr)
    c = log_density(gm.eps, x, importance=prop, control_variate=None, seed=4)
    assert not torch.equal(a.logp, c.logp)
    # image-shaped inputs: d counts all elements
    img = x.reshape(37, 1, 1, 2)
    eps_img = lambda xt, t: gm.eps(xt.flatten(1), t).reshape(xt.shape)  # noqa: E731
    e = log_density(eps_img, img, importance=prop, control_variate=None, seed=3)
    assert torch.allclose(e.logp, a.logp) and e.dim == 2


def test_float64_path_and_terms_add_up():
    gm = mixture_preset("ring8")
    x = gm.sample(50, generator=_gen(8))
    r = log_density(gm.eps, x, double=True)
    assert r.logp.dtype == torch.float64
    total = r.terms["noisy_end"] + r.terms["integral"] + r.terms["clean_end"]
    assert torch.allclose(total, r.logp)
    assert r.terms["noisy_end"].abs().max() < 1e-6  # e^{lam_min} (d - |x|^2) / 2 at lam_min = -20


def test_bad_inputs_raise_clear_errors():
    gm = mixture_preset("ring8")
    x = gm.sample(6, generator=_gen(9)).float()
    bad = x.clone()
    bad[1, 0] = float("nan")
    bad[4, 1] = float("inf")
    with pytest.raises(ValueError, match=r"rows \[1, 4\]"):
        log_density(gm.eps, bad)
    with pytest.raises(ValueError, match="returned shape"):
        log_density(lambda xt, t: xt[:, :1], x)
    with pytest.raises(ValueError, match="NaN/Inf"):
        log_density(lambda xt, t: xt * float("nan"), x)
    with pytest.raises(TypeError, match="floating"):
        log_density(gm.eps, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="batched"):
        log_density(gm.eps, torch.zeros(2))
    with pytest.raises(ValueError, match="lam_max > lam_min"):
        log_density(gm.eps, x, lam_min=3.0, lam_max=1.0)
    with pytest.raises(ValueError, match="even n_t"):
        log_density(gm.eps, x, n_t=7)
    with pytest.raises(ValueError, match="scheme"):
        log_density(gm.eps, x, scheme="simpson")
    with pytest.raises(ValueError, match="dimension"):
        log_density(gm.eps, x, control_variate=GaussianMixture.gaussian(torch.zeros(3), torch.eye(3)))


def test_batches_keyed_by_global_ids_reproduce_the_whole():
    gm = mixture_preset("ring8")
    x = gm.sample(40, generator=_gen(12)).float()
    prop = LambdaProposal.uniform(-20.0, 20.0)
    whole = log_density(gm.eps, x, importance=prop, control_variate=None, seed=5)
    parts = [
        log_density(
            gm.eps,
            x[s : s + 13],
            importance=prop,
            control_variate=None,
            seed=5,
            example_ids=torch.arange(s, min(s + 13, 40)),
        )
        for s in range(0, 40, 13)
    ]
    assert torch.equal(torch.cat([p.logp for p in parts]), whole.logp)


def test_conditional_model_through_cond_rows():
    """cond= hands each row its example's condition: class-conditional exact eps gives log p(x | y)."""
    gm = mixture_preset("blobs2d")
    comps = [GaussianMixture.gaussian(gm.means[k], gm.covs[k]) for k in range(3)]

    def eps_cond(x_t, t, y):
        out = torch.empty_like(x_t)
        for k, comp in enumerate(comps):
            m = y == k
            if m.any():
                out[m] = comp.eps(x_t[m], t[m])
        return out

    x, y = gm.sample(300, generator=_gen(13), return_labels=True)
    est = log_density(eps_cond, x.float(), cond=y)
    exact = torch.stack([comps[int(k)].log_prob(x[i : i + 1])[0] for i, k in enumerate(y)])
    assert abs(float((est.logp - exact).mean())) < 4 * est.mean_stderr()
    with pytest.raises(ValueError, match="one row per example"):
        log_density(eps_cond, x.float(), cond=y[:5])
