"""``scoredensity compare``: every likelihood estimator on the same test points, one table, JSON and a plot.

The work is done by :func:`compare_estimators` ``(eps_fn, x, exact_logp or None)``, so any model (a mixture
preset with its exact ``eps`` here; a trained run folder once its loader is wired) goes through the same code.
Each estimator runs at a few budgets (number of log-SNR draws, solver tolerance, number of steps), so the plot
shows error against cost per estimator.

Cost: ``nfe`` counts forward calls of ``eps_fn`` per example; estimators that need the divergence of ``eps``
(divergence-form ELBO, ODE) also make vector-Jacobian products (``vjp``, one backward pass each, typically 1-2x
a forward call). The plot's x-axis is ``nfe + vjp``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._common import (
    add_device_arguments,
    add_threads_argument,
    apply_threads,
    estimator_options,
    prepare_out_dir,
    resolve_device,
    supported_kwargs,
)
from ._model_source import add_model_arguments, model_source

NAME = "compare"
HELP = "run every likelihood estimator on the same points: table, JSON and error-vs-cost plot"


@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator at one budget: ``family`` groups the budgets of one estimator in the plot."""

    family: str
    setting: str
    run: Callable  # (eps_fn, x) -> LogDensity


def default_suite(
    dim: int,
    level: str = "default",
    lam_min: float = -20.0,
    lam_max: float = 20.0,
    *,
    options: dict | None = None,
) -> list[EstimatorSpec]:
    """The estimators compared, each at increasing budgets.

    Args:
        dim: data dimension (exact-trace variants: the ELBO up to ``d = 16``, the ODE up to ``d = 64``).
        level: ``"quick"`` (one small budget each, for smoke tests), ``"default"`` or ``"full"`` (one more budget).
        lam_min, lam_max: log-SNR range of the formula, the divergence ELBO and the ODE. For a trained model use
            its training range: outside it the network is untrained and the bounds pay for it (measured on a
            ring8 MLP trained on [-12, 12]: the bound drops by ~0.85 nats/example when evaluated on [-20, 20]).
            The DDPM ELBO uses its own clock (VP-linear, ``abar_k = abar(k/T)``).
        options: estimator keyword arguments shared by every estimator (``precision``, ``max_batch``); an
            estimator that does not take one is told so on stderr (:func:`~._common.supported_kwargs`).
    """
    opts = dict(options or {})
    from ..ddpm import ddpm_elbo
    from ..elbo import elbo
    from ..formula import log_density
    from ..ode import ode_log_likelihood
    from ..schedules import DDPMSchedule, VPLinearClock

    if level not in ("quick", "default", "full"):
        raise ValueError(f"level must be 'quick', 'default' or 'full', got {level!r}")
    n_ts = {"quick": [32], "default": [32, 128, 512], "full": [32, 128, 512, 2048]}[level]
    tols = {"quick": [1e-3], "default": [1e-3, 1e-5], "full": [1e-3, 1e-5, 1e-7]}[level]
    steps = {"quick": [100], "default": [100, 1000], "full": [100, 1000, 4000]}[level]
    lam = {"lam_min": lam_min, "lam_max": lam_max}
    f_kw = {**lam, **supported_kwargs(log_density, opts, "log_density")}
    e_kw = {**lam, **supported_kwargs(elbo, opts, "elbo")}
    o_kw = {**lam, **supported_kwargs(ode_log_likelihood, opts, "ode_log_likelihood")}
    ddpm_opts = supported_kwargs(ddpm_elbo, opts, "ddpm_elbo")
    for fn, kw in ((log_density, f_kw), (elbo, e_kw), (ode_log_likelihood, o_kw), (ddpm_elbo, ddpm_opts)):
        if "progress" in inspect.signature(fn).parameters:
            kw["progress"] = False  # the command prints one line per estimator; no bars inside the table's work
    specs: list[EstimatorSpec] = []
    for n in n_ts:
        specs.append(EstimatorSpec("formula", f"n_t={n}", lambda f, x, n=n: log_density(f, x, n_t=n, **f_kw)))
    for n in n_ts:
        specs.append(
            EstimatorSpec(
                "formula-plain",
                f"n_t={n}",
                lambda f, x, n=n: log_density(
                    f, x, n_t=n, scheme="mc", importance="uniform", control_variate=None, norm_z=False, **f_kw
                ),
            )
        )
    for n in n_ts:
        specs.append(EstimatorSpec("elbo-div-rademacher", f"n_t={n}", lambda f, x, n=n: elbo(f, x, n_t=n, **e_kw)))
    if dim <= 16:
        for n in n_ts:
            specs.append(
                EstimatorSpec("elbo-div-exact", f"n_t={n}", lambda f, x, n=n: elbo(f, x, n_t=n, probe="exact", **e_kw))
            )
    if dim <= 64:
        for tol in tols:
            specs.append(
                EstimatorSpec(
                    "ode-exact",
                    f"tol={tol:g}",
                    lambda f, x, tol=tol: ode_log_likelihood(f, x, rtol=tol, atol=tol, **o_kw),
                )
            )
    for tol in tols:
        specs.append(
            EstimatorSpec(
                "ode-hutchinson",
                f"tol={tol:g},probes=4",
                lambda f, x, tol=tol: ode_log_likelihood(
                    f, x, rtol=tol, atol=tol, trace="hutchinson", n_probes=4, **o_kw
                ),
            )
        )
    for T in steps:
        specs.append(
            EstimatorSpec(
                "ddpm-fixed_large",
                f"T={T}",
                lambda f, x, T=T: ddpm_elbo(f, x, schedule=DDPMSchedule.from_clock(VPLinearClock(), T), **ddpm_opts),
            )
        )
    return specs


