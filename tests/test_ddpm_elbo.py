"""Discrete DDPM ELBO with the exact eps of mixtures, abar_k = abar(k/T) from one continuous clock."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import mixture_points

from scoredensity.ddpm import ddpm_elbo, discretized_gaussian_log_likelihood
from scoredensity.mixtures import GaussianMixture, mixture_preset
from scoredensity.schedules import DDPMSchedule, VPLinearClock

EULER_GAMMA = 0.5772156649015329


pytestmark = pytest.mark.usefixtures("one_thread")


def _sched(T: int) -> DDPMSchedule:
    return DDPMSchedule.from_clock(VPLinearClock(), T)


def _gap(gm, x, T, n_z, **kw):
    """Mean gap to log p_0 per dimension and its standard error."""
    est = ddpm_elbo(gm.eps, x, schedule=_sched(T), n_z=n_z, **kw)
    d = gm.dim
    return float((est.logp - gm.log_prob(x)).mean()) / d, est.mean_stderr() / d


def test_fixed_large_gap_shrinks_like_one_over_T():
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 48)
    g10, s10 = _gap(gm, x, 10, n_z=256)
    g100, s100 = _gap(gm, x, 100, n_z=16)
    g1000, s1000 = _gap(gm, x, 1000, n_z=2)
    assert abs(g10) > 4 * s10  # a real discretisation gap at T = 10
    c = 10 * abs(g10)  # |gap| ~ c / T, allowing a factor 2 for "roughly"
    assert abs(g100) <= 2 * c / 100 + 4 * s100
    assert abs(g1000) <= 2 * c / 1000 + 4 * s1000
    assert abs(g1000) < abs(g10)


def test_fixed_small_gap_is_about_gamma_over_two_per_dimension():
    # Theory (docs/design.md §3): with sigma_k^2 = posterior variance the KL weights are b_k / (2 a_k t_{k-1}) instead
    # of b_k / (2 a_k t_k); with the exact eps this costs (gamma_Euler / 2) d ≈ 0.289 d nats more than fixed_large
    # as T -> inf. At finite T the clock is linear in t only for the first ~T/100 steps, so the excess is larger
    # and decreases towards the limit. Same seed: the two runs see the same z.
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 32)
    lim = EULER_GAMMA / 2
    excess = []
    for T in (300, 3000):
        large = ddpm_elbo(gm.eps, x, schedule=_sched(T), variance="fixed_large", seed=7)
        small = ddpm_elbo(gm.eps, x, schedule=_sched(T), variance="fixed_small", decoder_variance="beta", seed=7)
        diff = (large.logp - small.logp) / gm.dim
        se = float(diff.std() / math.sqrt(len(diff)))
        excess.append((float(diff.mean()), se))
    (e300, s300), (e3000, s3000) = excess
    assert e3000 > lim - 4 * s3000
    assert e300 > e3000 - 4 * (s300 + s3000)
    # two-sided, at finite T: for a Gaussian the expected excess is known step by step. KL of two Gaussians with the
    # same posterior mean error m_k = b_k^2 / (a_k t_k) E||z - eps||^2 and variances post_k (small), b_k (large):
    # excess = sum_k 1/2 [m_k (1/post_k - 1/b_k) - d (post_k/b_k - 1 - log(post_k/b_k))], k = 2..T (1-based)
    g = gm.moment_matched()
    xg = mixture_points(g, 64)
    for T in (300, 3000):
        large = ddpm_elbo(g.eps, xg, schedule=_sched(T), variance="fixed_large", seed=7)
        small = ddpm_elbo(g.eps, xg, schedule=_sched(T), variance="fixed_small", decoder_variance="beta", seed=7)
        diff = large.logp - small.logp
        t = _sched(T).times
        abar = 1 - t
        b = 1 - abar[1:] / abar[:-1]  # steps 2..T
        post = b * t[:-1] / t[1:]
        err = torch.stack([g.expected_denoising_error(xg, tk.expand(len(xg))) for tk in t[1:]])  # [T-1, B]
        m = (b**2 / ((1 - b) * t[1:]))[:, None] * err
        r = (post / b)[:, None]
        expected = 0.5 * (m * (1 / post - 1 / b)[:, None] - g.dim * (r - 1 - torch.log(r))).sum(0)
        se = float((diff - expected).std()) / math.sqrt(len(xg))
        assert abs(float((diff - expected).mean())) < 4 * se + 1e-9, (T, float(diff.mean()), float(expected.mean()))
    # the clipped decoder variance sigma~_2^2 ≈ b_1 / 2 (published code) costs another (1 - ln 2)/2 per dimension
    clipped = ddpm_elbo(gm.eps, x, schedule=_sched(3000), variance="fixed_small", seed=7)
    beta = ddpm_elbo(gm.eps, x, schedule=_sched(3000), variance="fixed_small", decoder_variance="beta", seed=7)
    dec = float((beta.terms["decoder"] - clipped.terms["decoder"]).mean()) / gm.dim
    assert abs(dec - (1 - math.log(2)) / 2) < 0.02


def test_measures_the_model_not_the_data():
    data = mixture_preset("ring8")
    model = mixture_preset("blobs2d")
    x = mixture_points(data, 32)
    est = ddpm_elbo(model.eps, x, schedule=_sched(1000), n_z=2)
    gap = float((est.logp - model.log_prob(x)).mean())
    # O(1/T) discretisation gap (c ≈ 10 |gap_10| ≈ 5 nats/dim on these mixtures: 0.005 nats/dim at T = 1000)
    # plus noise
    assert abs(gap) < 5 / 1000 * model.dim + 4 * est.mean_stderr()
    assert float((data.log_prob(x) - model.log_prob(x)).abs().mean()) > 1.0


def test_d20_close_to_exact_at_T_1000():
    gm = mixture_preset("anisotropic", d=20)
    x = mixture_points(gm, 16)
    est = ddpm_elbo(gm.eps, x, schedule=_sched(1000))
    gap = float((est.logp - gm.log_prob(x)).mean())
    assert abs(gap) < 0.02 * gm.dim + 4 * est.mean_stderr()


def test_betas_alphas_cumprod_and_schedule_agree():
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 3)
    sch = _sched(20)
    a = ddpm_elbo(gm.eps, x, schedule=sch, seed=1)
    b = ddpm_elbo(gm.eps, x, betas=sch.betas, seed=1)
    c = ddpm_elbo(gm.eps, x, alphas_cumprod=sch.alphas_cumprod, seed=1)
    assert torch.allclose(a.logp, b.logp, atol=1e-9) and torch.allclose(a.logp, c.logp, atol=1e-9)


def test_subsampled_steps_are_unbiased():
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 24)
    full = ddpm_elbo(gm.eps, x, schedule=_sched(200), n_z=2, seed=1)
    sub = ddpm_elbo(gm.eps, x, schedule=_sched(200), n_steps_sampled=64, seed=2)
    joint = math.sqrt(full.mean_stderr() ** 2 + sub.mean_stderr() ** 2)
    assert abs(full.mean() - sub.mean()) < 4 * joint
    assert sub.nfe == 64 + 8 + sub.info["pilot_calls"] / 24 and full.nfe == 2 * 199 + 8
    assert sub.info["step_proposal"] == "analytic"


def test_stderr_is_honest():
    # the spread over seeds matches the reported standard error (pair-difference estimate with n_z = 1)
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 4)
    runs = [ddpm_elbo(gm.eps, x, schedule=_sched(50), seed=s) for s in range(24)]
    spread = torch.stack([r.logp for r in runs]).std(0)
    reported = torch.stack([r.stderr for r in runs]).mean(0)
    ratio = spread / reported
    assert ((ratio > 0.5) & (ratio < 1.6)).all(), ratio


def test_discretized_decoder_matches_bin_mass():
    # 8-bit data of a smooth density: the discretised decoder's probability is ≈ the Gaussian decoder's density
    # times the bin width 2/255 (midpoint rule over a bin 0.8 decoder standard deviations wide), away from the
    # open edge bins
    gm = GaussianMixture.gaussian(torch.zeros(2), 0.09 * torch.eye(2))
    pts = mixture_points(gm, 32)
    pts = pts[(pts.abs() < 0.98).all(1)][:16]
    x = ((pts + 1) * 127.5).round() / 127.5 - 1
    common = {"schedule": _sched(1000), "seed": 3, "variance": "fixed_large"}
    disc = ddpm_elbo(gm.eps, x, decoder="discretized", **common)
    gauss = ddpm_elbo(gm.eps, x, decoder="gaussian", norm_z=False, **common)
    assert torch.equal(disc.terms["diffusion"], ddpm_elbo(gm.eps, x, decoder="gaussian", **common).terms["diffusion"])
    expect = gauss.terms["decoder"] + 2 * math.log(2 / 255)
    assert ((disc.terms["decoder"] - expect).abs() < 0.1).all()


def test_discretized_log_likelihood_is_a_distribution():
    # probabilities of all 2^8 levels sum to one (1-D, edge bins open)
    levels = 256
    x = (torch.arange(levels, dtype=torch.float64) / 127.5 - 1)[:, None]
    mean = torch.full_like(x, 0.3)
    logp = discretized_gaussian_log_likelihood(x, mean, math.log(0.2), levels)
    assert abs(float(torch.logsumexp(logp, 0))) < 1e-10
    far = discretized_gaussian_log_likelihood(torch.tensor([[1.0]]), torch.tensor([[-40.0]]), 0.0, levels)
    assert torch.isfinite(far).all()


def test_bad_input():
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 3)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ddpm_elbo(gm.eps, x, decoder="discretized", schedule=_sched(10))
    with pytest.raises(ValueError, match="variance"):
        ddpm_elbo(gm.eps, x, variance="learned")
    with pytest.raises(ValueError, match="not both"):
        ddpm_elbo(gm.eps, x, betas=torch.full((5,), 0.1), schedule=_sched(5))
    with pytest.raises(ValueError, match="not both"):
        ddpm_elbo(gm.eps, x, betas=torch.full((5,), 0.1), alphas_cumprod=_sched(5).alphas_cumprod)
    with pytest.raises(ValueError, match="betas"):
        ddpm_elbo(gm.eps, x, betas=torch.tensor([0.1, -0.2]))
    with pytest.raises(ValueError, match="n_steps_sampled"):
        ddpm_elbo(gm.eps, x, n_steps_sampled=1)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        ddpm_elbo(gm.eps, bad)


def test_zero_terminal_snr_schedule_is_refused_not_inf():
    import pytest

    from scoredensity import CosineClock, DDPMSchedule, ddpm_elbo, mixture_preset

    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 50, dtype=torch.float64), 0)
    abar[-1] = 0.0
    gm = mixture_preset("ring8")
    x = gm.sample(4, generator=torch.Generator().manual_seed(0)).float()
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        ddpm_elbo(gm.eps, x, alphas_cumprod=abar)
    # the cosine clock's b_T = 1 is clipped at 0.999 as in the published schedule: finite bound
    sched = DDPMSchedule.from_clock(CosineClock(), 100)
    assert float(sched.betas.max()) <= 0.999
    assert torch.isfinite(ddpm_elbo(gm.eps, x, schedule=sched).logp).all()


def test_no_graph_on_a_trainable_module_and_batching_invariance():
    # issue 11: inference mode (no autograd graph kept), and keyed draws that do not depend on max_batch or on the
    # batch's composition (global example ids)
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 6).float()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x_t, t):
            return self.scale * gm.eps(x_t.double(), t).float()

    net = Net()
    a = ddpm_elbo(net, x, schedule=_sched(20), n_steps_sampled=8, seed=5)
    assert a.logp.requires_grad is False and a.info["max_batch"] >= 1
    b = ddpm_elbo(net, x, schedule=_sched(20), n_steps_sampled=8, seed=5, max_batch=5)
    c = ddpm_elbo(net, x[3:], schedule=_sched(20), n_steps_sampled=8, seed=5, example_ids=torch.arange(3, 6))
    assert torch.allclose(a.logp, b.logp, atol=1e-5) and torch.allclose(a.logp[3:], c.logp, atol=1e-5)
    full = ddpm_elbo(net, x, schedule=_sched(20), seed=5)
    fb = ddpm_elbo(net, x, schedule=_sched(20), seed=5, max_batch=7)
    assert torch.allclose(full.logp, fb.logp, atol=1e-5)
    with pytest.warns(DeprecationWarning):
        ddpm_elbo(net, x, schedule=_sched(20), seed=5, chunk_size=7)


def test_precision_and_cond():
    # bf16 autocast of the network agrees with fp32 within the stated standard error; cond reaches the network
    gm = mixture_preset("ring8")
    x = mixture_points(gm, 8).float()
    lin = torch.nn.Linear(2, 2)

    def net(x_t, t):
        return gm.eps(x_t.double(), t).float() + 0.01 * lin(x_t)

    kw = dict(schedule=_sched(50), n_steps_sampled=16, seed=2)
    fp32 = ddpm_elbo(net, x, **kw)
    bf16 = ddpm_elbo(net, x, precision="bf16", **kw)
    assert bf16.info["precision"] == "bf16"
    se = (fp32.stderr**2 + bf16.stderr**2).sqrt()
    assert ((fp32.logp - bf16.logp).abs() < 4 * se + 1e-3).all()
    seen = []

    def cond_net(x_t, t, c):
        seen.append(c)
        return gm.eps(x_t.double(), t).float()

    labels = torch.arange(8)
    out = ddpm_elbo(cond_net, x, cond=labels, **kw)
    assert torch.allclose(out.logp, ddpm_elbo(gm.eps, x, **kw).logp, atol=1e-5)
    assert all(c.shape[0] > 0 for c in seen) and set(torch.cat(seen).tolist()) == set(range(8))
    with pytest.raises(ValueError, match="cond"):
        ddpm_elbo(cond_net, x, cond=labels[:3], **kw)
