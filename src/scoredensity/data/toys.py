"""Synthetic continuous data: samples of the analytic mixtures and the classic 2-D toys.

Scaling of the 2-D toys (fixed constants, the same for every seed, so that each coordinate has variance
close to 1 and the shapes are not distorted: one scale per toy, not per coordinate):

* ``moons``: ``sklearn.datasets.make_moons(noise=0.05)``, centred by its exact mean (0.5, 0.25) and multiplied
  by sqrt(2) (per-coordinate variances about 1.5 and 0.5, total 2).
* ``swissroll``: ``sklearn.datasets.make_swiss_roll(noise=0.5)``, coordinates (x, z), centred by (2.0, 0.2)
  and divided by 6.8 (variances about 0.96 and 1.05).
* ``checkerboard``: uniform on the 8 black squares of a 4x4 board of unit squares on [-2, 2]^2 (a square
  ``(c, r)`` is filled when ``c + r`` is even), multiplied by sqrt(3)/2 so each coordinate is uniform with
  variance exactly 1. Its density is piecewise constant, ``1 / (8 (sqrt(3)/2)^2) = 1/6`` on the squares.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..mixtures import MIXTURE_PRESETS, GaussianMixture, mixture_preset

__all__ = ["TOYS", "TOY_SCALING", "sample_toy", "sample_mixture"]

TOY_SCALING = {
    "moons": {"noise": 0.05, "center": (0.5, 0.25), "scale": math.sqrt(2.0)},
    "swissroll": {"noise": 0.5, "center": (2.0, 0.2), "scale": 1 / 6.8},
    "checkerboard": {"center": (0.0, 0.0), "scale": math.sqrt(3.0) / 2},
}
"""Fixed affine maps ``(x - center) * scale`` applied to each 2-D toy (documented in the module docstring)."""

TOYS = tuple(TOY_SCALING)


def _moons(n: int, seed: int) -> np.ndarray:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=n, noise=TOY_SCALING["moons"]["noise"], random_state=seed)
    return x


def _swissroll(n: int, seed: int) -> np.ndarray:
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n_samples=n, noise=TOY_SCALING["swissroll"]["noise"], random_state=seed)
    return x[:, [0, 2]]


def _checkerboard(n: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    col = torch.randint(0, 4, (n,), generator=g)
    row = 2 * torch.randint(0, 2, (n,), generator=g) + col % 2  # c + r even
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    return (torch.stack([col, row], 1).to(torch.float64) + u - 2).numpy()


def sample_toy(name: str, n: int, seed: int = 0) -> Tensor:
    """``n`` points [n, 2] float32 of a 2-D toy (``moons``, ``swissroll``, ``checkerboard``), scaled as documented."""
    if name not in TOY_SCALING:
        raise ValueError(f"unknown 2-D toy {name!r}; choose one of {list(TOYS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    raw = {"moons": _moons, "swissroll": _swissroll, "checkerboard": _checkerboard}[name](n, seed)
    cfg = TOY_SCALING[name]
    x = (np.asarray(raw, dtype=np.float64) - np.asarray(cfg["center"])) * cfg["scale"]
    return torch.from_numpy(x).to(torch.float32)


def sample_mixture(name: str, n: int, seed: int = 0) -> tuple[Tensor, Tensor, GaussianMixture]:
    """``n`` points [n, d] float32 from the mixture preset ``name`` (a ``torch.Generator`` seeded by ``seed``),
    their component labels [n] int64 (the classes of class-conditional training) and the mixture itself."""
    if name not in MIXTURE_PRESETS:
        raise ValueError(f"unknown mixture preset {name!r}; choose one of {sorted(MIXTURE_PRESETS)}")
    gm = mixture_preset(name)
    x, labels = gm.sample(n, generator=torch.Generator().manual_seed(seed), return_labels=True)
    return x.to(torch.float32), labels.to(torch.int64), gm
