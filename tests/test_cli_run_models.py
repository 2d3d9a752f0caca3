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


def test_compare_prints_each_row_once_and_reports_the_device(tmp_path, capsys):
    assert main(["compare", "--preset", "ring8", "--n", "4", "--level", "quick", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    rows = [ln for ln in cap.out.splitlines() if ln.startswith(("formula ", "ode-exact ", "ddpm-fixed_large "))]
    assert len(rows) == 3  # the table once; per-estimator progress went to stderr
    assert "on cpu" in cap.err and "[1/" in cap.err


def test_interrupted_runs_are_flagged_with_their_step(tmp_path):
    """A run killed after its step-40 checkpoint of 60: classify and compare say so (step and warning)."""
    from helpers import TINY_TRAIN_ARGS, run_module

    from scoredensity.train import KILL_ENV

    run = str(tmp_path / "run")
    args = [*TINY_TRAIN_ARGS, "--n", "600", "--steps", "60", "--checkpoint-every", "20", "--conditional"]
    r = run_module("scoredensity", "train", *args, "--out", run, env={KILL_ENV: "40", "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    for cmd in (
        ["classify", run, "--n", "4", "--budget", "256", "--json"],
        ["compare", run, "--n", "3", "--level", "quick"],
    ):
        r = run_module("scoredensity", *cmd, env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        assert "training did not finish (checkpoint at step 40 of 60)" in r.stderr, r.stderr


def test_finished_run_prints_its_step_without_a_warning(tmp_path, capsys):
    from helpers import TINY_TRAIN_ARGS

    run = tmp_path / "run"
    assert main(["train", *TINY_TRAIN_ARGS, "--n", "300", "--steps", "3", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "-n", "5", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert "checkpoint at step 3" in err and "warning" not in err
