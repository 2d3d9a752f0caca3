"""Helpers shared by several test files (tests/ is on sys.path under pytest: ``from helpers import ...``).

The time-inconsistent linear model: ``switched_eps`` is the exact noise predictor of Gaussian ``GAUSS_A`` for
t < 1/2 and of Gaussian ``GAUSS_B`` for t >= 1/2. Its reverse SDE and probability-flow ODE are linear in x, so
their laws at the clean end are Gaussians whose mean and covariance follow from linear moment ODEs, solved here
independently with scipy (``gaussian_law``, in log-SNR, split at the switch lam = 0).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch
from scipy.integrate import solve_ivp

from scoredensity.mixtures import GaussianMixture

LAM_MIN, LAM_MAX = -20.0, 20.0

GAUSS_A = GaussianMixture.gaussian(torch.tensor([1.0, -0.5]), torch.tensor([[0.5, 0.2], [0.2, 0.3]]))
GAUSS_B = GaussianMixture.gaussian(torch.tensor([-0.5, 0.5]), torch.tensor([[2.0, 0.0], [0.0, 0.7]]))

# a small ring8 MLP training run on one thread, without evaluation or progress bar (add --steps, --n, --out ...)
TINY_TRAIN_ARGS = [
    "--data",
    "ring8",
    "--batch-size",
    "64",
    "--hidden",
    "32",
    "--blocks",
    "1",
    "--eval-n",
    "0",
    "--threads",
    "1",
    "--no-progress",
]


def mixture_points(gm: GaussianMixture, n: int, seed: int = 1) -> torch.Tensor:
    """``n`` points [n, d] drawn from ``gm`` with a generator seeded by ``seed``."""
    return gm.sample(n, generator=torch.Generator().manual_seed(seed))


def run_module(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m module *args`` in a subprocess (environment: this one updated with ``env``), output captured."""
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=e, timeout=300)


def tiny_unet(seed: int = 0, channels: int = 1, out_mult: int = 1, perturb: bool = True):
    """A small diffusers ``UNet2DModel`` for 8x8 images with ``channels`` channels (``channels * out_mult`` out), in
    eval mode, its initial weights drawn with ``torch.manual_seed(seed)``. ``perturb`` adds 0.05 N(0, 1) to every
    weight, so the random network is non-trivial everywhere (diffusers zero-inits some layers)."""
    from diffusers import UNet2DModel  # optional dependency: imported only by the tests that use it

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels * out_mult,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    if perturb:
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def as_tensor_keeps_tensor_devices(monkeypatch) -> None:
    """Make ``torch.as_tensor(tensor)`` keep the tensor's device inside a default-device context, as it does
    outside one, so that the "default device = meta" tests flag only tensors created without a device."""
    as_tensor = torch.as_tensor

    def keep_device(data, dtype=None, device=None):
        if device is None and isinstance(data, torch.Tensor):
            device = data.device
        return as_tensor(data, dtype=dtype, device=device)

    monkeypatch.setattr(torch, "as_tensor", keep_device)


def switched_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact eps of GAUSS_A for t < 1/2 and of GAUSS_B for t >= 1/2 (time-inconsistent)."""
    early = (t < 0.5)[:, None]
    return torch.where(early, GAUSS_A.eps(x_t, t), GAUSS_B.eps(x_t, t))


def gaussian_law(eta: float, lam_min: float = LAM_MIN, lam_max: float = LAM_MAX, gauss_lo=GAUSS_A, gauss_hi=GAUSS_B):
    """Mean [d] and covariance [d, d] at ``lam_max`` of ``dx = b_eta dlam + eta sqrt(t) dW`` started at N(0, I) at
    ``lam_min``, with eps the exact eps of ``gauss_lo`` for t < 1/2 (lam > 0) and of ``gauss_hi`` for t >= 1/2.

    For ``eps = sqrt(t) S_t^{-1} (x - alpha mu)``, ``S_t = alpha^2 S + t I``, the drift
    ``t x / 2 - (1 + eta^2)/2 sqrt(t) eps`` is ``A x + c`` with ``A = t/2 I - k t S_t^{-1}``,
    ``c = k t alpha S_t^{-1} mu``, ``k = (1 + eta^2) / 2``; then ``m' = A m + c``, ``C' = A C + C A^T + eta^2 t I``.
    """
    d = gauss_lo.dim
    k = (1 + eta**2) / 2

    def rhs_for(g: GaussianMixture):
        mu = g.means[0].numpy()
        cov = g.covs[0].numpy()

        def rhs(lam, state):
            t = 1 / (1 + np.exp(lam))
            a = np.sqrt(1 - t)
            s_inv = np.linalg.inv(a**2 * cov + t * np.eye(d))
            amat = 0.5 * t * np.eye(d) - k * t * s_inv
            c = k * t * a * s_inv @ mu
            m = state[:d]
            cmat = state[d:].reshape(d, d)
            dm = amat @ m + c
            dc = amat @ cmat + cmat @ amat.T + eta**2 * t * np.eye(d)
            return np.concatenate([dm, dc.ravel()])

        return rhs

    state = np.concatenate([np.zeros(d), np.eye(d).ravel()])
    for (lo, hi), g in (((lam_min, 0.0), gauss_hi), ((0.0, lam_max), gauss_lo)):
        sol = solve_ivp(rhs_for(g), (lo, hi), state, method="DOP853", rtol=1e-11, atol=1e-12)
        assert sol.success, sol.message
        state = sol.y[:, -1]
    return torch.from_numpy(state[:d].copy()), torch.from_numpy(state[d:].reshape(d, d).copy())
