"""The README's set-up and quick-start sections stay true: every CLI command parses with the flags written, every
command states a time within the promised 3 minutes, and the Python quick start runs and gives the exact
log-density within its standard error."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from scoredensity.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _commands(title: str) -> list[tuple[str, str]]:
    """(command, comment) for each indented shell line of a README section."""
    out = []
    for line in _section(title).splitlines():
        if line.startswith("    ") and not line.startswith("     "):
            cmd, _, comment = line.strip().partition("   # ")
            out.append((cmd, comment))
    return out


def _scoredensity_argvs() -> list[list[str]]:
    argvs = []
    for title in ("Set-up", "Quick start (CLI)"):
        for cmd, _ in _commands(title):
            for part in cmd.split("&&"):
                argv = shlex.split(part)
                if argv and argv[0] == "scoredensity":
                    argvs.append(argv[1:])
    return argvs


def test_readme_lists_the_quickstart_commands():
    argvs = _scoredensity_argvs()
    names = {a[0] for a in argvs}
    assert len(argvs) >= 15
    assert {"demo", "train", "evaluate", "compare", "sample", "export", "certify", "classify", "gan"} <= names


@pytest.mark.parametrize("argv", _scoredensity_argvs(), ids=lambda a: " ".join(a)[:60])
def test_readme_cli_command_parses(argv):
    # a wrong flag or value exits with the parser's usage error (SystemExit) instead of returning the namespace
    args = build_parser().parse_args(argv)
    assert args.command == argv[0]


def test_readme_cli_commands_state_a_time_within_three_minutes():
    cmds = _commands("Quick start (CLI)")
    assert len(cmds) >= 15
    for cmd, comment in cmds:
        m = re.match(r"(\d+) s\b", comment)
        assert m, f"no measured time beside: {cmd}"
        assert int(m.group(1)) <= 180, f"over the promised 3 minutes: {cmd}"


def test_readme_python_quickstart_runs_and_matches_the_exact_density():
    m = re.search(r"```python\n(.*?)```", _section("Quick start (Python)"), re.S)
    assert m, "no python block in the Python quick start"
    threads = torch.get_num_threads()
    ns: dict = {}
    try:
        exec(compile(m.group(1), str(README), "exec"), ns)  # noqa: S102 - the README's own code
    finally:
        torch.set_num_threads(threads)
    gm, x, est = ns["gm"], ns["x"], ns["est"]
    exact = gm.log_prob(x).double()
    # the formula with the exact eps is unbiased: its mean lies within 4 standard errors of the exact mean
    assert abs(est.mean() - exact.mean().item()) < 4 * est.mean_stderr()
    # the three other estimators return per-example results on the same 50 points
    for name in ("ode", "div", "ddpm"):
        assert ns[name].logp.shape == (50,), name
    # the exact-trace ODE of the exact eps is exact up to solver tolerance (mean abs error per dim)
    assert (ns["ode"].logp.double() - exact[:50]).abs().mean().item() / x.shape[1] < 2e-3  # measured 4e-5
    # the divergence ELBO is unbiased for exact eps: within 4 standard errors of the exact mean
    div = ns["div"]
    assert abs(div.mean() - exact[:50].mean().item()) < 4 * div.mean_stderr()
    assert ns["samples"].shape == (1000, 16) and torch.isfinite(ns["samples"]).all()


def test_gan_and_certify_print_progress_lines_in_a_log(tmp_path, capsys):
    # under pytest stderr is not a terminal: like train and demo, both commands say what they do and when done,
    # and --json keeps stdout to one JSON object
    import json

    from scoredensity.cli import main

    gan = ["gan", "--steps", "3", "--batch", "16", "--n-samples", "50", "--threads", "1", "--json"]
    assert main([*gan, "--out", str(tmp_path / "g")]) == 0
    out, err = capsys.readouterr()
    json.loads(out)
    assert "gan: training 3 steps on ring8" in err and "gan: trained in" in err
    cert = ["certify", "--n", "60", "--steps", "10", "--variances", "fixed_large", "--n-init", "1", "--threads", "1"]
    assert main([*cert, "--json", "--out", str(tmp_path / "c")]) == 0
    out, err = capsys.readouterr()
    json.loads(out)
    assert "certify: 3 fits of K = 3 components to" in err and "certify: fits done in" in err


def test_an_unfinished_run_is_reported_once_in_one_line(tmp_path):
    # the CLI says "training did not finish" itself; the library's UnfinishedRunWarning (with its source line)
    # used to be printed as well
    from helpers import TINY_TRAIN_ARGS, run_module

    from scoredensity.train import KILL_ENV

    run = str(tmp_path / "run")
    args = [*TINY_TRAIN_ARGS, "--n", "300", "--steps", "30", "--checkpoint-every", "10"]
    r = run_module("scoredensity", "train", *args, "--out", run, env={KILL_ENV: "20", "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    r = run_module("scoredensity", "sample", run, "-n", "5", "--steps", "2", "--out", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("did not finish") == 1 and "UnfinishedRunWarning" not in r.stderr, r.stderr
    assert "checkpoint at step 20 of 30" in r.stderr, r.stderr
