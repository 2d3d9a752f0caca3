"""Named evaluation conventions: the published settings, and the library's bound under each of them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scoredensity.conventions import CONVENTIONS, Convention, get_convention


def test_every_convention_is_complete_and_serialisable():
    for name, conv in CONVENTIONS.items():
        assert conv.name == name
        d = json.loads(json.dumps(conv.as_dict()))
        assert d["name"] == name and "clip_denoised" in d and "bits_offset" in d and "lam_range" in d


def test_published_settings():
    sde = get_convention("score-sde")
    assert sde.bits_offset == 7.0 and sde.dequantization_offset == pytest.approx(7.0)
    lo, hi = sde.lam_range
    # VP-SDE beta 0.1..20: B(1) = 10.05, so log-SNR(1) = -10.05 - log(1 - e^-10.05); s = 1e-5 gives t ≈ 1e-6
    assert lo == pytest.approx(-10.05 - math.log1p(-math.exp(-10.05)), abs=1e-9)
    assert hi == pytest.approx(math.log((1 - 1e-6) / 1e-6), abs=1e-3)
    assert sde.prior_at == lo
    assert get_convention("scoredensity").dequantization_offset == pytest.approx(math.log2(127.5))
    for name in ("ddpm", "improved-diffusion"):
        c = get_convention(name)
        assert (c.time, c.variance, c.decoder_variance, c.clip_denoised) == (
            "discrete",
            "fixed_large",
            "posterior",
            True,
        )
    vdm = get_convention("vdm")
    assert vdm.time == "continuous" and vdm.lam_range == (-5.0, 13.3) and vdm.clean_end == "categorical"


def test_replace_and_errors():
    c = get_convention("improved-diffusion").replace(cdf="tanh")
    assert c.cdf == "tanh" and c.name.startswith("improved-diffusion+")
    assert get_convention(c) is c
    with pytest.raises(ValueError, match="unknown convention"):
        get_convention("ho")
    with pytest.raises(ValueError, match="cdf"):
        c.replace(cdf="erf")
    with pytest.raises(ValueError, match="lam_range"):
        c.replace(lam_range=(3.0, 1.0))
    assert isinstance(c, Convention)


# ---------------------------------------------------------------------------------------------- independent check
# A step-by-step implementation of the published bound (Ho et al. 2020 eq. 5; the code structure of
# calc_bpd_loop / _vb_terms_bpd): Gaussian KL between the forward posterior and the model's reverse step, written
# element-wise, and the discretised decoder with the exact normal CDF (or the tanh approximation). It shares no
# code with scoredensity.ddpm except the keyed noise (matched noise), and is compared per image.

import torch  # noqa: E402

from scoredensity.ddpm import ddpm_elbo, step_noise  # noqa: E402
from scoredensity.rng import Stream  # noqa: E402


def _normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))


def _log_bin_mass(x, mean, log_sd, cdf):
    if cdf == "tanh":
        phi = lambda v: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))  # noqa: E731
    else:
        phi = torch.special.ndtr
    inv = torch.exp(-log_sd)
    c_hi = phi((x - mean + 1 / 255) * inv)
    c_lo = phi((x - mean - 1 / 255) * inv)
    mid = torch.log((c_hi - c_lo).clamp_min(1e-12))
    return torch.where(
        x < -0.999,
        torch.log(c_hi.clamp_min(1e-12)),
        torch.where(x > 0.999, torch.log((1 - c_lo).clamp_min(1e-12)), mid),
    )


def reference_bpd(model, x, betas, *, variance, decoder_variance, clip, cdf, seed, n_dec):
    """Per-image bits/dim of -(L_T + sum L_{t-1} + L_0), one draw per KL step, ``n_dec`` decoder draws.

    ``model(x_t, j)`` returns eps at 0-based timestep ``j``."""
    T = len(betas)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_lv = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef1 = betas * abar_prev.sqrt() / (1 - abar)
    coef2 = (1 - abar_prev) * alphas.sqrt() / (1 - abar)
    if variance == "fixed_large":
        first = post_var[1:2] if decoder_variance == "posterior" else betas[:1]
        model_lv = torch.log(torch.cat([first, betas[1:]]))
    else:
        model_lv = post_lv.clone()
    b = x.shape[0]
    keys = torch.arange(b)
    bits = torch.zeros(b, dtype=torch.float64)
    for j in range(T):
        draws = range(n_dec) if j == 0 else [j - 1]
        vals = []
        for r in draws:
            z = step_noise(seed, Stream.DECODER_NOISE if j == 0 else Stream.DDPM_NOISE, keys, x.shape[1:], r)
            x_t = abar[j].sqrt() * x + (1 - abar[j]).sqrt() * z
            eps = model(x_t, j)
            lv_j = model_lv[j]
            if variance == "learned_range":  # the model's extra channels interpolate the two log-variances
                eps, v = eps
                frac = (v + 1) / 2
                lv_j = frac * torch.log(betas[j]) + (1 - frac) * post_lv[j]
            x0 = (1 / abar[j]).sqrt() * x_t - (1 / abar[j] - 1).sqrt() * eps
            if clip:
                x0 = x0.clamp(-1, 1)
            mean = coef1[j] * x0 + coef2[j] * x_t
            if j == 0:
                vals.append(-_log_bin_mass(x, mean, 0.5 * lv_j, cdf).flatten(1).sum(1))
            else:
                true_mean = coef1[j] * x + coef2[j] * x_t
                vals.append(_normal_kl(true_mean, post_lv[j], mean, lv_j).flatten(1).sum(1))
        bits += torch.stack(vals).mean(0)
    prior = _normal_kl(abar[-1].sqrt() * x, torch.log(1 - abar[-1]), 0.0, torch.tensor(0.0, dtype=torch.float64))
    bits += prior.flatten(1).sum(1)
    return bits / (x[0].numel() * math.log(2))


CASES = [
    ("ddpm", {}),
    ("improved-diffusion", {}),
    ("improved-diffusion", {"variance": "fixed_small"}),
    ("improved-diffusion", {"cdf": "tanh"}),
    ("improved-diffusion", {"clip_denoised": False}),
    ("scoredensity", {}),
]


def _settings(name, over):
    conv = get_convention(name)
    return {
        "variance": over.get("variance", conv.variance),
        "decoder_variance": "beta"
        if (name == "scoredensity" and over.get("variance", conv.variance) == "fixed_large")
        else "posterior",
        "clip": over.get("clip_denoised", conv.clip_denoised),
        "cdf": over.get("cdf", conv.cdf),
    }


def _compare(eps_fn, raw_model, x, betas, name, over):
    est = ddpm_elbo(eps_fn, x, betas=betas, convention=name, n_z=1, decoder_draws=2, seed=4, norm_z=False, **over)
    ours = est.bits_per_dim()
    ref = reference_bpd(raw_model, x, betas, seed=4, n_dec=2, **_settings(name, over))
    assert est.info["convention"].startswith(name)
    assert (ours - ref).abs().max() < 1e-5, (ours, ref)
    return ours


def _grid_images(b, shape, seed=0):
    k = torch.randint(0, 256, (b, *shape), generator=torch.Generator().manual_seed(seed))
    return 2 * k.to(torch.float64) / 255 - 1


@pytest.mark.parametrize("name,over", CASES)
def test_matches_the_paper_step_by_step_on_an_exact_gaussian(name, over):
    from scoredensity.mixtures import GaussianMixture

    d = 16
    gm = GaussianMixture.gaussian(torch.zeros(d, dtype=torch.float64), 0.3 * torch.eye(d, dtype=torch.float64))
    x = _grid_images(6, (d,), seed=1)
    T = 40
    betas = torch.linspace(1000 / T * 1e-4, 1000 / T * 0.02, T, dtype=torch.float64)  # improved-diffusion "linear"
    times = 1 - torch.cumprod(1 - betas, 0)

    def raw(x_t, j):
        return gm.eps(x_t, times[j].expand(x_t.shape[0]))

    _compare(gm.eps, raw, x, betas, name, over)


@pytest.mark.parametrize("name,over", CASES)
def test_matches_the_paper_step_by_step_on_a_tiny_unet(name, over):
    import diffusers
    from helpers import tiny_unet

    from scoredensity import DiffusersEps

    unet = tiny_unet().requires_grad_(False)
    T = 30
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=1000 / T * 1e-4, beta_end=1000 / T * 0.02)
    eps = DiffusersEps(unet, sched.config)
    x = _grid_images(3, (1, 8, 8), seed=2)

    def raw(x_t, j):
        with torch.no_grad():
            return unet(x_t.float(), torch.full((x_t.shape[0],), j)).sample.double()

    _compare(eps, raw, x, eps.schedule.betas, name, over)


def test_the_choices_move_the_figure():
    # sanity: the published decoder variance, clipping and the tanh CDF each change the bound (so the check above
    # would see a wrong choice)
    from scoredensity.mixtures import GaussianMixture

    d = 16
    gm = GaussianMixture.gaussian(torch.zeros(d, dtype=torch.float64), 0.3 * torch.eye(d, dtype=torch.float64))
    x = _grid_images(6, (d,), seed=1)
    kw = dict(betas=torch.linspace(2.5e-3, 0.5, 40, dtype=torch.float64), n_z=1, decoder_draws=2, seed=4)
    base = ddpm_elbo(gm.eps, x, convention="improved-diffusion", **kw).logp
    for over in ({"decoder_variance": "beta"}, {"clip_denoised": False}, {"cdf": "tanh"}):
        other = ddpm_elbo(gm.eps, x, convention="improved-diffusion", **kw, **over)
        assert (other.logp - base).abs().max() > 1e-4, over
        assert "+" in other.info["convention"]


def test_learned_range_matches_the_paper_step_by_step():
    # improved-diffusion's learned_range model: the extra output channels interpolate log b_j and the clipped
    # posterior log-variance; read through DiffusersEps.eps_and_log_variance
    import diffusers
    from helpers import tiny_unet

    from scoredensity import DiffusersEps

    unet = tiny_unet(out_mult=2).requires_grad_(False)
    T = 30
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=T, beta_start=1000 / T * 1e-4, beta_end=1000 / T * 0.02, variance_type="learned_range"
    )
    eps = DiffusersEps(unet, sched.config)
    x = _grid_images(3, (1, 8, 8), seed=2)

    def raw(x_t, j):
        with torch.no_grad():
            out = unet(x_t.float(), torch.full((x_t.shape[0],), j)).sample.double()
        return out[:, :1], out[:, 1:]

    for over in ({"variance": "learned_range"}, {"variance": "learned_range", "clip_denoised": False}):
        _compare(eps, raw, x, eps.schedule.betas, "improved-diffusion", over)
    with pytest.raises(ValueError, match="variance channels"):
        ddpm_elbo(lambda x_t, t: x_t, x, betas=eps.schedule.betas, variance="learned_range")


def test_vdm_categorical_decoder_is_a_distribution():
    # VDM's decoder normalises N(mean; c_k, s^2) over the levels' centres c_k = 2(k + 1/2)/L - 1
    from scoredensity.decoders import categorical_gaussian_log_likelihood

    levels = 256
    k = torch.arange(levels, dtype=torch.float64)
    x = (2 * (k + 0.5) / levels - 1)[:, None]  # every value of a 1-d datum
    mean = torch.full_like(x, 0.123)
    logp = categorical_gaussian_log_likelihood(x, mean, math.log(0.05), levels)
    assert abs(float(torch.logsumexp(logp, 0))) < 1e-12
    direct = torch.log_softmax(-0.5 * ((0.123 - x[:, 0]) / 0.05) ** 2, 0)
    assert torch.allclose(logp, direct, atol=1e-12)
    # on the model's grid 2k/(L-1) - 1 (centres="grid") the argmax is the nearest level
    g = categorical_gaussian_log_likelihood(
        (2 * k / 255 - 1)[:, None], torch.full((levels, 1), 0.5, dtype=torch.float64), -3.0, levels, centres="grid"
    )
    assert int(g.argmax()) == round(1.5 * 255 / 2)


# ---------------------------------------------------------------------------------------------- continuous conventions
# ode_log_likelihood(convention=) and log_density(convention=) against exact answers on a single Gaussian, whose
# probability-flow map, denoising error and prior KL are closed forms.
from scoredensity import log_density, ode_log_likelihood  # noqa: E402
from scoredensity.mixtures import GaussianMixture  # noqa: E402

_MEAN = torch.tensor([[0.1, -0.2, 0.05]], dtype=torch.float64)
_EVALS = torch.tensor([0.09, 0.04, 0.16], dtype=torch.float64)
_Q = torch.linalg.qr(torch.tensor([[1.0, 0.3, -0.2], [0.1, 1.0, 0.4], [-0.3, 0.2, 1.0]], dtype=torch.float64))[0]
GAUSS = GaussianMixture(_MEAN, (_Q @ torch.diag(_EVALS) @ _Q.T)[None], torch.ones(1, dtype=torch.float64))


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def _ode_model_logp_gauss(x: torch.Tensor, lam_min: float, lam_max: float) -> torch.Tensor:
    """Exact log-density of the probability-flow ODE model of N(m, S) with the prior N(0, I) at lam_min and the data
    at lam_max: the flow is the affine map of q_lam_max = N(a m, a^2 S + t I) onto q_lam_min, coordinate-wise in
    S's eigenbasis, so log p = log N(T(x); 0, I) + log |det T'|."""
    t_lo, t_hi = _sigmoid(-lam_min), _sigmoid(-lam_max)
    a_lo, a_hi = math.sqrt(1 - t_lo), math.sqrt(1 - t_hi)
    var_lo, var_hi = (1 - t_lo) * _EVALS + t_lo, (1 - t_hi) * _EVALS + t_hi
    scale = (var_lo / var_hi).sqrt()
    u = (x - a_hi * _MEAN) @ _Q  # eigen-coordinates of x - a_hi m
    y = a_lo * _MEAN @ _Q + scale * u  # T(x) in the same (orthonormal) coordinates
    return -0.5 * y.pow(2).sum(1) - 1.5 * math.log(2 * math.pi) + scale.log().sum()


def test_score_sde_ode_reproduces_the_prior_at_s1_exactly():
    x = GAUSS.sample(6, generator=torch.Generator().manual_seed(4))
    conv = get_convention("score-sde")
    r = ode_log_likelihood(GAUSS.eps, x, convention="score-sde", rtol=1e-9, atol=1e-9)
    assert (r.info["lam_min"], r.info["lam_max"]) == conv.lam_range and r.info["convention"] == "score-sde"
    lo, hi = conv.lam_range
    want = _ode_model_logp_gauss(x, lo, hi)
    assert (r.logp - want).abs().max().item() < 1e-5  # solver tolerance 1e-9 on an O(1) state
    # the truncation is real: the convention's figure differs from log p_0 by far more than the solver error
    assert (want - GAUSS.log_prob(x)).abs().max().item() > 1e-4
    # an explicit end overrides the convention, and the name says so
    r2 = ode_log_likelihood(GAUSS.eps, x, convention="score-sde", lam_min=-12.0, steps=64)
    assert r2.info["lam_min"] == -12.0 and r2.info["lam_max"] == hi
    assert r2.info["convention"] == "score-sde+lam_min=-12.0"


def test_score_sde_formula_against_the_closed_form_truncated_formula():
    x = GAUSS.sample(64, generator=torch.Generator().manual_seed(5))
    lo, hi = get_convention("score-sde").lam_range
    r = log_density(GAUSS.eps, x, convention="score-sde", n_t=32, seed=1)
    assert (r.info["lam_min"], r.info["lam_max"], r.info["decoder"]) == (lo, hi, "gaussian")
    from scoredensity.formula import integrate_expected_error

    exact = integrate_expected_error(GAUSS.expected_denoising_error, x, lam_min=lo, lam_max=hi).logp
    err = r.logp - exact
    se_mean = r.stderr.pow(2).sum().sqrt().item() / len(x)
    assert abs(err.mean().item()) < 4 * se_mean + 1e-9
    assert err.pow(2).sum().item() / r.stderr.pow(2).sum().item() < 3.0  # the stated errors are not too small


def _vdm_data(n: int, seed: int) -> torch.Tensor:
    """A Gaussian rounded to VDM's 256 centres 2(k + 1/2)/256 - 1."""
    x = GAUSS.sample(n, generator=torch.Generator().manual_seed(seed))
    k = ((x + 1) * 128 - 0.5).round().clamp(0, 255)
    return 2 * (k + 0.5) / 256 - 1


