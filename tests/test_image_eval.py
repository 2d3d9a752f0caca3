"""Image bits/dim through a diffusers-style discrete-time model, against exact answers."""

import math
import os

import pytest
import torch
from torch import nn

from scoredensity import DiffusersEps, GaussianMixture
from scoredensity.image_eval import evaluate_images
from scoredensity.schedules import DDPMSchedule, linear_betas

L = 4  # levels: coarse enough that the decoder at t_1 = 1e-4 resolves the bins
SCHED = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
}


def _discrete_data():
    """A distribution on 5 patterns of 1x2x2 images with L levels: near-delta mixture components."""
    pats = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 0], [1, 1, 1, 1], [2, 0, 3, 1], [0, 0, 0, 3]], dtype=torch.float64)
    w = torch.tensor([0.3, 0.2, 0.2, 0.2, 0.1], dtype=torch.float64)
    means = 2 * pats / (L - 1) - 1
    return GaussianMixture(means, 1e-10 * torch.eye(4, dtype=torch.float64).expand(5, 4, 4).clone(), w), pats, w


class ExactUNet(nn.Module):
    """Stands in for a UNet2DModel: the exact eps of a mixture at (fractional) diffusers timesteps."""

    def __init__(self, mixture):
        super().__init__()
        self.mixture = mixture
        self.schedule = DDPMSchedule(linear_betas(1000))

    def forward(self, x, timestep):
        t = self.schedule.t_of_step(timestep.to(torch.float64))
        return self.mixture.eps(x.flatten(1).to(torch.float64), t).reshape(x.shape).to(x.dtype)


def _setup(n=60, seed=0):
    mix, pats, w = _discrete_data()
    idx = torch.multinomial(w, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    images = pats[idx].long().reshape(n, 1, 2, 2)
    return DiffusersEps(ExactUNet(mix), SCHED), images, w.log()[idx]


def test_bpd_of_exact_discrete_model_and_bookkeeping():
    eps, images, logw = _setup()
    d = 4
    res = evaluate_images(eps, images, levels=L, n_t=32, ddpm_steps=None, progress=False)
    exact_bpd = float(-logw.mean() / (d * math.log(2)))
    disc = res["methods"]["formula-discrete"]
    # exact eps of the discrete data: the discrete bound is tight up to MC error and does not beat the truth
    assert abs(disc["bpd"] - exact_bpd) < 4 * disc["bpd_estimator_stderr"] + 0.02
    deq = res["methods"]["formula-dequantized"]
    assert deq["kind"] == "dequantized" and disc["kind"] == "discrete"
    # the dequantised figure is a bound on the same discrete probability (Jensen): never below it beyond noise
    assert deq["bpd"] > exact_bpd - 4 * deq["bpd_estimator_stderr"]
    for m, r in res["methods"].items():
        total = sum(r["terms_bpd"].values()) + r.get("bpd_offset_dequantization", 0.0)
        assert math.isclose(total, r["bpd"], rel_tol=1e-9, abs_tol=1e-9), m
    ddpm = res["methods"]["ddpm"]
    assert ddpm["variance"] == "fixed_small" and ddpm["T"] == 1000
    # with the exact eps of near-delta discrete data and the posterior variance (fixed_small), every reverse step
    # matches the forward posterior once x_0 is identified, so the DDPM ELBO is tight (fixed_large costs ~0.47
    # bpd). 600 images, so that its standard error is small against a doubled or halved KL sum.
    eps, images, logw = _setup(n=600, seed=2)
    ddpm = evaluate_images(eps, images, levels=L, ddpm_steps=None, progress=False, methods=("ddpm",))["methods"]["ddpm"]
    exact_bpd = float(-logw.mean() / (d * math.log(2)))
    assert abs(ddpm["bpd"] - exact_bpd) < 4 * ddpm["bpd_stderr"], (ddpm["bpd"], exact_bpd, ddpm["bpd_stderr"])
    assert len(res["data_sha256"]) == 64 and res["preprocessing"]["scaling"].startswith("x = 2k/")


def test_figures_do_not_depend_on_batching():
    eps, images, _ = _setup(n=21, seed=1)
    kw = dict(levels=L, n_t=16, ddpm_steps=8, progress=False, methods=("formula-discrete", "ddpm"))
    a = evaluate_images(eps, images, batch_size=4, **kw)
    b = evaluate_images(eps, images, batch_size=50, **kw)
    for m in a["methods"]:
        assert a["methods"][m]["bpd"] == b["methods"][m]["bpd"]
        assert a["methods"][m]["bpd_stderr"] == b["methods"][m]["bpd_stderr"]


def _shard_worker(rank, world, path, out):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        eps, images, _ = _setup(n=21, seed=1)
        res = evaluate_images(
            eps, images, levels=L, n_t=16, ddpm_steps=8, progress=False, methods=("formula-discrete", "ddpm")
        )
        if rank == 0:
            torch.save({m: (r["bpd"], r["bpd_stderr"]) for m, r in res["methods"].items()}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_over_two_processes_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "res.pt"
    mp.spawn(_shard_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    sharded = torch.load(out)
    eps, images, _ = _setup(n=21, seed=1)
    single = evaluate_images(
        eps, images, levels=L, n_t=16, ddpm_steps=8, progress=False, methods=("formula-discrete", "ddpm")
    )
    for m, (bpd, se) in sharded.items():
        assert bpd == pytest.approx(single["methods"][m]["bpd"], rel=1e-12, abs=1e-12)
        assert se == pytest.approx(single["methods"][m]["bpd_stderr"], rel=1e-12, abs=1e-12)


def test_bad_inputs():
    eps, images, _ = _setup(n=4)
    with pytest.raises(ValueError, match="levels must lie"):
        evaluate_images(eps, images + 10, levels=L, progress=False)
    with pytest.raises(TypeError, match="integer"):
        evaluate_images(eps, images.float(), levels=L, progress=False)
    with pytest.raises(ValueError, match="methods"):
        evaluate_images(eps, images, levels=L, methods=("ode",), progress=False)
    learned = DiffusersEps(ExactUNet(_discrete_data()[0]), {**SCHED, "variance_type": "learned_range"})
    with pytest.raises(ValueError, match="needs 2x1 output channels"):
        evaluate_images(learned, images, levels=L, methods=("ddpm",), progress=False)
