"""Adapters: every foreign convention, wrapped around an exact mixture model, must give the exact canonical eps."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from scoredensity.adapters import (
    PREDICTION_KINDS,
    DiffusersEps,
    betas_from_scheduler_config,
    convert,
    eps_from,
    from_canonical,
    from_flow,
    from_k_diffusion,
    from_ve,
    from_vp_sde,
    pred_from_eps,
)
from scoredensity.mixtures import mixture_preset
from scoredensity.schedules import DDPMSchedule, VPLinearClock

TOL = 1e-6


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    err = float((a - b).abs().max())
    assert err < tol, f"max abs error {err:.3g} >= {tol}"


# ------------------------------------------------------------------------------------------ prediction kinds
def _triple(n: int = 64, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, dtype=torch.float64, generator=g)
    z = torch.randn(n, d, dtype=torch.float64, generator=g)
    ends = torch.tensor([1e-8, 1e-4, 0.5, 1 - 1e-4, 1 - 1e-8], dtype=torch.float64)
    t = torch.cat([ends, torch.rand(n - 5, generator=g, dtype=torch.float64)])
    a, s = (1 - t).sqrt()[:, None], t.sqrt()[:, None]
    x_t = a * x0 + s * z
    truth = {"eps": z, "x0": x0, "v": a * z - s * x0, "score": -z / s, "velocity": z - x0}
    return x_t, t, truth


@pytest.mark.parametrize("kind", PREDICTION_KINDS)
def test_eps_from_and_back_on_exact_pairs(kind):
    x_t, t, truth = _triple()
    scale = truth[kind].abs().amax(1, keepdim=True).clamp_min(1.0)
    _close(eps_from(kind, truth[kind], x_t, t), truth["eps"], 1e-9 * float(scale.max()))
    _close(pred_from_eps(kind, truth["eps"], x_t, t) / scale, truth[kind] / scale, 1e-9)


@pytest.mark.parametrize("src", PREDICTION_KINDS)
@pytest.mark.parametrize("dst", PREDICTION_KINDS)
def test_convert_every_pair(src, dst):
    x_t, t, truth = _triple(seed=1)
    # keep away from the ends, where x0 (t -> 0) and 1/a (t -> 1) amplify rounding
    keep = (t > 1e-3) & (t < 1 - 1e-3)
    x_t, t = x_t[keep], t[keep]
    truth = {k: v[keep] for k, v in truth.items()}
    out = convert(src, dst, truth[src], x_t, t)
    scale = truth[dst].abs().amax(1, keepdim=True).clamp_min(1.0)
    _close(out / scale, truth[dst] / scale, 1e-8)


def test_round_trip_random_predictions():
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(32, 3, 4, 4, dtype=torch.float64, generator=g)
    t = torch.rand(32, generator=g, dtype=torch.float64) * 0.98 + 0.01
    eps = torch.randn_like(x_t)
    for kind in PREDICTION_KINDS:
        _close(eps_from(kind, pred_from_eps(kind, eps, x_t, t), x_t, t), eps, 1e-10)


def test_zero_snr_end():
    x_t, t, truth = _triple()
    t1 = torch.ones_like(t)
    z = x_t  # at t = 1, x_t = z
    x0 = truth["x0"]
    _close(eps_from("v", -x0, z, t1), z, 1e-12)  # v = a z - s x0 = -x0
    _close(eps_from("velocity", z - x0, z, t1), z, 1e-12)


def test_bad_kind_and_shape():
    x = torch.zeros(2, 3, dtype=torch.float64)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown prediction kind"):
        eps_from("noise", x, x, t)
    with pytest.raises(ValueError, match="does not match"):
        eps_from("v", x[:, :2], x, t)
    with pytest.raises(ValueError, match=r"t must be \[B\]"):
        eps_from("v", x, x, t[:1])


# ------------------------------------------------------------------------------------------ continuous clocks
GM = mixture_preset("blobs2d")


def _marginal_score(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Score of ``a x + b z`` for ``x ~ GM``, computed directly: sum_k w_k N(a mu_k, a^2 S_k + b^2 I), autograd."""
    y = y.detach().clone().requires_grad_(True)
    eye = torch.eye(GM.dim, dtype=torch.float64)
    cov = a[:, None, None, None] ** 2 * GM.covs[None] + b[:, None, None, None] ** 2 * eye  # [B, K, d, d]
    loc = a[:, None, None] * GM.means[None]  # [B, K, d]
    logp = torch.distributions.MultivariateNormal(loc, cov).log_prob(y[:, None, :]) + GM.weights.log()
    (grad,) = torch.autograd.grad(torch.logsumexp(logp, 1).sum(), y)
    return grad


