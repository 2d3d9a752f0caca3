"""Losses: keyed randomness, importance weights, and the elbo loss = minus the exact log-density."""

import math

import pytest
import torch

from scoredensity.losses import LamSampler, dsm_loss, keyed_normals, keyed_uniforms, philox4x32
from scoredensity.mixtures import mixture_preset
from scoredensity.nets import MLPDenoiser


@pytest.fixture(autouse=True)
def _on_cpu():
    """Every tensor of these tests is made on the CPU explicitly (the estimators compute where x lives)."""
    with torch.device("cpu"):
        yield


def _t(v):
    return torch.tensor([v], dtype=torch.int64)


def test_philox_known_answers():
    """Random123's known-answer vectors for philox4x32_10."""
    z = _t(0)
    assert [int(w) for w in philox4x32((z, z, z, z), (0, 0))] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = _t(0xFFFFFFFF)
    assert [int(w) for w in philox4x32((f, f, f, f), (0xFFFFFFFF, 0xFFFFFFFF))] == [
        0x408F276D,
        0x41C83B0E,
        0xA20BC7C6,
        0x6D5451FD,
    ]
    c = (_t(0x243F6A88), _t(0x85A308D3), _t(0x13198A2E), _t(0x03707344))
    assert [int(w) for w in philox4x32(c, (0xA4093822, 0x299F31D0))] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_keyed_draws_do_not_depend_on_batch_splitting():
    idx = torch.arange(1000, 1064)
    full = keyed_normals(7, 3, idx, (5,))
    parts = torch.cat([keyed_normals(7, 3, idx[s], (5,)) for s in (slice(0, 10), slice(10, 64))])
    assert torch.equal(full, parts)
    assert not torch.equal(full, keyed_normals(7, 4, idx, (5,)))  # other step
    assert not torch.equal(full, keyed_normals(8, 3, idx, (5,)))  # other seed


