"""A battery of bad inputs and faults: every one gives a non-zero exit code (the documented one where it is
fixed), exactly one error line on stderr that names the option or file, and no Python traceback.

In-process cases call ``scoredensity.cli.main``; a few run ``python -m scoredensity`` in a subprocess to check the
real exit path. Loader cases call the readers directly and check the one-line ``DataError``/``InputFileError``.
(Run-folder faults of the trainer - locks, resume, divergence, SIGTERM - are in test_run_faults.py.)
"""

from __future__ import annotations

import argparse
import errno
import gzip
import json
import os
import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN_ARGS, run_module

from scoredensity import errors
from scoredensity.cli import main
from scoredensity.data import DataError, load_dataset
from scoredensity.data.files import CIFAR10_FILES, CIFAR10_RECORD, MNIST_FILES, read_idx

pytestmark = pytest.mark.usefixtures("one_thread")

USAGE, DATA, IO = errors.EXIT_USAGE, errors.EXIT_DATA, errors.EXIT_IO


# ------------------------------------------------------------------------------------------------ helpers
def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)`` in-process: (exit code, stderr). argparse's own exits count as exit codes."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, code: int | None = None, names: str | None = None) -> str:
    """Non-zero exit (``code`` when given), exactly one ``error:`` line on stderr, no traceback; returns the line."""
    assert rc != 0, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error:" in ln]
    assert len(errs) == 1, err
    assert lines[-1] == errs[0], err  # the error is the last thing said
    if code is not None:
        assert rc == code, (rc, err)
    if names is not None:
        assert names in errs[0], (names, errs[0])
    return errs[0]


