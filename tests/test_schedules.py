"""Schedules: conversions are inverse to each other and t is monotone in every clock."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scoredensity.schedules import (
    CosineClock,
    DDPMSchedule,
    VEClock,
    VPLinearClock,
    add_noise,
    alpha_sigma,
    alpha_sigma_from_logsnr,
    diffusion_squared,
    drift,
    logsnr_from_t,
    t_from_logsnr,
)

unit = st.floats(min_value=1e-6, max_value=1 - 1e-6)


@given(t=unit)
def test_logsnr_roundtrip(t):
    tt = torch.tensor([t], dtype=torch.float64)
    assert torch.allclose(t_from_logsnr(logsnr_from_t(tt)), tt, rtol=1e-12, atol=0)


@given(lam=st.floats(min_value=-30, max_value=30))
def test_alpha_sigma_from_logsnr_matches_t(lam):
    lt = torch.tensor([lam], dtype=torch.float64)
    a, s = alpha_sigma_from_logsnr(lt)
    t = t_from_logsnr(lt)
    assert torch.allclose(a**2 + s**2, torch.ones(1, dtype=torch.float64))
    assert torch.allclose(s**2, t, rtol=1e-12)
    # log-SNR is recovered from the scales
    assert abs(float(torch.log(a**2) - torch.log(s**2)) - lam) < 1e-9 * max(1, abs(lam))


@given(s=st.floats(min_value=1e-4, max_value=1.0))
def test_vp_linear_roundtrip(s):
    clock = VPLinearClock()
    ss = torch.tensor([s], dtype=torch.float64)
    assert torch.allclose(clock.from_t(clock.to_t(ss)), ss, rtol=1e-9)
    assert torch.allclose(clock.logsnr(ss), logsnr_from_t(clock.to_t(ss)), rtol=1e-9, atol=1e-9)


@given(s=st.floats(min_value=1e-4, max_value=0.999))
def test_cosine_roundtrip(s):
    clock = CosineClock()
    ss = torch.tensor([s], dtype=torch.float64)
    assert torch.allclose(clock.from_t(clock.to_t(ss)), ss, rtol=1e-7, atol=1e-9)


@given(sigma=st.floats(min_value=1e-3, max_value=1e3))
def test_ve_roundtrip(sigma):
    clock = VEClock()
    sg = torch.tensor([sigma], dtype=torch.float64)
    assert torch.allclose(clock.from_t(clock.to_t(sg)), sg, rtol=1e-9)
    # VE input scaled by 1/sqrt(1+sigma^2) has canonical noise level t
    t = clock.to_t(sg)
    assert torch.allclose(VEClock.scale(sg) * sg, t.sqrt(), rtol=1e-12)


@settings(max_examples=50)
@given(a=unit, b=unit)
def test_clocks_monotone(a, b):
    lo, hi = sorted([a, b])
    if hi - lo < 1e-9:
        return
    pair = torch.tensor([lo, hi], dtype=torch.float64)
    for clock in (VPLinearClock(), CosineClock()):
        t = clock.to_t(pair)
        assert t[0] < t[1]
    t = VEClock().to_t(pair * 100)
    assert t[0] < t[1]
    lam = logsnr_from_t(pair)
    assert lam[0] > lam[1]


def test_float32_keeps_dtype():
    t = torch.rand(5) * 0.98 + 0.01
    assert logsnr_from_t(t).dtype == torch.float32
    assert VPLinearClock().to_t(t).dtype == torch.float32
    a, s = alpha_sigma(t)
    assert a.dtype == torch.float32


def test_ddpm_schedule_grid_and_interpolation():
    sched = DDPMSchedule()
    assert sched.num_steps == 1000
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    assert torch.allclose(sched.times, 1 - abar, rtol=1e-10)
    assert math.isclose(float(sched.times[0]), 1e-4, rel_tol=1e-9)
    k = torch.tensor([0.0, 10.0, 10.5, 999.0], dtype=torch.float64)
    t = sched.t_of_step(k)
    assert torch.allclose(t[[0, 1, 3]], sched.times[[0, 10, 999]])
    assert sched.times[10] < t[2] < sched.times[11]
    assert torch.allclose(sched.step_of_t(t), k, atol=1e-9)


def test_ddpm_from_clock_matches_clock():
    clock = VPLinearClock()
    for steps in (10, 100, 1000):
        sched = DDPMSchedule.from_clock(clock, steps)
        s = torch.arange(1, steps + 1, dtype=torch.float64) / steps
        assert torch.allclose(sched.times, clock.to_t(s), rtol=1e-10)


def test_sde_coefficients_and_noising():
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(drift(x, t), -x / (2 * (1 - t))[:, None])
    assert torch.allclose(diffusion_squared(t), 1 / (1 - t))
    z = torch.randn_like(x)
    assert torch.allclose(add_noise(x, z, t), (1 - t).sqrt()[:, None] * x + t.sqrt()[:, None] * z)
    # the forward SDE keeps unit variance: d/dt Var = 2 f'(x) Var + g^2 = -Var/(1-t) + 1/(1-t) = 0 at Var = 1
    assert torch.allclose(-1 / (1 - t) + diffusion_squared(t), torch.zeros(4, dtype=torch.float64))


def test_zero_terminal_snr_grid_interpolates_without_nan():
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 50, dtype=torch.float64), 0)
    abar[-1] = 0.0  # t_T = 1
    sched = DDPMSchedule(alphas_cumprod=abar)
    assert float(sched.times[-1]) == 1.0
    k = torch.tensor([0.0, 47.5, 48.0, 48.25, 49.0], dtype=torch.float64)
    t = sched.t_of_step(k)
    assert torch.isfinite(t).all()
    assert float(t[-1]) == 1.0 and sched.times[48] < t[3] < 1.0
    back = sched.step_of_t(t[:4])
    assert torch.allclose(back, k[:4], atol=1e-9)


def test_one_step_time_map_zero_terminal_snr_at_48_5():
    # issue 12.4: one map between discrete steps and canonical time, used by the schedule and the diffusers adapter;
    # on the zero-terminal-SNR last interval it is linear in sqrt(abar) = sqrt(1 - t)
    from scoredensity.adapters import DiffusersEps

    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 50, dtype=torch.float64), 0)
    abar[-1] = 0.0
    sched = DDPMSchedule(alphas_cumprod=abar)
    j = torch.tensor([48.5], dtype=torch.float64)
    expect = 1 - abar[48] / 4  # sqrt(abar) halfway between sqrt(abar_48) and 0
    assert torch.allclose(sched.t_of_step(j), expect.reshape(1), rtol=0, atol=1e-15)
    fake = DiffusersEps(lambda x, ts: x, {"trained_betas": sched.betas.tolist()})
    assert torch.equal(fake.t_of_step(j), sched.t_of_step(j))
    assert torch.equal(fake.step_of_t(sched.t_of_step(j)), sched.step_of_t(sched.t_of_step(j)))
    assert torch.allclose(sched.step_of_t(sched.t_of_step(j)), j, atol=1e-9)
