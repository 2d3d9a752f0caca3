"""Image evaluations at scale: layouts of the given images, all of them evaluated, devices, precision, progress
lines for log files, and evaluation to a target standard error."""

import io
import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny_unet
from test_image_eval import L, _setup

from scoredensity import DiffusersEps
from scoredensity.cli import main
from scoredensity.eval_store import ProgressLog, ResultStore
from scoredensity.image_eval import evaluate_images, image_layout, record_keys, to_nchw

SCHED = {"num_train_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.2, "beta_schedule": "linear"}


def test_layouts_are_inferred_from_the_model_channels():
    assert image_layout((16, 8, 8, 3), 3) == "NHWC"  # an improved-diffusion arr_0 sample file
    assert image_layout((16, 3, 8, 8), 3) == "NCHW"
    assert image_layout((16, 8, 8), 1) == "NHW"
    assert image_layout((16, 1, 8, 8), 1) == "NCHW"
    assert image_layout((16, 8, 8, 1), 1) == "NHWC"
    assert image_layout((16, 3, 8, 3), 3, (8, 3)) == "NCHW"  # the model's size decides
    with pytest.raises(ValueError, match="ambiguous"):
        image_layout((16, 3, 8, 3), 3)
    with pytest.raises(ValueError, match="ambiguous"):
        image_layout((4, 3, 3, 3), 3, (3, 3))
    with pytest.raises(ValueError, match="fit neither"):
        image_layout((16, 8, 8, 4), 3)
    with pytest.raises(ValueError, match="greyscale"):
        image_layout((16, 8, 8), 3)
    x = torch.arange(2 * 4 * 5 * 3).reshape(2, 4, 5, 3)
    assert torch.equal(to_nchw(x, "NHWC")[1, 2, 3, 4], x[1, 3, 4, 2])


def _pipeline(path, channels):
    import diffusers

    unet = tiny_unet(channels=channels)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**SCHED)).save_pretrained(path)


def _eval_cli(capsys, *args) -> dict:
    rc = main(["evaluate", *map(str, args), "--n-t", "4", "--ddpm-steps", "4", "--json", "--no-progress"])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_every_given_image_is_evaluated_in_its_layout(tmp_path, capsys):
    _pipeline(tmp_path / "rgb", 3)
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, size=(13, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=nhwc)  # improved-diffusion's sample file
    np.save(tmp_path / "nchw.npy", np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)))
    a = _eval_cli(capsys, "--diffusers", tmp_path / "rgb", "--images", tmp_path / "samples.npz")
    b = _eval_cli(capsys, "--diffusers", tmp_path / "rgb", "--images", tmp_path / "nchw.npy")
    assert a["n"] == 13 and a["images"]["split"] == "all"  # no hidden 20% test split
    assert a["images"]["layout"] == "NHWC" and b["images"]["layout"] == "NCHW"
    assert a["data_sha256"] == b["data_sha256"]
    for m in a["methods"]:
        assert a["methods"][m]["bpd"] == b["methods"][m]["bpd"], m
    # a fixed train/test split file: its test part unless asked otherwise
    np.savez(tmp_path / "split.npz", x_train=nhwc[:9], x_test=nhwc[9:])
    c = _eval_cli(capsys, "--diffusers", tmp_path / "rgb", "--images", tmp_path / "split.npz", "--methods", "ddpm")
    assert c["n"] == 4 and c["images"]["split"] == "test"
    split_all = ["--images", tmp_path / "split.npz", "--methods", "ddpm", "--split", "all"]
    d = _eval_cli(capsys, "--diffusers", tmp_path / "rgb", *split_all)
    assert d["n"] == 13
    # greyscale NHW for a one-channel model; a wrong channel count is refused clearly
    _pipeline(tmp_path / "grey", 1)
    np.save(tmp_path / "grey.npy", nhwc[..., 0])
    assert _eval_cli(capsys, "--diffusers", tmp_path / "grey", "--images", tmp_path / "grey.npy")["n"] == 13
    assert main(["evaluate", "--diffusers", str(tmp_path / "grey"), "--images", str(tmp_path / "nchw.npy")]) == 2
    assert "fit neither NCHW nor NHWC" in capsys.readouterr().err