def _vdm_recon_by_hand(x: torch.Tensor, lam_max: float, moments: bool = False):
    """``E_eps0 log p(x | z_0)`` [B] of VDM's decoder by Gauss-Hermite quadrature per dimension:
    ``log softmax_k(-(x + s e - c_k)^2 / (2 s^2))`` at the datum's level, ``s = e^{-lam_max/2}``. With ``moments``
    also its variance over ``eps0`` [B] (the dimensions are independent: the sum of theirs)."""
    s = math.exp(-lam_max / 2)
    e, w_e = np.polynomial.hermite_e.hermegauss(60)  # weight e^{-e^2/2}: normalise by sqrt(2 pi)
    c = torch.tensor(2 * (np.arange(256) + 0.5) / 256 - 1, dtype=torch.float64)
    k = ((x + 1) * 128 - 0.5).round().long()
    m1 = torch.zeros_like(x)
    m2 = torch.zeros_like(x)
    for ej, wj in zip(e, w_e, strict=True):
        logits = -0.5 * (((x + s * float(ej))[..., None] - c) / s) ** 2  # [B, d, 256]
        logp = logits.gather(2, k[..., None])[..., 0] - torch.logsumexp(logits, 2)
        m1 += float(wj) / math.sqrt(2 * math.pi) * logp
        m2 += float(wj) / math.sqrt(2 * math.pi) * logp**2
    if moments:
        return m1.sum(1), (m2 - m1**2).sum(1)
    return m1.sum(1)


