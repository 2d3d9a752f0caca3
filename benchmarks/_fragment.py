"""Shared helpers for benchmark scripts that write their own markdown fragment under docs/.

A fragment is the only place a benchmark figure is written down: docs/benchmarks.md links to it and the README
quotes it. Each fragment starts with a do-not-edit marker and one provenance line (command, wall time, date,
machine, torch, threads, load average), so a reader can tell what produced it and under what load.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch


def provenance(script: str, command: str, seconds: float) -> str:
    """Two lines: the do-not-edit marker naming `script`, and the command with its wall time, date, machine, load."""
    load = os.getloadavg()
    return (
        f"<!-- written by {script}; do not edit by hand -->\n\n"
        f"Command: `{command}` ({seconds:.0f} s wall; {datetime.date.today().isoformat()}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s) per process, "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at the end)."
    )


def write(path: str | os.PathLike | None, text: str) -> None:
    """Print the fragment and, if `path` is given, write it there (creating the folder)."""
    print()
    print(text)
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text if text.endswith("\n") else text + "\n")
        print(f"\nwrote {p}")


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); nan for n < 2)."""
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        return math.nan, math.nan
    m = sum(v) / n
    if n < 2:
        return m, math.nan
    var = sum((x - m) ** 2 for x in v) / (n - 1)
    return m, math.sqrt(var / n)


def paired_diff(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the paired differences a_i - b_i (same seeds or same points, in the same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired_diff needs equal lengths, got {len(a)} and {len(b)}")
    return mean_se([x - y for x, y in zip(a, b, strict=True)])


def pm(mean: float, se: float, digits: int = 3) -> str:
    """`mean ± se` with a fixed number of decimals (se omitted when it is nan)."""
    if math.isnan(se):
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} ± {se:.{digits}f}"
