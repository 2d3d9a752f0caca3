"""Samplers: component masses of ring8 with the exact eps, and the laws of a time-inconsistent linear model."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import gaussian_law, switched_eps

from scoredensity.mixtures import mixture_preset
from scoredensity.ode import ODESolverError
from scoredensity.sampling import SAMPLERS, logsnr_grid, sample

# documented step counts at which each sampler puts every ring8 component within 2 percentage points of 1/8 and
# the samples' mean exact log-density within RING8_LOGP_TOL nats of that of true samples (DDIM with eta = 0 needs
# 100 steps for the latter: at 25 steps it is 0.26 nats too spread)
RING8_LOGP_TOL = 0.1
RING8_STEPS = {
    ("ddim", 0.0): 100,
    ("ddim", 1.0): 25,
    ("euler_maruyama", 1.0): 100,
    ("ode", None): None,  # adaptive dopri5, rtol = atol = 1e-4
    ("ddpm", None): 100,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("sampler,eta", list(RING8_STEPS))
def test_ring8_component_masses(sampler, eta):
    gm = mixture_preset("ring8")
    n = 10_000
    steps = RING8_STEPS[(sampler, eta)]
    x = sample(gm.eps, (n, 2), sampler=sampler, steps=steps, eta=eta, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 2) and torch.isfinite(x).all()
    # exact posterior component at (almost) t = 0
    labels = gm.responsibilities_t(x.double(), 1e-12).argmax(1)
    mass = torch.bincount(labels, minlength=8).double() / n
    assert (mass - gm.weights).abs().max() < 0.02, mass
    # and the points sit on the components, not between them: mean log-density near the true one
    # (the tolerance: the discretisation allowance plus 4 standard errors of the difference of two sample means)
    true = gm.log_prob(gm.sample(n, generator=torch.Generator().manual_seed(1)))
    got = gm.log_prob(x.double())
    se = math.sqrt(float(true.var() + got.var()) / n)
    assert abs(float(got.mean() - true.mean())) < RING8_LOGP_TOL + 4 * se, (float(got.mean() - true.mean()), se)


@pytest.mark.parametrize(
    "sampler,eta,steps", [("ddim", 1.0, 480), ("euler_maruyama", 1.0, 400), ("ddim", 0.0, 480), ("ode", None, None)]
)
def test_time_inconsistent_model_laws(sampler, eta, steps):
    # eps switches between two Gaussians' exact eps at t = 1/2: the reverse SDE (eta = 1) and the ODE (eta = 0) are
    # linear, and their laws at lam_max are the Gaussians of the moment ODEs (solved with scipy in helpers).
    # The jump of eps at lam = 0 makes every first-order step a O(dlam) error (measured: halves with the steps)
    lam_min, lam_max = -15.0, 15.0
    m, c = gaussian_law(eta or 0.0, lam_min=lam_min, lam_max=lam_max)
    n = 20_000
    x = sample(
        switched_eps, (n, 2), sampler=sampler, steps=steps, eta=eta, lam_min=lam_min, lam_max=lam_max,
        generator=torch.Generator().manual_seed(2), dtype=torch.float64,
    )  # fmt: skip
    se_mean = (c.diagonal() / n).sqrt()
    assert ((x.mean(0) - m).abs() < 4 * se_mean + 0.02).all(), (x.mean(0), m)
    emp = torch.cov(x.T)
    se_cov = ((c.diagonal()[:, None] * c.diagonal()[None, :] + c**2) / n).sqrt()
    assert ((emp - c).abs() < 4 * se_cov + 0.03).all(), (emp, c)


def test_sde_and_ode_laws_differ_for_the_time_inconsistent_model():
    # so the previous test tells the two apart
    m0, c0 = gaussian_law(0.0, lam_min=-15.0, lam_max=15.0)
    m1, c1 = gaussian_law(1.0, lam_min=-15.0, lam_max=15.0)
    assert (c0 - c1).abs().max() > 0.1 or (m0 - m1).abs().max() > 0.1


def test_deterministic_samplers_are_reproducible_and_seeded():
    gm = mixture_preset("ring8")
    a = sample(gm.eps, (64, 2), sampler="ddim", steps=10, generator=torch.Generator().manual_seed(5))
    b = sample(gm.eps, (64, 2), sampler="ddim", steps=10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    noise = torch.randn(64, 2)
    c = sample(gm.eps, (64, 2), sampler="ode", noise=noise, steps=20)
    d = sample(gm.eps, (64, 2), sampler="ode", noise=noise, steps=20)
    assert torch.equal(c, d)
    e = sample(gm.eps, (64, 2), sampler="ddpm", steps=20, generator=torch.Generator().manual_seed(6))
    f = sample(gm.eps, (64, 2), sampler="ddpm", steps=20, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(e, f)


def test_grid_and_bad_input():
    g = logsnr_grid(4, -2.0, 2.0)
    assert torch.allclose(g, torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64))
    gm = mixture_preset("ring8")
    assert set(SAMPLERS) == {"ddim", "euler_maruyama", "ode", "ddpm"}
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(gm.eps, (4, 2), sampler="heun")
    with pytest.raises(ValueError, match="eta"):
        sample(gm.eps, (4, 2), sampler="ode", eta=1.0)
    with pytest.raises(ValueError, match="eta"):
        sample(gm.eps, (4, 2), sampler="ddim", eta=-1.0)
    with pytest.raises(ValueError, match="steps"):
        sample(gm.eps, (4, 2), sampler="ddim", steps=0)
    with pytest.raises(ValueError, match="shape"):
        sample(gm.eps, (4,), sampler="ddim")
    with pytest.raises(ValueError, match="lam_min"):
        sample(gm.eps, (4, 2), sampler="euler_maruyama", lam_min=3.0, lam_max=-3.0)
    with pytest.raises(ValueError, match="options"):
        sample(gm.eps, (4, 2), sampler="ddim", rtol=1e-3)
    with pytest.raises(ODESolverError, match="rtol"):
        sample(lambda x_t, t: torch.sin(1e9 * x_t), (4, 2), sampler="ode", rtol=1e-9, atol=1e-9, max_num_steps=50)
    assert math.isfinite(float(sample(gm.eps, (3, 2), sampler="ddpm", steps=5).sum()))


def test_sample_command_writes_npy_png_json(tmp_path):
    import json

    import numpy as np

    from scoredensity.cli import main

    out = tmp_path / "s"
    rc = main(["sample", "--preset", "ring8", "-n", "2000", "--sampler", "ddim", "--steps", "25", "--out", str(out)])
    assert rc == 0
    x = np.load(out / "samples.npy")
    assert x.shape == (2000, 2) and np.isfinite(x).all()
    assert (out / "samples.png").stat().st_size > 1000
    summary = json.loads((out / "samples.json").read_text())
    assert summary["max_mass_error"] < 0.03  # 2000 samples: binomial std of a mass is 0.0074
    assert main(["sample", "--preset", "ring8", "-n", "5", "--sampler", "ode", "--eta", "1", "--out", str(out)]) == 2


def test_sample_ode_caps_its_step_in_log_snr():
    # the adaptive solver may not stride more than max_step log-SNR units (default 4), as in ode_log_likelihood.
    # dopri5's stages sit at 0, 1/5, 3/10, 4/5, 8/9, 1 of a step, so calls are at most half a step apart: the
    # widest gap between calls is <= 2 with the cap; uncapped it is wider on ring8 (measured 3.4)
    from scoredensity.sampling import sample_ode

    gm = mixture_preset("ring8")
    calls: list[float] = []

    def eps(x, t):
        calls.append(float(torch.log((1 - t[0]) / t[0])))
        return gm.eps(x, t)

    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    def widest_gap(**kw) -> float:
        calls.clear()
        sample_ode(eps, noise, rtol=1e-3, atol=1e-3, **kw)
        lam = sorted(set(calls))
        return max(b - a for a, b in zip(lam, lam[1:], strict=False))

    assert widest_gap() <= 0.5 * 4.0 + 1e-9
    assert widest_gap(max_step=None) > 0.5 * 4.0  # the cap is what keeps the steps short
    with pytest.raises(ValueError, match="max_step must be positive"):
        sample_ode(eps, noise, max_step=0.0)
