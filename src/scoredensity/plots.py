"""Small matplotlib helpers shared by the demo and the CLI (Agg backend, files only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["density_grid", "save_density_comparison", "save_scatter", "save_mode_coverage"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def density_grid(lo: float, hi: float, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A square 2-D grid: returns ``(xs [n], ys [n], points [n*n, 2])`` with points in row-major order."""
    xs = np.linspace(lo, hi, n)
    gx, gy = np.meshgrid(xs, xs)
    return xs, xs, np.stack([gx.ravel(), gy.ravel()], 1)


def save_density_comparison(
    path: str | Path,
    xs: np.ndarray,
    panels: list[tuple[str, np.ndarray]],
    points: np.ndarray | None = None,
    error: tuple[str, np.ndarray] | None = None,
) -> Path:
    """Save side-by-side images of 2-D densities, one panel per ``(title, logp [n*n])``.

    Panels share one colour scale of the density (not the log-density), so they compare at a glance; the scale
    is drawn as a colour bar beside the last density panel. ``error`` adds a last panel ``(title, values [n*n])``
    with its own colour bar (diverging, centred on zero, so the sign reads off the colour).
    """
    plt = _plt()
    n = len(xs)
    dens = [np.exp(v.reshape(n, n)) for _, v in panels]
    vmax = max(float(d.max()) for d in dens)
    ncols = len(panels) + (error is not None)
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 4), squeeze=False)
    ext = (xs[0], xs[-1], xs[0], xs[-1])
    im = None
    for ax, (title, _), dd in zip(axes[0][: len(panels)], panels, dens, strict=True):
        im = ax.imshow(dd, origin="lower", extent=ext, vmin=0, vmax=vmax, cmap="viridis")
        if points is not None:
            ax.scatter(points[:, 0], points[:, 1], s=1, c="w", alpha=0.3)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=axes[0][len(panels) - 1], fraction=0.046, label="density")
    if error is not None:
        ax = axes[0][-1]
        vals = np.asarray(error[1], dtype=float).reshape(n, n)
        lim = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
        im = ax.imshow(vals, origin="lower", extent=ext, cmap="RdBu_r", vmin=-lim, vmax=lim)
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(error[0], fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_scatter(path: str | Path, sets: list[tuple[str, np.ndarray]], lim: float | None = None) -> Path:
    """Save side-by-side scatter plots of 2-D point sets ``(title, points [N, 2])``."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], sets, strict=True):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4)
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
        if lim is not None:
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_mode_coverage(
    path: str | Path,
    real: np.ndarray,
    fake: np.ndarray,
    means: np.ndarray,
    radii: np.ndarray,
    counts: np.ndarray,
    title: str,
    min_count: int = 1,
) -> Path:
    """Real and generated 2-D samples side by side, with every mode's high-quality disc drawn on the generated
    panel: green when covered (at least ``min_count`` generated samples inside it), red when missed, each labelled
    with its count. The picture thus shows exactly what a "k/K modes covered" summary counts.

    Args:
        real: [N, 2] data samples. fake: [M, 2] generated samples. means: [K, 2] mode centres.
        radii: [K] disc radii (n_std standard deviations). counts: [K] generated samples inside each disc.
        title: the generated panel's title (put the "k/K modes" figure in it).
    """
    plt = _plt()
    from matplotlib.patches import Circle

    fig, axes = plt.subplots(1, 2, figsize=(8.6, 4.2), squeeze=False)
    lo = np.minimum(real.min(0), means.min(0) - radii.max()) - 0.3
    hi = np.maximum(real.max(0), means.max(0) + radii.max()) + 0.3
    for ax, (name, pts) in zip(axes[0], (("data", real), (title, fake)), strict=True):
        inside = (pts[:, 0] > lo[0]) & (pts[:, 0] < hi[0]) & (pts[:, 1] > lo[1]) & (pts[:, 1] < hi[1])
        ax.scatter(pts[inside, 0], pts[inside, 1], s=2, alpha=0.35, lw=0)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=9)
    ax = axes[0][1]
    for (cx, cy), r, c in zip(means, radii, counts, strict=True):
        ok = c >= min_count
        ax.add_patch(Circle((cx, cy), r, fill=False, lw=1.0, color="tab:green" if ok else "tab:red"))
        ax.text(cx, cy + r, str(int(c)), ha="center", va="bottom", fontsize=6, color="k" if ok else "tab:red")
    n_out = int(
        len(fake)
        - np.count_nonzero((fake[:, 0] > lo[0]) & (fake[:, 0] < hi[0]) & (fake[:, 1] > lo[1]) & (fake[:, 1] < hi[1]))
    )
    if n_out:
        ax.set_xlabel(f"{n_out} generated samples lie outside this window", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
