"""The :class:`Dataset` every trainer and evaluator consumes, its model-space transforms, and seeded splits.

Two kinds of data:

* **continuous** (``levels is None``): ``x_*`` are float32 values used by the model as they are;
* **discrete** (``levels = L``): ``x_*`` are int64 levels ``k = 0..L-1``. The data scale is docs/design.md's
  ``x = 2k/(L-1) - 1`` in [-1, 1]; :meth:`Dataset.to_model` dequantises uniformly,
  ``x = 2(k + u - 1/2)/(L-1) - 1`` with ``u ~ U[0, 1)`` (each bin has width ``2/(L-1)`` around its centre),
  and then applies the optional logit transform.

Logit transform (Real NVP / sdeflow-light's ``LogitTransform``, ``alpha = 0.05``): the dequantised value is
first mapped to [0, 1) as ``y = (k + u)/L`` (affine in ``x``: ``y = ((x + 1)(L - 1)/2 + 1/2)/L``), then
``y' = alpha + (1 - 2 alpha) y`` and the model sees ``m = logit(y')``. Per dimension

    log |dm/dx| = log((L-1)/(2L)) + log(1 - 2 alpha) - log y' - log(1 - y'),

with ``-log y' - log(1 - y') = softplus(m) + softplus(-m)`` evaluated from ``m`` itself (stable). Then
``log p_data(x) = log p_model(m) + log_jacobian(m)`` on the [-1, 1] data scale, and bits per dimension of the
integer data follow docs/design.md §2: ``bpd = -log p_data / (d ln 2) + log2((L - 1)/2)``
(:func:`scoredensity.logdensity.bits_per_dim`). For ``L = 256`` this equals sdeflow-light's
``-elbo/(d ln 2) + 8`` on its ``[0, 1]`` scale, i.e. the published scale.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputFileError
from ..logdensity import bits_per_dim as _bits_per_dim
from ..mixtures import GaussianMixture

__all__ = [
    "DataError",
    "Dataset",
    "LOGIT_ALPHA",
    "make_dataset",
    "split_indices",
    "batch_indices",
    "iterate_batches",
    "array_sha256",
    "levels_to_unit_scale",
]

LOGIT_ALPHA = 0.05
"""Default ``alpha`` of the logit transform (sdeflow-light, Real NVP)."""


def levels_to_unit_scale(k: Tensor, levels: int, u: Tensor | float = 0.5) -> Tensor:
    """Integer levels ``k`` in 0..L-1 to the [-1, 1] scale (docs/design.md units): ``x = 2(k + u - 1/2)/(L-1) - 1``.

    ``u = 1/2`` gives the bin centres ``2k/(L-1) - 1``; ``u ~ U[0, 1)`` is uniform dequantisation. float64.
    """
    return 2 * (k.to(torch.float64) + u - 0.5) / (levels - 1) - 1


class DataError(InputFileError):
    """Bad or unreadable input data; the message names the file, rows or keys at fault (exit code 3; a
    ``ValueError``)."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split of one data set, with the maps between data and model space.

    Attributes:
        name: the name or path it was loaded from.
        x_train, x_test: [N, *shape]. float32 model-space values for continuous data; int64 levels
            ``0..levels-1`` for discrete data.
        y_train, y_test: [N] int64 class labels, or None.
        levels: ``L`` for discrete data (17 for scikit-learn's digits, 256 for 8-bit images), None if continuous.
        mixture: the exact density of the continuous data in model space (mixture presets), else None.
        logit_alpha: ``alpha`` of the logit transform, None unless the transform is on (discrete data only).
        meta: JSON-serialisable provenance: source, files, sha256 of the arrays, split seed, sizes.
    """

    name: str
    x_train: Tensor
    x_test: Tensor
    y_train: Tensor | None
    y_test: Tensor | None
    levels: int | None
    mixture: GaussianMixture | None = None
    logit_alpha: float | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        xs = {"x_train": self.x_train, "x_test": self.x_test}
        for key, x in xs.items():
            if not isinstance(x, Tensor):
                raise TypeError(f"{key} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() < 2:
                raise DataError(f"{key} must have shape [N, *shape], got {tuple(x.shape)}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"x_train and x_test differ in shape: {tuple(self.x_train.shape[1:])} vs {tuple(self.x_test.shape[1:])}"
            )
        if self.levels is None:
            for key, x in xs.items():
                if x.dtype != torch.float32:
                    raise DataError(f"continuous data must be float32; {key} is {x.dtype}")
            if self.logit_alpha is not None:
                raise DataError("the logit transform applies to discrete data (levels set) only")
        else:
            if int(self.levels) < 2:
                raise DataError(f"levels must be >= 2, got {self.levels}")
            for key, x in xs.items():
                if x.dtype != torch.int64:
                    raise DataError(f"discrete data must be int64 levels; {key} is {x.dtype}")
        if self.logit_alpha is not None and not 0 < self.logit_alpha < 0.5:
            raise DataError(f"logit_alpha must lie in (0, 1/2), got {self.logit_alpha}")
        if self.mixture is not None and (self.levels is not None or self.mixture.dim != self.dim):
            raise DataError(f"mixture of dimension {self.mixture.dim} does not fit the data: shape {self.shape}")
        for key, y, x in (("y_train", self.y_train, self.x_train), ("y_test", self.y_test, self.x_test)):
            if y is None:
                continue
            if y.dtype != torch.int64 or y.shape != x.shape[:1]:
                raise DataError(f"{key} must be int64 of shape {tuple(x.shape[:1])}, got {y.dtype} {tuple(y.shape)}")
        if (self.y_train is None) != (self.y_test is None):
            raise DataError("y_train and y_test must both be given or both be None")

    # ------------------------------------------------------------------ sizes
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(2,)`` or ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def dim(self) -> int:
        """Number of elements ``d`` of one example."""
        return math.prod(self.shape)

    @property
    def num_classes(self) -> int | None:
        """Number of classes (``meta["num_classes"]`` if recorded, else ``max label + 1``); None if unlabelled."""
        if self.y_train is None:
            return None
        if "num_classes" in self.meta:
            return int(self.meta["num_classes"])
        return max(int(self.y_train.max()), int(self.y_test.max())) + 1

    @property
    def discrete(self) -> bool:
        """True for data on ``levels`` integer levels."""
        return self.levels is not None

    def __repr__(self) -> str:
        kind = "continuous" if self.levels is None else f"levels={self.levels}"
        logit = "" if self.logit_alpha is None else f", logit_alpha={self.logit_alpha}"
        return (
            f"Dataset({self.name!r}, shape={self.shape}, {kind}{logit}, n_train={len(self.x_train)}, "
            f"n_test={len(self.x_test)}, classes={self.num_classes}, exact={self.mixture is not None})"
        )

    # ------------------------------------------------------------------ transforms
    def to_model(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        dequantize: bool = True,
        *,
        u: Tensor | None = None,
    ) -> Tensor:
        """A float32 model-space batch from a batch of stored examples.

        Discrete data: uniform dequantisation ``x = 2(k + u - 1/2)/(L-1) - 1``, ``u ~ U[0,1)`` drawn from
        ``generator`` (or given as ``u``, same shape as ``x``, values in [0, 1)); with ``dequantize=False`` the bin
        centres ``2k/(L-1) - 1`` (``u = 1/2``); then the logit transform if ``logit_alpha`` is set.
        Continuous data are returned as they are (float32).

        Args:
            x: [B, *shape] int levels (discrete) or float values (continuous).
        Returns:
            [B, *shape] float32.
        """
        if self.levels is None:
            if not x.is_floating_point():
                raise DataError(f"continuous data expected a floating tensor, got {x.dtype}")
            return x.to(torch.float32)
        L = self.levels
        if x.is_floating_point() or x.is_complex():
            raise DataError(f"discrete data expect integer levels 0..{L - 1}, got a {x.dtype} tensor")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > L - 1):
            raise DataError(f"levels out of range 0..{L - 1}: found min {int(x.min())}, max {int(x.max())}")
        k = x.to(torch.float64)
        if u is not None:
            if u.shape != x.shape:
                raise DataError(f"u must have the shape of x {tuple(x.shape)}, got {tuple(u.shape)}")
            if u.numel() and (float(u.min()) < 0 or float(u.max()) >= 1):
                raise DataError("u must lie in [0, 1)")
            u = u.to(torch.float64)
        elif dequantize:
            u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
        else:
            u = torch.full_like(k, 0.5)
        if self.logit_alpha is None:
            return levels_to_unit_scale(k, L, u).to(torch.float32)
        return self._logit((k + u) / L).to(torch.float32)

    def from_data(self, x_data: Tensor) -> Tensor:
        """Model-space values from continuous values on the data scale (the [-1, 1] scale of discrete data).

        The identity unless the logit transform is on; then ``y = ((x + 1)(L-1)/2 + 1/2)/L``,
        ``m = logit(alpha + (1 - 2 alpha) y)``. Differentiable (used to check :meth:`log_jacobian` by autograd).
        """
        if self.logit_alpha is None:
            return x_data
        L = self.levels
        y = ((x_data + 1) * (L - 1) / 2 + 0.5) / L
        return self._logit(y)

    def to_data(self, x_model: Tensor) -> Tensor:
        """Inverse of :meth:`from_data`: model-space values back to the data scale (float, same dtype)."""
        if self.logit_alpha is None:
            return x_model
        a, L = self.logit_alpha, self.levels
        y = (torch.sigmoid(x_model) - a) / (1 - 2 * a)
        return 2 * (y * L - 0.5) / (L - 1) - 1

    def to_levels(self, x_model: Tensor) -> Tensor:
        """Nearest integer levels [B, *shape] int64 (clamped to 0..L-1) of model-space values, e.g. samples."""
        if self.levels is None:
            raise DataError("to_levels needs discrete data (levels set)")
        x = self.to_data(x_model.to(torch.float64))
        k = torch.round((x + 1) * (self.levels - 1) / 2)
        return k.clamp(0, self.levels - 1).to(torch.int64)

    def _logit(self, y: Tensor) -> Tensor:
        a = self.logit_alpha
        s = a + (1 - 2 * a) * y
        return torch.log(s) - torch.log1p(-s)

    def log_jacobian(self, x_model: Tensor) -> Tensor:
        """``log |det d(model)/d(data on the [-1, 1] scale)|`` per example, [B] float64 nats.

        So that ``log p_data = log p_model + log_jacobian``. Zeros without a transform; with the logit
        transform the sum over elements of ``log((L-1)/(2L)) + log(1 - 2 alpha) + softplus(m) + softplus(-m)``.
        """
        b = x_model.shape[0]
        if self.logit_alpha is None:
            return torch.zeros(b, dtype=torch.float64)
        m = x_model.to(torch.float64).reshape(b, -1)
        const = math.log((self.levels - 1) / (2 * self.levels)) + math.log(1 - 2 * self.logit_alpha)
        return (const + F.softplus(m) + F.softplus(-m)).sum(dim=1)

    def bits_per_dim(self, nll_model: Tensor, x_model: Tensor) -> Tensor | None:
        """Bits per dimension of the discrete data on the published scale, [B] float64; None for continuous data.

        ``bpd = (nll_model - log_jacobian) / (d ln 2) + log2((L - 1)/2)``, where ``nll_model`` [B] is the
        negative log-density (nats) of the model-space points ``x_model`` (a dequantised, continuous density).
        A uniform density over the bins gives exactly ``log2(L)``.
        """
        if self.levels is None:
            return None
        nll_model = torch.as_tensor(nll_model, dtype=torch.float64)
        if nll_model.shape != x_model.shape[:1]:
            raise DataError(f"nll_model must be [B] = {tuple(x_model.shape[:1])}, got {tuple(nll_model.shape)}")
        return _bits_per_dim(nll_model - self.log_jacobian(x_model), self.dim, self.levels)


# ---------------------------------------------------------------------- building a Dataset
def array_sha256(a: np.ndarray | Tensor) -> str:
    """SHA-256 of an array's C-contiguous bytes (dtype and shape are recorded separately in ``meta``)."""
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    return hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B")).hexdigest()


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded train/test split of ``range(n)``: ``torch.randperm`` under ``torch.Generator().manual_seed(seed)``;
    the first ``round(n * test_fraction)`` indices are the test set. Returns (train, test), each sorted, int64."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n_test > n - 1:
        raise DataError(f"cannot split {n} examples with test_fraction={test_fraction}: both parts must be non-empty")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def _subset(n_total: int, n: int, seed: int) -> Tensor:
    """``n`` sorted indices out of ``range(n_total)`` drawn without replacement (seeded)."""
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed + 7919))
    return perm[:n].sort().values


