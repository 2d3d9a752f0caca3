"""``scoredensity demo``: the main job on the embedded default mixture."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "demo"
HELP = "Run the density formula (and training, when available) on the embedded default 2-D mixture."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-grid", type=int, default=60, help="grid points per axis for the density image")
    p.add_argument("--n-samples", type=int, default=1000, help="test samples from the mixture")


def run(args: argparse.Namespace) -> int:
    from ..demo import format_table, formula_demo

    out = Path(args.out)
    summary = formula_demo(out, n_grid=args.n_grid, n_samples=args.n_samples, seed=args.seed)
    print(f"Density formula with the exact eps of the '{summary['mixture']}' mixture vs its exact log-density")
    cols = [
        ("points", "points", "s"),
        ("n", "n", "d"),
        ("mean_err", "mean error (nats)", ".4f"),
        ("mean_abs_err", "mean abs error", ".4f"),
        ("mean_stderr", "mean stderr", ".4f"),
        ("max_abs_z", "max abs z-score", ".2f"),
        ("nfe", "nfe/example", ".1f"),
        ("seconds", "seconds", ".2f"),
    ]
    print(format_table(summary["rows"], cols))
    print(f"wrote {out / 'formula_density.png'} and {out / 'formula_demo.json'}")
    return 0
