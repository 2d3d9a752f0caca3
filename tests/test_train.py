"""Must-show: a short likelihood-weighted training run on ring8 gets its held-out bound within 0.2 nats of the
exact NLL, and never below it beyond 3 paired standard errors. Plus the evaluate CLI's JSON."""

import json
import math

import pytest
import torch

from scoredensity.cli import main
from scoredensity.mixtures import mixture_preset
from scoredensity.train import TrainConfig, _lr_at, train


def test_ring8_bound_within_0p2_nats_of_exact(tmp_path, capsys):
    torch.set_num_threads(1)
    # 1200 steps of batch 512 leave 0.04-0.13 nats over 3 seeds (docs/bench_training_ring8.md); this test trains
    # 2000 steps and allows 0.2. About 30-40 s on one core.
    cfg = TrainConfig(
        steps=2000, batch_size=512, lr=4e-3, seed=0, eval_n=0, checkpoint_every=10**9, log_every=500, device="cpu"
    )
    res = train(
        tmp_path / "run", {"name": "ring8", "n": 20000}, net={"hidden": 128, "blocks": 2, "emb_dim": 64}, config=cfg
    )
    assert res.step == 2000
    # held-out evaluation through the CLI (EMA weights, density formula), the same test points for both sides
    assert main(["evaluate", str(tmp_path / "run"), "--n", "2000", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    for key in ("method", "n", "nll", "nll_stderr", "bpd", "nfe_per_example", "true_nll"):
        assert key in ev
    assert ev["method"] == "formula" and ev["n"] == 2000 and ev["bpd"] is None and ev["ema"] is True
    gap, se = ev["gap"], ev["gap_stderr"]
    assert abs(ev["nll"] - ev["true_nll"] - gap) < 1e-9
    assert gap < 0.2, (gap, se)
    assert gap > -3 * se, (gap, se)  # a bound cannot beat the truth on average
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [500, 1000, 1500, 2000]
    assert lines[-1]["train_nll_bound"] < lines[0]["train_nll_bound"]


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=1000, warmup=100, lr=1.0, min_lr_frac=0.1)
    assert abs(_lr_at(cfg, 50) - 0.5) < 1e-12
    assert abs(_lr_at(cfg, 100) - 1.0) < 1e-12
    assert abs(_lr_at(cfg, 1000) - 0.1) < 1e-12
    assert all(_lr_at(cfg, s) >= _lr_at(cfg, s + 1) for s in range(100, 1000))


def _tiny_train_argv(out) -> list[str]:
    """A 2-step ring8 MLP run with no --threads option (the thread default is what is tested)."""
    return ["train", "--data", "ring8", "--n", "200", "--batch-size", "32", "--hidden", "16", "--blocks", "1",
            "--eval-n", "0", "--no-progress", "--steps", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip


def test_train_threads_default_like_the_other_commands(tmp_path, monkeypatch, capsys):
    """``train`` without --threads: 1 thread for an MLP on 2-D data (the other commands' default), OMP_NUM_THREADS
    honoured when set (torch's setting left alone), an explicit --threads used as given, also on --resume."""
    from scoredensity.commands._common import default_threads

    n0 = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        assert main(_tiny_train_argv(tmp_path / "a")) == 0
        assert torch.get_num_threads() == default_threads("small") == 1
        assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["threads"] == 0  # not pinned
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert main(_tiny_train_argv(tmp_path / "b")) == 0
        assert torch.get_num_threads() == 2  # left as OMP_NUM_THREADS set it
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert main(["train", "--resume", "--out", str(tmp_path / "b"), "--steps", "3", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
        assert main(_tiny_train_argv(tmp_path / "c") + ["--threads", "-1"]) == 2
        assert "--threads" in capsys.readouterr().err
    finally:
        torch.set_num_threads(n0)


def test_digits_train_and_evaluate_bits_per_dim(tmp_path, capsys):
    """Discrete data: keyed dequantisation, logit transform and bits/dim on the published scale."""
    cfg = TrainConfig(steps=3, batch_size=16, eval_n=0, device="cpu")
    train(
        tmp_path / "d",
        {"name": "digits", "n": 200, "logit": True},
        net={"type": "mlp", "hidden": 32, "blocks": 1},
        config=cfg,
    )
    assert main(["evaluate", str(tmp_path / "d"), "--n", "8", "--n-t", "4", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["kind"] == "dequantised" and ev["true_nll"] is None
    assert abs(ev["bpd"] - (ev["nll"] / (64 * 0.6931471805599453) + 3.0)) < 1e-9  # log2((17 - 1) / 2) = 3


def test_trained_unet_keeps_diffusers_convention_and_exports(tmp_path):
    from scoredensity.diffusers_io import save_diffusers

    cfg = TrainConfig(steps=2, batch_size=16, eval_n=0, device="cpu")
    res = train(tmp_path / "u", {"name": "digits", "n": 200}, net={"type": "unet", "channels": [16, 32]}, config=cfg)
    assert res.ema.config["type"] == "unet" and res.ema.config["data_std"] == 1.0
    assert (save_diffusers(res.ema, tmp_path / "exported") / "model_index.json").is_file()


def test_training_demo_report(tmp_path):
    from scoredensity.demo import full_demo

    r = full_demo(tmp_path, steps=30, n_grid=8, n_samples=50, n_eval=100, progress=False)
    t = r["training"]
    assert t["steps"] == 30 and t["eval"]["n"] == 100 and t["eval"]["true_nll"] is not None
    for name in ("report.md", "formula_density.png", "trained_density.png", "samples.png", "training_demo.json"):
        assert (tmp_path / name).is_file(), name
    text = (tmp_path / "report.md").read_text()
    assert "bound - exact" in text and "trained_density.png" in text
    # the report states the run's own figures: the JSON written beside it, its table rows, and a consistent gap
    saved = json.loads((tmp_path / "training_demo.json").read_text())
    ev = saved["eval"]
    assert saved["steps"] == 30 and ev == pytest.approx(t["eval"])
    assert ev["gap"] == pytest.approx(ev["nll"] - ev["true_nll"])
    labels = (("NLL bound (model)", "nll"), ("exact NLL (same points)", "true_nll"), ("bound - exact (paired)", "gap"))
    for label, key in labels:
        assert f"| {label} | {ev[key]:.4f} ± {ev[key + '_stderr']:.4f} |" in text, label
    assert f"trained for {saved['steps']} steps" in text and f"n = {ev['n']}" in text
    for row in r["formula"]["rows"]:
        assert f"| {row['points']} | {row['n']} | {row['mean_err']:.4f} | {row['mean_stderr']:.4f} |" in text
    # the exact NLL is blobs2d's: the Gaussian fitted to blobs2d (1 nat worse than the mixture) lies well above it
    gauss_nll = 0.5 * float(torch.logdet(2 * math.pi * math.e * mixture_preset("blobs2d").covariance()))
    assert ev["true_nll"] < gauss_nll - 4 * ev["true_nll_stderr"]