def _vdm_elbo_by_hand(x: torch.Tensor, lam_min: float, lam_max: float) -> torch.Tensor:
    """VDM's ELBO of N(m, S)'s exact eps, term by term (Kingma et al. 2021, eq. 11 and appendix):
    -KL(q(z_1 | x) || N(0, I)) - 1/2 ∫ E||eps - eps_hat||^2 dlam + E_eps0 log p(x | z_0)."""
    d = x.shape[1]
    t1 = _sigmoid(-lam_min)
    kl = 0.5 * ((1 - t1) * x.pow(2).sum(1) + d * t1 - d - d * math.log(t1))
    nodes, weights = np.polynomial.legendre.leggauss(40)
    diffusion = torch.zeros(x.shape[0], dtype=torch.float64)
    edges = np.linspace(lam_min, lam_max, 37)
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        for u, w in zip(nodes, weights, strict=True):
            t = torch.full((x.shape[0],), _sigmoid(-(0.5 * (a + b) + 0.5 * (b - a) * u)), dtype=torch.float64)
            diffusion += 0.5 * (b - a) * w * 0.5 * GAUSS.expected_denoising_error(x, t)
    return -kl - diffusion + _vdm_recon_by_hand(x, lam_max)


def test_vdm_formula_with_categorical_decoder_against_the_paper_by_hand():
    x = _vdm_data(48, 6)
    conv = get_convention("vdm")
    r = log_density(GAUSS.eps, x, convention="vdm", n_t=32, seed=2, decoder_draws=8, importance="uniform")
    assert (r.info["lam_min"], r.info["lam_max"]) == conv.lam_range
    assert (r.info["decoder"], r.info["levels"], r.info["convention"]) == ("categorical", 256, "vdm")
    assert r.nfe == 32  # no pilot; the decoder reads the latent: no network call for the clean end
    want = _vdm_elbo_by_hand(x, *conv.lam_range)
    err = r.logp - want
    se_mean = r.stderr.pow(2).sum().sqrt().item() / len(x)
    assert abs(err.mean().item()) < 4 * se_mean, (err.mean().item(), se_mean)
    assert err.pow(2).sum().item() / r.stderr.pow(2).sum().item() < 3.0
    # the bound is below log P(k) of the discretised Gaussian, which is about log q(x) + d log(2/256)
    assert (r.logp < GAUSS.log_prob(x) + 3 * math.log(2 / 256) + 0.05).all()