def compare_estimators(
    eps_fn,
    x,
    exact_logp=None,
    *,
    suite: list[EstimatorSpec] | None = None,
    level: str = "default",
    lam_min: float = -20.0,
    lam_max: float = 20.0,
    progress: Callable[[str], None] | None = None,
    options: dict | None = None,
) -> dict:
    """Run every estimator of ``suite`` on the same points ``x`` and summarise.

    Args:
        eps_fn: the model (an :class:`~scoredensity.epsfn.EpsFn`).
        x: [B, *shape] test points.
        exact_logp: [B] exact log-density of the model at ``x`` if known (mixtures), else None.
        suite: estimators to run (default :func:`default_suite` of the data dimension at ``level`` and
            ``[lam_min, lam_max]``: for a trained model pass its training range).
        progress: called with a line of text after each estimator.
        options: estimator options for the default suite (``precision``, ``max_batch``).

    Returns:
        ``{"dim", "n", "rows": [...]}``; each row has ``family``, ``setting``, ``logp`` (mean per example),
        ``logp_per_dim``, ``stderr`` (mean per-example standard error), ``nfe``, ``vjp``, ``cost`` (= nfe + vjp),
        ``seconds_per_example``, ``per_example`` / ``stderr_per_example`` (lists [B]), and with ``exact_logp``:
        ``bias`` (mean of estimate - exact), ``abs_err`` (mean |estimate - exact| per example) and
        ``abs_err_per_dim``; the top level then also has ``exact_logp`` (mean) and ``exact_per_example``.
    """
    import torch

    from ..epsfn import check_data

    x = check_data(x)
    b, d = x.shape[0], x[0].numel()
    if exact_logp is not None:
        exact_logp = torch.as_tensor(exact_logp, dtype=torch.float64)
        if exact_logp.shape != (b,):
            raise ValueError(f"exact_logp must have shape [{b}], got {tuple(exact_logp.shape)}")
    rows = []
    specs = suite if suite is not None else default_suite(d, level, lam_min, lam_max, options=options)
    for i, spec in enumerate(specs):
        t0 = time.perf_counter()
        est = spec.run(eps_fn, x)
        secs = time.perf_counter() - t0
        vjp = float(est.info.get("vjp", 0.0))
        row = {
            "family": spec.family,
            "setting": spec.setting,
            "method": est.method,
            "logp": est.mean(),
            "logp_per_dim": est.mean() / d,
            "stderr": float(est.stderr.mean()),
            "nfe": float(est.nfe),
            "vjp": vjp,
            "cost": float(est.nfe) + vjp,
            "seconds_per_example": secs / b,
            "per_example": est.logp.cpu().tolist(),
            "stderr_per_example": est.stderr.cpu().tolist(),
        }
        if exact_logp is not None:
            gap = est.logp.cpu().double() - exact_logp
            row.update(
                bias=float(gap.mean()),
                bias_stderr=est.mean_stderr(),
                abs_err=float(gap.abs().mean()),
                abs_err_per_dim=float(gap.abs().mean()) / d,
            )
        rows.append(row)
        if progress is not None:
            progress(f"[{i + 1}/{len(specs)}] {spec.family} {spec.setting}: {secs:.2f} s")
    out = {"dim": d, "n": b, "rows": rows}
    if exact_logp is not None:
        out["exact_logp"] = float(exact_logp.mean())
        out["exact_per_example"] = exact_logp.tolist()
    return out


_COLS = [
    ("family", "estimator", "{:<20}"),
    ("setting", "setting", "{:<18}"),
    ("logp", "logp/ex", "{:>9.4f}"),
    ("logp_per_dim", "/dim", "{:>8.4f}"),
    ("stderr", "stderr", "{:>8.4f}"),
    ("nfe", "nfe", "{:>7.0f}"),
    ("vjp", "vjp", "{:>7.0f}"),
    ("seconds_per_example", "s/ex", "{:>8.4f}"),
    ("bias", "gap", "{:>8.4f}"),
    ("abs_err", "|gap|/ex", "{:>8.4f}"),
    ("abs_err_per_dim", "|gap|/dim", "{:>9.5f}"),
]