def assert_one_line(e: BaseException, names: str) -> None:
    msg = str(e)
    assert "\n" not in msg and names in msg, msg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny trained ring8 run (2 steps), shared read-only; crafted variants are copies."""
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(["train", *TINY_TRAIN_ARGS, "--steps", "2", "--n", "300", "--out", str(out)]) == 0
    return out


def crafted_copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "crafted"
    shutil.copytree(run_dir, dst)
    return dst


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` greyscale pixels (valid CRCs), with a tiny data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def idx_bytes(dims: tuple[int, ...], data: bytes = b"", code: int = 0x08) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims) + data


# ------------------------------------------------------------------------------------------------ usage (exit 2)
USAGE_CASES = {
    "compare --n 0": (["compare", "--n", "0"], "--n"),
    "compare --n x": (["compare", "--n", "x"], "--n"),
    "compare unknown preset": (["compare", "--preset", "nosuch", "--n", "3"], "nosuch"),
    "compare run and preset": (["compare", "somedir", "--preset", "ring8"], "--preset"),
    "compare --device tpu": (["compare", "--device", "tpu"], "--device"),
    "compare --device cuda:99": (["compare", "--device", "cuda:99"], "--device"),
    "compare --max-batch 0": (["compare", "--max-batch", "0", "--n", "3"], "--max-batch"),
    "compare --precision fp8": (["compare", "--precision", "fp8"], "--precision"),
    "compare --threads -1": (["compare", "--threads", "-1", "--n", "3"], "--threads"),
    "compare --level": (["compare", "--level", "huge"], "--level"),
    "sample -n 0": (["sample", "--out", "{tmp}/s", "-n", "0"], "-n"),
    "sample --steps 0": (["sample", "--out", "{tmp}/s", "--steps", "0", "-n", "5"], "--steps"),
    "sample --sampler": (["sample", "--out", "{tmp}/s", "--sampler", "magic"], "--sampler"),
    "sample without --out": (["sample"], "--out"),
    "certify --k 0": (["certify", "--k", "0", "--out", "{tmp}/c"], "--k"),
    "certify --steps 1": (["certify", "--steps", "1", "--out", "{tmp}/c"], "--steps"),
    "certify --n 0": (["certify", "--n", "0", "--out", "{tmp}/c"], "--n"),
    "export --steps 0": (["export", "{tmp}/run", "--out", "{tmp}/p", "--steps", "0"], "--steps"),
    "export --steps 5": (["export", "{tmp}/run", "--out", "{tmp}/p", "--steps", "5"], "--steps"),
    "classify --n 0": (["classify", "{tmp}/run", "--n", "0"], "--n"),
    "classify --budget 0": (["classify", "{tmp}/run", "--budget", "0"], "--budget"),
    "gan --steps 0": (["gan", "--steps", "0", "--out", "{tmp}/g"], "--steps"),
    "gan unknown preset": (["gan", "--preset", "nosuch", "--steps", "1", "--out", "{tmp}/g"], "nosuch"),
    "demo --n-grid 1": (["demo", "--n-grid", "1", "--out", "{tmp}/d"], "--n-grid"),
    "demo --seconds 0": (["demo", "--seconds", "0", "--out", "{tmp}/d"], "--seconds"),
    "demo --threads -2": (["demo", "--threads", "-2", "--out", "{tmp}/d"], "--threads"),
    "unknown command": (["frobnicate"], "frobnicate"),
    "no command": ([], "COMMAND"),
}


@pytest.mark.parametrize("argv,names", list(USAGE_CASES.values()), ids=list(USAGE_CASES))
def test_usage_errors_are_one_line_with_exit_2(argv, names, tmp_path, capsys):
    rc, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert_one_line_error(rc, err, USAGE, names)


# ---------------------------------------------------------------------------------- missing or crafted inputs (exit 3)
def test_missing_run_folder(tmp_path, capsys):
    for cmd in (["export", tmp_path / "nope", "--out", tmp_path / "p"], ["classify", tmp_path / "nope"]):
        assert_one_line_error(*run_cli(cmd, capsys), DATA, "nope")


def test_run_folder_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert_one_line_error(*run_cli(["compare", tmp_path / "f", "--n", "3"], capsys), DATA, str(tmp_path / "f"))


@pytest.mark.parametrize(
    "content",
    ["[1, 2]", "{not json", '{"data": {}, "net": {}, "train": {}}', '{"data": {"name": "ring8"}, "net": 3}'],
    ids=["list", "not-json", "empty-sections", "wrong-types"],
)
def test_crafted_config_is_one_line(content, run_dir, tmp_path, capsys):
    run = crafted_copy(run_dir, tmp_path)
    (run / "config.json").write_text(content)
    assert_one_line_error(*run_cli(["compare", run, "--n", "3", "--level", "quick"], capsys), DATA, str(run))


def test_config_missing_a_key_the_loader_needs(run_dir, tmp_path, capsys):
    run = crafted_copy(run_dir, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    cfg["net"] = {"type": "mlp"}  # a crafted network section: sizes missing
    (run / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run_cli(["compare", run, "--n", "3", "--level", "quick"], capsys), DATA, str(run))


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_damaged_checkpoint_is_one_line(damage, run_dir, tmp_path, capsys):
    run = crafted_copy(run_dir, tmp_path)
    ck = run / "checkpoint.safetensors"
    raw = ck.read_bytes()
    ck.write_bytes({"truncated": raw[: len(raw) // 2], "random": os.urandom(4096), "empty": b""}[damage])
    assert_one_line_error(*run_cli(["compare", run, "--n", "3", "--level", "quick"], capsys), DATA)


def test_metrics_with_non_object_lines(run_dir, tmp_path, capsys):
    run = crafted_copy(run_dir, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n3\nnot json\n")
    rc, err = run_cli(["train", "--resume", "--out", run, "--steps", "3", "--no-progress"], capsys)
    assert "Traceback" not in err
    if rc != 0:  # refusing the file is fine, as one line; resuming past the foreign lines is fine too
        assert_one_line_error(rc, err, names="metrics.jsonl")


@pytest.mark.parametrize("kind", ["missing", "random", "pickle"])
def test_certify_bad_npy(kind, tmp_path, capsys):
    p = tmp_path / "pts.npy"
    if kind == "random":
        p.write_bytes(os.urandom(512))
    elif kind == "pickle":
        p.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    line = assert_one_line_error(*run_cli(["certify", "--data", p, "--out", tmp_path / "c"], capsys), DATA, "pts.npy")
    assert "pickled" not in line or kind == "pickle"


# ------------------------------------------------------------------------------------------------ I/O (exit 4)
def test_out_is_an_existing_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    cases = [
        ["sample", "--out", f, "-n", "5", "--steps", "2"],
        ["compare", "--out", f, "--n", "3", "--level", "quick"],
        ["export", tmp_path / "run", "--out", f],
        ["gan", "--steps", "1", "--n-samples", "10", "--out", f],
    ]
    for argv in cases:
        assert_one_line_error(*run_cli(argv, capsys), IO, str(f))


def test_out_under_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    line = assert_one_line_error(*run_cli(["sample", "--out", f / "sub", "-n", "5", "--steps", "2"], capsys), IO)
    assert "file" in line and "not a folder" in line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_parent(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = assert_one_line_error(*run_cli(["sample", "--out", ro / "o", "-n", "5", "--steps", "2"], capsys), IO)
        assert "permission denied" in line
    finally:
        ro.chmod(0o700)


def test_full_disk(tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "s" / "samples.npy"))

    monkeypatch.setattr(np, "save", full)
    line = assert_one_line_error(*run_cli(["sample", "--out", tmp_path / "s", "-n", "5", "--steps", "2"], capsys), IO)
    assert "no space left on device" in line and "samples.npy" in line


# ------------------------------------------------------------------------------------------------ exit-code classes
@pytest.mark.parametrize(
    "exc,code",
    [
        (errors.DivergenceError("non-finite loss at step 12; last good checkpoint kept at step 10"), 5),
        (errors.RunBusyError("run folder R is locked by process 123"), 6),
        (errors.Interrupted("checkpoint saved at step 40", signum=15), 143),
        (KeyboardInterrupt(), 130),
        (KeyError("step"), DATA),
        (ZeroDivisionError("division by zero"), USAGE),
        (AttributeError("'list' object has no attribute 'get'"), errors.EXIT_INTERNAL),
        (RuntimeError("line one\nline two"), USAGE),
    ],
    ids=["divergence", "busy", "sigterm", "sigint", "keyerror", "zerodiv", "internal", "multiline"],
)
def test_every_exception_class_is_one_line_with_its_exit_code(exc, code, capsys, monkeypatch):
    import scoredensity.commands.compare as compare

    def boom(args):
        raise exc

    monkeypatch.setattr(compare, "run", boom)
    rc, err = run_cli(["compare"], capsys)
    assert rc == code
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.strip()]) == 1, err


def _minimal_argv(sub: argparse.ArgumentParser, name: str) -> list[str]:
    """``name`` plus placeholder values for the sub-command's required options and positionals."""
    argv = [name]
    for a in sub._actions:
        if a.option_strings and not a.required:
            continue
        if not a.option_strings and a.nargs in ("?", "*", argparse.SUPPRESS):
            continue
        value = str(next(iter(a.choices))) if a.choices else "1" if a.type in (int, float) else "placeholder"
        argv += ([a.option_strings[0]] if a.option_strings else []) + [value]
    return argv


