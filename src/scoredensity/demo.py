"""``scoredensity demo``: the main job on an embedded default.

Part 1 (exact score): the density formula with the exact ``eps`` of the embedded 2-D mixture
(``blobs2d``) against its exact ``log_prob`` at a grid and at samples; a table and a PNG of the exact and
estimated densities side by side. Later parts (training) extend the report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .formula import log_density
from .mixtures import mixture_preset
from .plots import density_grid, save_density_comparison

__all__ = ["formula_demo", "format_table"]

DEFAULT_MIXTURE = "blobs2d"


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Render rows as a markdown table; ``columns`` are ``(key, header, format)``."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| " + " | ".join(("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns) + " |" for r in rows
    ]
    return "\n".join([head, sep, *body])


def formula_demo(
    out_dir: str | Path, *, n_grid: int = 60, n_samples: int = 1000, n_t: int = 128, seed: int = 0
) -> dict:
    """Density formula with the exact eps vs the exact density, at a grid and at samples.

    Writes ``formula_density.png`` and ``formula_demo.json`` into ``out_dir``; returns the summary
    (per point set: mean error, mean |error|, max |error| / stderr, mean stderr, nfe, seconds).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gm = mixture_preset(DEFAULT_MIXTURE)
    xs, _, grid = density_grid(-3.5, 3.5, n_grid)
    sets = {
        "grid": torch.as_tensor(grid, dtype=torch.float32),
        "samples": gm.sample(n_samples, generator=torch.Generator().manual_seed(seed)).float(),
    }
    rows, results = [], {}
    for name, x in sets.items():
        t0 = time.perf_counter()
        est = log_density(gm.eps, x, n_t=n_t, seed=seed, progress=True)
        sec = time.perf_counter() - t0
        exact = gm.log_prob(x)
        err = est.logp - exact
        zs = err / est.stderr
        row = {
            "points": name,
            "n": len(x),
            "mean_err": float(err.mean()),
            "mean_err_stderr": est.mean_stderr(),
            "mean_abs_err": float(err.abs().mean()),
            "mean_stderr": float(est.stderr.mean()),
            "max_abs_z": float(zs.abs().max()),
            "frac_z_gt_3": float((zs.abs() > 3).float().mean()),
            "nfe": est.nfe,
            "seconds": sec,
        }
        rows.append(row)
        results[name] = (est, exact)
    est, exact = results["grid"]
    save_density_comparison(
        out / "formula_density.png",
        xs,
        [
            ("exact density", exact.numpy()),
            (f"density formula, exact eps ({est.nfe:.0f} nfe)", est.logp.numpy()),
        ],
        error=("(estimate - exact) / stderr", ((est.logp - exact) / est.stderr).numpy()),
    )
    summary = {"mixture": DEFAULT_MIXTURE, "n_t": n_t, "seed": seed, "rows": rows}
    (out / "formula_demo.json").write_text(json.dumps(summary, indent=2))
    return summary
