"""The continuous published conventions (``vdm``, ``score-sde``) through :func:`evaluate_images`: per image the same
figure as the direct estimator call with the convention and matched keyed noise, with the convention's offset."""

import math

import pytest
import torch
from helpers import tiny_unet

from scoredensity import DiffusersEps, rng
from scoredensity.conventions import get_convention
from scoredensity.formula import fit_proposal, log_density
from scoredensity.image_eval import evaluate_images, round_keys
from scoredensity.ode import ode_log_likelihood

# trained log-SNR range about [-15.6, 16.1]: wide enough for vdm's [-5, 13.3] and score-sde's [-10.05, 13.8]
WIDE = {"num_train_timesteps": 100, "beta_start": 1e-7, "beta_end": 0.3, "beta_schedule": "linear"}
NARROW = {"num_train_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.2, "beta_schedule": "linear"}
N, D = 3, 64


def _images() -> torch.Tensor:
    return torch.randint(0, 256, (N, 1, 8, 8), generator=torch.Generator().manual_seed(3))


def test_vdm_equals_the_direct_call_with_matched_noise():
    eps = DiffusersEps(tiny_unet(channels=1), WIDE)
    assert eps.lam_range[0] < -5 and eps.lam_range[1] > 13.3
    images = _images()
    conv = get_convention("vdm")
    res = evaluate_images(
        eps, images, methods=("formula-discrete",), convention="vdm", n_t=8, batch_size=2, progress=False
    )
    r = res["methods"]["formula-discrete"]
    assert res["convention"] == conv.as_dict() and r["convention"] == "vdm"
    assert res["lam_range"] == [-5.0, 13.3]
    # the direct call: VDM's grid, the convention's range and decoder, the same shared proposal and keys
    x = (2 * (images.double() + 0.5) / 256 - 1).float()
    # the shared proposal: fitted once on the first examples on VDM's grid, over the convention's range
    prop = fit_proposal(eps, x, lam_min=-5.0, lam_max=13.3, seed=0, pilot_examples=16, pilot_nodes=8)
    direct = log_density(
        eps,
        x,
        convention="vdm",
        n_t=8,
        importance=prop,
        control_variate=None,
        example_ids=round_keys(torch.arange(N), 0),
    )
    assert direct.info["lam_min"] == -5.0 and direct.info["lam_max"] == 13.3
    bpd = conv.bits_per_dim(-direct.logp, D)  # no offset: the categorical decoder gives a probability
    assert conv.bits_offset == 0.0
    assert r["bpd"] == pytest.approx(float(bpd.mean()), abs=1e-5)
    assert r["nll_nats"] == pytest.approx(float(-direct.logp.mean()), rel=1e-6)


def test_score_sde_equals_the_direct_ode_with_matched_dequantisation():
    eps = DiffusersEps(tiny_unet(channels=1), WIDE)
    images = _images()[:2]
    conv = get_convention("score-sde")
    res = evaluate_images(eps, images, methods=("ode-dequantized",), convention="score-sde", progress=False)
    r = res["methods"]["ode-dequantized"]
    assert r["convention"] == "score-sde" and r["kind"] == "dequantized"
    assert r["bpd_offset_dequantization"] == 7.0 == conv.bits_offset
    ids = torch.arange(2)
    u = rng.uniforms(0, rng.Stream.DEQUANT, ids, D, step=0).reshape(images.shape)
    x = (2 * (images.double() + u.double()) / 256 - 1).float()
    direct = ode_log_likelihood(eps, x, convention="score-sde", seed=0, example_ids=round_keys(ids, 0))
    bpd = conv.bits_per_dim(-direct.logp, D)  # + 7 bits/dim: bins of 2/256
    assert float((bpd - (-direct.logp / (D * math.log(2)))).mean()) == pytest.approx(7.0)
    assert r["bpd"] == pytest.approx(float(bpd.mean()), abs=1e-5)


def test_conventions_beyond_the_trained_range_or_with_other_methods_are_refused():
    eps = DiffusersEps(tiny_unet(channels=1), NARROW)  # log-SNR up to about 9.2 < 13.3
    images = _images()
    with pytest.raises(ValueError, match=r"log-SNR range \[-5, 13.3\].*trained range.*--clip-convention-range"):
        evaluate_images(eps, images, methods=("formula-discrete",), convention="vdm", progress=False)
    with pytest.raises(ValueError, match=r"log-SNR range \[-10.05, 13.8.*trained range"):
        evaluate_images(eps, images, methods=("ode-dequantized",), convention="score-sde", progress=False)
    with pytest.raises(ValueError, match="'formula-discrete' only"):
        evaluate_images(eps, images, convention="vdm", progress=False)
    with pytest.raises(ValueError, match="'ode-dequantized' only"):
        evaluate_images(eps, images, methods=("formula-dequantized",), convention="score-sde", progress=False)


def test_clip_convention_range_evaluates_the_intersection_and_says_so():
    # a standard-range model (log-SNR up to about 9.2) under vdm: refused by default, on the intersection of the
    # ranges with convention_range="clip", labelled, and equal to the direct call on that range
    eps = DiffusersEps(tiny_unet(channels=1), NARROW)
    images = _images()
    m_lo, m_hi = eps.lam_range
    kw = dict(methods=("formula-discrete",), convention="vdm", n_t=8, progress=False)
    res = evaluate_images(eps, images, convention_range="clip", **kw)
    lo, hi = res["lam_range"]
    assert lo == -5.0 and hi == pytest.approx(m_hi) and hi < 13.3
    r = res["methods"]["formula-discrete"]
    assert r["convention"].startswith("vdm+lam_range=[") and res["settings"]["convention_clipped"]
    x = (2 * (images.double() + 0.5) / 256 - 1).float()
    prop = fit_proposal(eps, x, lam_min=lo, lam_max=hi, seed=0, pilot_examples=16, pilot_nodes=8)
    direct = log_density(
        eps, x, convention="vdm", lam_min=lo, lam_max=hi, n_t=8, importance=prop, control_variate=None,
        example_ids=round_keys(torch.arange(N), 0),
    )  # fmt: skip
    assert direct.info["lam_max"] == pytest.approx(hi)
    assert r["nll_nats"] == pytest.approx(float(-direct.logp.mean()), rel=1e-6)
    # a wide-range model is not clipped: the published figure, unlabelled
    wide = evaluate_images(DiffusersEps(tiny_unet(channels=1), WIDE), images, convention_range="clip", **kw)
    assert wide["lam_range"] == [-5.0, 13.3] and wide["methods"]["formula-discrete"]["convention"] == "vdm"
    with pytest.raises(ValueError, match="convention_range must be one of"):
        evaluate_images(eps, images, convention_range="extend", **kw)


def test_ode_dequantized_without_a_convention_uses_the_library_grid_and_offset():
    eps = DiffusersEps(tiny_unet(channels=1), WIDE)
    images = _images()[:1]
    res = evaluate_images(eps, images, methods=("ode-dequantized",), progress=False)
    r = res["methods"]["ode-dequantized"]
    assert res["convention"] is None and "convention" not in r
    assert r["bpd_offset_dequantization"] == pytest.approx(math.log2(255 / 2))
    u = rng.uniforms(0, rng.Stream.DEQUANT, torch.arange(1), D, step=0).reshape(images.shape)
    x = (2 * (images.double() + u.double() - 0.5) / 255 - 1).float()
    lam_min, lam_max = res["lam_range"]
    direct = ode_log_likelihood(eps, x, lam_min=lam_min, lam_max=lam_max, seed=0, example_ids=torch.arange(1))
    bpd = float(-direct.logp.mean()) / (D * math.log(2)) + math.log2(255 / 2)
    assert r["bpd"] == pytest.approx(bpd, abs=1e-5)


def test_ode_tolerance_and_trace_reach_the_solver():
    # ode_tol and ode_trace are passed to ode_log_likelihood: the same figure as the direct call with those options
    eps = DiffusersEps(tiny_unet(channels=1), WIDE)
    images = _images()[:1]
    kw = dict(methods=("ode-dequantized",), progress=False)
    res = evaluate_images(eps, images, ode_tol=1e-2, ode_trace="hutchinson", **kw)
    r = res["methods"]["ode-dequantized"]
    assert res["settings"]["ode_tol"] == 1e-2 and res["settings"]["ode_trace"] == "hutchinson"
    ids = torch.arange(1)
    u = rng.uniforms(0, rng.Stream.DEQUANT, ids, D, step=0).reshape(images.shape)
    x = (2 * (images.double() + u.double() - 0.5) / 255 - 1).float()
    lam_min, lam_max = res["lam_range"]
    common = dict(lam_min=lam_min, lam_max=lam_max, seed=0, example_ids=round_keys(ids, 0))
    hutch = ode_log_likelihood(eps, x, rtol=1e-2, atol=1e-2, trace="hutchinson", probe="gaussian", n_probes=8, **common)
    assert r["nll_nats"] == pytest.approx(float(-hutch.logp.mean()), rel=1e-6)
    assert r["bpd_estimator_stderr"] > 0  # 8 probes: the trace noise is in the standard error
    loose = evaluate_images(eps, images, ode_tol=1e-2, **kw)["methods"]["ode-dequantized"]
    direct = ode_log_likelihood(eps, x, rtol=1e-2, atol=1e-2, **common)
    assert loose["nll_nats"] == pytest.approx(float(-direct.logp.mean()), rel=1e-6)
    assert loose["bpd_estimator_stderr"] == 0  # the exact trace has no Monte Carlo noise
    tight = evaluate_images(eps, images, ode_tol=1e-4, **kw)["methods"]["ode-dequantized"]
    assert loose["nfe_per_example"] < tight["nfe_per_example"]  # a looser tolerance takes fewer steps
    for bad in (dict(ode_tol=0), dict(ode_tol=True), dict(ode_trace="gaussian")):
        with pytest.raises(ValueError, match="ode_t"):
            evaluate_images(eps, images, **kw, **bad)


def test_cli_convention_vdm_picks_its_method_and_lists_its_choices(tmp_path, capsys):
    import diffusers
    import numpy as np
    from test_evaluate_scale import _eval_cli

    diffusers.DDPMPipeline(unet=tiny_unet(channels=1), scheduler=diffusers.DDPMScheduler(**WIDE)).save_pretrained(
        tmp_path / "p"
    )
    np.save(tmp_path / "x.npy", _images()[:, 0].numpy().astype(np.uint8))
    out = _eval_cli(capsys, "--diffusers", tmp_path / "p", "--images", tmp_path / "x.npy", "--convention", "vdm")
    assert list(out["methods"]) == ["formula-discrete"] and out["convention"] == get_convention("vdm").as_dict()
    assert out["methods"]["formula-discrete"]["convention"] == "vdm" and out["lam_range"] == [-5.0, 13.3]


def test_cli_clip_convention_range(tmp_path, capsys):
    import diffusers
    import numpy as np
    from test_evaluate_scale import _eval_cli

    from scoredensity.cli import main

    diffusers.DDPMPipeline(unet=tiny_unet(channels=1), scheduler=diffusers.DDPMScheduler(**NARROW)).save_pretrained(
        tmp_path / "p"
    )
    np.save(tmp_path / "x.npy", _images()[:, 0].numpy().astype(np.uint8))
    src = ["--diffusers", tmp_path / "p", "--images", tmp_path / "x.npy"]
    base = ["evaluate", *map(str, src), "--n-t", "4", "--json", "--no-progress"]
    assert main([*base, "--convention", "vdm"]) == 2  # refused, naming the option that would clip
    assert "--clip-convention-range" in capsys.readouterr().err
    out = _eval_cli(capsys, *src, "--convention", "vdm", "--clip-convention-range")
    assert out["methods"]["formula-discrete"]["convention"].startswith("vdm+lam_range=[-5, ")
    assert out["lam_range"][1] < 13.3
    assert main([*base, "--clip-convention-range"]) == 2  # without a convention it means nothing: refused
    assert "--clip-convention-range applies to --convention" in capsys.readouterr().err