@pytest.mark.parametrize(
    "exc,code",
    [
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/runs/r/metrics.jsonl"), IO),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), "/runs/r/metrics.jsonl"), IO),
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/r/metrics.jsonl"), IO),
    ],
    ids=["permission", "read-only", "full"],
)
def test_every_command_reports_an_os_error_as_one_line_naming_the_file(exc, code, capsys, monkeypatch):
    import scoredensity.cli as cli

    def boom(args):
        raise exc

    names = []
    for mod in cli._command_modules():
        monkeypatch.setattr(mod, "run", boom)
        names.append(mod.NAME)
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"train", "evaluate", "sample", "export", "compare", "certify", "classify", "demo", "gan"} <= set(names)
    for name in names:
        line = assert_one_line_error(*run_cli(_minimal_argv(subs[name], name), capsys), code, "metrics.jsonl")
        assert f"scoredensity {name}: error: /runs/r/metrics.jsonl: " in line, line


def test_float64_data_beyond_float32_are_rejected_by_every_loader_and_command(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(400, 2))
    path = tmp_path / "data.npy"
    np.save(path, x)
    train_argv = ["train", *TINY_TRAIN_ARGS, "--data", path, "--steps", "2", "--n", "300", "--out", tmp_path / "run"]
    assert run_cli(train_argv, capsys)[0] == 0
    x[[5, 41], 1] = [1e39, -1e300]  # finite in float64, infinite in float32
    np.save(path, x)
    with pytest.raises(DataError, match=r"data.npy: x has values beyond the float32 range .* rows \[5, 41\]"):
        load_dataset(str(path))
    for argv in (
        ["evaluate", tmp_path / "run", "--n", "10"],  # the run's data file now holds such values
        ["train", *TINY_TRAIN_ARGS, "--data", path, "--out", tmp_path / "run2"],
    ):
        line = assert_one_line_error(*run_cli(argv, capsys), DATA, "data.npy")
        assert "float32 range" in line
    assert not (tmp_path / "run2").exists()


