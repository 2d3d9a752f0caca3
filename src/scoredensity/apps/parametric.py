"""A differentiable family of exact mixture denoisers: learnable means, Cholesky factors and weight logits.

Every parameter value ``theta = (mu_k, L_k, logits)`` *is* a Gaussian mixture
``p_theta = sum_k w_k N(mu_k, L_k L_k^T)`` with ``w = softmax(logits)``, and its noise predictor is that mixture's
exact ``eps*`` (docs/design.md §1)::

    eps_theta(x_t, t) = sqrt(t) sum_k r_k(x_t, t) C_k(t)^{-1} (x_t - sqrt(1-t) mu_k),
    C_k(t) = (1 - t) L_k L_k^T + t I,   r_k = softmax_k(log w_k + log N(x_t; sqrt(1-t) mu_k, C_k(t))).

So each member is at once a denoiser (to be trained by a denoising loss) and a density with a closed-form
log-likelihood (to judge the training by): the setting of "certifying ELBO training" (Li & Yan 2024, §4.1).

This is the same mathematics as :class:`scoredensity.mixtures.GaussianMixture` (the project's ground truth),
written with Cholesky solves instead of an eigendecomposition so that it is differentiable in the parameters
(``eigh`` has no usable gradient for the isotropic components most fits start from). The tests check the two
agree to float64 rounding; :meth:`ParametricMixture.to_mixture` hands a fit back to the reference class.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..mixtures import GaussianMixture

__all__ = ["ParametricMixture", "sklearn_to_mixture"]

_LOG_2PI = math.log(2 * math.pi)


class ParametricMixture(nn.Module):
    """Gaussian mixture with trainable ``means`` [K, d], Cholesky factors [K, d, d] and weight logits [K].

    The Cholesky factor is stored as its strictly-lower part and the log of its diagonal, so every parameter
    value is a valid mixture. Parameters are float64.

    Args:
        means: [K, d] initial means.
        chols: [K, d, d] initial lower-triangular Cholesky factors with positive diagonals (covariance
            ``L L^T``); ``None`` gives identity covariances.
        weights: [K] initial positive weights (normalised here); ``None`` gives equal weights.

    Raises:
        ValueError: on inconsistent shapes, non-finite values, or non-positive diagonals/weights.
    """

    def __init__(self, means: Tensor, chols: Tensor | None = None, weights: Tensor | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must be [K, d] with K, d >= 1, got shape {tuple(means.shape)}")
        k, d = means.shape
        if chols is None:
            chols = torch.eye(d, dtype=torch.float64).expand(k, d, d)
        chols = torch.as_tensor(chols, dtype=torch.float64)
        if chols.shape != (k, d, d):
            raise ValueError(f"chols must be [K, d, d] = {(k, d, d)}, got {tuple(chols.shape)}")
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,):
            raise ValueError(f"weights must be [K] = ({k},), got {tuple(weights.shape)}")
        for name, v in (("means", means), ("chols", chols), ("weights", weights)):
            if not torch.isfinite(v).all():
                raise ValueError(f"{name} contain NaN or Inf")
        diag = chols.diagonal(dim1=1, dim2=2)
        if (diag <= 0).any():
            raise ValueError("Cholesky factors must have a positive diagonal")
        if (weights <= 0).any():
            raise ValueError("weights must be positive")
        self.means = nn.Parameter(means.clone())
        self.chol_lower = nn.Parameter(torch.tril(chols, diagonal=-1).clone())
        self.log_diag = nn.Parameter(diag.log().clone())
        self.logits = nn.Parameter((weights / weights.sum()).log().clone())

    # ------------------------------------------------------------------ constructors and conversions
    @classmethod
    def from_mixture(cls, gm: GaussianMixture) -> ParametricMixture:
        """The member equal to a :class:`GaussianMixture` (Cholesky factors of its covariances)."""
        return cls(gm.means, torch.linalg.cholesky(gm.covs), gm.weights)

    @classmethod
    def from_sklearn(cls, model) -> ParametricMixture:
        """The member equal to a fitted ``sklearn.mixture.GaussianMixture`` (any covariance type)."""
        return cls.from_mixture(sklearn_to_mixture(model))

    def to_mixture(self) -> GaussianMixture:
        """A detached :class:`GaussianMixture` with the current parameters (for exact evaluation)."""
        with torch.no_grad():
            return GaussianMixture(self.means.detach().clone(), self.covs().detach(), self.weights().detach())

    @property
    def num_components(self) -> int:
        """Number of components ``K``."""
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        """Dimension ``d``."""
        return self.means.shape[1]

    def chols(self) -> Tensor:
        """Cholesky factors ``L_k`` [K, d, d] (differentiable)."""
        return self.chol_lower.tril(-1) + torch.diag_embed(self.log_diag.exp())

    def covs(self) -> Tensor:
        """Covariances ``L_k L_k^T`` [K, d, d] (differentiable)."""
        ch = self.chols()
        return ch @ ch.transpose(1, 2)

    def weights(self) -> Tensor:
        """Weights ``softmax(logits)`` [K] (differentiable)."""
        return torch.softmax(self.logits, 0)

    # ------------------------------------------------------------------ the one piece of mathematics
    def _terms(self, x: Tensor, t: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-component pieces for groups of points sharing a time.

        Args:
            x: [G, M, d] points; group ``g`` is at time ``t[g]``.
            t: [G] float64 times in (0, 1), or ``None`` for the data density (t = 0).

        Returns:
            log_joint: [G, M, K] ``log w_k + log N(x; sqrt(1-t) mu_k, C_k(t))``.
            prec_res: [G, M, K, d] ``C_k(t)^{-1} (x - sqrt(1-t) mu_k)``.
        """
        x = x.to(torch.float64)
        d = self.dim
        if t is None:
            chol = self.chols()[None]  # [1, K, d, d]
            diff = x[:, None] - self.means[None, :, None, :]  # [G, K, M, d]
        else:
            t = t.to(torch.float64)
            a2 = (1 - t)[:, None, None, None]  # [G, 1, 1, 1]
            cov = a2 * self.covs()[None] + t[:, None, None, None] * torch.eye(d, dtype=torch.float64)
            chol = torch.linalg.cholesky(cov)  # [G, K, d, d]
            diff = x[:, None] - a2.sqrt() * self.means[None, :, None, :]  # [G, K, M, d]
        # the d x d inverse factor once per (group, component), then plain matrix products over the M points
        eye = torch.eye(d, dtype=torch.float64).expand_as(chol)
        inv = torch.linalg.solve_triangular(chol, eye, upper=False)  # L^{-1}, [G, K, d, d]
        y = diff @ inv.transpose(-1, -2)  # rows L^{-1} (x - m), [G, K, M, d]
        prec = y @ inv  # rows C^{-1} (x - m)
        logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [G or 1, K]
        log_n = -0.5 * (d * _LOG_2PI + logdet[..., None] + y.pow(2).sum(-1))  # [G, K, M]
        log_joint = log_n + torch.log_softmax(self.logits, 0)[None, :, None]
        return log_joint.transpose(1, 2), prec.transpose(1, 2)

    # ------------------------------------------------------------------ densities and eps
    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density [B] (nats, float64, differentiable in the parameters) of ``x`` [B, d]."""
        x = self._check(x)
        log_joint, _ = self._terms(x[None], None)
        return torch.logsumexp(log_joint[0], dim=1)

    def component_log_prob(self, x: Tensor) -> Tensor:
        """``log w_k + log N(x; mu_k, S_k)`` [B, K] (float64): the joint of point and component."""
        x = self._check(x)
        return self._terms(x[None], None)[0][0]

    def eps_grouped(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Exact ``eps*`` for groups of points sharing a time: ``x_t`` [G, M, d], ``t`` [G] -> [G, M, d] float64.

        Grouping lets a fit evaluate many noise draws at a few shared times with one Cholesky per
        (group, component); :meth:`eps` is the ``G = B, M = 1`` case.
        """
        log_joint, prec = self._terms(x_t, t)
        r = torch.softmax(log_joint, dim=-1)  # [G, M, K]
        return t.to(torch.float64).sqrt()[:, None, None] * (r[..., None] * prec).sum(-2)

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Exact noise predictor of the member, an ``EpsFn``: ``x_t`` [B, d], ``t`` [B] float64 -> [B, d]
        in ``x_t``'s dtype (differentiable in the parameters)."""
        x_t = self._check(x_t)
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must be [B] = ({x_t.shape[0]},), got {tuple(t.shape)}")
        if not ((t > 0) & (t < 1)).all():
            raise ValueError("t must lie in the open interval (0, 1)")
        return self.eps_grouped(x_t[:, None, :], t)[:, 0, :].to(x_t.dtype)

    forward = eps

    def _check(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected points of shape [B, {self.dim}], got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            rows = (~torch.isfinite(x).all(1)).nonzero().flatten()[:10].tolist()
            raise ValueError(f"x contains NaN or Inf in rows {rows}")
        return x

    def extra_repr(self) -> str:
        return f"K={self.num_components}, d={self.dim}"


def sklearn_to_mixture(model) -> GaussianMixture:
    """Convert a fitted ``sklearn.mixture.GaussianMixture`` (full/tied/diag/spherical) to a :class:`GaussianMixture`."""
    means = torch.as_tensor(model.means_, dtype=torch.float64)
    k, d = means.shape
    cov = torch.as_tensor(model.covariances_, dtype=torch.float64)
    kind = model.covariance_type
    if kind == "full":
        covs = cov
    elif kind == "tied":
        covs = cov.expand(k, d, d).clone()
    elif kind == "diag":
        covs = torch.diag_embed(cov)
    elif kind == "spherical":
        covs = cov[:, None, None] * torch.eye(d, dtype=torch.float64)
    else:
        raise ValueError(f"unknown sklearn covariance_type {kind!r}")
    covs = 0.5 * (covs + covs.transpose(1, 2))
    w = torch.as_tensor(model.weights_, dtype=torch.float64)
    return GaussianMixture(means, covs, w / w.sum())