def _from_numpy(a) -> Tensor:
    """A tensor from a numpy array of any byte order or width (integers -> int64, floats -> float32/64)."""
    if not isinstance(a, np.ndarray):
        return torch.as_tensor(a)
    if a.dtype.kind in "biu":
        a = a.astype(np.int64)
    elif a.dtype.kind == "f":
        a = a.astype(np.float64 if a.dtype.itemsize > 4 else np.float32)
    else:
        raise DataError(f"unsupported array dtype {a.dtype}; expected bool, integer or float")
    return torch.from_numpy(np.ascontiguousarray(a))


def _as_tensor(a, key: str, source: str, levels: int | None) -> Tensor:
    """Checked conversion of one data array to float32 (continuous) or int64 levels (discrete)."""
    t = _from_numpy(a)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() < 2 or t.shape[0] == 0:
        raise DataError(f"{source}: {key} must be a non-empty array [N, *shape], got shape {tuple(t.shape)}")
    if levels is None:
        if not t.is_floating_point():
            raise DataError(f"{source}: {key} has integer dtype {t.dtype} but no levels were set")
        finite = torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
        if not finite.all():
            rows = (~finite).nonzero().flatten()
            more = "" if len(rows) <= 10 else f" (and {len(rows) - 10} more)"
            raise DataError(f"{source}: {key} contains NaN or Inf in rows {rows[:10].tolist()}{more}")
        t32 = t.to(torch.float32)
        finite = torch.isfinite(t32.reshape(t32.shape[0], -1)).all(dim=1)
        if not finite.all():  # finite float64 values beyond float32's range (|x| > 3.4e38) become Inf in the cast
            rows = (~finite).nonzero().flatten()
            more = "" if len(rows) <= 10 else f" (and {len(rows) - 10} more)"
            raise DataError(
                f"{source}: {key} has values beyond the float32 range (|x| > 3.4e38, infinite after the cast to "
                f"float32) in rows {rows[:10].tolist()}{more}"
            )
        return t32
    if t.is_floating_point():
        finite = torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
        if not finite.all():
            rows = (~finite).nonzero().flatten()[:10].tolist()
            raise DataError(f"{source}: {key} contains NaN or Inf in rows {rows}")
        if not (t == t.round()).all():
            raise DataError(f"{source}: {key} has non-integer values but levels={levels} was given")
    t = t.to(torch.int64)
    lo, hi = torch.aminmax(t)
    if int(lo) < 0 or int(hi) > levels - 1:
        bad = ((t < 0) | (t > levels - 1)).reshape(t.shape[0], -1).any(dim=1)
        rows = bad.nonzero().flatten()[:10].tolist()
        raise DataError(
            f"{source}: {key} has values outside 0..{levels - 1} (min {int(t.min())}, max {int(t.max())}) "
            f"in rows {rows}"
        )
    return t