def test_debug_shows_the_traceback(capsys, monkeypatch):
    import scoredensity.commands.compare as compare

    def boom(args):
        raise AttributeError("a bug")

    monkeypatch.setattr(compare, "run", boom)
    rc, err = run_cli(["compare", "--debug"], capsys)
    assert rc == errors.EXIT_INTERNAL and "Traceback" in err and "AttributeError: a bug" in err
    rc, err = run_cli(["compare"], capsys)  # without --debug: one line that says how to get the traceback
    assert rc == errors.EXIT_INTERNAL and "Traceback" not in err and err.rstrip().endswith("--debug and report it)")


# -------------------------------------------------------------------------------------------- hostile files: loaders
def test_idx_gzip_bomb_with_trailing_data_stops_early(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(p, "wb") as f:
        f.write(idx_bytes((2, 3, 3), bytes(18)))
        for _ in range(64):  # 64 MiB of zeros behind a header that promises 18 bytes
            f.write(bytes(1 << 20))
    assert p.stat().st_size < 1 << 20
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert_one_line(e.value, "trailing bytes")


def test_idx_header_over_the_size_limit_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setenv("SCOREDENSITY_MAX_BYTES", "1000000")
    p = tmp_path / "x.idx"
    p.write_bytes(idx_bytes((60000, 28, 28)))
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert_one_line(e.value, "over the 1000000-byte limit")


def test_idx_gzip_that_cannot_hold_its_header_size(tmp_path):
    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as f:
        f.write(idx_bytes((100000, 100, 100), bytes(100)))
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert_one_line(e.value, "cannot hold")


@pytest.mark.parametrize(
    "raw,names",
    [(b"\x01\x02\x03\x04", "not an idx file"), (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]), "unknown idx type code")],
    ids=["magic", "type-code"],
)
def test_idx_bad_headers(raw, names, tmp_path):
    p = tmp_path / "x.idx"
    p.write_bytes(raw)
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert_one_line(e.value, names)


def test_mnist_gzip_bomb_through_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("SCOREDENSITY_MAX_BYTES", str(10**6))
    for key, fname in MNIST_FILES.items():
        dims = (3, 28, 28) if key.startswith("x") else (3,)
        with gzip.open(tmp_path / (fname + ".gz"), "wb") as f:
            f.write(idx_bytes(dims, bytes(int(np.prod(dims)))))
    with gzip.open(tmp_path / (MNIST_FILES["x_train"] + ".gz"), "wb") as f:
        f.write(idx_bytes((60000 * 80, 28, 28)))
    with pytest.raises(DataError) as e:
        load_dataset("mnist", root=tmp_path)
    assert_one_line(e.value, "train-images-idx3-ubyte.gz")


def _cifar(folder: Path, counts: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for fname in CIFAR10_FILES:
        n = counts.get(fname, 3)
        rec = rng.integers(0, 256, (n, CIFAR10_RECORD), dtype=np.uint8)
        rec[:, 0] %= 10
        (folder / fname).write_bytes(rec.tobytes())


def test_cifar_batch_cut_at_a_record_boundary(tmp_path):
    _cifar(tmp_path, {"data_batch_3.bin": 2})
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=tmp_path)
    assert_one_line(e.value, "data_batch_3.bin (2)")


