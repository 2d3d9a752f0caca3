"""`compare` and `sample` on a trained run folder (not only on presets)."""

import json

import numpy as np

from scoredensity.cli import main


def test_compare_and_sample_a_trained_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                "ring8",
                "--steps",
                "20",
                "--out",
                str(run),
                "--n",
                "2000",
                "--hidden",
                "32",
                "--batch-size",
                "64",
                "--eval-n",
                "50",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["compare", str(run), "--n", "20", "--level", "quick", "--out", str(tmp_path / "cmp")]) == 0
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    # the estimators run on the run's training log-SNR range, and the exact NLL of the mixture is known
    assert res["lam_min"] == cfg["train"]["lam_min"] and res["lam_max"] == cfg["train"]["lam_max"]
    assert res["run_dir"] == str(run)
    assert (tmp_path / "cmp" / "compare.png").exists()
    assert main(["sample", str(run), "-n", "300", "--steps", "10", "--out", str(tmp_path / "smp")]) == 0
    x = np.load(tmp_path / "smp" / "samples.npy")
    assert x.shape == (300, 2) and np.isfinite(x).all()
    assert main(["compare", str(run), "--preset", "ring8"]) != 0
