"""`scoredensity export`: a run trained by `scoredensity train --net unet` samples with diffusers' own pipeline."""

import pytest

from scoredensity.cli import main

diffusers = pytest.importorskip("diffusers")


def test_trained_unet_run_exports_to_a_working_ddpm_pipeline(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                "digits",
                "--net",
                "unet",
                "--channels",
                "8,16",
                "--steps",
                "3",
                "--batch-size",
                "8",
                "--eval-n",
                "4",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["export", str(run), "--out", str(tmp_path / "pipe")]) == 0
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    # and it reads back as a canonical-time eps_fn
    from scoredensity import load_diffusers_eps

    eps = load_diffusers_eps(tmp_path / "pipe")
    assert eps.prediction_type == "v_prediction"


def test_mlp_run_does_not_export(tmp_path, capsys):
    run = tmp_path / "mlp"
    assert (
        main(
            [
                "train",
                "--data",
                "ring8",
                "--steps",
                "2",
                "--n",
                "500",
                "--eval-n",
                "10",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["export", str(run), "--out", str(tmp_path / "x")]) != 0
    assert "U-Net" in capsys.readouterr().err
