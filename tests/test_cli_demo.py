"""The CLI's demo runs end to end and writes what it says."""

import json

from scoredensity.cli import main


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
    assert t["steps"] == 150 and abs(t["eval"]["nll"] - t["eval"]["true_nll"]) < 5.0
    report = (tmp_path / "report.md").read_text()
    for png in ("formula_density.png", "trained_density.png", "samples.png"):
        assert png in report and (tmp_path / png).stat().st_size > 1000
