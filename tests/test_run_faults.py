"""Run folders that lose nothing: locking, foreign folders, early deaths, divergence, signals, changed data,
crafted files, permissions, devices and progress in logs (issue 14 items 1-5, 7, 9, 11, 12; issue 11 item 1)."""

import importlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN_ARGS

from scoredensity import distributed as D
from scoredensity import errors
from scoredensity.checkpoint import (
    CheckpointError,
    UnfinishedRunWarning,
    load_checkpoint,
    load_run,
    read_config,
    save_checkpoint,
)
from scoredensity.cli import main
from scoredensity.data import DataError
from scoredensity.epsfn import resolve_lam_range
from scoredensity.runlock import LOCK_NAME, RunLock, RunLockedError
from scoredensity.train import TrainConfig, TrainingDiverged, TrainingInterrupted, train

T = importlib.import_module("scoredensity.train")  # the module (the package exports a function of that name)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden": 16, "blocks": 1, "emb_dim": 8}
DATA = {"name": "ring8", "n": 400}


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=10, batch_size=32, eval_n=0, checkpoint_every=5, log_every=5, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _tensors_equal(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _popen(*args: str, env: dict | None = None) -> subprocess.Popen:
    """``scoredensity train *args`` in a subprocess (output captured)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "scoredensity", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=e,
    )


def _wait_for(path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    torch.set_num_threads(1)
    train(run, DATA, net=TINY, config=_cfg(lam_min=-10.0, lam_max=9.0))
    return run


# ---------------------------------------------------------------------------------------- 1. the lock
def test_a_second_trainer_is_refused_while_the_first_completes_unharmed(tmp_path, capsys):
    run = tmp_path / "run"
    steps = 1000
    a = _popen(*TINY_TRAIN_ARGS, "--n", "2000", "--steps", str(steps), "--checkpoint-every", "100", "--out", str(run))
    _wait_for(run / "checkpoint.safetensors", a)
    with pytest.raises(RunLockedError, match="in use by another training process"):
        train(run, resume=True)
    assert main(["train", "--resume", "--out", str(run)]) == errors.EXIT_BUSY
    assert "in use by another training process" in capsys.readouterr().err
    assert a.poll() is None, "the first trainer finished before the second one was tried: the test proved nothing"
    assert (
        main(["train", "--data", "ring8", "--out", str(run), "--device", "cpu"]) == errors.EXIT_DATA
    )  # a new run there: no
    assert "already holds a training run" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnfinishedRunWarning)
        for _ in range(10):  # readers while it trains: always a whole checkpoint, its step and settings agreeing
            _, config, _ = load_run(run, load_data=False)
            assert config["step"] % 100 == 0 and config["train"]["steps"] == steps
    out, err = a.communicate(timeout=300)
    assert a.returncode == 0, err
    assert f"to step {steps}" in out
    _, meta = load_checkpoint(run / "checkpoint.safetensors")
    assert meta["step"] == steps
    metric_steps = [json.loads(s)["step"] for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert metric_steps == list(range(50, steps + 1, 50))  # every line of the first run, none removed


def test_the_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path / "r"):
        with pytest.raises(RunLockedError):
            with RunLock(tmp_path / "r"):
                pass
    with RunLock(tmp_path / "r"):  # released on exit: free again
        pass


def test_a_stale_lock_of_a_killed_process_does_not_block(tmp_path):
    run = tmp_path / "run"
    p = _popen(*TINY_TRAIN_ARGS, "--n", "400", "--steps", "20", "--checkpoint-every", "10", "--out", str(run),
               env={T.KILL_ENV: "10"})  # fmt: skip
    p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert (run / LOCK_NAME).exists()  # the file stays, but no one holds it
    res = train(run, resume=True)
    assert res.step == 20


def test_readers_never_see_half_a_checkpoint_while_it_is_rewritten(tmp_path):
    p = tmp_path / "c.safetensors"
    save_checkpoint(p, {"w": torch.zeros(20000)}, {"step": 0})
    stop, errors = threading.Event(), []

    def writer():
        i = 1
        while not stop.is_set():
            save_checkpoint(p, {"w": torch.full((20000,), float(i))}, {"step": i})
            i += 1

    th = threading.Thread(target=writer)
    th.start()
    try:
        for _ in range(150):
            try:
                tensors, meta = load_checkpoint(p)
            except CheckpointError as e:
                errors.append(str(e))
                continue
            assert torch.all(tensors["w"] == float(meta["step"]))  # metadata and tensors of the same version
    finally:
        stop.set()
        th.join()
    assert not errors, errors[:3]


# ---------------------------------------------------------------------------------------- 2. foreign folders
def test_a_folder_that_is_not_a_run_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own notes, not JSON\n")
    (out / "thesis.tex").write_text("\\begin{document}")
    with pytest.raises(CheckpointError, match="neither empty nor a scoredensity run folder.*thesis.tex"):
        train(out, DATA, net=TINY, config=_cfg())
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "thesis.tex"]
    assert (out / "metrics.jsonl").read_text() == "my own notes, not JSON\n"


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json"])
def test_a_folder_with_a_file_of_a_run_name_is_not_a_run(tmp_path, name):
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text('{"step": 1, "mine": true}\n')
    with pytest.raises(CheckpointError, match=f"neither empty nor a scoredensity run folder.*{name}"):
        train(out, DATA, net=TINY, config=_cfg())
    assert (out / name).read_text() == '{"step": 1, "mine": true}\n'


def test_out_naming_a_file_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["train", "--data", "ring8", "--steps", "2", "--out", str(f), "--device", "cpu"]) == errors.EXIT_IO
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and err.count("\n") == 1


def test_resume_never_rewrites_lines_it_did_not_write(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 10, "loss": 1}\n# a comment\n{"step": 30, "loss": 2}\n{"note": 5}\n[1, 2]\n{"step": 4')
    T._truncate_metrics(m, 20)
    assert m.read_text() == '{"step": 10, "loss": 1}\n# a comment\n{"note": 5}\n[1, 2]\n'
    before = m.read_text()
    T._truncate_metrics(m, 20)  # nothing more to drop: the file is not rewritten
    assert m.read_text() == before


def test_out_under_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert (
        main(["train", "--data", "ring8", "--steps", "2", "--out", str(tmp_path / "afile" / "run")]) == errors.EXIT_IO
    )
    err = capsys.readouterr().err
    assert "cannot create the run folder" in err and err.count("\n") == 1


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    import scoredensity.checkpoint as ck

    run = tmp_path / "run"
    train(run, DATA, net=TINY, config=_cfg())
    good = (run / "checkpoint.safetensors").read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", disk_full)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--steps", "15", "--no-progress"]) == errors.EXIT_IO
    err = capsys.readouterr().err
    assert "No space left on device (the previous checkpoint is kept)" in err and err.count("\n") == 1
    assert (run / "checkpoint.safetensors").read_bytes() == good
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------- 3. early deaths
def test_a_bad_setting_leaves_no_folder_behind(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", "ring8", "--n", "100", "--batch-size", "5000", "--out", str(run), "--device", "cpu"]
    assert main(args) == errors.EXIT_USAGE
    assert "exceeds the 80 training examples" in capsys.readouterr().err
    assert not run.exists()


def test_a_run_that_died_before_its_first_checkpoint_can_be_restarted_or_resumed(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_step = T._Trainer.optimiser_step

    def dies_at_step_3(self, step, *a):
        if step == 3:
            raise RuntimeError("simulated crash")
        return real_step(self, step, *a)

    monkeypatch.setattr(T._Trainer, "optimiser_step", dies_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(run, DATA, net=TINY, config=_cfg())
    assert (run / "config.json").is_file() and not (run / "checkpoint.safetensors").exists()
    monkeypatch.setattr(T._Trainer, "optimiser_step", real_step)
    # --resume starts from step 0 ...
    train(run, resume=True)
    resumed, _ = load_checkpoint(run / "checkpoint.safetensors")
    # ... and a plain train in the same folder starts afresh; both equal an uninterrupted run bit for bit
    monkeypatch.setattr(T._Trainer, "optimiser_step", dies_at_step_3)
    with pytest.raises(RuntimeError):
        train(tmp_path / "run2", DATA, net=TINY, config=_cfg())
    monkeypatch.setattr(T._Trainer, "optimiser_step", real_step)
    train(tmp_path / "run2", DATA, net=TINY, config=_cfg())
    fresh, _ = load_checkpoint(tmp_path / "run2" / "checkpoint.safetensors")
    train(tmp_path / "ref", DATA, net=TINY, config=_cfg())
    ref, _ = load_checkpoint(tmp_path / "ref" / "checkpoint.safetensors")
    assert _tensors_equal(resumed, ref) and _tensors_equal(fresh, ref)


def test_orphaned_temporary_files_are_removed_on_resume(tmp_path):
    run = tmp_path / "run"
    train(run, DATA, net=TINY, config=_cfg())
    for name in (".checkpoint.safetensors.k1ll3d.tmp", ".config.json.x.tmp"):
        (run / name).write_bytes(b"\0" * 1000)
    train(run, resume=True, steps=12)
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []


# ---------------------------------------------------------------------------------------- 4. divergence
def test_divergence_exits_nonzero_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    bad = ["--data", "ring8", "--steps", "60", "--lr", "1e3", "--grad-clip", "0", "--warmup", "0", "--eval-n", "0"]
    assert (
        main(["train", *bad, "--out", str(tmp_path / "a"), "--threads", "1", "--device", "cpu"]) == errors.EXIT_DIVERGED
    )
    err = capsys.readouterr().err
    said = [s for s in err.splitlines() if not s.startswith("train: ")]  # not the progress lines of a log
    assert len(said) == 1 and "training diverged at step" in said[0]
    # with a checkpoint every step, the one kept is the step before the divergence, with finite weights
    assert (
        main(["train", *bad, "--out", str(tmp_path / "b"), "--threads", "1", "--checkpoint-every", "1"])
        == errors.EXIT_DIVERGED
    )
    err = capsys.readouterr().err
    at = int(re.search(r"diverged at step (\d+)", err).group(1))
    tensors, meta = load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")
    assert meta["step"] == at - 1 and f"checkpoint (step {at - 1})" in err
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_float64_data_that_overflow_float32_are_rejected(tmp_path):
    x = np.random.default_rng(0).normal(size=(100, 2))
    x[17, 0] = 1e300
    np.save(tmp_path / "big.npy", x)
    with pytest.raises(DataError, match=r"beyond the float32 range.*rows \[\d+\]"):
        train(tmp_path / "run", str(tmp_path / "big.npy"), net=TINY, config=_cfg())
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- 5. changed data
def test_a_replaced_data_file_is_noticed_by_evaluate_resume_and_load_run(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "x.npy"
    np.save(path, rng.normal(size=(200, 2)).astype(np.float32))
    run = tmp_path / "run"
    train(run, str(path), net=TINY, config=_cfg())
    np.save(path, 3 + rng.normal(size=(200, 2)).astype(np.float32))  # same shape, other values
    assert main(["evaluate", str(run), "--n", "10"]) == errors.EXIT_DATA
    assert "not those the run was trained on" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="not those the run was trained on"):
        train(run, resume=True, steps=12)
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_run(run)
    model, config, ds = load_run(run, check_data=False)  # evaluating other data on purpose
    assert ds.x_train.mean() > 2


def test_an_edited_data_seed_is_noticed(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"]["seed"] = 1
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="data settings .* differ"):
        load_run(run, load_data=False)
    with pytest.raises(CheckpointError, match="not those the run was trained on|differ"):
        train(run, resume=True, steps=12)


# ---------------------------------------------------------------------------------------- 6. signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_resuming_is_bit_exact(tmp_path, monkeypatch, signum):
    run = tmp_path / "run"
    real_draw = T._Trainer.draw_batch

    def signalled_at_7(self, step):
        if step == 7:
            os.kill(os.getpid(), signum)
        return real_draw(self, step)

    monkeypatch.setattr(T._Trainer, "draw_batch", signalled_at_7)
    cfg = _cfg(steps=20, checkpoint_every=100)
    with pytest.raises(TrainingInterrupted, match=f"stopped by {signal.Signals(signum).name} at step 7") as e:
        train(run, DATA, net=TINY, config=cfg)
    assert e.value.step == 7 and e.value.signum == signum
    _, meta = load_checkpoint(run / "checkpoint.safetensors")
    assert meta["step"] == 7
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back
    monkeypatch.setattr(T._Trainer, "draw_batch", real_draw)
    train(run, resume=True)
    train(tmp_path / "ref", DATA, net=TINY, config=cfg)
    a, _ = load_checkpoint(run / "checkpoint.safetensors")
    b, _ = load_checkpoint(tmp_path / "ref" / "checkpoint.safetensors")
    assert _tensors_equal(a, b)


def test_sigterm_from_a_scheduler_exits_143_with_a_message(tmp_path):
    run = tmp_path / "run"
    p = _popen(*TINY_TRAIN_ARGS, "--n", "2000", "--steps", "100000", "--log-every", "10", "--out", str(run))
    _wait_for(run / "metrics.jsonl", p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    step = int(re.search(r"stopped by SIGTERM at step (\d+) of 100000; checkpoint saved", err).group(1))
    assert "train --resume --out" in err
    _, meta = load_checkpoint(run / "checkpoint.safetensors")
    assert meta["step"] == step


# ---------------------------------------------------------------------------------------- 7. crafted files
def _recraft(run, **changes):
    tensors, meta = load_checkpoint(run / "checkpoint.safetensors")
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    meta.pop("sha256")
    meta.pop("format")
    save_checkpoint(run / "checkpoint.safetensors", tensors, meta)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"step": 10**12}, r"key 'step' must be <= 1000000000"),
        ({"step": 1e12}, r"key 'step' must be an integer, got float"),
        ({"step": -3}, r"key 'step' must be >= 0"),
        ({"step": 11}, r"key 'step' = 11 exceeds the run's 10 steps"),
        ({"optimizer": None}, r"optimiser state does not fit"),
        ({"train": "fast"}, r"key 'train' must be an object"),
    ],
)
def test_crafted_checkpoint_values_are_clear_errors(finished_run, tmp_path, capsys, change, message):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _recraft(run, **change)
    config_before = (run / "config.json").read_bytes()
    with pytest.raises(CheckpointError, match=message):
        train(run, resume=True, steps=12)
    assert (run / "config.json").read_bytes() == config_before  # a refused resume changes nothing
    if "step" in change:
        with pytest.raises(CheckpointError, match=message):
            load_run(run, load_data=False)


def test_a_checkpoint_without_sampler_state_is_a_clear_error(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    tensors, meta = load_checkpoint(run / "checkpoint.safetensors")
    tensors = {k: v for k, v in tensors.items() if not k.startswith("sampler.")}
    meta.pop("sha256")
    meta.pop("format")
    save_checkpoint(run / "checkpoint.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match="sampler state is missing"):
        train(run, resume=True, steps=12)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "seed", "abc", r"config.json: key 'train.seed' must be an integer, got str 'abc'"),
        ("train", "steps", -5, r"key 'train.steps' must be >= 1"),
        ("train", "steps", 1e12, r"key 'train.steps' must be an integer, got float"),
        ("train", "log_every", 0, r"key 'train.log_every' must be >= 1"),
        ("train", "lr", "fast", r"key 'train.lr' must be a number, got str"),
        ("train", "betas", [0.9], r"key 'train.betas' must be a list of two numbers"),
        ("train", "weighting", "l2", r"key 'train.weighting' must be one of \['elbo', 'simple'\]"),
        ("train", "precision", "fp8", r"key 'train.precision' must be one of"),
        ("train", "lam_min", 20.0, r"'train.lam_min' < 'train.lam_max' required"),
        ("data", "test_fraction", 2, r"key 'data.test_fraction' must be < 1"),
        ("data", "seed", "0", r"key 'data.seed' must be an integer"),
        ("net", "hidden", "wide", r"key 'net.hidden' must be an integer"),
        ("net", "shape", [2, 0], r"key 'net.shape' must be a non-empty list of positive integers"),
        ("train", "colour", "red", r"unknown keys \['train.colour'\]"),
    ],
)
def test_config_json_is_checked_against_its_schema(finished_run, tmp_path, capsys, section, key, value, message):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg[section][key] = value
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        read_config(run)
    assert main(["evaluate", str(run), "--n", "10"]) == errors.EXIT_DATA  # one line, no traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json" in err
    assert main(["train", "--resume", "--out", str(run)]) == errors.EXIT_DATA
    assert "config.json" in capsys.readouterr().err


def test_train_config_checks_types_in_the_api():
    with pytest.raises(ValueError, match=r"key 'train.seed' must be an integer, got str"):
        TrainConfig(seed="1", device="cpu").validate()
    with pytest.raises(ValueError, match=r"key 'train.checkpoint_every' must be >= 1"):
        TrainConfig(checkpoint_every=0, device="cpu").validate()


# ---------------------------------------------------------------------------------------- 8. permissions
def test_run_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        train(tmp_path / "run", DATA, net=TINY, config=_cfg())
    finally:
        os.umask(old)
    for name in ("config.json", "checkpoint.safetensors", "metrics.jsonl", LOCK_NAME):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name


# ---------------------------------------------------------------------------------------- 9. devices, precision
def test_devices_are_checked_and_backends_follow_them():
    assert D.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu0'"):
        D.resolve_device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda:0' is not available.*--device cpu"):
            D.resolve_device("cuda:0")
        assert TrainConfig().device == "cpu"
    assert D.backend_for("cuda:1") == "nccl" and D.backend_for("cpu") == "gloo"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_training_runs_and_resumes(tmp_path, precision):
    run = tmp_path / "run"
    cfg = _cfg(steps=10, precision=precision)
    res = train(run, DATA, net=TINY, config=cfg)
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    _, meta = load_checkpoint(run / "checkpoint.safetensors")
    assert meta["train"]["precision"] == precision
    assert ("grad_scaler" in meta) == (precision == "fp16")
    assert train(run, resume=True, steps=12).step == 12


def test_fp16_skips_overflowing_steps_then_reports_divergence(tmp_path):
    cfg = _cfg(steps=300, precision="fp16", lr=1e3, grad_clip=0.0, warmup=0, checkpoint_every=1000)
    with pytest.raises(TrainingDiverged, match=f"{T.FP16_SKIP_LIMIT} consecutive fp16 steps with non-finite") as e:
        train(tmp_path / "run", DATA, net=TINY, config=cfg)
    assert e.value.step < 300 and e.value.checkpoint_step is None  # stopped early; no checkpoint was due yet


def test_cli_device_and_precision_reach_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*TINY_TRAIN_ARGS, "--n", "400", "--steps", "3", "--device", "cpu", "--precision", "bf16"]
    assert main(["train", *args, "--out", str(run)]) == 0
    capsys.readouterr()
    cfg = read_config(run)
    assert cfg["train"]["device"] == "cpu" and cfg["train"]["precision"] == "bf16"


# ---------------------------------------------------------------------------------------- 10. load_run
def test_load_run_carries_the_training_range_and_warns_on_unfinished_runs(finished_run, tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finished run loads without a warning
        model, config, _ = load_run(finished_run, load_data=False, device="cpu")
    assert model.lam_range == (-10.0, 9.0) and config["finished"] and config["step"] == 10
    assert resolve_lam_range(model, None, None) == (-10.0, 9.0)  # what the estimators use by default
    run = tmp_path / "run"
    real_draw = T._Trainer.draw_batch

    def stop_at_4(self, step):
        if step == 4:
            self.signal = signal.SIGTERM
        return real_draw(self, step)

    monkeypatch.setattr(T._Trainer, "draw_batch", stop_at_4)
    with pytest.raises(TrainingInterrupted):
        train(run, DATA, net=TINY, config=_cfg())
    with pytest.warns(UnfinishedRunWarning, match="stopped at step 4 of 10"):
        _, config, _ = load_run(run, load_data=False)
    assert not config["finished"]


def test_load_run_uses_the_checkpoint_settings_after_an_extension(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    train(run, resume=True, steps=14)
    _, config, _ = load_run(run, load_data=False)
    assert config["step"] == 14 and config["train"]["steps"] == 14 and config["finished"]
    assert read_config(run)["train"]["steps"] == 14


# ---------------------------------------------------------------------------------------- 12. progress in logs
def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "PROGRESS_SECONDS", 0.0)
    train(tmp_path / "run", DATA, net=TINY, config=_cfg(steps=6))  # progress=None: capsys is not a terminal
    lines = [s for s in capsys.readouterr().err.splitlines() if s.startswith("train: step")]
    assert len(lines) == 6
    assert re.fullmatch(r"train: step 6/6 \(100%\), loss [-\d.e+]+, [\d.]+ steps/s, ETA 00:00:00", lines[-1])
    train(tmp_path / "quiet", DATA, net=TINY, config=_cfg(steps=6), progress=False)
    assert "train: step" not in capsys.readouterr().err


def _signalled_rank(rank: int, world: int, init: str, run: str, queue) -> None:
    """One of two gloo processes training the same run; only rank 1 receives SIGTERM, at step 5."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    real_draw = T._Trainer.draw_batch

    def draw(self, step):
        if step == 5 and rank == 1:
            self.signal = signal.SIGTERM
        return real_draw(self, step)

    T._Trainer.draw_batch = draw
    try:
        train(run, DATA, net=TINY, config=_cfg(steps=20, checkpoint_every=100), progress=False)
        queue.put((rank, "finished"))
    except TrainingInterrupted as e:
        queue.put((rank, e.step))
    finally:
        torch.distributed.destroy_process_group()


def test_a_signal_to_one_process_stops_all_processes_at_the_same_step(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'pg'}"
    procs = [ctx.Process(target=_signalled_rank, args=(r, 2, init, str(tmp_path / "run"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = dict(queue.get(timeout=5) for _ in range(2))
    assert got == {0: 5, 1: 5}
    _, meta = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["step"] == 5