def _points(n: int = 40, seed: int = 3, t_lo: float = 1e-3, t_hi: float = 0.999):
    g = torch.Generator().manual_seed(seed)
    x = GM.sample(n, generator=g)
    lam = torch.empty(n, dtype=torch.float64).uniform_(math.log((1 - t_hi) / t_hi), math.log((1 - t_lo) / t_lo))
    t = torch.sigmoid(-lam)
    z = torch.randn(n, GM.dim, dtype=torch.float64, generator=g)
    x_t = (1 - t).sqrt()[:, None] * x + t.sqrt()[:, None] * z
    return x_t, t


def test_vp_sde_score_model_is_exact():
    def vp_t(s):  # by hand: t(s) = 1 - exp(-(0.1 s + 9.95 s^2))
        return -torch.expm1(-(0.1 * s + 0.5 * 19.9 * s**2))

    def score_fn(x, s):
        t = vp_t(s)
        return _marginal_score(x, (1 - t).sqrt(), t.sqrt())

    x_t, t = _points(t_lo=1e-3, t_hi=float(vp_t(torch.tensor(1.0))))
    _close(from_vp_sde(score_fn)(x_t, t), GM.eps(x_t, t))
    # the same process predicting eps
    eps_model = from_vp_sde(lambda x, s: -vp_t(s).sqrt()[:, None] * score_fn(x, s), kind="eps")
    _close(eps_model(x_t, t), GM.eps(x_t, t))


def test_vp_sde_range_raise_and_clamp():
    clock = VPLinearClock()
    t_end = float(clock.to_t(torch.tensor(0.5)))

    def score_fn(x, s):
        t = clock.to_t(s)
        return _marginal_score(x, (1 - t).sqrt(), t.sqrt())

    x_t, _ = _points(4)
    t = torch.tensor([0.1, 0.2, t_end, 0.9999], dtype=torch.float64)
    with pytest.raises(ValueError, match="trained on canonical t in"):
        from_vp_sde(score_fn, s_range=(0.0, 0.5))(x_t, t)
    clamped = from_vp_sde(score_fn, s_range=(0.0, 0.5), out_of_range="clamp")(x_t, t)
    _close(clamped, GM.eps(x_t, t.clamp(max=t_end)))


def test_ve_score_and_k_diffusion_denoiser_are_exact():
    def ve_score(x, sigma):
        return _marginal_score(x, torch.ones_like(sigma), sigma)

    class KDenoiser:
        sigma_min, sigma_max = 0.002, 80.0

        def __call__(self, x, sigma):
            return x + sigma[:, None] ** 2 * ve_score(x, sigma)

    lo, hi = 0.002**2 / (1 + 0.002**2), 80.0**2 / (1 + 80.0**2)
    x_t, t = _points(t_lo=lo * 1.01, t_hi=hi * 0.9999)
    _close(from_ve(ve_score)(x_t, t), GM.eps(x_t, t))
    model = from_k_diffusion(KDenoiser())
    _close(model(x_t, t), GM.eps(x_t, t))
    with pytest.raises(ValueError, match="trained on"):
        model(x_t[:1], torch.tensor([lo / 2], dtype=torch.float64))


def test_flow_velocity_model_is_exact():
    def velocity(x, s):
        a, b = 1 - s, s
        ez = -b[:, None] * _marginal_score(x, a, b)  # E[z | x_s]
        ex = (x - b[:, None] * ez) / a[:, None]  # E[x | x_s]
        return ez - ex

    x_t, t = _points(t_lo=1e-4, t_hi=1 - 1e-4)
    _close(from_flow(velocity)(x_t, t), GM.eps(x_t, t))
    # the time map: t = s^2 / ((1-s)^2 + s^2) is the canonical time of flow time s
    s = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    seen = {}

    def spy(x, s_in):
        seen["s"] = s_in
        return torch.zeros_like(x)

    from_flow(spy)(torch.zeros(3, 2, dtype=torch.float64), s**2 / ((1 - s) ** 2 + s**2))
    _close(seen["s"], s, 1e-12)


