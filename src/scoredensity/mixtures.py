"""Analytic Gaussian mixtures: exact densities, scores and noise predictors at every canonical time.

A mixture ``sum_k w_k N(mu_k, S_k)`` pushed through ``x_t = sqrt(1-t) x + sqrt(t) z`` stays a mixture,
``sum_k w_k N(sqrt(1-t) mu_k, (1-t) S_k + t I)``. With the eigendecomposition ``S_k = U_k diag(s_k) U_k^T``
done once, every noise level is diagonal in the same basis: ``(1-t) S_k + t I = U_k diag((1-t) s_k + t) U_k^T``,
so densities, scores and ``eps*`` at any batch of times cost two matrix products per component, for any
dimension (tested up to d = 1000). Everything is computed in float64 and returned in the input's dtype.

This is the ground truth of the whole project.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["GaussianMixture", "mixture_preset", "MIXTURE_PRESETS"]

_LOG_2PI = math.log(2 * math.pi)


class GaussianMixture:
    """A Gaussian mixture in ``d`` dimensions with full covariances.

    Args:
        means: [K, d] component means.
        covs: [K, d, d] symmetric positive-definite covariances.
        weights: [K] positive weights summing to 1 (within 1e-6).

    Raises:
        ValueError: on inconsistent shapes, non-finite entries, weights that are not a probability
            vector, or a covariance that is not symmetric positive definite.
    """

    def __init__(self, means: Tensor, covs: Tensor, weights: Tensor):
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64, device=means.device)
        weights = torch.as_tensor(weights, dtype=torch.float64, device=means.device)
        if means.dim() != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(means.shape)}")
        k, d = means.shape
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must be [K, d, d] = {(k, d, d)}, got {tuple(covs.shape)}")
        if weights.shape != (k,):
            raise ValueError(f"weights must be [K] = ({k},), got {tuple(weights.shape)}")
        for name, v in (("means", means), ("covs", covs), ("weights", weights)):
            if not torch.isfinite(v).all():
                raise ValueError(f"{name} contain NaN or Inf")
        if (weights <= 0).any() or abs(float(weights.sum()) - 1) > 1e-6:
            raise ValueError(f"weights must be positive and sum to 1, got sum {float(weights.sum()):.8g}")
        asym = (covs - covs.transpose(1, 2)).abs().amax()
        if asym > 1e-8 * max(1.0, float(covs.abs().amax())):
            raise ValueError(f"covs must be symmetric (max asymmetry {float(asym):.3g})")
        evals, evecs = torch.linalg.eigh(covs)
        bad = (evals <= 0).any(dim=1) | ~torch.isfinite(evals).all(dim=1)
        if bad.any():
            comps = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"covariance of component(s) {comps} is not positive definite "
                f"(smallest eigenvalue {float(evals.min()):.3g})"
            )
        self.means = means
        self.covs = covs
        self.weights = weights / weights.sum()
        self.evals = evals  # [K, d]
        self.evecs = evecs  # [K, d, d], columns are eigenvectors
        self._proj_means = torch.einsum("kji,kj->ki", evecs, means)  # U_k^T mu_k, [K, d]

    # ------------------------------------------------------------------ basic properties
    @property
    def dim(self) -> int:
        """Dimension ``d``."""
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        """Number of components ``K``."""
        return self.means.shape[0]

    def mean(self) -> Tensor:
        """Mixture mean [d]."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Mixture covariance [d, d]."""
        m = self.mean()
        dm = self.means - m
        return torch.einsum("k,kij->ij", self.weights, self.covs) + torch.einsum("k,ki,kj->ij", self.weights, dm, dm)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, d={self.dim})"

    @property
    def device(self) -> torch.device:
        """Where the parameters live (and where :meth:`eps` and the densities compute)."""
        return self.means.device

    def to(self, device: torch.device | str) -> GaussianMixture:
        """This mixture with its parameters on ``device`` (``self`` when already there; not revalidated)."""
        dev = torch.device(device)
        if self.means.device == dev:
            return self
        new = object.__new__(GaussianMixture)
        for name in ("means", "covs", "weights", "evals", "evecs", "_proj_means"):
            setattr(new, name, getattr(self, name).to(dev))
        return new

    # ------------------------------------------------------------------ constructors
    @classmethod
    def gaussian(cls, mean: Tensor, cov: Tensor) -> GaussianMixture:
        """A single Gaussian ``N(mean, cov)``."""
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        return cls(mean[None], cov[None], torch.ones(1, dtype=torch.float64, device=mean.device))

    @classmethod
    def fit_gaussian(cls, x: Tensor, shrinkage: float = 1e-3, block_rows: int = 4096) -> GaussianMixture:
        """The Gaussian fitted to data ``x`` [N, *shape] (sample mean and covariance, with
        ``shrinkage * mean(variance) * I`` added so it stays positive definite for small N).

        Computed on ``x``'s device (CPU for MPS) in float64 blocks of ``block_rows`` rows, so memory is
        O(d^2 + block_rows d) whatever N."""
        x = torch.as_tensor(x)
        dev = torch.device("cpu") if x.device.type == "mps" else x.device
        n, d = x.shape[0], x[0].numel()
        blocks = [slice(s, min(s + block_rows, n)) for s in range(0, n, block_rows)]
        rows = lambda sl: x[sl].flatten(1).to(device=dev, dtype=torch.float64)  # noqa: E731
        mean = sum(rows(sl).sum(0) for sl in blocks) / n
        cov = torch.zeros(d, d, dtype=torch.float64, device=dev)
        for sl in blocks:
            xc = rows(sl) - mean
            cov += xc.T @ xc
        cov = cov / max(n - 1, 1)
        scale = float(cov.diagonal().mean()) if n > 1 else 1.0
        cov = 0.5 * (cov + cov.T) + max(shrinkage * scale, 1e-12) * torch.eye(d, dtype=torch.float64, device=dev)
        return cls.gaussian(mean, cov)

    def moment_matched(self) -> GaussianMixture:
        """The Gaussian with this mixture's mean and covariance."""
        return GaussianMixture.gaussian(self.mean(), self.covariance())

    # ------------------------------------------------------------------ sampling and densities
    def sample(
        self, n: int, generator: torch.Generator | None = None, return_labels: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Draw ``n`` samples [n, d] (float64); with ``return_labels`` also the component index [n]."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        root = self.evecs * self.evals.sqrt()[:, None, :]  # U diag(sqrt s), [K, d, d]
        x = self.means[labels] + torch.einsum("nij,nj->ni", root[labels], z)
        return (x, labels) if return_labels else x

    def _check_x(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected points of shape [B, {self.dim}], got {tuple(x.shape)}")
        bad = ~torch.isfinite(x).all(dim=1)
        if bad.any():
            rows = bad.nonzero().flatten()[:10].tolist()
            raise ValueError(f"x contains NaN or Inf in rows {rows}")
        return x

    def _check_t(self, t: Tensor | float, batch: int) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or [B] = ({batch},), got {tuple(t.shape)}")
        if not ((t > 0) & (t < 1)).all():
            bad = ((t <= 0) | (t >= 1) | t.isnan()).nonzero().flatten()[:10].tolist()
            raise ValueError(f"t must lie in the open interval (0, 1); rows {bad} do not")
        return t.to(torch.float64)

    def _components(self, x_t: Tensor, t: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component pieces at time ``t`` (``None`` means t = 0, the data density).

        Returns:
            log_joint: [B, K] ``log w_k + log N(x_t; a mu_k, a^2 S_k + t I)``.
            y_over_var: [K, B, d] ``(U_k^T (x_t - a mu_k)) / (a^2 s_k + t)``.
            var: [K, B, d] the eigenvalues ``a^2 s_k + t``.
        """
        x = x_t.to(torch.float64)
        proj = torch.einsum("bi,kij->kbj", x, self.evecs)  # U_k^T x, [K, B, d]
        if t is None:
            y = proj - self._proj_means[:, None, :]
            var = self.evals[:, None, :].expand_as(y)
        else:
            a2 = (1 - t)[None, :, None]  # [1, B, 1]
            y = proj - a2.sqrt() * self._proj_means[:, None, :]
            var = a2 * self.evals[:, None, :] + t[None, :, None]
        maha = (y**2 / var).sum(-1)  # [K, B]
        logdet = var.log().sum(-1)
        log_n = -0.5 * (self.dim * _LOG_2PI + logdet + maha)
        return (log_n + self.weights.log()[:, None]).T, y / var, var

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density [B] (nats, float64) of data points ``x`` [B, d]."""
        x = self._check_x(x)
        log_joint, _, _ = self._components(x, None)
        return torch.logsumexp(log_joint, dim=1)

    def log_prob_t(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Exact log-density [B] (float64) of the noised marginal ``p_t`` at ``x_t`` [B, d], ``t`` in (0, 1)."""
        x_t = self._check_x(x_t)
        t = self._check_t(t, x_t.shape[0])
        log_joint, _, _ = self._components(x_t, t)
        return torch.logsumexp(log_joint, dim=1)

    def responsibilities_t(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Posterior component probabilities [B, K] given ``x_t`` at time ``t``."""
        x_t = self._check_x(x_t)
        t = self._check_t(t, x_t.shape[0])
        log_joint, _, _ = self._components(x_t, t)
        return torch.softmax(log_joint, dim=1)

    def _neg_score(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``-grad log p_t(x_t)`` [B, d] in float64 (inputs already checked)."""
        log_joint, y_over_var, _ = self._components(x_t, t)
        r = torch.softmax(log_joint, dim=1)  # [B, K]
        # -score = sum_k r_k U_k (y_k / var_k)
        back = torch.einsum("kbj,kij->kbi", y_over_var, self.evecs)  # [K, B, d]
        return torch.einsum("bk,kbi->bi", r, back)

    def score(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Exact score ``grad log p_t(x_t)`` [B, d] at time ``t`` in (0, 1), in ``x_t``'s dtype."""
        x_t = self._check_x(x_t)
        t = self._check_t(t, x_t.shape[0])
        return (-self._neg_score(x_t, t)).to(x_t.dtype)

    def eps(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Exact noise predictor ``eps*(x_t, t) = E[z | x_t] = -sqrt(t) score`` [B, d], in ``x_t``'s dtype.

        This has the ``EpsFn`` signature and is the ground truth every estimator is tested against.
        """
        x_t = self._check_x(x_t)
        t = self._check_t(t, x_t.shape[0])
        return (t.sqrt()[:, None] * self._neg_score(x_t, t)).to(x_t.dtype)

    __call__ = eps

    # ------------------------------------------------------------------ closed forms for one Gaussian
    def expected_denoising_error(self, x: Tensor, t: Tensor) -> Tensor:
        """``E_z || z - eps*(sqrt(1-t) x + sqrt(t) z, t) ||^2`` [B] in closed form (single Gaussian only).

        For ``N(m, S)`` with ``S = U diag(s) U^T``, ``A = (1-t) S + t I`` and ``u = U^T (x - m)``:
        ``sum_i ((1-t) s_i / A_i)^2 + t (1-t) sum_i u_i^2 / A_i^2``.
        """
        return self.expected_denoising_error_fn(x)(t)

    def expected_denoising_error_fn(self, x: Tensor):
        """:meth:`expected_denoising_error` at fixed ``x`` [B, d] as a function of ``t`` alone: the projection
        ``u = U^T (x - m)`` (the O(B d^2) part) is done once, each ``t`` then costs O(B d)."""
        if self.num_components != 1:
            raise ValueError("the closed-form denoising error exists for a single Gaussian only")
        x = self._check_x(x).to(torch.float64)
        u2 = ((x - self.means[0]) @ self.evecs[0]) ** 2  # [B, d]
        s = self.evals[0]

        def error_at(t: Tensor | float) -> Tensor:
            t = self._check_t(t, x.shape[0])
            a2 = (1 - t)[:, None]
            var = a2 * s + t[:, None]
            return ((a2 * s / var) ** 2).sum(1) + (t * (1 - t)) * (u2 / var**2).sum(1)

        return error_at

    def expected_denoising_error_grid(self, x: Tensor, t: Tensor) -> Tensor:
        """:meth:`expected_denoising_error` of every row of ``x`` [B, d] at every time of ``t`` [N]: [B, N] float64,
        as one matrix product (single Gaussian only; ``t`` in (0, 1), on ``x``'s device)."""
        if self.num_components != 1:
            raise ValueError("the closed-form denoising error exists for a single Gaussian only")
        x = self._check_x(x).to(torch.float64)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).flatten()
        u2 = ((x - self.means[0]) @ self.evecs[0]) ** 2  # [B, d]
        a2, s = (1 - t)[:, None], self.evals[0][None, :]
        var = a2 * s + t[:, None]  # [N, d]
        return ((a2 * s / var) ** 2).sum(1)[None, :] + (t * (1 - t))[None, :] * (u2 @ var.pow(-2).T)


class StandardNormal:
    """``N(0, I)`` in closed form, in any dimension and on any device, without the d x d algebra of
    :class:`GaussianMixture`: ``eps*(y, t) = sqrt(t) y`` and ``E_z ||z - eps*||^2 = d (1-t)^2 + t (1-t) ||x||^2``.

    The ``"prior"`` control variate of the estimators (:func:`scoredensity.formula.resolve_control_variate`)."""

    def to(self, device: torch.device | str) -> StandardNormal:
        """``self`` (no parameters)."""
        return self

    @staticmethod
    def eps(y: Tensor, t: Tensor) -> Tensor:
        """Exact ``eps*`` [B, d] of ``N(0, I)`` at ``y`` [B, d], ``t`` [B]: ``sqrt(t) y``, in ``y``'s dtype."""
        return t.to(y.dtype).sqrt()[:, None] * y

    @staticmethod
    def expected_denoising_error(x: Tensor, t: Tensor) -> Tensor:
        """``E_z || z - eps*(sqrt(1-t) x + sqrt(t) z, t) ||^2`` [B] float64."""
        return StandardNormal.expected_denoising_error_fn(x)(t)

    @staticmethod
    def expected_denoising_error_fn(x: Tensor):
        """:meth:`expected_denoising_error` at fixed ``x`` [B, *shape] as a function of ``t`` [B] alone."""
        xf = x.flatten(1).to(torch.float64)
        d, sq = xf.shape[1], xf.pow(2).sum(1)
        return lambda t: d * (1 - t) ** 2 + t * (1 - t) * sq

    @staticmethod
    def expected_denoising_error_grid(x: Tensor, t: Tensor) -> Tensor:
        """:meth:`expected_denoising_error` of every row of ``x`` [B, *shape] at every ``t`` [N]: [B, N] float64."""
        xf = x.flatten(1).to(torch.float64)
        t = torch.as_tensor(t, dtype=torch.float64, device=xf.device).flatten()[None, :]
        return xf.shape[1] * (1 - t) ** 2 + t * (1 - t) * xf.pow(2).sum(1, keepdim=True)


# ---------------------------------------------------------------------- presets
def _isotropic(means: Tensor, std: float) -> GaussianMixture:
    k, d = means.shape
    covs = (std**2) * torch.eye(d, dtype=torch.float64).expand(k, d, d).clone()
    return GaussianMixture(means, covs, torch.full((k,), 1.0 / k, dtype=torch.float64))


def ring8() -> GaussianMixture:
    """The "8 Gaussians" toy: means on the circle of radius 2 sqrt(2) at angles 2 pi k / 8,
    isotropic standard deviation 0.5 / sqrt(2), equal weights."""
    ang = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    means = 2 * math.sqrt(2) * torch.stack([ang.cos(), ang.sin()], 1)
    return _isotropic(means, 0.5 / math.sqrt(2))


def grid25() -> GaussianMixture:
    """25 Gaussians with means on {-4, -2, 0, 2, 4}^2, standard deviation 0.05, equal weights."""
    g = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0], dtype=torch.float64)
    means = torch.cartesian_prod(g, g)
    return _isotropic(means, 0.05)


def anisotropic(d: int = 16, seed: int = 0) -> GaussianMixture:
    """Three strongly anisotropic components in ``d`` dimensions.

    Each component has a random rotation and covariance eigenvalues log-spaced over [1e-3, 10]
    (for d = 1 the three variances are 1e-3, 0.3 and 10); means are drawn N(0, 4 I / d) so that the
    components are about 2 apart; weights (0.5, 0.3, 0.2). Fixed by ``seed``.
    """
    if d < 1:
        raise ValueError("d must be >= 1")
    g = torch.Generator().manual_seed(seed)
    covs = []
    for k in range(3):
        if d == 1:
            ev = torch.tensor([(1e-3, 0.3, 10.0)[k]], dtype=torch.float64)
        else:
            ev = torch.logspace(-3, 1, d, dtype=torch.float64)
        q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
        covs.append((q * ev) @ q.T)
    covs = torch.stack(covs)
    covs = 0.5 * (covs + covs.transpose(1, 2))
    means = torch.randn(3, d, dtype=torch.float64, generator=g) * (2.0 / math.sqrt(d))
    return GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


def blobs2d() -> GaussianMixture:
    """The embedded default of ``scoredensity demo``: three 2-D components of different shapes
    (one elongated and tilted), weights (0.5, 0.3, 0.2)."""
    means = torch.tensor([[-1.5, 0.0], [1.5, 1.0], [0.5, -1.5]], dtype=torch.float64)
    c = math.cos(0.6)
    s = math.sin(0.6)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    tilted = rot @ torch.diag(torch.tensor([0.8, 0.05], dtype=torch.float64)) @ rot.T
    covs = torch.stack([tilted, 0.15 * torch.eye(2, dtype=torch.float64), torch.diag(torch.tensor([0.4, 0.1]))]).to(
        torch.float64
    )
    return GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


MIXTURE_PRESETS = {
    "ring8": ring8,
    "grid25": grid25,
    "anisotropic": anisotropic,
    "blobs2d": blobs2d,
}


def mixture_preset(name: str, **kwargs) -> GaussianMixture:
    """A named mixture: ``ring8``, ``grid25``, ``anisotropic`` (``d=``, ``seed=``) or ``blobs2d``."""
    try:
        factory = MIXTURE_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown mixture preset {name!r}; choose one of {sorted(MIXTURE_PRESETS)}") from None
    return factory(**kwargs)
