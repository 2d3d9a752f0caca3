"""Two gloo processes (torchrun) with the same global batch end with the weights of one process."""

import os
import subprocess
import sys

from scoredensity.checkpoint import load_checkpoint

ARGS = [
    "--data",
    "ring8",
    "--num-examples",
    "3000",
    "--steps",
    "100",
    "--batch-size",
    "64",
    "--hidden",
    "32",
    "--blocks",
    "1",
    "--eval-n",
    "0",
    "--threads",
    "1",
    "--no-progress",
    "--checkpoint-every",
    "100",
]


def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run(
        [sys.executable, "-m", "scoredensity", "train", *ARGS, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "scoredensity",
            "train",
            *ARGS,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    t1, m1 = load_checkpoint(tmp_path / "one" / "checkpoint.safetensors")
    t2, m2 = load_checkpoint(tmp_path / "two" / "checkpoint.safetensors")
    assert m1["step"] == m2["step"] == 100
    worst = 0.0
    for k in t1:
        if k.startswith(("model.", "ema.")):
            worst = max(worst, float((t1[k].double() - t2[k].double()).abs().max()))
    print("max abs weight difference:", worst)
    assert worst < 1e-5, worst
    moved = float((t1["model.out.weight"]).abs().max())
    assert moved > 1e-3  # the weights did change over 100 steps
