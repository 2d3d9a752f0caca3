"""``load_dataset``: one entry point from a name or a path to a checked, seeded :class:`Dataset`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..mixtures import MIXTURE_PRESETS
from .dataset import DataError, Dataset, make_dataset
from .files import (
    CIFAR10_FILES,
    IMAGE_SUFFIXES,
    MNIST_FILES,
    read_array_file,
    read_cifar10,
    read_image_folder,
    read_mnist,
)
from .toys import TOY_SCALING, TOYS, sample_mixture, sample_toy

__all__ = ["load_dataset", "dataset_names", "infer_levels", "DEFAULT_N"]

DEFAULT_N = 20000
"""Number of points sampled for the synthetic data sets when ``n`` is not given."""

_AUTO_LEVELS = (2, 17, 256)


def dataset_names() -> list[str]:
    """Every built-in name ``load_dataset`` accepts (besides paths)."""
    return [*MIXTURE_PRESETS, *TOYS, "digits", "mnist", "cifar10"]


def infer_levels(x: np.ndarray, source: str) -> int:
    """Levels of integer data without an explicit ``levels``: ``max + 1`` rounded up to 2, 17 or 256.

    (2: binary, 17: scikit-learn's digits, 256: 8-bit.) Anything else must be stated with ``levels=``.
    """
    if x.size == 0:
        raise DataError(f"{source}: empty array")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0:
        raise DataError(f"{source}: integer data must be non-negative levels, found minimum {lo}")
    for L in _AUTO_LEVELS:
        if hi + 1 <= L:
            return L
    raise DataError(f"{source}: integer data with maximum {hi} exceed 8 bits; pass levels= explicitly")


def _num_classes(*ys) -> int | None:
    ys = [y for y in ys if y is not None]
    return None if not ys else int(max(int(np.max(y)) for y in ys)) + 1


def _fixed_levels(name: str, levels: int | None, native: int) -> int:
    if levels is not None and int(levels) != native:
        raise DataError(f"{name} has {native} levels; levels={levels} cannot be applied")
    return native


def _load_arrays(path: Path, levels: int | None, **common) -> Dataset:
    arrays, info = read_array_file(path)
    src = str(path)
    if "levels" in arrays:
        file_levels = int(arrays.pop("levels"))
        if levels is not None and int(levels) != file_levels:
            raise DataError(f"{src}: stores levels={file_levels}, but levels={levels} was passed")
        levels = file_levels
    x = arrays.get("x", arrays.get("x_train"))
    xs = [a for k, a in arrays.items() if k.startswith("x")]
    if levels is None and all(a.dtype.kind in "biu" for a in xs):
        levels = max(infer_levels(a, src) for a in xs)
        info["levels_inferred"] = True
    elif levels is None and any(a.dtype.kind in "biu" for a in xs):
        raise DataError(f"{src}: x_train and x_test must both be integer or both be floating point")
    ys = (arrays.get("y"), arrays.get("y_train"), arrays.get("y_test"))
    nc = _num_classes(*ys)
    meta = {"source": src, **info, **({"num_classes": nc} if nc is not None else {})}
    return make_dataset(
        src,
        x,
        arrays.get("y", arrays.get("y_train")),
        levels=levels,
        x_test=arrays.get("x_test"),
        y_test=arrays.get("y_test"),
        meta=meta,
        **common,
    )


def is_mnist_dir(p: Path) -> bool:
    return any((p / (MNIST_FILES["x_train"] + s)).is_file() for s in ("", ".gz"))


def is_cifar_dir(p: Path) -> bool:
    return any((p / f).is_file() for f in CIFAR10_FILES)


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    n: int | None = None,
    logit: bool = False,
    root: str | os.PathLike | None = None,
    levels: int | None = None,
) -> Dataset:
    """Load a data set by name or path, split by ``seed``.

    Names:
        * mixture presets ``ring8``, ``grid25``, ``blobs2d``, ``anisotropic`` (d = 16): ``n`` points
          (default 20000) sampled with ``torch.Generator().manual_seed(seed)``; ``Dataset.mixture`` is the
          exact density.
        * 2-D toys ``moons``, ``swissroll``, ``checkerboard`` (continuous, scaled as in :mod:`.toys`).
        * ``digits``: scikit-learn's 8x8 digits (bundled, offline), 1797 images [1, 8, 8], 17 levels, labels.
        * ``mnist``: idx files under ``root`` (``train-images-idx3-ubyte[.gz]`` etc.), [1, 28, 28], 256 levels,
          the official 60000/10000 split.
        * ``cifar10``: binary batches under ``root`` (``data_batch_1.bin`` .. ``test_batch.bin``), [3, 32, 32],
          256 levels, the official 50000/10000 split.
        * a path: ``.npy``/``.npz`` (floating -> continuous; integer -> discrete with ``levels`` from the
          argument, a ``levels`` entry of the ``.npz``, or ``max + 1`` rounded up to 2, 17 or 256); a folder
          with the MNIST or CIFAR-10 files; otherwise a folder of PNG/JPEG images (256 levels; class
          subfolders give labels). A relative path is also looked up under ``root``. Built-in names win over
          a file or folder of the same name (write ``./digits`` for the folder).

    Args:
        seed: split (and sampling) seed; the same seed gives the same arrays bit for bit.
        test_fraction: share of test examples (for fixed splits: only used together with ``n``).
        n: total number of examples (sampled, or a seeded subset); None: all (synthetic: 20000).
        logit: logit transform (alpha = 0.05) in ``to_model``; discrete data only.
        root: data directory for ``mnist``/``cifar10`` (default ``$SCOREDENSITY_DATA`` or ``./data``).
        levels: number of levels for integer arrays (paths only).

    Returns:
        The :class:`Dataset`; ``meta["load_args"]`` holds these arguments, so that
        ``load_dataset(**ds.meta["load_args"])`` rebuilds it (compare ``meta["sha256"]`` to verify).

    Raises:
        DataError (a ValueError): unknown name, missing or wrong files, truncated files, NaN/Inf rows, bad sizes.
    """
    ds = _load(name, seed=seed, test_fraction=test_fraction, n=n, logit=logit, root=root, levels=levels)
    ds.meta["load_args"] = {
        "name": str(name),
        "seed": int(seed),
        "test_fraction": float(test_fraction),
        "n": None if n is None else int(n),
        "logit": bool(logit),
        "root": None if root is None else str(root),
        "levels": None if levels is None else int(levels),
    }
    return ds


def _load(
    name: str,
    *,
    seed: int,
    test_fraction: float,
    n: int | None,
    logit: bool,
    root: str | os.PathLike | None,
    levels: int | None,
) -> Dataset:
    common = {"seed": seed, "test_fraction": test_fraction, "n": n, "logit": logit}
    if not isinstance(name, str | os.PathLike):
        raise TypeError(f"name must be a string or path, got {type(name).__name__}")
    key = str(name)
    if levels is not None and (key in MIXTURE_PRESETS or key in TOY_SCALING):
        raise DataError(f"{key} is continuous; levels={levels} cannot be applied")
    if key in MIXTURE_PRESETS or key in TOY_SCALING:
        m = DEFAULT_N if n is None else int(n)
        if m < 2:
            raise DataError(f"n must be >= 2, got {m}")
        if key in MIXTURE_PRESETS:
            x, y, gm = sample_mixture(key, m, seed)
            meta = {"source": f"scoredensity.mixtures.mixture_preset({key!r})", "sample_seed": int(seed)}
        else:
            x, y, gm = sample_toy(key, m, seed), None, None
            meta = {"source": f"2-D toy {key!r}", "scaling": TOY_SCALING[key], "sample_seed": int(seed)}
        common["n"] = None
        ds = make_dataset(key, x, y, mixture=gm, meta=meta, **common)
        ds.meta["n"] = m
        return ds
    if key == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = np.asarray(d.images, dtype=np.int64)[:, None]  # values 0..16
        meta = {"source": "sklearn.datasets.load_digits", "num_classes": 10}
        return make_dataset(key, x, d.target, levels=_fixed_levels(key, levels, 17), meta=meta, **common)
    if key in ("mnist", "cifar10"):
        arrays, info = (read_mnist if key == "mnist" else read_cifar10)(root)
        meta = {"source": key, **info, "num_classes": 10}
        return make_dataset(
            key,
            arrays["x_train"],
            arrays["y_train"],
            x_test=arrays["x_test"],
            y_test=arrays["y_test"],
            levels=_fixed_levels(key, levels, 256),
            meta=meta,
            **common,
        )
    path = Path(key).expanduser()
    if not path.exists() and root is not None and (Path(root) / key).exists():
        path = Path(root) / key
    if path.is_file():
        if path.suffix.lower() not in (".npy", ".npz"):
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected .npy or .npz (or a folder)")
        return _load_arrays(path, levels, **common)
    if path.is_dir():
        if is_mnist_dir(path):
            return _load("mnist", root=path, levels=levels, **common)
        if is_cifar_dir(path):
            return _load("cifar10", root=path, levels=levels, **common)
        arrays, info = read_image_folder(path)
        meta = {"source": str(path), **info}
        return make_dataset(
            str(path), arrays["x"], arrays.get("y"), levels=_fixed_levels(str(path), levels, 256), meta=meta, **common
        )
    looks_like_path = os.sep in key or "/" in key or key.lower().endswith((".npy", ".npz", *IMAGE_SUFFIXES))
    if looks_like_path:
        raise DataError(f"data path {key!r} does not exist")
    raise DataError(
        f"unknown data set {key!r}: not a built-in name ({', '.join(dataset_names())}) and no such file or folder"
    )
