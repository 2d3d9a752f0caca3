"""The pieces every command shares: devices, threads, precision pass-through, output folders, exit codes, the
demo's log lines, and the GAN summary that counts what its picture draws."""

from __future__ import annotations

import argparse
import errno

import pytest
import torch

from scoredensity import errors
from scoredensity.cli import main
from scoredensity.commands import _common as C


def test_resolve_device_accepts_cpu_and_refuses_what_is_not_there():
    assert C.resolve_device("cpu") == torch.device("cpu")
    assert C.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cpu:1", "cuda:x", ""):
        with pytest.raises(errors.UsageError, match="--device must be cpu, cuda, cuda:N or mps"):
            C.resolve_device(bad)
    with pytest.raises(errors.UsageError, match="--device cuda:99"):
        C.resolve_device("cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(errors.UsageError, match="CUDA is not available"):
            C.resolve_device("cuda")


def test_device_arguments_and_estimator_options():
    p = argparse.ArgumentParser()
    C.add_device_arguments(p)
    a = p.parse_args(["--device", "cpu", "--precision", "bf16", "--max-batch", "64"])
    assert C.estimator_options(a) == {"precision": "bf16", "max_batch": 64}
    assert C.estimator_options(p.parse_args([])) == {"precision": "fp32"}
    with pytest.raises(errors.UsageError, match="--max-batch must be >= 1"):
        C.estimator_options(p.parse_args(["--max-batch", "0"]))


def test_thread_defaults(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert C.default_threads("small") == 1
    assert 1 <= C.default_threads("unet") <= 4
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert C.default_threads("small") is None  # torch already follows OMP_NUM_THREADS: leave it alone
    n = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert C.apply_threads(argparse.Namespace(threads=None), "small") == 1
        assert C.apply_threads(argparse.Namespace(threads=2), "small") == 2  # an explicit --threads wins
        with pytest.raises(errors.UsageError, match="--threads"):
            C.apply_threads(argparse.Namespace(threads=-1))
    finally:
        torch.set_num_threads(n)


def test_supported_kwargs_drops_and_says_so(capsys):
    def f(x, *, precision="fp32"):
        return x

    assert C.supported_kwargs(f, {"precision": "bf16", "max_batch": None}, "f") == {"precision": "bf16"}
    assert capsys.readouterr().err == ""  # max_batch None is the default: nothing to say
    assert C.supported_kwargs(f, {"max_batch": 8}, "f") == {}
    assert "f does not take --max-batch" in capsys.readouterr().err


def test_with_precision_autocasts_the_network_only():
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    seen = []

    def eps(x, t):
        out = net(x)
        seen.append(out.dtype)
        return out

    x = torch.randn(5, 3)
    t = torch.full((5,), 0.5, dtype=torch.float64)
    assert C.with_precision(eps, "fp32") is eps
    out = C.with_precision(eps, "bf16")(x, t)
    assert seen[-1] == torch.bfloat16 and out.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(out, net(x), atol=0.05)  # bf16 keeps ~3 significant digits


def test_prepare_out_dir(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(FileExistsError) as e:
        C.prepare_out_dir(f)
    assert errors.exit_code_for(e.value) == errors.EXIT_IO and str(f) in errors.one_line(e.value)
    with pytest.raises(NotADirectoryError) as e:
        C.prepare_out_dir(f / "sub")
    assert errors.exit_code_for(e.value) == errors.EXIT_IO
    assert C.prepare_out_dir(tmp_path / "a" / "b").is_dir()


def test_exit_codes_and_one_line_messages():
    assert errors.exit_code_for(OSError(errno.ENOSPC, "No space left on device", "/x/ck")) == errors.EXIT_IO
    assert (
        errors.one_line(OSError(errno.ENOSPC, "No space left on device", "/x/ck")) == "/x/ck: no space left on device"
    )
    assert errors.one_line(PermissionError(errno.EACCES, "Permission denied", "/r")) == "/r: permission denied"
    assert errors.exit_code_for(FileNotFoundError("gone")) == errors.EXIT_DATA
    assert errors.exit_code_for(errors.DivergenceError("nan")) == 5
    assert errors.exit_code_for(errors.Interrupted("saved", 15)) == 143
    assert errors.one_line(ValueError("a\n  b")) == "a b"
    assert errors.one_line(KeyError("step")) == "missing key 'step'"

    class Own(Exception):
        exit_code = 7

    assert errors.exit_code_for(Own()) == 7


def test_help_documents_exit_codes_and_threads(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "exit codes:" in out and "3 data or checkpoint error" in out and "OMP_NUM_THREADS" in out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--threads" in out and "OMP_NUM_THREADS" in out and "--device" in out


def test_demo_prints_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    rc = main(["demo", "--no-train", "--n-grid", "8", "--n-samples", "50", "--out", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    err = capsys.readouterr().err  # captured: not a terminal
    lines = [ln for ln in err.splitlines() if ln.startswith("demo: ")]
    assert len(lines) >= 4 and "1 thread(s)" in lines[0] and lines[-1].startswith("demo: done in")
    assert "\r" not in err  # no progress bars in a log


def test_gan_summary_counts_what_the_picture_draws():
    from scoredensity.apps.gan import gan_metrics
    from scoredensity.commands.gan import mode_counts
    from scoredensity.mixtures import mixture_preset

    mix = mixture_preset("ring8")
    g = torch.Generator().manual_seed(3)
    # a collapsed generator: half the modes, plus far-away junk
    x = torch.cat([mix.sample(400, generator=g)[:200], torch.randn(50, 2, generator=g) * 0.1 + 20])
    keep = torch.cdist(x, mix.means).argmin(1) % 2 == 0
    x = torch.cat([x[:200][keep[:200]], x[200:]])
    counts, radii = mode_counts(x, mix)
    m = gan_metrics(x, mix)
    assert float((counts >= 1).sum()) == m["modes_covered"] == 4
    assert float(counts.sum()) / len(x) == pytest.approx(m["high_quality"])
    assert radii.shape == (8,) and (radii > 0).all()
