"""Small matplotlib helpers shared by the demo and the CLI (Agg backend, files only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["density_grid", "save_density_comparison", "save_scatter"]


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

    Panels share one colour scale of the density (not the log-density), so they compare at a glance.
    ``error`` adds a last panel ``(title, values [n*n])`` with its own colour bar.
    """
    plt = _plt()
    n = len(xs)
    dens = [np.exp(v.reshape(n, n)) for _, v in panels]
    vmax = max(float(d.max()) for d in dens)
    ncols = len(panels) + (error is not None)
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 4), squeeze=False)
    ext = (xs[0], xs[-1], xs[0], xs[-1])
    for ax, (title, _), dd in zip(axes[0][: len(panels)], panels, dens, strict=True):
        ax.imshow(dd, origin="lower", extent=ext, vmin=0, vmax=vmax, cmap="viridis")
        if points is not None:
            ax.scatter(points[:, 0], points[:, 1], s=1, c="w", alpha=0.3)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if error is not None:
        ax = axes[0][-1]
        im = ax.imshow(error[1].reshape(n, n), origin="lower", extent=ext, cmap="magma")
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
