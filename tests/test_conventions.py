"""Named evaluation conventions: the published settings, and the library's bound under each of them."""

from __future__ import annotations

import json
import math

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
    diffusers = pytest.importorskip("diffusers")
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
    diffusers = pytest.importorskip("diffusers")
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
