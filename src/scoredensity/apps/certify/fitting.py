"""Fitting in certifying ELBO training: L-BFGS on a fixed-draw objective, EM (the maximum-likelihood reference),
a k-means start, comparison of fits up to label switching, and a plain training loop for neural denoisers."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import Tensor

from ... import rng
from ...mixtures import GaussianMixture
from ...rng import Stream
from ..parametric import ParametricMixture, sklearn_to_mixture
from .objectives import NEURAL_LOSSES, DenoisingObjective, check_points, denoising_loss

__all__ = ["fit_objective", "fit_em", "kmeans_init", "match_components", "parameter_distance", "train_denoiser"]


def fit_objective(
    model: ParametricMixture,
    objective: DenoisingObjective,
    *,
    max_iter: int = 300,
    tol: float = 1e-10,
) -> dict:
    """Minimise ``objective(model)`` over the model's parameters by L-BFGS (strong Wolfe line search), in place.

    Returns:
        ``{"loss": final value, "iterations": outer steps, "seconds": wall time, "grad_norm": final gradient norm}``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=20, tolerance_grad=tol, tolerance_change=1e-14, history_size=50,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = objective(model)
        loss.backward()
        return loss

    start = time.perf_counter()
    prev = math.inf
    it = 0
    for it in range(1, max(1, max_iter // 20) + 1):
        loss = float(opt.step(closure).detach())
        if not math.isfinite(loss):
            raise RuntimeError(f"the objective became {loss} during the fit (step {it})")
        if abs(prev - loss) < 1e-12 * max(1.0, abs(loss)):
            break
        prev = loss
    opt.zero_grad()
    final = objective(model)
    final.backward()
    final = final.detach()
    gnorm = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in params)))
    opt.zero_grad()
    return {"loss": float(final), "iterations": it, "seconds": time.perf_counter() - start, "grad_norm": gnorm}


def kmeans_init(x: Tensor, k: int, seed: int = 0) -> ParametricMixture:
    """A starting member from k-means: cluster means, covariances and shares (a ridge keeps them positive)."""
    from sklearn.cluster import KMeans

    x = check_points(x)
    xn = x.numpy()
    labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(xn).labels_
    d = x.shape[1]
    ridge = 1e-3 * float(np.var(xn, axis=0).mean())
    means, covs, w = [], [], []
    for j in range(k):
        pts = xn[labels == j]
        means.append(pts.mean(0))
        cov = np.cov(pts.T).reshape(d, d) if len(pts) > 1 else np.zeros((d, d))
        covs.append(cov + ridge * np.eye(d))
        w.append(max(len(pts), 1))
    gm = GaussianMixture(torch.tensor(np.array(means)), torch.tensor(np.array(covs)), torch.tensor(w) / sum(w))
    return ParametricMixture.from_mixture(gm)


def fit_em(x: Tensor, k: int, *, n_init: int = 8, seed: int = 0, tol: float = 1e-10) -> GaussianMixture:
    """Maximum-likelihood fit by EM: scikit-learn's ``GaussianMixture`` (full covariances, ``n_init`` starts,
    a negligible ``reg_covar`` so the answer is the MLE), returned as a :class:`GaussianMixture`."""
    from sklearn.mixture import GaussianMixture as SkGM

    x = check_points(x)
    sk = SkGM(k, covariance_type="full", n_init=n_init, tol=tol, max_iter=5000, reg_covar=1e-10, random_state=seed)
    sk.fit(x.numpy())
    return sklearn_to_mixture(sk)


# ---------------------------------------------------------------------------------------- comparing fits
def match_components(a: GaussianMixture, b: GaussianMixture) -> np.ndarray:
    """Permutation ``perm`` with ``b``'s component ``perm[j]`` matched to ``a``'s component ``j`` (label switching),
    minimising the summed squared distance of means (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    if a.num_components != b.num_components or a.dim != b.dim:
        raise ValueError(f"cannot match {a} with {b}")
    cost = torch.cdist(a.means, b.means).pow(2).numpy()
    _, perm = linear_sum_assignment(cost)
    return perm


def parameter_distance(a: GaussianMixture, b: GaussianMixture) -> dict[str, float]:
    """Largest parameter differences between two mixtures after matching components:
    ``mean`` (Euclidean norm of a mean difference), ``cov`` (Frobenius norm of a covariance difference),
    ``weight`` (absolute weight difference)."""
    perm = torch.as_tensor(match_components(a, b))
    return {
        "mean": float((a.means - b.means[perm]).norm(dim=1).max()),
        "cov": float((a.covs - b.covs[perm]).flatten(1).norm(dim=1).max()),
        "weight": float((a.weights - b.weights[perm]).abs().max()),
    }


# ---------------------------------------------------------------------------------------- neural case
def train_denoiser(
    model: torch.nn.Module,
    x: Tensor,
    loss: str,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` (an ``EpsFn`` module) on ``x`` [N, d] by one of :data:`NEURAL_LOSSES` with a plain loop (AdamW,
    cosine decay, gradient clipping at 1, the same data order and budget for every loss). The minibatch of step ``k``
    is drawn with replacement from keyed uniforms (:attr:`Stream.CERTIFY_NODES`, step ``2 + k``) on ``x``'s device.
    Returns the loss history."""
    if loss not in NEURAL_LOSSES:
        raise ValueError(f"loss must be one of {NEURAL_LOSSES}, got {loss!r}")
    x = check_points(x)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    slots = torch.arange(batch_size, device=x.device)
    hist = []
    for step in range(steps):
        u = rng.uniforms(seed, Stream.CERTIFY_NODES, slots, 1, step=2 + step, device=x.device)[:, 0]
        idx = (u * x.shape[0]).long().clamp(max=x.shape[0] - 1).to(x.device)
        value = denoising_loss(model, x[idx], loss, seed=seed, step=step)
        opt.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        hist.append(float(value.detach()))
    return hist