def test_categorical_clean_end_matches_quadrature_per_example():
    # the clean end alone: 64 decoder draws against the Gauss-Hermite value, with the decoder's own standard
    # error computed by quadrature too (the stated stderr also carries the integral's noise)
    x = _vdm_data(32, 7)
    hi = get_convention("vdm").lam_range[1]
    r = log_density(GAUSS.eps, x, convention="vdm", n_t=4, seed=3, decoder_draws=64)
    recon, var = _vdm_recon_by_hand(x, hi, moments=True)
    clean_want = recon - 0.5 * 3 * (hi + math.log1p(math.exp(-hi)))  # the formula's split: minus (d/2) softplus
    diff = r.terms["clean_end"] - clean_want
    # a draw's log-probability is skewed (mostly ~0, rarely very negative), so per-example z-scores are heavy-tailed
    # (max |z| up to 5 over 12 seeds); their sum over 32 examples is close to normal, and E z^2 = 1 exactly
    assert abs(diff.sum().item()) < 4 * (var.sum() / 64).sqrt().item()
    assert (diff.pow(2) / (var / 64)).mean().item() < 4.0


def test_convention_errors_are_one_line_and_name_the_choice():
    x2 = GAUSS.sample(4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="discrete-time.*ddpm_elbo"):
        log_density(GAUSS.eps, x2, convention="ddpm")
    with pytest.raises(ValueError, match="not an ODE likelihood"):
        ode_log_likelihood(GAUSS.eps, x2, convention="vdm")
    with pytest.raises(ValueError, match="not an ODE likelihood"):
        ode_log_likelihood(GAUSS.eps, x2, convention="improved-diffusion")
    with pytest.raises(ValueError, match=r"VDM's grid.*2\(k \+ 1/2\)/L - 1"):
        log_density(GAUSS.eps, x2.clamp(-1, 1), convention="vdm", n_t=2)
    with pytest.raises(ValueError, match="unknown convention"):
        log_density(GAUSS.eps, x2, convention="vdn")
    r = log_density(GAUSS.eps, _vdm_data(4, 1), convention="vdm", lam_min=-6.0, n_t=4)
    assert r.info["convention"] == "vdm+lam_min=-6.0" and r.info["lam_min"] == -6.0
    assert log_density(GAUSS.eps, x2, n_t=4).info["convention"] is None


def test_scoredensity_convention_is_the_library_default_with_its_decoder():
    k = torch.randint(0, 256, (4, 3), generator=torch.Generator().manual_seed(0)).double()
    x = 2 * k / 255 - 1  # the library's 8-bit grid
    r = log_density(GAUSS.eps, x, convention="scoredensity", n_t=4)
    assert (r.info["decoder"], r.info["levels"], r.info["convention"]) == ("discretized", 256, "scoredensity")
    assert (r.info["lam_min"], r.info["lam_max"]) == (-20.0, 20.0)  # the model's range (none here): the default
    o = ode_log_likelihood(GAUSS.eps, x[:1], convention="scoredensity", steps=4)
    assert (o.info["lam_min"], o.info["lam_max"], o.info["convention"]) == (-20.0, 20.0, "scoredensity")
    with pytest.raises(ValueError, match="not on the grid of 256 levels"):
        log_density(GAUSS.eps, x + 1e-3, convention="scoredensity", n_t=4)
