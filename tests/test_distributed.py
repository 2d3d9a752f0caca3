"""Two gloo processes (torchrun) with the same global batch end with the weights of one process, and the final
held-out evaluation (shared out over the processes) gives the figures of one process."""

import json

from helpers import TINY_TRAIN_ARGS, run_module

from scoredensity.checkpoint import load_checkpoint

ARGS = [*TINY_TRAIN_ARGS, "--num-examples", "3000", "--steps", "100", "--checkpoint-every", "100", "--eval-n", "301"]


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
    # the final evaluation: every process evaluates its share (301 examples: unequal shares), rank 0 writes it
    e1, e2 = _final_eval(tmp_path / "one"), _final_eval(tmp_path / "two")
    assert e1["n"] == e2["n"] == 301 and e1["world_size"] == 1 and e2["world_size"] == 2
    # the same draws on weights that differ by `worst`: the figures agree far inside the estimator's own error
    print("nll difference:", e1["nll"] - e2["nll"], "estimator stderr:", e1["estimator_stderr"])
    assert abs(e1["nll"] - e2["nll"]) < 0.01 * e1["estimator_stderr"]
    assert abs(e1["true_nll"] - e2["true_nll"]) < 1e-9  # the same test points


def _final_eval(run) -> dict:
    recs = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in recs if "eval" in r]
    assert len(evals) == 1 and [r["step"] for r in recs if "eval" in r] == [100]
    return evals[0]