def test_canonical_x0_model():
    def x0_model(x, t):
        return (x + t[:, None] * _marginal_score(x, (1 - t).sqrt(), t.sqrt())) / (1 - t).sqrt()[:, None]

    x_t, t = _points()
    _close(from_canonical(x0_model, "x0")(x_t, t), GM.eps(x_t, t))


def test_clock_adapter_errors():
    with pytest.raises(ValueError, match="unknown prediction kind"):
        from_vp_sde(lambda x, s: x, kind="noise")
    with pytest.raises(ValueError, match="out_of_range"):
        from_flow(lambda x, s: x, out_of_range="extrapolate")
    with pytest.raises(ValueError, match="returned"):
        from_flow(lambda x, s: x[:, :1])(torch.zeros(2, 2, dtype=torch.float64), torch.full((2,), 0.5))


# ------------------------------------------------------------------------------------------ discrete DDPM models
SHAPE = (2, 4, 4)
IMG_GM = mixture_preset("anisotropic", d=32, seed=0)
COARSE = {"num_train_timesteps": 50, "beta_start": 1e-4, "beta_end": 0.2, "beta_schedule": "linear"}


class FakeUNet(nn.Module):
    """A "UNet2DModel" that returns the exact eps / v / x0 of ``IMG_GM`` at its (fractional) timestep.

    Its grid is computed here by hand: abar_j = prod_{i<=j}(1 - b_i); a fractional timestep interpolates the
    log-SNR linearly, and, at zero terminal SNR, the last interval linearly in sqrt(abar).
    """

    def __init__(self, betas: torch.Tensor, kind: str, learned: bool = False):
        super().__init__()
        self.abar = torch.cumprod(1 - betas.double(), 0)
        self.kind, self.learned = kind, learned
        self.config = {"in_channels": SHAPE[0], "sample_size": SHAPE[1]}

    def t_of(self, j: torch.Tensor) -> torch.Tensor:
        j = j.double()
        n = len(self.abar)
        zero_snr = bool(self.abar[-1] == 0)
        lam = torch.log(self.abar) - torch.log1p(-self.abar)
        k0 = j.floor().long().clamp(0, n - 2)
        w = j - k0
        t = torch.sigmoid(-(lam[k0] * (1 - w) + lam[k0 + 1] * w))
        if zero_snr:
            last = j > n - 2
            a = self.abar[-2].sqrt() * (1 - (j - (n - 2)))
            t = torch.where(last, 1 - a**2, t)
        return torch.where(j == j.round(), 1 - self.abar[j.round().long().clamp(0, n - 1)], t)

    def forward(self, sample, timestep):
        t = self.t_of(torch.as_tensor(timestep).expand(sample.shape[0]))
        x = sample.flatten(1)
        inner = (t > 0) & (t < 1)
        eps = x.clone()  # t = 1: eps = x_t
        if inner.any():
            eps[inner] = IMG_GM.eps(x[inner], t[inner])
        a, s = (1 - t).sqrt()[:, None], t.sqrt()[:, None]
        x0 = IMG_GM.mean().expand_as(x).clone()  # t = 1: E[x | x_t] is the data mean
        x0[inner] = (x[inner] - s[inner] * eps[inner]) / a[inner]
        out = {"eps": eps, "v": a * eps - s * x0, "x0": x0}[self.kind]
        out = out.reshape(sample.shape)
        if self.learned:
            out = torch.cat([out, torch.tanh(sample)], 1)
        return SimpleNamespace(sample=out)


