"""`scoredensity export`: a run trained by `scoredensity train --net unet` samples with diffusers' own pipeline."""

import diffusers
import torch

from scoredensity.cli import main


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
    # round trip: the exported network's eps equals the trained run's (EMA) eps at the grid's timesteps
    from scoredensity import load_run

    ours, _, ds = load_run(run)
    x0 = ds.to_model(ds.x_test[:6], generator=torch.Generator().manual_seed(0))
    j = torch.tensor([0, 10, 100, 400, 700, 999])
    t = eps.times[j]
    x_t = (1 - t).sqrt().view(-1, 1, 1, 1).float() * x0 + t.sqrt().view(-1, 1, 1, 1).float() * torch.randn_like(x0)
    with torch.no_grad():
        assert torch.allclose(eps(x_t, t), ours(x_t, t), atol=1e-4, rtol=1e-4)
    # the export says which step it took (an unfinished run's warning is tested on a killed run in
    # test_cli_run_models: the checkpoint, not an edited config.json, says how many steps were planned)
    assert "from step 3" in capsys.readouterr().out
    assert (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").is_file()


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
