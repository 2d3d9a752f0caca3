"""Two gloo processes (torchrun) with the same global batch end with the weights of one process."""

from helpers import TINY_TRAIN_ARGS, run_module

from scoredensity.checkpoint import load_checkpoint

ARGS = [*TINY_TRAIN_ARGS, "--num-examples", "3000", "--steps", "100", "--checkpoint-every", "100"]


def test_two_processes_match_one(tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    one = run_module("scoredensity", "train", *ARGS, "--out", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr
    two = run_module(
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
        env=env,
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
