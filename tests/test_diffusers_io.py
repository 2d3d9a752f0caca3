"""diffusers interop: schedules reproduced in float64, local folders loaded as EpsFns, models exported to folders
that diffusers' own DDPMPipeline loads and samples."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from helpers import tiny_unet
from torch import nn

from scoredensity.adapters import DiffusersEps, betas_from_scheduler_config, eps_from
from scoredensity.diffusers_io import load_diffusers, load_diffusers_eps, save_diffusers
from scoredensity.formula import log_density
from scoredensity.schedules import DDPMSchedule

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "sigmoid"},
        {"rescale_betas_zero_snr": True},
        {"rescale_betas_zero_snr": True, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"num_train_timesteps": 10, "trained_betas": [0.01 * (i + 1) for i in range(10)]},
    ],
)
def test_schedule_matches_diffusers(config):
    ours = torch.cumprod(1 - betas_from_scheduler_config(config), 0)
    for cls in (DDPMScheduler, DDIMScheduler) if config.get("beta_schedule") != "sigmoid" else (DDPMScheduler,):
        theirs = cls(**config).alphas_cumprod.double()  # float32 in diffusers
        assert ours.shape == theirs.shape
        assert float((ours - theirs).abs().max()) < 2e-6 + 1e-6 * len(ours) ** 0.5


def test_scheduler_object_is_read_like_its_config():
    sched = DDIMScheduler(num_train_timesteps=50, beta_schedule="scaled_linear", prediction_type="v_prediction")
    model = DiffusersEps(lambda x, j: x, sched)
    assert model.prediction_type == "v_prediction" and model.scheduler_config["_class_name"] == "DDIMScheduler"
    want = DiffusersEps(lambda x, j: x, dict(sched.config)).times
    assert torch.equal(model.times, want)


SCHED = {"num_train_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.1, "prediction_type": "epsilon"}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(**SCHED)).save_pretrained(path)
    return path


def test_load_pipeline_folder_equals_model_at_grid(pipeline_dir):
    ref = tiny_unet()
    eps_fn = load_diffusers_eps(pipeline_dir)
    assert eps_fn.timesteps == "interpolated" and eps_fn.num_train_timesteps == 100
    assert eps_fn.source["model_class"] == "UNet2DModel"
    g = torch.Generator().manual_seed(1)
    j = torch.tensor([0, 1, 37, 99])
    x = torch.randn(4, 1, 8, 8, generator=g)
    with torch.no_grad():
        want = ref(x, j).sample
        t = eps_fn.times[j]
        nearest = load_diffusers_eps(pipeline_dir, timesteps="nearest")
        for got in (eps_fn(x, t), eps_fn.eps_at_step(x, j), nearest(x, t)):
            assert float((got - want).abs().max()) < 1e-6


def test_load_bare_model_folder(tmp_path, pipeline_dir):
    bare = tmp_path / "unet"
    shutil.copytree(pipeline_dir / "unet", bare)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_diffusers(bare)
    shutil.copy(pipeline_dir / "scheduler" / "scheduler_config.json", bare / "scheduler_config.json")
    loaded = load_diffusers(bare)
    assert loaded.scheduler_config["num_train_timesteps"] == 100
    assert isinstance(loaded.model, UNet2DModel) and not loaded.model.training


def test_missing_files_are_named(tmp_path, pipeline_dir):
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        load_diffusers(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither a diffusers pipeline folder"):
        load_diffusers(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(FileNotFoundError) as info:
        load_diffusers(broken)
    assert "diffusion_pytorch_model.safetensors" in str(info.value)
    assert "scheduler_config.json" in str(info.value)
    index = json.loads((broken / "model_index.json").read_text())
    index.pop("unet")
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no 'unet' component"):
        load_diffusers(broken)


def test_bad_images_and_prediction_type(pipeline_dir):
    eps_fn = load_diffusers_eps(pipeline_dir)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="takes 1 channels"):
        eps_fn(torch.zeros(2, 3, 8, 8), t)
    with pytest.raises(ValueError, match="takes 8x8 images"):
        eps_fn(torch.zeros(2, 1, 16, 16), t)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        load_diffusers_eps(pipeline_dir, prediction_type="noise")


class _VFromEps(nn.Module):
    """The v-prediction network that encodes the same denoiser as an epsilon network (exact v at its timestep)."""

    def __init__(self, unet: UNet2DModel, schedule: DDPMSchedule):
        super().__init__()
        self.unet, self.schedule = unet, schedule

    def forward(self, x, timestep):
        eps = self.unet(x, timestep).sample.double()
        t = self.schedule.t_of_step(torch.as_tensor(timestep, dtype=torch.float64).expand(x.shape[0]))
        a, s = (1 - t).sqrt()[:, None, None, None], t.sqrt()[:, None, None, None]
        return (eps - s * x.double()) / a


def test_v_and_epsilon_encodings_give_the_same_log_likelihood():
    unet = tiny_unet(seed=3)
    eps_model = DiffusersEps(unet, SCHED)
    v_model = DiffusersEps(_VFromEps(unet, eps_model.schedule), dict(SCHED, prediction_type="v_prediction"))
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1e-3, 0.3, 0.9], dtype=torch.float64)
    with torch.no_grad():
        assert float((eps_model(x, t) - v_model(x, t)).abs().max()) < 1e-5
        lam_lo, lam_hi = (float(torch.log1p(-v) - torch.log(v)) for v in (eps_model.times[-1], eps_model.times[0]))
        kw = dict(n_t=8, lam_min=lam_lo, lam_max=lam_hi, importance="uniform", control_variate=None, seed=11)
        a = log_density(eps_model, x, **kw)
        b = log_density(v_model, x, **kw)
    assert float((a.logp - b.logp).abs().max()) < 1e-6 * float(a.logp.abs().max()) + 1e-4


def test_export_diffusers_eps_round_trip(tmp_path):
    unet = tiny_unet(seed=5)
    model = DiffusersEps(unet, dict(SCHED, prediction_type="v_prediction"))
    out = save_diffusers(model, tmp_path / "export")
    pipe = DDPMPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 8, 8, 1)
    back = load_diffusers_eps(out)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)
    with torch.no_grad():
        assert float((back(x, t) - model(x, t)).abs().max()) < 1e-6


def test_export_bare_unet_needs_its_schedule(tmp_path):
    with pytest.raises(ValueError, match="needs scheduler="):
        save_diffusers(tiny_unet(), tmp_path / "x")
    with pytest.raises(TypeError, match="cannot export"):
        save_diffusers(object(), tmp_path / "y")


def test_eps_from_matches_diffusers_step_x0():
    """Our v -> eps -> x0 agrees with the x0 that diffusers' DDPMScheduler.step derives from a v output."""
    sched = DDPMScheduler(**dict(SCHED, prediction_type="v_prediction", clip_sample=False))
    g = torch.Generator().manual_seed(6)
    x, v = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    j = 40
    x0_theirs = sched.step(v, j, x).pred_original_sample.double()
    t = torch.full((2,), float(1 - sched.alphas_cumprod[j]), dtype=torch.float64)
    eps = eps_from("v", v.double(), x.double(), t)
    x0_ours = (x.double() - t.sqrt()[:, None, None, None] * eps) / (1 - t).sqrt()[:, None, None, None]
    assert float((x0_ours - x0_theirs).abs().max()) < 1e-5


@pytest.mark.parametrize(("num_classes", "param"), [(0, "v"), (3, "eps")])
def test_export_canonical_unet_denoiser(tmp_path, num_classes, param):
    """A canonical-time nets.UNetDenoiser exports exactly at the grid timesteps (class-conditional: null label)."""
    from scoredensity.nets import UNetDenoiser

    torch.manual_seed(7)
    model = UNetDenoiser([1, 8, 8], channels=(8, 16), num_classes=num_classes, param=param).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = save_diffusers(model, tmp_path / "export", scheduler=SCHED)
    pipe = DDPMPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if param == "v" else "epsilon")
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 8, 8, 1)
    back = load_diffusers_eps(out)
    assert back.timesteps == "nearest"  # a table time embedding takes integer timesteps only
    x = torch.randn(5, 1, 8, 8)
    t = back.times[torch.tensor([0, 1, 50, 98, 99])]
    with torch.no_grad():
        want = model(x, t)
        assert float((back(x, t) - want).abs().max()) < 1e-5 * (1 + float(want.abs().max()))
    with pytest.raises(ValueError, match="data_std"):
        save_diffusers(UNetDenoiser([1, 8, 8], channels=(8, 16), data_std=0.5), tmp_path / "no")