def test_device_option_errors_are_clear(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["evaluate", str(tmp_path), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--device", "tpu"]) == 2
    assert "--device" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err


def test_progress_lines_when_stderr_is_not_a_terminal():
    buf = io.StringIO()
    p = ProgressLog(10, desc="evaluate", unit="images", every=0.0, stream=buf)
    p.update(3)
    p.update(7)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in buf.getvalue()
    assert lines[0].startswith("evaluate: 3/10 images (30.0%)") and "images/s" in lines[0] and "ETA" in lines[0]
    assert lines[1].startswith("evaluate: 10/10 images (100.0%)")
    quiet = io.StringIO()
    q = ProgressLog(10, every=1e9, stream=quiet)
    q.update(3)
    assert quiet.getvalue() == ""  # not yet due
    q.update(7)
    assert "10/10" in quiet.getvalue()  # the last line is always printed


def test_target_se_spends_rounds_until_the_data_set_stderr_is_reached():
    eps, images, _ = _setup(n=24, seed=2)
    kw = dict(levels=L, n_t=8, progress=False, methods=("formula-discrete", "formula-dequantized"))
    one = evaluate_images(eps, images, **kw)
    se1 = max(r["bpd_estimator_stderr"] for r in one["methods"].values())
    target = se1 / 2.5  # about 6 rounds of the one-round error
    res = evaluate_images(eps, images, target_se=target, **kw)
    t = res["target_se"]
    assert t["reached"] and t["se_bpd"] <= target and t["rounds"] >= 3
    for m, r in res["methods"].items():
        assert r["rounds"] == t["rounds"] and r["bpd_estimator_stderr"] <= target
        per_round = one["methods"][m]["nfe_per_example"] - 16 * 8 / 24
        assert r["nfe_per_example"] == pytest.approx(t["rounds"] * per_round + 16 * 8 / 24)
        # the rounds' mean agrees with one round within their errors, and round 0 is the one-round figure
        diff = abs(r["bpd"] - one["methods"][m]["bpd"])
        assert diff < 4 * math.hypot(r["bpd_estimator_stderr"], one["methods"][m]["bpd_estimator_stderr"]), m
    # the rounds are independent draws: a second round differs from the first
    store = ResultStore(record_keys(kw["methods"]))
    evaluate_images(eps, images, target_se=1e-12, max_rounds=2, store=store, **kw)
    ids = torch.arange(24)
    r0, r1 = store.table(0, ids), store.table(1, ids)
    assert not torch.equal(r0["formula-dequantized/logp"], r1["formula-dequantized/logp"])
    assert torch.equal(r0["formula-discrete/logp"], store.table(0, ids)["formula-discrete/logp"])


def test_bf16_agrees_with_fp32_within_the_stated_error():
    eps = DiffusersEps(tiny_unet(channels=1), SCHED)
    images = torch.randint(0, 256, (12, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(n_t=8, ddpm_steps=4, progress=False, seed=3)
    a = evaluate_images(eps, images, precision="fp32", **kw)
    b = evaluate_images(eps, images, precision="bf16", **kw)
    assert b["precision"] == "bf16" and b["settings"]["precision"] == "bf16"
    for m in a["methods"]:
        ra, rb = a["methods"][m], b["methods"][m]
        assert ra["bpd"] != rb["bpd"], m  # the autocast did change the network's arithmetic
        # same noise on both sides: the difference is the network's rounding, far below the estimator's error
        assert abs(ra["bpd"] - rb["bpd"]) < 2 * ra["bpd_estimator_stderr"], m


def test_convention_is_applied_named_and_listed(tmp_path, capsys):
    from scoredensity.conventions import get_convention
    from scoredensity.ddpm import ddpm_elbo
    from scoredensity.image_eval import round_keys

    eps = DiffusersEps(tiny_unet(channels=1), SCHED)
    images = torch.randint(0, 256, (6, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    res = evaluate_images(eps, images, methods=("ddpm",), convention="ddpm", ddpm_steps=None, progress=False)
    assert res["convention"] == get_convention("ddpm").as_dict()
    r = res["methods"]["ddpm"]
    assert r["convention"] == "ddpm" and r["variance"] == "fixed_large"  # the paper's, not the model's fixed_small
    # the same figure as the published bound computed directly with the convention (same keyed noise)
    x = 2 * images.double() / 255 - 1
    direct = ddpm_elbo(
        eps, x.float(), schedule=eps.schedule, convention="ddpm", example_ids=round_keys(torch.arange(6), 0)
    )
    bpd = float((-direct.logp / (64 * math.log(2))).mean())
    assert r["bpd"] == pytest.approx(bpd, abs=1e-5)
    # another convention changes the figure (posterior decoder variance and clipping vs the library's defaults)
    own = evaluate_images(eps, images, methods=("ddpm",), convention="scoredensity", ddpm_steps=None, progress=False)
    assert own["convention"]["name"] == "scoredensity" and own["methods"]["ddpm"]["bpd"] != r["bpd"]
    with pytest.raises(ValueError, match="DDPM bound only"):
        evaluate_images(eps, images, convention="ddpm", progress=False)
    with pytest.raises(ValueError, match=r"log-SNR range \[-5, 13.3\].*trained range"):
        evaluate_images(eps, images, methods=("formula-discrete",), convention="vdm", progress=False)
    with pytest.raises(ValueError, match="unknown convention"):
        evaluate_images(eps, images, convention="nope", progress=False)
    # the CLI: --convention picks the DDPM method and the JSON lists every choice
    import diffusers

    diffusers.DDPMPipeline(unet=tiny_unet(channels=1), scheduler=diffusers.DDPMScheduler(**SCHED)).save_pretrained(
        tmp_path / "p"
    )
    np.save(tmp_path / "x.npy", images[:, 0].numpy().astype(np.uint8))
    out = _eval_cli(
        capsys, "--diffusers", tmp_path / "p", "--images", tmp_path / "x.npy", "--convention", "improved-diffusion"
    )
    assert list(out["methods"]) == ["ddpm"] and out["convention"]["name"] == "improved-diffusion"
    assert {"decoder_variance", "clip_denoised", "cdf", "bin_width", "bits_offset"} <= set(out["convention"])
    assert out["methods"]["ddpm"]["convention"] == "improved-diffusion+variance=fixed_small"  # the model's own


def test_learned_variance_model_gets_its_own_ddpm_bound():
    from scoredensity.ddpm import ddpm_elbo
    from scoredensity.image_eval import round_keys

    eps = DiffusersEps(tiny_unet(channels=1, out_mult=2), {**SCHED, "variance_type": "learned_range"})
    images = torch.randint(0, 256, (5, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    res = evaluate_images(eps, images, methods=("ddpm",), ddpm_steps=None, progress=False)
    r = res["methods"]["ddpm"]
    assert r["variance"] == "learned_range"
    x = (2 * images.double() / 255 - 1).float()
    direct = ddpm_elbo(
        eps,
        x,
        schedule=eps.schedule,
        variance="learned_range",
        decoder="discretized",
        levels=256,
        example_ids=round_keys(torch.arange(5), 0),
    )
    assert r["bpd"] == pytest.approx(float((-direct.logp / (64 * math.log(2))).mean()), abs=1e-6)
    fixed = evaluate_images(eps, images, methods=("ddpm",), variance="fixed_small", ddpm_steps=None, progress=False)
    assert fixed["methods"]["ddpm"]["bpd"] != r["bpd"]  # the learned variances were used