def test_npy_of_random_bytes_is_named_as_such(tmp_path):
    p = tmp_path / "r.npy"
    p.write_bytes(np.random.default_rng(1).integers(1, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as e:
        load_dataset(str(p))
    assert_one_line(e.value, "is not a numpy .npy/.npz file")
    assert "pickle" not in str(e.value)


@pytest.mark.parametrize(
    "write,names",
    [
        (lambda p: p.write_bytes(pickle.dumps([1, 2, 3], protocol=4)), "is a Python pickle"),
        (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "holds Python objects"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(gzip.compress(b"\x93NUMPY")), "gzip"),
    ],
    ids=["pickle", "object-array", "empty", "gzipped"],
)
def test_npy_that_is_not_numeric(write, names, tmp_path):
    p = tmp_path / "a.npy"
    write(p)
    with pytest.raises(DataError) as e:
        load_dataset(str(p))
    assert_one_line(e.value, names)


def test_npy_header_claiming_a_huge_array(tmp_path, monkeypatch):
    p = tmp_path / "h.npy"
    with open(p, "wb") as f:  # a valid header that promises 72 GB, then 64 bytes
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**9, 9)})
        f.write(bytes(64))
    with pytest.raises(DataError) as e:
        load_dataset(str(p))
    assert_one_line(e.value, "h.npy: header says shape (1000000000, 9)")


def test_npz_member_truncated(tmp_path):
    import zipfile

    p = tmp_path / "m.npz"
    arr = tmp_path / "x.npy"
    np.save(arr, np.zeros((100, 4)))
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.npy", arr.read_bytes()[:-64])
    with pytest.raises(DataError) as e:
        load_dataset(str(p))
    assert_one_line(e.value, "m.npz[x]: cannot read: truncated")


def test_png_decompression_bomb(tmp_path):
    png_claiming(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path))
    assert_one_line(e.value, "bomb.png: image too large to decode safely")


def test_png_just_over_the_warning_size(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("L", (40, 40)).save(tmp_path / "w.png")  # 1600 pixels: Pillow only warns between 1x and 2x
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path))
    assert_one_line(e.value, "w.png: image too large")


def test_corrupt_png(tmp_path):
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path))
    assert_one_line(e.value, "c.png: cannot read as an image")


# ------------------------------------------------------------------------------------------------ diffusers folders
@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    import diffusers
    from helpers import tiny_unet

    path = tmp_path_factory.mktemp("pipe") / "pipe"
    sched = diffusers.DDPMScheduler(num_train_timesteps=100)
    diffusers.DDPMPipeline(unet=tiny_unet(perturb=False), scheduler=sched).save_pretrained(path)
    return path


