"""Checkpoints: atomic verified writes, clear errors for bad files, and bit-for-bit resumption after SIGKILL."""

import json
import signal

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN_ARGS, run_module

import scoredensity.checkpoint as ck
from scoredensity import errors
from scoredensity.checkpoint import (
    CheckpointError,
    check_state_dict,
    flatten_optimizer_state,
    load_checkpoint,
    load_run,
    save_checkpoint,
    unflatten_optimizer_state,
)
from scoredensity.cli import main
from scoredensity.nets import MLPDenoiser
from scoredensity.train import KILL_ENV, TrainConfig, train

TINY = {"hidden": 16, "blocks": 1, "emb_dim": 8}


def test_save_load_round_trip_and_corruption(tmp_path):
    p = tmp_path / "c.safetensors"
    t = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.zeros(0)}
    save_checkpoint(p, t, {"step": 3, "x": [1, 2]})
    got, meta = load_checkpoint(p)
    assert meta["step"] == 3 and meta["x"] == [1, 2]
    assert all(torch.equal(got[k], t[k]) for k in t)
    raw = p.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) - 7])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "trunc.safetensors")
    flipped = bytearray(raw)
    flipped[-3] ^= 0xFF  # inside the tensor data: only the checksum can tell
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(tmp_path / "flip.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.safetensors")


def test_a_good_checkpoint_is_never_overwritten_by_a_broken_one(tmp_path, monkeypatch):
    p = tmp_path / "c.safetensors"
    save_checkpoint(p, {"w": torch.ones(4)}, {"step": 1})
    before = p.read_bytes()

    def broken_save(tensors, filename, metadata=None):  # a writer that dies half-way
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")

    monkeypatch.setattr(ck, "save_file", broken_save)
    with pytest.raises(CheckpointError):
        save_checkpoint(p, {"w": torch.zeros(4)}, {"step": 2})
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary left behind


def test_optimizer_state_round_trip():
    torch.manual_seed(0)
    net = MLPDenoiser([2], **TINY)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 2), torch.full((8,), 0.5, dtype=torch.float64)).pow(2).sum().backward()
        for p in net.parameters():
            p.grad.add_(0.01)
        opt.step()
    tensors, doc = flatten_optimizer_state(opt.state_dict())
    doc = json.loads(json.dumps(doc))
    opt2 = torch.optim.AdamW(net.parameters(), lr=1e-2)
    opt2.load_state_dict(unflatten_optimizer_state(tensors, doc))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for pid in s1["state"]:
        for k, v in s1["state"][pid].items():
            assert torch.equal(v, s2["state"][pid][k])


def test_state_dict_from_another_configuration():
    a, b = MLPDenoiser([2], **TINY), MLPDenoiser([2], hidden=32, blocks=1, emb_dim=8)
    with pytest.raises(CheckpointError, match="another model configuration.*shape mismatch"):
        check_state_dict(a, b.state_dict(), "x")
    c = MLPDenoiser([2], hidden=16, blocks=2, emb_dim=8)
    with pytest.raises(CheckpointError, match="another model configuration.*unexpected"):
        check_state_dict(a, c.state_dict(), "x")


def test_kill_and_resume_is_bit_for_bit(tmp_path):
    """A run SIGKILLs itself right after the checkpoint of step 40; resumed, it ends exactly like an
    uninterrupted run (weights, EMA, optimiser state, sampler state)."""
    common = [*TINY_TRAIN_ARGS, "--n", "2000", "--steps", "70", "--checkpoint-every", "20", "--log-every", "10"]
    common += ["--device", "cpu"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = run_module("scoredensity", "train", *common, "--out", a, env={KILL_ENV: "40"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    tensors_40, meta = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors")
    assert meta["step"] == 40
    resume = ["--resume", "--out", a, "--no-progress", "--threads", "1", "--device", "cpu"]
    r = run_module("scoredensity", "train", *resume)
    assert r.returncode == 0, r.stderr
    r = run_module("scoredensity", "train", *common, "--out", b)
    assert r.returncode == 0, r.stderr
    ta, ma = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors")
    tb, mb = load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")
    assert ma["step"] == mb["step"] == 70
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert not torch.equal(tensors_40["model.out.weight"], ta["model.out.weight"])
    steps = [json.loads(s)["step"] for s in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) == 7  # no duplicated lines after resume


def test_cli_errors_are_one_line_and_nonzero(tmp_path, capsys):
    # --resume with nothing to resume
    assert main(["train", "--resume", "--out", str(tmp_path / "none")]) == errors.EXIT_DATA
    assert "nothing to resume" in capsys.readouterr().err
    # NaN in the data
    x = np.random.default_rng(0).normal(size=(50, 2))
    x[7, 1] = np.nan
    np.save(tmp_path / "bad.npy", x)
    assert (
        main(["train", "--data", str(tmp_path / "bad.npy"), "--steps", "2", "--out", str(tmp_path / "r0")])
        == errors.EXIT_DATA
    )
    assert "NaN" in capsys.readouterr().err
    # a data directory with the wrong files
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "notes.txt").write_text("hello")
    assert (
        main(["train", "--data", str(tmp_path / "wrong"), "--steps", "2", "--out", str(tmp_path / "r1")])
        == errors.EXIT_DATA
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err
    # a good run, then corrupt / truncated checkpoints and a foreign configuration
    run = tmp_path / "run"
    cfg = TrainConfig(steps=5, batch_size=32, eval_n=0, device="cpu")
    train(run, {"name": "ring8", "n": 400}, net=TINY, config=cfg)
    model, config, ds = load_run(run)
    assert config["step"] == 5 and ds.name == "ring8"
    assert model(torch.zeros(2, 2), torch.full((2,), 0.5, dtype=torch.float64)).shape == (2, 2)
    raw, _, _ = load_run(run, ema=False, load_data=False)
    assert any(not torch.equal(a, b) for a, b in zip(raw.parameters(), model.parameters(), strict=True))
    assert main(["train", "--data", "ring8", "--steps", "2", "--out", str(run)]) == errors.EXIT_DATA  # would overwrite
    assert "already holds" in capsys.readouterr().err
    assert main(["train", "--resume", "--data", "moons", "--out", str(run)]) == errors.EXIT_DATA
    assert "other data" in capsys.readouterr().err
    ckpt = run / "checkpoint.safetensors"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[:-100])
    assert main(["evaluate", str(run), "--n", "10"]) == errors.EXIT_DATA
    assert "truncated or corrupt" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run)]) == errors.EXIT_DATA
    assert "truncated or corrupt" in capsys.readouterr().err
    ckpt.write_bytes(good)
    cfg = json.loads((run / "config.json").read_text())
    cfg["net"]["hidden"] = 32
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["evaluate", str(run), "--n", "10"]) == errors.EXIT_DATA
    assert "another model configuration" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "wrong")]) == errors.EXIT_DATA
    assert "not a training run folder" in capsys.readouterr().err
