"""The CLI's demo runs end to end and writes what it says."""

import json
import math

import pytest
import torch

from scoredensity.cli import main
from scoredensity.mixtures import mixture_preset


def test_demo_writes_table_and_png(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--n-grid", "20", "--n-samples", "200", "--steps", "150"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "density formula" in out.lower() or "Density formula" in out
    assert (tmp_path / "formula_density.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "formula_demo.json").read_text())
    rows = {r["points"]: r for r in summary["rows"]}
    # exact eps: the mean error over samples is within 4 standard errors of zero
    s = rows["samples"]
    assert abs(s["mean_err"]) < 4 * s["mean_err_stderr"]
    # the training part ran, was evaluated against the exact NLL, and the report links every picture
    t = json.loads((tmp_path / "training_demo.json").read_text())
    ev = t["eval"]
    assert t["steps"] == 150 and t["mixture"] == "blobs2d"
    # a bound: not below the exact NLL of the same points beyond noise (paired standard error)
    assert ev["gap"] == pytest.approx(ev["nll"] - ev["true_nll"]) and ev["gap"] > -4 * ev["gap_stderr"]
    # and it learned the mixture: it closes more than half of the way from the best single Gaussian
    # (cross-entropy = that Gaussian's entropy, 1 nat above the mixture's) to the exact NLL
    gm = mixture_preset("blobs2d")
    gauss_nll = 0.5 * float(torch.logdet(2 * math.pi * math.e * gm.covariance()))
    assert ev["gap"] < 0.5 * (gauss_nll - ev["true_nll"]) - 4 * ev["gap_stderr"], (ev["gap"], gauss_nll)
    report = (tmp_path / "report.md").read_text()
    for png in ("formula_density.png", "trained_density.png", "samples.png"):
        assert png in report and (tmp_path / png).stat().st_size > 1000