def test_keyed_draws_distribution():
    n = 200_000
    u = keyed_uniforms(1, 0, torch.arange(n), 1)[:, 0]
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / n)
    # Kolmogorov-Smirnov distance against U(0,1): 1.95 / sqrt(n) is the 0.1% critical value
    us = u.sort().values
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert float((us - grid).abs().max()) < 1.95 / math.sqrt(n)
    z = keyed_normals(1, 0, torch.arange(n // 4), (4,)).flatten()
    m = len(z)
    assert abs(float(z.mean())) < 4 / math.sqrt(m)
    assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / m)
    assert abs(float((z**4).mean()) - 3) < 4 * math.sqrt(96 / m)


@pytest.mark.parametrize("kind", ["uniform", "t_uniform", "adaptive"])
def test_importance_weights_integrate_to_the_range(kind):
    """E_q[1/q(lam)] = lam_max - lam_min for every proposal (a check of the weights)."""
    s = LamSampler(kind, -10.0, 6.0)
    if kind == "adaptive":  # give it a non-uniform state
        lam = torch.linspace(-10, 6, 1000, dtype=torch.float64)
        s.update(s.bin_stats(lam, torch.exp(-0.1 * (lam - 1) ** 2)))
        assert s.proposal().masses.std() > 0
    n = 100_000
    lam, inv_q = s.sample(keyed_uniforms(0, 0, torch.arange(n), 1)[:, 0])
    assert float(lam.min()) >= -10 and float(lam.max()) <= 6
    assert abs(float(inv_q.mean()) - 16.0) < 4 * float(inv_q.std()) / math.sqrt(n) + 1e-9


@pytest.mark.parametrize(("preset", "kind"), [("ring8", "uniform"), ("ring8", "adaptive"), ("anisotropic", "uniform")])
def test_elbo_loss_at_exact_eps_is_minus_exact_logdensity(preset, kind):
    """The loss and the formula are one quantity: E[elbo loss at eps*] = -E log p(x) (up to MC error)."""
    gm = mixture_preset(preset, **({"d": 3} if preset == "anisotropic" else {}))
    x = gm.sample(20_000, generator=torch.Generator().manual_seed(0))
    s = LamSampler(kind, -12.0, 12.0, low_discrepancy=False)
    losses = []
    for step in range(3):
        idx = torch.arange(len(x)) + step * len(x)
        out = dsm_loss(gm.eps, x, weighting="elbo", sampler=s, seed=5, step=step, index=idx)
        s.update(s.bin_stats(out.lam, out.integrand))
        torch.testing.assert_close(out.loss, out.nll)
        losses.append(out.loss)
    loss = torch.cat(losses)
    exact = -gm.log_prob(x).repeat(3)
    diff = loss - exact  # paired: removes the spread of log p over the sample
    se = float(diff.std()) / math.sqrt(len(diff))
    # the range [-12, 12] truncates terms of order e^-12 * (d + curvature): < 1e-3 here
    assert abs(float(diff.mean())) < 4 * se + 1e-3, (float(diff.mean()), se)


def test_elbo_gradient_is_weighted_denoising_error():
    torch.manual_seed(0)
    net = MLPDenoiser([2], hidden=16, blocks=1, emb_dim=8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(8, 2)
    s = LamSampler("uniform", -5, 5)
    out = dsm_loss(net, x, weighting="elbo", sampler=s, seed=0, step=1, index=torch.arange(8))
    g1 = torch.autograd.grad(out.loss.sum(), list(net.parameters()))
    # recompute by hand: 1/2 ||z - eps||^2 / q(lam), q = 1/10
    lam = out.lam
    z = keyed_normals(0, 1, torch.arange(8), (2,))
    t = torch.sigmoid(-lam)
    x_t = torch.sigmoid(lam).sqrt()[:, None] * x.double() + t.sqrt()[:, None] * z
    eps = net(x_t.float(), t).double()
    g2 = torch.autograd.grad((0.5 * (z - eps).pow(2).sum(1) * 10.0).sum(), list(net.parameters()))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_simple_loss_and_low_discrepancy():
    gm = mixture_preset("ring8")
    x = gm.sample(4096, generator=torch.Generator().manual_seed(1))
    s = LamSampler("ddpm")
    out = dsm_loss(gm.eps, x, weighting="simple", sampler=s, seed=0, step=0, index=torch.arange(4096))
    assert out.nll is None and out.loss.shape == (4096,)
    assert float(out.loss.mean()) < 1.0  # the exact eps has mean squared error below that of eps = 0
    # low discrepancy: u depends on the global position only, so any sharding gives the same lam
    s = LamSampler("uniform", -12, 12, low_discrepancy=True)
    pos = torch.arange(64)
    a = dsm_loss(gm.eps, x[:64], weighting="elbo", sampler=s, seed=3, step=2, index=pos, position=pos, global_batch=64)
    b = dsm_loss(
        gm.eps,
        x[32:64],
        weighting="elbo",
        sampler=s,
        seed=3,
        step=2,
        index=pos[32:],
        position=pos[32:],
        global_batch=64,
    )
    torch.testing.assert_close(a.lam[32:], b.lam, rtol=0, atol=0)
    gaps = a.lam.sort().values.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 24 / 64), rtol=0, atol=1e-9)  # evenly spread


def test_bad_settings():
    with pytest.raises(ValueError, match="weighting"):
        dsm_loss(
            lambda x, t: x,
            torch.zeros(2, 2),
            weighting="kl",
            sampler=LamSampler(),
            seed=0,
            step=0,
            index=torch.arange(2),
        )
    with pytest.raises(ValueError, match="ddpm"):
        dsm_loss(
            lambda x, t: x,
            torch.zeros(2, 2),
            weighting="elbo",
            sampler=LamSampler("ddpm"),
            seed=0,
            step=0,
            index=torch.arange(2),
        )
    with pytest.raises(ValueError, match="lam sampling"):
        LamSampler("cosine")
    with pytest.raises(ValueError, match="lam_max > lam_min"):
        LamSampler("uniform", 3, 1)