def _as_labels(y, key: str, source: str, n: int) -> Tensor:
    t = _from_numpy(y)
    if t.is_floating_point() or t.dim() != 1 or t.shape[0] != n:
        raise DataError(f"{source}: {key} must be integer labels of shape ({n},), got {t.dtype} {tuple(t.shape)}")
    t = t.to(torch.int64)
    if (t < 0).any():
        raise DataError(f"{source}: {key} has negative labels in rows {(t < 0).nonzero().flatten()[:10].tolist()}")
    return t


def make_dataset(
    name: str,
    x,
    y=None,
    *,
    levels: int | None = None,
    x_test=None,
    y_test=None,
    seed: int = 0,
    test_fraction: float = 0.2,
    n: int | None = None,
    logit: bool = False,
    mixture: GaussianMixture | None = None,
    meta: dict | None = None,
) -> Dataset:
    """Build a checked :class:`Dataset` from in-memory arrays (numpy or torch); every loader ends here.

    Args:
        name: recorded as ``Dataset.name``.
        x: [N, *shape] examples (a 1-D array is read as [N, 1]). Floating -> continuous (float32), unless
            ``levels`` is given; integer levels 0..levels-1 -> discrete (int64).
        y: [N] integer labels or None.
        levels: number of levels of discrete data, None for continuous data.
        x_test, y_test: a fixed test set (e.g. MNIST's official one); then ``x`` is the training set and
            ``test_fraction`` only matters with ``n``.
        seed: split seed (:func:`split_indices`) and subset seed.
        test_fraction: share of the examples that go to the test set.
        n: total number of examples to keep (a seeded random subset) before splitting; with a fixed test set,
            ``n - round(n * test_fraction)`` training and ``round(n * test_fraction)`` test examples are kept.
        logit: apply the logit transform (``alpha = LOGIT_ALPHA``) in :meth:`Dataset.to_model`; discrete data only.
        mixture: exact density of continuous data, if known.
        meta: extra provenance merged into ``Dataset.meta``.

    Raises:
        DataError: non-finite values (rows named), values off the level grid, mismatched sizes, bad split.
    """
    source = (meta or {}).get("source", name)
    if levels is not None and int(levels) < 2:
        raise DataError(f"levels must be >= 2, got {levels}")
    if logit and levels is None:
        raise DataError(f"{source}: the logit transform needs discrete data (levels set); these data are continuous")
    xt = _as_tensor(x, "x" if x_test is None else "x_train", source, levels)
    yt = None if y is None else _as_labels(y, "y" if x_test is None else "y_train", source, xt.shape[0])
    info: dict = {"seed": int(seed)}
    if x_test is None:
        if y_test is not None:
            raise DataError("y_test given without x_test")
        total = xt.shape[0]
        if n is not None:
            if not 2 <= n <= total:
                raise DataError(f"{source}: n={n} must lie in [2, {total}] (the number of examples available)")
            keep = _subset(total, n, seed)
            xt = xt[keep]
            yt = None if yt is None else yt[keep]
        tr, te = split_indices(xt.shape[0], test_fraction, seed)
        x_tr, x_te = xt[tr], xt[te]
        y_tr, y_te = (None, None) if yt is None else (yt[tr], yt[te])
        info.update(split="seeded", test_fraction=float(test_fraction))
    else:
        x_te = _as_tensor(x_test, "x_test", source, levels)
        if x_te.shape[1:] != xt.shape[1:]:
            shapes = f"{tuple(xt.shape[1:])} vs {tuple(x_te.shape[1:])}"
            raise DataError(f"{source}: x_train and x_test differ in example shape: {shapes}")
        if (y is None) != (y_test is None):
            raise DataError(f"{source}: labels must be given for both the training and the test set, or for neither")
        y_te = None if y_test is None else _as_labels(y_test, "y_test", source, x_te.shape[0])
        x_tr, y_tr = xt, yt
        info.update(split="fixed")
        if n is not None:
            if not 0 < test_fraction < 1:
                raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
            n_te = int(round(n * test_fraction))
            n_tr = n - n_te
            if not (1 <= n_tr <= len(x_tr) and 1 <= n_te <= len(x_te)):
                raise DataError(
                    f"{source}: n={n} with test_fraction={test_fraction} asks for {n_tr} training and {n_te} test "
                    f"examples; available {len(x_tr)} and {len(x_te)}"
                )
            ktr, kte = _subset(len(x_tr), n_tr, seed), _subset(len(x_te), n_te, seed + 1)
            x_tr, x_te = x_tr[ktr], x_te[kte]
            y_tr, y_te = (None, None) if y_tr is None else (y_tr[ktr], y_te[kte])
            info.update(test_fraction=float(test_fraction))
    info.update(
        n=None if n is None else int(n),
        n_train=int(x_tr.shape[0]),
        n_test=int(x_te.shape[0]),
        shape=list(x_tr.shape[1:]),
        dtype=str(x_tr.dtype).replace("torch.", ""),
        levels=None if levels is None else int(levels),
        logit_alpha=LOGIT_ALPHA if logit else None,
        sha256={
            k: array_sha256(v)
            for k, v in (("x_train", x_tr), ("x_test", x_te), ("y_train", y_tr), ("y_test", y_te))
            if v is not None
        },
    )
    full_meta = {"name": name, "source": source, **(meta or {}), **info}
    return Dataset(
        name=name,
        x_train=x_tr.contiguous(),
        x_test=x_te.contiguous(),
        y_train=None if y_tr is None else y_tr.contiguous(),
        y_test=None if y_te is None else y_te.contiguous(),
        levels=None if levels is None else int(levels),
        mixture=mixture,
        logit_alpha=LOGIT_ALPHA if logit else None,
        meta=full_meta,
    )


# ---------------------------------------------------------------------- batches
def batch_indices(
    n: int, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = True, shuffle: bool = True
) -> Iterator[Tensor]:
    """One epoch of index batches over ``range(n)`` (int64 tensors), shuffled by ``torch.randperm(n, generator)``.

    With ``drop_last`` the final incomplete batch is dropped (every batch has exactly ``batch_size`` indices).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if drop_last and n < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} examples and drop_last=True would yield nothing")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        yield order[i : i + batch_size]


def iterate_batches(
    x: Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    drop_last: bool = True,
    *,
    y: Tensor | None = None,
    shuffle: bool = True,
) -> Iterator[Tensor] | Iterator[tuple[Tensor, Tensor]]:
    """One epoch of batches ``x[idx]`` (or ``(x[idx], y[idx])`` when ``y`` is given); see :func:`batch_indices`."""
    for idx in batch_indices(x.shape[0], batch_size, generator, drop_last, shuffle):
        yield x[idx] if y is None else (x[idx], y[idx])