def _width(head: str, fmt: str) -> int:
    return max(len(head), int(re.search(r"(\d+)", fmt).group(1)))


def format_row(row: dict) -> str:
    """One row of the table (columns without a value, e.g. the gap when no exact value is known, are blank)."""
    parts = []
    for key, head, fmt in _COLS:
        width = _width(head, fmt)
        v = row.get(key)
        parts.append(" " * width if v is None else fmt.format(v))
    return "  ".join(parts)


def format_table(result: dict) -> str:
    """The whole table as text, with a header."""
    head = []
    for _key, name, fmt in _COLS:
        width = _width(name, fmt)
        head.append(name.ljust(width) if "<" in fmt else name.rjust(width))
    lines = ["  ".join(head)] + [format_row(r) for r in result["rows"]]
    if "exact_logp" in result:
        lines.append(f"exact mean log-density {result['exact_logp']:.4f} nats/example (d = {result['dim']})")
        lines.append("gap = estimate - exact log-density (the plot shows |gap|/dim)")
    return "\n".join(lines)


def cheapest_to_reach(result: dict, target_per_dim: float = 0.01) -> dict | None:
    """The row with the lowest cost whose mean |gap| per dimension is at most ``target_per_dim`` (None if none)."""
    ok = [r for r in result["rows"] if r.get("abs_err_per_dim") is not None and r["abs_err_per_dim"] <= target_per_dim]
    return min(ok, key=lambda r: r["cost"]) if ok else None


def plot_error_vs_cost(result: dict, path: str | Path, title: str = "") -> None:
    """Mean |gap| per dimension against cost (nfe + vjp per example), one line per estimator (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    fams: dict[str, list] = {}
    for r in result["rows"]:
        if r.get("abs_err_per_dim") is not None:
            fams.setdefault(r["family"], []).append(r)
    for fam, rs in fams.items():
        rs = sorted(rs, key=lambda r: r["cost"])
        ax.plot([r["cost"] for r in rs], [max(r["abs_err_per_dim"], 1e-8) for r in rs], marker="o", label=fam)
    ax.axhline(0.01, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cost per example (eps calls + vector-Jacobian products)")
    ax.set_ylabel("mean |log p estimate - exact| per dimension (nats)")
    ax.set_title(title or f"d = {result['dim']}, {result['n']} points")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: dict, out_dir: str | Path, stem: str = "compare", title: str = "") -> list[Path]:
    """Write ``{stem}.json`` and, when exact values are known, ``{stem}.png`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    if "exact_logp" in result:
        paths.append(out / f"{stem}.png")
        plot_error_vs_cost(result, paths[1], title)
    return paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``scoredensity compare``."""
    add_model_arguments(p)
    p.add_argument("--n", type=int, default=200, help="test points (default 200)")
    p.add_argument("--level", choices=["quick", "default", "full"], default="default", help="budgets per estimator")
    p.add_argument("--seed", type=int, default=0, help="seed of the test points")
    p.add_argument("--out", default=None, help="folder for compare.json and compare.png")
    add_device_arguments(p)
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    """Draw test points, compare, print the table once (progress on stderr), write JSON and PNG."""
    import sys

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    device = resolve_device(args.device)
    opts = estimator_options(args)
    if args.out:
        prepare_out_dir(args.out)
    src = model_source(args, device)
    threads = apply_threads(args, src.kind)
    x = src.test_points(args.n, args.seed)
    exact = None if src.exact_log_prob is None else src.exact_log_prob(x)
    print(f"{src.title}: {len(x)} points on {device}, {threads} thread(s)", file=sys.stderr, flush=True)
    result = compare_estimators(
        src.eps_fn,
        x.to(device),
        exact,
        level=args.level,
        lam_min=src.lam_min,
        lam_max=src.lam_max,
        progress=lambda s: print(s, file=sys.stderr, flush=True),
        options=opts,
    )
    result.update(
        model=src.title,
        run_dir=args.run_dir,
        preset=None if args.run_dir else (args.preset or "ring8"),
        seed=args.seed,
        lam_min=src.lam_min,
        lam_max=src.lam_max,
        device=str(device),
        precision=opts.get("precision", "fp32"),
        max_batch=opts.get("max_batch"),
    )
    print(format_table(result))
    best = cheapest_to_reach(result)
    if best is not None:
        print(f"cheapest to 0.01 nats/dim: {best['family']} ({best['setting']}), cost {best['cost']:.0f} per example")
    elif "exact_logp" in result:
        print("no estimator reached 0.01 nats/dim at these budgets")
    if args.out:
        for path in write_report(result, args.out, title=f"{src.title}, {len(x)} points"):
            print(f"wrote {path}")
    return 0


__all__ = [
    "EstimatorSpec",
    "default_suite",
    "compare_estimators",
    "format_table",
    "cheapest_to_reach",
    "plot_error_vs_cost",
    "write_report",
]