def _pipe_copy(pipe_dir: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "pipe"
    shutil.copytree(pipe_dir, dst)
    return dst


def test_diffusers_model_is_frozen_and_in_eval_mode(pipe_dir):
    from scoredensity import load_diffusers_eps

    eps = load_diffusers_eps(pipe_dir)
    assert not eps.model.training
    assert all(not p.requires_grad for p in eps.model.parameters())


@pytest.mark.parametrize("damage", ["truncated", "garbage-header", "pickle-bin-only", "empty"])
def test_damaged_diffusers_weights(damage, pipe_dir, tmp_path):
    from scoredensity import load_diffusers_eps

    pipe = _pipe_copy(pipe_dir, tmp_path)
    w = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    raw = w.read_bytes()
    if damage == "truncated":
        w.write_bytes(raw[: len(raw) - 1000])
    elif damage == "garbage-header":
        w.write_bytes(struct.pack("<Q", 40) + b"{" * 40 + raw[48:])
    elif damage == "empty":
        w.write_bytes(b"")
    else:
        w.unlink()
        torch.save({"w": torch.zeros(2)}, pipe / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(errors.InputFileError) as e:
        load_diffusers_eps(pipe)
    assert_one_line(e.value, "diffusion_pytorch_model")


def test_diffusers_index_not_json(pipe_dir, tmp_path):
    from scoredensity import load_diffusers_eps

    pipe = _pipe_copy(pipe_dir, tmp_path)
    (pipe / "model_index.json").write_text("{oops")
    with pytest.raises(ValueError) as e:
        load_diffusers_eps(pipe)
    assert_one_line(e.value, "model_index.json")


def test_cli_evaluate_truncated_diffusers_weights(pipe_dir, tmp_path, capsys):
    pipe = _pipe_copy(pipe_dir, tmp_path)
    w = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    np.savez(tmp_path / "imgs.npz", x=np.zeros((4, 1, 8, 8), dtype=np.uint8))
    rc, err = run_cli(["evaluate", "--diffusers", pipe, "--images", tmp_path / "imgs.npz"], capsys)
    assert_one_line_error(rc, err, DATA, "diffusion_pytorch_model.safetensors")


# ------------------------------------------------------------------------------------------------ subprocesses
SUBPROCESS_CASES = {
    "usage": (["compare", "--n", "0"], USAGE, "--n"),
    "device": (["sample", "--device", "cuda:99", "--out", "{tmp}/s"], USAGE, "--device"),
    "export-steps": (["export", "{tmp}/run", "--out", "{tmp}/p", "--steps", "0"], USAGE, "--steps"),
    "out-is-file": (["sample", "--out", "{tmp}/file", "-n", "3", "--steps", "2"], IO, "file"),
    "png-bomb": (["train", "--data", "{tmp}/imgs", "--out", "{tmp}/r", "--steps", "1"], DATA, "bomb.png"),
}


@pytest.mark.parametrize("argv,code,names", list(SUBPROCESS_CASES.values()), ids=list(SUBPROCESS_CASES))
def test_real_process_exit_codes(argv, code, names, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "imgs").mkdir()
    png_claiming(tmp_path / "imgs" / "bomb.png", 20000, 20000)
    r = run_module("scoredensity", *[a.replace("{tmp}", str(tmp_path)) for a in argv], env={"OMP_NUM_THREADS": "1"})
    assert_one_line_error(r.returncode, r.stderr, code, names)


# ------------------------------------------------------------------------------------------------ docs and exports
def test_failure_doc_lists_exactly_the_exit_codes_of_errors_py():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "failure.md").read_text()
    table = doc[doc.index("## Exit codes") :]
    codes = [int(m) for m in re.findall(r"^\| (\d+) \|", table, flags=re.M)]
    assert codes == sorted(errors.EXIT_CODES), codes


def test_named_errors_are_exported_with_their_exit_codes():
    import scoredensity as sd

    cases = {
        sd.UsageError("x"): errors.EXIT_USAGE,
        sd.DataError("x"): DATA,
        sd.CheckpointError("x"): DATA,
        sd.RunFolderIOError("x"): IO,
        sd.TrainingDiverged("x", 3, 2): errors.EXIT_DIVERGED,
        sd.RunLockedError("x"): errors.EXIT_BUSY,
        sd.TrainingInterrupted("x", 15, 7): errors.EXIT_SIGTERM,
        sd.TrainingInterrupted("x", 2, 7): errors.EXIT_SIGINT,
    }
    for exc, code in cases.items():
        assert sd.exit_code_for(exc) == code, exc
    assert isinstance(sd.RunLockedError("x"), sd.RunBusyError | sd.CheckpointError)
    assert isinstance(sd.TrainingDiverged("x", 3, 2), sd.DivergenceError | RuntimeError)
    assert issubclass(sd.TrainingInterrupted, sd.Interrupted) and issubclass(sd.UnfinishedRunWarning, UserWarning)
    assert sd.get_convention("ddpm") is sd.CONVENTIONS["ddpm"] and isinstance(sd.CONVENTIONS["ddpm"], sd.Convention)
    assert callable(sd.fit_step_proposal) and sd.StepProposal.__name__ == "StepProposal"
    from scoredensity import rng

    assert sd.rng is rng
