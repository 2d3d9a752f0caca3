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

And one sequence process with an exact conditional density, :class:`BimodalARProcess` (a test bed for the
autoregressive heads of :mod:`scoredensity.apps.diffusion_loss`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..mixtures import MIXTURE_PRESETS, GaussianMixture, mixture_preset

__all__ = ["TOYS", "TOY_SCALING", "sample_toy", "sample_mixture", "BimodalARProcess"]

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


class BimodalARProcess:
    """Sequences of continuous tokens with an exact, bimodal conditional density (a test bed for AR heads).

    ``x_0 = 0`` (virtual), and for ``k = 1..L``, with ``h = tanh(W x_{k-1})``::

        x_k | x_<k ~ 1/2 N(m + delta, s^2 I) + 1/2 N(m - delta, s^2 I),   m = 0.9 h,   delta = r u (1 + 0.5 h_1)

    with a fixed random ``W`` (spectral norm 1.2) and unit vector ``u``. A Gaussian output layer cannot fit the
    two modes; a mixture-density or diffusion head can. ``log_prob`` is exact per token.

    Args:
        token_dim: D. seq_len: L. sep: mode half-separation ``r``. std: ``s``. seed: fixes ``W`` and ``u``.
    """

    def __init__(self, token_dim: int = 4, seq_len: int = 6, sep: float = 0.6, std: float = 0.15, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(token_dim, token_dim, generator=g, dtype=torch.float64)
        self.w = 1.2 * w / torch.linalg.matrix_norm(w, ord=2)
        u = torch.randn(token_dim, generator=g, dtype=torch.float64)
        self.u = u / u.norm()
        self.token_dim, self.seq_len, self.sep, self.std = token_dim, seq_len, sep, std

    def _params(self, prev: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(prev @ self.w.T)
        return 0.9 * h, self.sep * (1 + 0.5 * h[..., :1]) * self.u

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` sequences [n, L, D] (float32)."""
        x = torch.zeros(n, self.seq_len + 1, self.token_dim, dtype=torch.float64)
        for k in range(1, self.seq_len + 1):
            m, delta = self._params(x[:, k - 1])
            sign = torch.randint(0, 2, (n, 1), generator=generator, dtype=torch.float64) * 2 - 1
            noise = torch.randn(n, self.token_dim, generator=generator, dtype=torch.float64)
            x[:, k] = m + sign * delta + self.std * noise
        return x[:, 1:].to(torch.float32)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x_k | x_<k)`` per token [n, L] (float64 nats) of sequences ``x`` [n, L, D]."""
        x = x.to(torch.float64)
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        m, delta = self._params(prev)
        d = self.token_dim
        const = -0.5 * d * math.log(2 * math.pi * self.std**2) - math.log(2)
        lp = [-0.5 * ((x - m - sgn * delta) ** 2).sum(-1) / self.std**2 for sgn in (1.0, -1.0)]
        return const + torch.logaddexp(lp[0], lp[1])
