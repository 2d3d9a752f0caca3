"""``scoredensity demo``: the main job on the embedded default mixture."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_device_arguments, add_threads_argument, apply_threads, prepare_out_dir, resolve_device

NAME = "demo"
HELP = "Density formula with the exact score, then train a model for about a minute, on the embedded 2-D mixture."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=60.0, help="training budget in seconds (default 60)")
    p.add_argument("--steps", type=int, default=None, help="fixed training steps instead of --seconds")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=110.0,
        help="wall-clock budget of the whole demo process (default 110): on a busy machine training gets fewer "
        "steps so that the demo still ends in time (0: no limit)",
    )
    p.add_argument("--no-train", action="store_true", help="only the exact-score part")
    p.add_argument("--n-grid", type=int, default=60, help="grid points per axis for the density images")
    p.add_argument("--n-samples", type=int, default=1000, help="test samples from the mixture")
    add_device_arguments(p, precision=False, max_batch=False)
    add_threads_argument(p)
    p.add_argument(
        "--progress",
        choices=["auto", "bar", "log", "none"],
        default="auto",
        help="progress display: bars on a terminal, plain lines every ~10 s in a log (auto: by whether stderr is "
        "a terminal)",
    )


def _process_age() -> float:
    """Seconds since this process started (Linux ``/proc``; 0 where unknown), so that ``--max-seconds`` also
    counts the time spent importing before the demo's own clock starts."""
    import os

    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def run(args: argparse.Namespace) -> int:
    """Run the demo's parts, print their tables and write ``report.md``. Returns the exit code."""
    import sys
    import time

    from ..demo import ProgressLog, format_table, formula_demo, training_demo, write_report

    t0 = time.perf_counter()
    started = t0 - _process_age()  # the whole process counts against --max-seconds

    for name in ("n_grid", "n_samples"):
        if getattr(args, name) < 2:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 2, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not args.seconds > 0:
        raise ValueError(f"--seconds must be > 0, got {args.seconds}")
    if not args.max_seconds >= 0:
        raise ValueError(f"--max-seconds must be >= 0, got {args.max_seconds}")
    device = resolve_device(args.device)
    prepare_out_dir(args.out)
    threads = apply_threads(args, "small")
    mode = args.progress if args.progress != "auto" else ("bar" if sys.stderr.isatty() else "log")
    log = ProgressLog("demo", enabled=mode == "log")
    log(f"start: device {device}, {threads} thread(s), output {args.out}")
    out = Path(args.out)
    formula = formula_demo(
        out, n_grid=args.n_grid, n_samples=args.n_samples, seed=args.seed, device=device, log=log, bars=mode == "bar"
    )
    print(f"1. Density formula with the exact eps of the '{formula['mixture']}' mixture vs its exact log-density")
    cols = [
        ("points", "points", "s"),
        ("n", "n", "d"),
        ("mean_err", "mean error (nats)", ".4f"),
        ("mean_err_stderr", "its stderr", ".4f"),
        ("mean_abs_err", "mean abs error", ".4f"),
        ("mean_stderr", "mean stderr", ".4f"),
        ("max_abs_z", "max abs z-score", ".2f"),
        ("nfe", "nfe/example", ".1f"),
        ("seconds", "seconds", ".2f"),
    ]
    print(format_table(formula["rows"], cols))
    training = None
    if not args.no_train:
        budget = f"{args.steps} steps" if args.steps else f"about {args.seconds:.0f} s"
        print(f"\n2. Training a denoiser on '{formula['mixture']}' ({budget}; elbo weighting, adaptive log-SNR)")
        training = training_demo(
            out,
            seconds=args.seconds,
            seed=args.seed,
            n_grid=args.n_grid,
            steps=args.steps,
            progress={"bar": True, "log": None, "none": False}[mode],
            device=device,
            log=log,
            deadline=started + args.max_seconds if args.max_seconds else None,
        )
        ev = training["eval"]
        print(
            f"   {training['steps']} steps in {training['train_seconds']:.1f} s; held-out NLL bound "
            f"{ev['nll']:.4f} ± {ev['nll_stderr']:.4f} nats, exact {ev['true_nll']:.4f}, "
            f"gap (bound - exact NLL) {ev['gap']:.4f} ± {ev['gap_stderr']:.4f} (>= 0 up to noise)"
        )
    report = write_report(out, formula, training)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    print(
        f"\nwrote {report} with {out / 'formula_density.png'}"
        + ("" if training is None else f", {out / 'trained_density.png'}, {out / 'samples.png'}")
    )
    return 0
