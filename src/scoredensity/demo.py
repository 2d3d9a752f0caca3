"""``scoredensity demo``: the main job on an embedded default.

Part 1 (exact score): the density formula with the exact ``eps`` of the embedded 2-D mixture
(``blobs2d``) against its exact ``log_prob`` at a grid and at samples; a table and a PNG of the exact and
estimated densities side by side. Later parts (training) extend the report.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .formula import log_density
from .mixtures import mixture_preset
from .plots import density_grid, save_density_comparison

__all__ = ["formula_demo", "format_table", "ProgressLog"]

DEFAULT_MIXTURE = "blobs2d"


class ProgressLog:
    """Plain progress lines on stderr for logs, in the trainer's style: ``demo: message``, one per phase, and,
    inside :meth:`every`, a status line every ``interval`` seconds (default 10) from a callable. Enabled by default
    when stderr is not a terminal (where tqdm bars would be unreadable); silent when ``enabled`` is False."""

    def __init__(self, name: str = "demo", enabled: bool | None = None, interval: float = 10.0) -> None:
        self.name = name
        self.enabled = (not sys.stderr.isatty()) if enabled is None else bool(enabled)
        self.interval = float(interval)
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        """Print one line (when enabled)."""
        if self.enabled:
            print(f"{self.name}: {message}", file=sys.stderr, flush=True)

    def every(self, status: Callable[[], str | None]):
        """A context manager that prints ``status()`` every ``interval`` seconds while its body runs."""
        log = self

        class _Beat:
            def __enter__(self):
                self.stop = threading.Event()
                self.thread = None
                if log.enabled:
                    self.thread = threading.Thread(target=self._run, daemon=True)
                    self.thread.start()
                return self

            def _run(self) -> None:
                while not self.stop.wait(log.interval):
                    try:
                        line = status()
                    except Exception:  # a status line is best effort; never disturb the work
                        line = None
                    if line:
                        log(line)

            def __exit__(self, *exc) -> None:
                self.stop.set()
                if self.thread is not None:
                    self.thread.join(timeout=1.0)

        return _Beat()


def _hms(seconds: float) -> str:
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h:02d}:{m:02d}:{sec:02d}"


def _training_status(metrics: Path, total: int, t_start: float) -> str | None:
    """``training step s/N (p%), loss, steps/s, ETA H:MM:SS`` (the trainer's own line format) from the last line
    of a run's metrics.jsonl."""
    try:
        with open(metrics, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "training: starting"
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "loss" in rec and isinstance(rec.get("step"), int):
            step = rec["step"]
            rate = step / max(time.perf_counter() - t_start, 1e-9)
            eta = _hms((total - step) / rate) if rate > 0 else "?"
            return (
                f"training step {step}/{total} ({100 * step / total:.0f}%), loss {rec['loss']:.4g}, "
                f"{rate:.1f} steps/s, ETA {eta}"
            )
    return "training: starting"


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Render rows as a markdown table; ``columns`` are ``(key, header, format)``."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = [
        "| " + " | ".join(("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns) + " |" for r in rows
    ]
    return "\n".join([head, sep, *body])


def formula_demo(
    out_dir: str | Path,
    *,
    n_grid: int = 60,
    n_samples: int = 1000,
    n_t: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: ProgressLog | None = None,
    bars: bool | None = None,
) -> dict:
    """Density formula with the exact eps vs the exact density, at a grid and at samples.

    The mixture's closed-form ``eps`` and the points live on ``device``; ``log`` prints phase lines for logs;
    ``bars``: tqdm bars (default: when ``log`` is silent).

    Writes ``formula_density.png`` and ``formula_demo.json`` into ``out_dir``; returns the summary
    (per point set: mean error, mean |error|, max |error| / stderr, mean stderr, nfe, seconds).
    """
    from .commands._model_source import mixture_on_device

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = log or ProgressLog(enabled=False)
    device = torch.device(device)
    gm = mixture_preset(DEFAULT_MIXTURE)
    eps = mixture_on_device(gm, device).eps
    xs, _, grid = density_grid(-3.5, 3.5, n_grid)
    sets = {
        "grid": torch.as_tensor(grid, dtype=torch.float32),
        "samples": gm.sample(n_samples, generator=torch.Generator().manual_seed(seed)).float(),
    }
    rows, results = [], {}
    for name, x in sets.items():
        log(f"exact-score formula on the {name} ({len(x)} points, n_t={n_t})")
        t0 = time.perf_counter()
        est = log_density(eps, x.to(device), n_t=n_t, seed=seed, progress=(not log.enabled) if bars is None else bars)
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
        log(f"{name} done in {sec:.1f} s: mean error {row['mean_err']:+.4f} ± {row['mean_err_stderr']:.4f} nats")
    est, exact = results["grid"]
    save_density_comparison(
        out / "formula_density.png",
        xs,
        [
            ("exact density", exact.numpy()),
            (f"density formula, exact eps ({est.nfe:.0f} nfe)", est.logp.numpy()),
        ],
        error=("z-score: (estimate - exact) / stderr", ((est.logp - exact) / est.stderr).numpy()),
    )
    summary = {"mixture": DEFAULT_MIXTURE, "n_t": n_t, "seed": seed, "rows": rows}
    (out / "formula_demo.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------- part 2: training
def training_demo(
    out_dir: str | Path,
    *,
    seconds: float = 60.0,
    seed: int = 0,
    n_grid: int = 60,
    n_samples: int = 2000,
    n_eval: int = 2000,
    steps: int | None = None,
    progress: bool | None = None,
    device: str | torch.device = "cpu",
    log: ProgressLog | None = None,
    deadline: float | None = None,
) -> dict:
    """Train a denoiser on the embedded mixture for about ``seconds`` of CPU time, then hold it against the truth.

    Steps: a 50-step pilot measures the speed, the run then gets the steps that fit the budget (or ``steps``)
    (likelihood weighting, adaptive log-SNR sampling, EMA; :func:`scoredensity.train.train`, run folder
    ``out_dir/run``); the held-out NLL bound (density formula, EMA weights) is compared with the exact NLL of the
    same test points; the learned density on a grid is drawn next to the exact one; samples (DDIM, 100 steps) are
    drawn next to true samples.

    ``deadline`` (a ``time.perf_counter()`` value): when the whole demo should be done; on a busy machine the
    training then gets fewer steps (at least 100), so that evaluation, grid and samples still fit (estimated from
    the pilot's speed). ``device``: where the model trains (when the trainer takes a device) and is evaluated.
    ``log``: progress lines for logs (:class:`ProgressLog`; a status line every 10 s during training).
    ``progress``: the trainer's own display (True: bar; None: its default; False: none).

    Writes ``trained_density.png``, ``samples.png`` and ``training_demo.json`` into ``out_dir``; returns the
    summary (steps, seconds, the evaluation dict of :func:`scoredensity.train.evaluate_model`, grid errors).
    The sign convention is one throughout: ``gap = exact log-density - bound`` (>= 0 up to noise), in the table,
    the JSON and the picture.
    """
    import shutil

    from .nets import eval_eps_fn
    from .plots import save_scatter
    from .sampling import sample
    from .train import TrainConfig, train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = log or ProgressLog(enabled=False)
    device = torch.device(device)
    dev_kw = {"device": str(device)}  # the demo's training runs where its evaluation will (not the trainer's default)
    import scoredensity.train as _train

    # a trainer that prints its own plain lines in logs (progress=None) needs no heartbeat from the demo
    trainer_logs = hasattr(_train, "PROGRESS_SECONDS")
    if log.enabled and progress is None and not trainer_logs:
        progress = False  # the log gets ProgressLog's status lines instead
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own output of an earlier call
    data = {"name": DEFAULT_MIXTURE, "seed": seed}
    net = {"type": "mlp", "hidden": 128, "blocks": 2, "emb_dim": 64}
    if steps is None:  # pilot: measure steps per second on this machine, then size the run to the budget
        pilot_dir = out / ".pilot"
        shutil.rmtree(pilot_dir, ignore_errors=True)
        log("pilot: 50 training steps to measure this machine's speed")
        pilot_cfg = TrainConfig(steps=50, batch_size=512, eval_final=False, **dev_kw)
        rate = train(pilot_dir, data, net=net, config=pilot_cfg, progress=False).steps_per_second
        shutil.rmtree(pilot_dir, ignore_errors=True)
        train_s = 0.9 * seconds
        if deadline is not None:  # leave time for what follows training (evaluation, grid, samples, plots)
            rest_rows = 1.1 * n_eval * 32 + n_grid * n_grid * 128 + n_samples * 100  # network rows after training
            rest_s = rest_rows / (rate * 512 * 3) + 5.0  # a training step costs about 3 forward passes of 512 rows
            train_s = min(train_s, deadline - time.perf_counter() - rest_s)
        steps = int(min(20000, max(100, train_s * rate)))
        log(f"pilot: {rate:.1f} steps/s; training {steps} steps (about {steps / rate:.0f} s)")
    cfg = TrainConfig(
        steps=steps,
        batch_size=512,
        lr=4e-3,
        seed=seed,
        eval_n=n_eval,
        eval_n_t=32,
        log_every=max(steps // 20, 1),
        checkpoint_every=max(steps // 4, 1),
        **dev_kw,
    )
    t_train = time.perf_counter()
    beat = log if not (trainer_logs and progress is None) else ProgressLog(enabled=False)
    with beat.every(lambda: _training_status(run_dir / "metrics.jsonl", steps, t_train)):
        res = train(run_dir, data, net=net, config=cfg, progress=progress)
    ev = res.final_eval
    log(f"trained {steps} steps in {res.seconds:.1f} s; held-out NLL bound {ev['nll']:.4f}, exact {ev['true_nll']:.4f}")
    gm = mixture_preset(DEFAULT_MIXTURE)
    model = res.ema.to(device)  # on the training device already; made explicit, the grid and samples follow it
    eps_fn = eval_eps_fn(model)

    xs, _, grid = density_grid(-3.5, 3.5, n_grid)
    grid_t = torch.as_tensor(grid, dtype=torch.float32)
    log(f"learned density on a {n_grid}x{n_grid} grid (formula, n_t=128)")
    with torch.no_grad():
        est = log_density(
            eps_fn, grid_t.to(device), n_t=128, lam_min=cfg.lam_min, lam_max=cfg.lam_max, seed=seed, progress=False
        )
    logp = est.logp.cpu()  # LogDensity is on the CPU by contract; plotting and the gap below need CPU tensors
    exact = gm.log_prob(grid_t.double())
    save_density_comparison(
        out / "trained_density.png",
        xs,
        [("exact density", exact.numpy()), (f"trained model, formula bound ({steps} steps)", logp.numpy())],
        error=(
            "gap = exact log p - bound (nats, ±3)",
            (exact - logp).clamp(-3, 3).numpy(),
        ),
    )
    log(f"sampling {n_samples} points (DDIM, 100 steps)")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        fake = sample(eps_fn, (n_samples, 2), sampler="ddim", steps=100, generator=g, device=device).cpu()
    real = gm.sample(n_samples, generator=torch.Generator().manual_seed(seed + 2))
    save_scatter(
        out / "samples.png",
        [("exact mixture samples", real.numpy()), ("trained model samples (DDIM, 100 steps)", fake.double().numpy())],
        lim=3.5,
    )
    # where the density is not negligible, how far the learned bound is from the truth
    w = exact.exp() / exact.exp().sum()
    summary = {
        "mixture": DEFAULT_MIXTURE,
        "steps": steps,
        "train_seconds": res.seconds,
        "steps_per_second": res.steps_per_second,
        "eval": ev,
        "grid_weighted_mean_gap": float((w * (exact - logp)).sum()),
        "run_dir": str(run_dir),
    }
    (out / "training_demo.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_report(out_dir: str | Path, formula_summary: dict | None, training_summary: dict | None) -> Path:
    """Write ``report.md`` in ``out_dir``: the exact-score check and the training check, with their PNGs."""
    out = Path(out_dir)
    lines = ["# scoredensity demo", "", f"Embedded default: the 2-D Gaussian mixture `{DEFAULT_MIXTURE}`.", ""]
    if formula_summary is not None:
        lines += [
            "## 1. The density formula with the exact score",
            "",
            "The exact noise predictor of the mixture plugged into the density formula gives its exact log-density "
            "(up to Monte Carlo error, shown as a standard error per point):",
            "",
            format_table(
                formula_summary["rows"],
                [
                    ("points", "points", "s"),
                    ("n", "n", "d"),
                    ("mean_err", "mean error (nats)", ".4f"),
                    ("mean_stderr", "mean stderr", ".4f"),
                    ("max_abs_z", "max abs z-score", ".2f"),
                    ("nfe", "nfe/example", ".1f"),
                ],
            ),
            "",
            "![exact vs formula](formula_density.png)",
            "",
        ]
    if training_summary is not None:
        ev = training_summary["eval"]
        lines += [
            "## 2. A trained model: the bound against the truth",
            "",
            f"An MLP denoiser trained for {training_summary['steps']} steps "
            f"({training_summary['train_seconds']:.0f} s on this CPU) with the likelihood-weighted loss "
            "(the loss *is* the negative bound), adaptive log-SNR sampling and an EMA of the weights. "
            f"Held-out test points (n = {ev['n']}), density formula with the EMA weights:",
            "",
            "| quantity | nats per example |",
            "|---|---|",
            f"| NLL bound (model) | {ev['nll']:.4f} ± {ev['nll_stderr']:.4f} |",
            f"| exact NLL (same points) | {ev['true_nll']:.4f} ± {ev['true_nll_stderr']:.4f} |",
            f"| bound - exact (paired) | {ev['gap']:.4f} ± {ev['gap_stderr']:.4f} |",
            "",
            "The gap, NLL bound - exact NLL on the same points, is paired (its standard error is that of the "
            "per-point differences). The bound is an upper bound on the model's NLL, and the model's NLL cannot beat "
            "the exact one on average, so the gap is >= 0 up to noise; its size is what training has not yet "
            "learned. The picture below shows the same quantity point by point: gap = exact log-density - bound "
            "(>= 0 up to noise).",
            "",
            "Below, each grid point of the learned density is its own Monte Carlo estimate of the bound (128 "
            "log-SNR nodes), hence the speckle; far from the data the model's density is not the mixture's "
            "(clipped differences), and the held-out figures above average over the test points.",
            "",
            "![exact vs learned density](trained_density.png)",
            "",
            "![samples](samples.png)",
            "",
            f"Run folder: `{Path(training_summary['run_dir']).name}/` (config, checkpoint, metrics.jsonl); "
            "`scoredensity evaluate` re-evaluates it.",
            "",
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def full_demo(
    out_dir: str | Path,
    *,
    seconds: float = 60.0,
    seed: int = 0,
    n_grid: int = 60,
    n_samples: int = 1000,
    n_eval: int = 2000,
    steps: int | None = None,
    progress: bool | None = None,
    device: str | torch.device = "cpu",
    log: ProgressLog | None = None,
) -> dict:
    """The whole demo: :func:`formula_demo` (exact score), :func:`training_demo` (about ``seconds`` of training)
    and ``report.md`` (:func:`write_report`) in ``out_dir``. ``steps`` fixes the training steps instead of the
    ``seconds`` budget. Returns both summaries and the report path."""
    f = formula_demo(out_dir, n_grid=n_grid, n_samples=n_samples, seed=seed, device=device, log=log)
    t = training_demo(
        out_dir,
        seconds=seconds,
        seed=seed,
        n_grid=n_grid,
        n_eval=n_eval,
        steps=steps,
        progress=progress,
        device=device,
        log=log,
    )
    return {"formula": f, "training": t, "report": str(write_report(out_dir, f, t))}


__all__ += ["training_demo", "write_report", "full_demo"]
