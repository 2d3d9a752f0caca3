"""`scoredensity evaluate --diffusers PATH --images SRC` end to end on a tiny local pipeline."""

import json

import diffusers
import numpy as np
import pytest
from helpers import tiny_unet

from scoredensity.cli import main


def _pipeline(path):
    unet = tiny_unet(perturb=False)
    sched = diffusers.DDPMScheduler(num_train_timesteps=100, beta_start=1e-4, beta_end=0.2)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)


def test_evaluate_diffusers_reports_every_method(tmp_path, capsys):
    _pipeline(tmp_path / "pipe")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "imgs.npz", x=rng.integers(0, 256, size=(10, 1, 8, 8), dtype=np.uint8))
    rc = main(
        [
            "evaluate",
            "--diffusers",
            str(tmp_path / "pipe"),
            "--images",
            str(tmp_path / "imgs.npz"),
            "--n-t",
            "8",
            "--ddpm-steps",
            "4",
            "--json",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["methods"]) == {"formula-discrete", "formula-dequantized", "ddpm"}
    for m, r in res["methods"].items():
        assert np.isfinite(r["bpd"]) and r["bpd"] > 0, m
        assert r["kind"] == ("dequantized" if m == "formula-dequantized" else "discrete")
    assert res["levels"] == 256 and len(res["data_sha256"]) == 64
    # the network is never evaluated outside its trained range [t_1, t_T]
    t1 = 1e-4
    assert res["t_range"][0] == pytest.approx(t1, rel=1e-6)


def test_evaluate_diffusers_clear_errors(tmp_path, capsys):
    rc = main(["evaluate", "--diffusers", str(tmp_path / "missing"), "--images", str(tmp_path / "x.npz")])
    assert rc != 0
    assert "error" in capsys.readouterr().err
    _pipeline(tmp_path / "pipe")
    rc = main(["evaluate", "--diffusers", str(tmp_path / "pipe")])
    assert rc != 0 and "--images" in capsys.readouterr().err
    rc = main(["evaluate"])
    assert rc != 0 and "run folder" in capsys.readouterr().err