_PT = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _images(t: torch.Tensor, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = IMG_GM.sample(len(t), generator=g)
    z = torch.randn(x.shape, dtype=torch.float64, generator=g)
    return ((1 - t).sqrt()[:, None] * x + t.sqrt()[:, None] * z).reshape(len(t), *SHAPE)


def _exact(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return IMG_GM.eps(x_t.flatten(1), t).reshape(x_t.shape)


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_discrete_adapter_exact_on_grid_and_between(kind):
    config = dict(COARSE, prediction_type=_PT[kind])
    betas = torch.linspace(1e-4, 0.2, 50, dtype=torch.float64)
    fed = []  # the timesteps the network is called with

    class Recording(FakeUNet):
        def forward(self, sample, timestep):
            fed.append(torch.as_tensor(timestep, dtype=torch.float64).expand(sample.shape[0]).clone())
            return super().forward(sample, timestep)

    fake = Recording(betas, kind)
    interp = DiffusersEps(fake, config)
    near = DiffusersEps(fake, config, timesteps="nearest")
    grid = 1 - torch.cumprod(1 - betas, 0)
    _close(interp.times, grid, 1e-15)
    x_t = _images(grid)
    _close(interp(x_t, grid), _exact(x_t, grid))
    _close(near(x_t, grid), _exact(x_t, grid))
    _close(interp.eps_at_step(x_t, torch.arange(50)), _exact(x_t, grid))
    # between grid points: interpolated is exact; nearest is the exact eps at the nearest grid time (in log-SNR)
    g = torch.Generator().manual_seed(7)
    lam_grid = torch.log1p(-grid) - torch.log(grid)
    lam = lam_grid[-1] + (lam_grid[0] - lam_grid[-1]) * torch.rand(40, dtype=torch.float64, generator=g)
    t = torch.sigmoid(-lam)
    x_t = _images(t, seed=8)
    exact = _exact(x_t, t)
    fed.clear()
    _close(interp(x_t, t), exact)
    # the fake network agrees with the adapter only if the adapter feeds it the documented timestep: the one whose
    # log-SNR interpolates linearly between the grid's (numpy's interp, written independently of the adapter)
    j_doc = np.interp(lam.numpy(), lam_grid.flip(0).numpy(), np.arange(49, -1, -1, dtype=np.float64))
    _close(torch.cat(fed), torch.from_numpy(j_doc), 1e-9)
    assert (torch.cat(fed) != torch.cat(fed).round()).all()  # really between grid points
    fed.clear()
    got_near = near(x_t, t)
    j = torch.cat(fed)
    assert (j == j.round()).all()  # integers only
    j = j.long()
    # nearest in log-SNR: no neighbouring grid point is closer
    dist = (lam - lam_grid[j]).abs()
    assert (dist <= (lam - lam_grid[(j - 1).clamp(min=0)]).abs()).all()
    assert (dist <= (lam - lam_grid[(j + 1).clamp(max=49)]).abs()).all()
    _close(got_near, _exact(x_t, grid[j]))
    rms_near = float((got_near - exact).pow(2).mean().sqrt())
    assert rms_near > 1e-3  # nearest really pays for the grid


def test_discrete_adapter_matches_schedule_inverse():
    model = DiffusersEps(FakeUNet(torch.linspace(1e-4, 0.02, 1000), "eps"), {})
    sched = DDPMSchedule()
    t = torch.sigmoid(-torch.linspace(-10, 9, 101, dtype=torch.float64))
    _close(model.step_of_t(t), sched.step_of_t(t), 1e-9)
    _close(model.t_of_step(model.step_of_t(t)), t, 1e-12)
    assert model.t_range == (float(sched.times[0]), float(sched.times[-1]))


def test_zero_terminal_snr_v_model():
    config = dict(COARSE, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    betas = betas_from_scheduler_config(config)
    fake = FakeUNet(betas, "v")
    model = DiffusersEps(fake, config)
    assert float(model.times[-1]) == 1.0 and model.t_range[1] == 1.0
    t_prev = float(model.times[-2])
    t = torch.tensor([1.0, 0.5 * (t_prev + 1), t_prev, 0.3], dtype=torch.float64)
    x_t = _images(t.clamp(max=1 - 1e-12))
    eps = model(x_t, t)
    _close(eps[0], x_t[0], 1e-12)  # t = 1: eps = x_t
    _close(eps[1:], _exact(x_t[1:], t[1:]))
    _close(model.t_of_step(model.step_of_t(t)), t, 1e-12)
    with pytest.raises(ValueError, match="undefined at zero terminal SNR"):
        DiffusersEps(fake, dict(config, prediction_type="sample"))


def test_discrete_out_of_range():
    config = dict(COARSE)
    model = DiffusersEps(FakeUNet(betas_from_scheduler_config(config), "eps"), config)
    t_1, t_T = model.t_range
    t = torch.tensor([t_1 / 10, 0.5, (t_T + 1) / 2], dtype=torch.float64)
    x_t = _images(t)
    with pytest.raises(ValueError, match=r"trained on canonical t in \[0\.0001"):
        model(x_t, t)
    clamped = DiffusersEps(model.model, config, out_of_range="clamp")(x_t, t)
    _close(clamped, _exact(x_t, t.clamp(t_1, t_T)))
    # rounding at the ends is absorbed
    model(x_t[:1], torch.tensor([t_1 * (1 - 1e-9)], dtype=torch.float64))


def test_learned_range_uses_mean_part_and_its_variance():
    config = dict(COARSE, variance_type="learned_range")
    betas = betas_from_scheduler_config(config)
    model = DiffusersEps(FakeUNet(betas, "eps", learned=True), config)
    grid = model.times
    x_t = _images(grid)
    _close(model(x_t, grid), _exact(x_t, grid))
    steps = torch.arange(50)
    logvar = model.reverse_log_variance(x_t, steps)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    beta_tilde = (betas * (1 - abar_prev) / (1 - abar)).clamp_min(1e-20)
    frac = (torch.tanh(x_t) + 1) / 2
    want = frac * betas.log()[:, None, None, None] + (1 - frac) * beta_tilde.log()[:, None, None, None]
    _close(logvar, want, 1e-10)
    fixed = DiffusersEps(FakeUNet(betas, "eps"), COARSE)
    _close(fixed.reverse_log_variance(x_t, steps)[:, 0, 0, 0], beta_tilde.log(), 1e-10)
    with pytest.raises(ValueError, match="variance_type is 'fixed_small'"):
        DiffusersEps(FakeUNet(betas, "eps", learned=True), COARSE)(x_t, grid)


def test_discrete_bad_input():
    fake = FakeUNet(torch.linspace(1e-4, 0.2, 50), "eps")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        DiffusersEps(fake, dict(COARSE, prediction_type="flow"))
    with pytest.raises(ValueError, match="unknown beta_schedule"):
        DiffusersEps(fake, dict(COARSE, beta_schedule="quadratic"))
    with pytest.raises(ValueError, match="timesteps must be"):
        DiffusersEps(fake, COARSE, timesteps="linear")
    model = DiffusersEps(fake, COARSE)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="takes 2 channels"):
        model(torch.zeros(2, 3, 4, 4, dtype=torch.float64), t)
    with pytest.raises(ValueError, match="takes 4x4 images"):
        model(torch.zeros(2, 2, 8, 8, dtype=torch.float64), t)
    with pytest.raises(ValueError, match="not a discrete variance-preserving"):
        DiffusersEps(fake, {"_class_name": "FlowMatchEulerDiscreteScheduler"})


def test_diffusers_lam_range_is_the_estimators_default():
    from scoredensity import log_density, ode_log_likelihood

    betas = betas_from_scheduler_config(COARSE)
    model = DiffusersEps(FakeUNet(betas, "eps"), COARSE)
    t_1, t_T = model.t_range
    lo, hi = model.lam_range
    assert math.isclose(hi, math.log((1 - t_1) / t_1), rel_tol=1e-12)
    assert math.isclose(lo, math.log((1 - t_T) / t_T), rel_tol=1e-12)
    x = IMG_GM.sample(6, generator=torch.Generator().manual_seed(2)).reshape(6, *SHAPE)
    with pytest.raises(ValueError, match="trained on"):  # the old default range extrapolates the network
        log_density(model, x, n_t=8, lam_min=-20.0, lam_max=20.0)
    r = log_density(model, x, n_t=16, seed=3)
    assert (r.info["lam_min"], r.info["lam_max"]) == (lo, hi)
    ref = log_density(_exact, x, n_t=16, seed=3, lam_min=lo, lam_max=hi)  # same nodes and noise, exact eps
    _close(r.logp, ref.logp, 1e-8)
    o = ode_log_likelihood(model, x[:2], steps=8)  # a fixed grid: both runs call at the same times
    assert (o.info["lam_min"], o.info["lam_max"]) == (lo, hi)
    _close(o.logp, ode_log_likelihood(_exact, x[:2], steps=8, lam_min=lo, lam_max=hi).logp, 1e-8)


def test_diffusers_lam_range_at_zero_terminal_snr():
    from scoredensity.epsfn import DEFAULT_LAM_RANGE

    config = dict(COARSE, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    model = DiffusersEps(FakeUNet(betas_from_scheduler_config(config), "v"), config)
    lo, hi = model.lam_range
    assert lo == DEFAULT_LAM_RANGE[0]  # log-SNR -inf is trained: every lower end is inside
    assert math.isclose(hi, math.log((1 - model.t_range[0]) / model.t_range[0]), rel_tol=1e-12)
    x_t = _images(torch.full((2,), 0.5, dtype=torch.float64))
    model(x_t, torch.sigmoid(torch.full((2,), -lo, dtype=torch.float64)))  # the lower end is in range
