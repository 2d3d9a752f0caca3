"""Issue 12's moves keep old imports working, and the diffusion loss's adaptive log-SNR sampling stays unbiased."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import scoredensity as sd
from scoredensity import ddpm, sampling
from scoredensity.apps import diffusion_loss
from scoredensity.data import toys


def test_moved_names_are_the_same_objects():
    assert diffusion_loss.ancestral_sample is sampling.ancestral_sample
    assert diffusion_loss.cosine_lam_grid is sampling.cosine_lam_grid
    assert diffusion_loss.gaussian_temperature_law is sampling.gaussian_temperature_law
    assert diffusion_loss.BimodalARProcess is toys.BimodalARProcess is sd.BimodalARProcess
    assert sd.gaussian_temperature_law is sampling.gaussian_temperature_law


def test_old_variances_name_is_deprecated_and_distinct_from_ddpm():
    with pytest.warns(DeprecationWarning, match="ANCESTRAL_VARIANCES"):
        old = diffusion_loss.VARIANCES
    assert old == sampling.ANCESTRAL_VARIANCES
    assert not set(sampling.ANCESTRAL_VARIANCES) & set(ddpm.VARIANCES)
    with pytest.raises(AttributeError):
        diffusion_loss.NO_SUCH_NAME  # noqa: B018


def test_head_loads_a_state_dict_saved_before_the_time_embedding_moved():
    torch.manual_seed(1)
    head = diffusion_loss.DiffusionLoss(2, 3, width=16, depth=1)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    old_layout = {k.replace("time_emb.mlp.", "time_emb."): v for k, v in head.state_dict().items()}
    assert "time_emb.0.weight" in old_layout
    other = diffusion_loss.DiffusionLoss(2, 3, width=16, depth=1)
    other.load_state_dict(old_layout)
    x, c = torch.randn(5, 2), torch.randn(5, 3)
    t = torch.full((5,), 0.4, dtype=torch.float64)
    assert torch.equal(other.eps(x, t, c), head.eps(x, t, c))


def test_adaptive_lam_sampling_keeps_the_elbo_loss_unbiased():
    """A fresh head's output layer is zero, so its eps is ``sqrt(t) x_t``: the exact denoiser of N(0, I) tokens.
    Its elbo loss is then an unbiased estimate of ``-log N(x; 0, I)`` (up to the e^-20 tails), under the uniform
    and under the adapted log-SNR density alike; the adapted density must really differ from the uniform one."""
    torch.manual_seed(0)
    x = torch.tensor([[0.3, -1.2], [1.5, 0.4], [-0.7, -0.1]])
    c = torch.randn(3, 4)
    exact = -(-0.5 * x.double().pow(2).sum(1) - math.log(2 * math.pi))
    for kind in ("uniform", "adaptive"):
        head = diffusion_loss.DiffusionLoss(2, 4, width=16, depth=1, t_per_token=8, lam_sampling=kind)
        gen = torch.Generator().manual_seed(5)
        if kind == "adaptive":
            head.train()
            for _ in range(40):
                head(x, c, generator=gen)
            masses = head.lam_sampler.proposal().masses
            assert float(masses.max() / masses.min()) > 2.0
        head.eval()
        with torch.no_grad():
            draws = torch.stack([head(x, c, generator=gen, reduction="none").double() for _ in range(300)])
        mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
        assert (se > 0).all()
        assert ((mean - exact).abs() < 4 * se + 1e-4).all(), (kind, mean, exact, se)


def test_adaptive_lam_sampling_needs_the_elbo_weighting():
    with pytest.raises(ValueError, match="lam_sampling"):
        diffusion_loss.DiffusionLoss(2, 3, weighting="simple", lam_sampling="adaptive")
    with pytest.raises(ValueError, match="lam_sampling must be one of"):
        diffusion_loss.DiffusionLoss(2, 3, lam_sampling="t_uniform")


def test_no_deprecation_warning_on_plain_import():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        from scoredensity.apps.diffusion_loss import DiffusionLoss  # noqa: F401


def test_classifier_chunk_size_is_a_deprecated_alias_of_max_batch():
    from scoredensity.apps.classifier import MixtureClassConditional, classify
    from scoredensity.mixtures import mixture_preset

    gm = mixture_preset("blobs2d")
    x = gm.sample(12, generator=torch.Generator().manual_seed(0))
    model = MixtureClassConditional(gm)
    kw = dict(budget=gm.num_components * 16, round_size=16, seed=3, importance="uniform")
    new = classify(model, x, max_batch=37, **kw)
    with pytest.warns(DeprecationWarning, match="chunk_size"):
        old = classify(model, x, chunk_size=37, **kw)
    assert torch.equal(new.log_likelihood, old.log_likelihood)
    with pytest.raises(ValueError, match="max_batch"):
        classify(model, x, max_batch=0, **kw)


def test_gan_regulariser_n_draws_and_chunk_are_deprecated_aliases():
    from scoredensity.apps.gan import regulariser_gradient
    from scoredensity.mixtures import mixture_preset

    gm = mixture_preset("ring8")
    x = gm.sample(5, generator=torch.Generator().manual_seed(1))
    new = regulariser_gradient(gm.eps, x, n_z=16, max_batch=24, seed=2)
    with pytest.warns(DeprecationWarning, match="n_draws"), pytest.warns(DeprecationWarning, match="chunk"):
        old = regulariser_gradient(gm.eps, x, n_draws=16, chunk=24, seed=2)
    for a, b in zip(new, old, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="n_z must be >= 2"):
        regulariser_gradient(gm.eps, x, n_z=1)


def test_classifier_precision_autocasts_the_network_only():
    """bf16 autocast of a class-conditional MLP moves each log-likelihood by less than its own noise allows:
    the same draws (same seed) feed both runs, so the difference is the network's rounding alone, and the sums
    stay float64."""
    from scoredensity.apps.classifier import classify
    from scoredensity.mixtures import mixture_preset
    from scoredensity.nets import MLPDenoiser

    gm = mixture_preset("blobs2d")
    x = gm.sample(16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    net = MLPDenoiser((2,), hidden=32, blocks=1, emb_dim=16, num_classes=3)
    with torch.no_grad():  # a non-trivial, label-dependent output (zero-initialised layers made non-zero)
        for prm in net.parameters():
            prm.add_(0.2 * torch.randn_like(prm))
    kw = dict(budget=3 * 32, round_size=16, seed=1, importance="uniform", eliminate=False)
    ref = classify(net, x, **kw)
    low = classify(net, x, precision="bf16", **kw)
    assert low.info["precision"] == "bf16" and low.log_likelihood.dtype == torch.float64
    diff = (low.log_likelihood - ref.log_likelihood).abs()
    assert (diff > 0).any(), "bf16 changed nothing: the autocast did not reach the network"
    se = ref.covariance.diagonal(dim1=1, dim2=2).sqrt()  # [B, C]
    assert (diff < 3 * se + 1e-3).all()
    with pytest.raises(ValueError, match="precision must be one of"):
        classify(net, x, precision="fp64", **kw)


def test_adaptive_sampler_state_travels_with_the_head():
    x, c = torch.randn(6, 2), torch.randn(6, 3)
    head = diffusion_loss.DiffusionLoss(2, 3, width=16, depth=1, lam_sampling="adaptive")
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        head(x, c, generator=gen)
    state = head.state_dict()
    other = diffusion_loss.DiffusionLoss(2, 3, width=16, depth=1, lam_sampling="adaptive")
    assert not torch.equal(other.lam_sampler.proposal().masses, head.lam_sampler.proposal().masses)
    other.load_state_dict(state)
    assert torch.equal(other.lam_sampler.proposal().masses, head.lam_sampler.proposal().masses)
    plain = diffusion_loss.DiffusionLoss(2, 3, width=16, depth=1)
    plain.load_state_dict(state)  # a uniform head ignores the statistics
    assert plain.lam_sampler is None
