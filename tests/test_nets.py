"""Denoiser networks: canonical-time interface, v-parameterisation limit, config round trip, conditioning."""

import json

import pytest
import torch

from scoredensity.nets import MLPDenoiser, build_denoiser, denoiser_config, eval_eps_fn


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_mlp_shapes_dtypes_and_float64_time():
    net = _perturb(MLPDenoiser([2], hidden=32, blocks=2, emb_dim=16))
    x = torch.randn(5, 2)
    t = torch.rand(5, dtype=torch.float64) * 0.98 + 0.01
    out = net(x, t)
    assert out.shape == x.shape and out.dtype == torch.float32
    out64 = net(x.double(), t)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(5, 3), t)


def test_v_parameterisation_limits():
    """eps -> x_t as t -> 1 for any weights (docs/design.md §1), eps = F for the eps-parameterisation."""
    net = _perturb(MLPDenoiser([3], hidden=32, blocks=1, emb_dim=16, data_std=2.0))
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.full((4,), 1 - 1e-14, dtype=torch.float64)  # log-SNR ~ -32: representable only in float64
    torch.testing.assert_close(net(x, t), x, rtol=0, atol=1e-5)
    # the v output reconstructs exactly: F = (eps - sqrt(t) x_t) / (sqrt(1-t) c_out)
    t = torch.tensor([0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    eps_net = build_denoiser(dict(net.config, param="eps"))
    eps_net.load_state_dict(net.state_dict())
    f = eps_net(x, t)
    s2 = 4.0
    c_out = torch.sqrt((1 - t) + t * s2)
    expect = t.sqrt()[:, None] * x + ((1 - t).sqrt() * c_out)[:, None] * f
    torch.testing.assert_close(net(x, t), expect, rtol=1e-6, atol=1e-6)


def test_config_round_trip_is_json_and_exact():
    net = _perturb(MLPDenoiser([4], hidden=16, blocks=2, emb_dim=8, num_classes=3))
    cfg = json.loads(json.dumps(net.config))
    net2 = build_denoiser(cfg)
    net2.load_state_dict(net.state_dict())
    x, t = torch.randn(6, 4), torch.rand(6, dtype=torch.float64) * 0.9 + 0.05
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(net2(x, t, y), net(x, t, y), rtol=0, atol=0)


def test_class_conditioning_and_null_label():
    net = _perturb(MLPDenoiser([2], hidden=16, blocks=1, emb_dim=8, num_classes=2))
    x, t = torch.randn(3, 2), torch.full((3,), 0.5, dtype=torch.float64)
    null = net(x, t)
    torch.testing.assert_close(null, net(x, t, torch.full((3,), 2)))  # None means the null label
    assert not torch.allclose(net(x, t, torch.zeros(3, dtype=torch.long)), net(x, t, torch.ones(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="labels"):
        net(x, t, torch.full((3,), 5))


def test_build_denoiser_errors_and_defaults():
    with pytest.raises(ValueError, match="unknown denoiser type"):
        build_denoiser({"type": "transformer", "shape": [2]})
    with pytest.raises(ValueError, match="param"):
        MLPDenoiser([2], param="x0")
    assert denoiser_config([2])["type"] == "mlp"
    assert denoiser_config([1, 8, 8])["type"] == "unet"


def test_eval_eps_fn_keeps_input_gradients():
    net = _perturb(MLPDenoiser([2], hidden=16, blocks=1, emb_dim=8))
    fn = eval_eps_fn(net)
    assert all(not p.requires_grad for p in net.parameters())
    x = torch.randn(3, 2, requires_grad=True)
    fn(x, torch.full((3,), 0.4, dtype=torch.float64)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unet_denoiser_images():
    net = build_denoiser(denoiser_config([1, 8, 8], channels=[16, 32]))
    _perturb(net)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    out = net(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    t1 = torch.full((2,), 1 - 1e-14, dtype=torch.float64)
    torch.testing.assert_close(net(x, t1), x, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="divisible"):
        build_denoiser(denoiser_config([1, 7, 7], net="unet"))
