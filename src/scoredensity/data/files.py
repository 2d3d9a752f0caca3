"""Readers for data on disk: MNIST idx files, CIFAR-10 binary batches, ``.npy``/``.npz`` arrays, image folders.

Every reader returns plain numpy arrays plus a provenance dict and raises :class:`DataError` with a message
that names the file and what is wrong (expected vs found files, expected vs actual byte sizes, ...).
Nothing is ever unpickled: ``np.load(..., allow_pickle=False)`` and the CIFAR-10 *binary* version only.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .dataset import DataError

__all__ = [
    "MNIST_FILES",
    "CIFAR10_FILES",
    "IMAGE_SUFFIXES",
    "read_idx",
    "read_mnist",
    "read_cifar10",
    "read_array_file",
    "read_image_folder",
    "find_data_dir",
]

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
CIFAR10_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
CIFAR10_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1024 R, 1024 G, 1024 B bytes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# idx type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _listing(folder: Path, limit: int = 20) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError:
        return "(unreadable)"
    if not names:
        return "nothing (empty folder)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def find_data_dir(root: str | os.PathLike | None, subdirs: tuple[str, ...], marker: str) -> Path:
    """The first of ``root`` and ``root/<subdir>`` that holds ``marker`` (or ``marker.gz``), else ``root``.

    ``root=None`` means ``$SCOREDENSITY_DATA`` if set, else ``./data``.
    """
    base = Path(root if root is not None else os.environ.get("SCOREDENSITY_DATA", "data")).expanduser()
    if not base.is_dir():
        where = "" if root is not None else " (root=None: $SCOREDENSITY_DATA or ./data)"
        raise DataError(f"data directory {str(base)!r} does not exist{where}")
    for cand in (base, *(base / s for s in subdirs)):
        if (cand / marker).is_file() or (cand / (marker + ".gz")).is_file():
            return cand
    return base


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, OSError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); the file is truncated or corrupted") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file (``.gz`` allowed): magic ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32 sizes, data.

    Raises:
        DataError: bad magic, unknown type code, or a byte size different from the header's (truncated file).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        magic = raw[:4].hex() or "missing"
        raise DataError(f"{path}: not an idx file (magic bytes {magic}, expected 0000<type><ndim>)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown idx type code 0x{code:02x}")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated idx header ({len(raw)} bytes, header needs {head})")
    dims = struct.unpack(">" + "I" * ndim, raw[4:head])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = head + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {what}: header says shape {tuple(dims)} ({expected} bytes with the header), "
            f"file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


def read_mnist(root: str | os.PathLike | None) -> tuple[dict[str, np.ndarray], dict]:
    """MNIST (or any data in its layout, e.g. Fashion-MNIST) from the four idx files under ``root``
    (or ``root/MNIST/raw``, ``root/mnist``), each optionally gzipped.

    Returns:
        arrays: ``x_train`` [60000, 1, 28, 28] uint8, ``y_train`` [60000] uint8, ``x_test``, ``y_test``.
        info: provenance (directory, file names and sizes).
    """
    folder = find_data_dir(root, ("MNIST/raw", "mnist", "MNIST"), MNIST_FILES["x_train"])
    paths, missing = {}, []
    for key, fname in MNIST_FILES.items():
        if (folder / fname).is_file():
            paths[key] = folder / fname
        elif (folder / (fname + ".gz")).is_file():
            paths[key] = folder / (fname + ".gz")
        else:
            missing.append(fname + "[.gz]")
    if missing:
        raise DataError(
            f"MNIST: {folder} lacks {', '.join(missing)}; expected the idx files "
            f"{', '.join(f + '[.gz]' for f in MNIST_FILES.values())}; found: {_listing(folder)}"
        )
    arrays = {key: read_idx(p) for key, p in paths.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DataError(f"{paths['x_' + split]}: expected uint8 images [N, H, W], got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.dtype != np.uint8:
            raise DataError(f"{paths['y_' + split]}: expected uint8 labels [N], got {y.dtype} {y.shape}")
        if len(x) != len(y):
            raise DataError(f"MNIST {split}: {len(x)} images but {len(y)} labels")
        if y.size and y.max() > 9:
            raise DataError(f"{paths['y_' + split]}: labels must lie in 0..9, found {int(y.max())}")
        arrays[f"x_{split}"] = x[:, None]
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(f"MNIST: train images {arrays['x_train'].shape[2:]} and test images differ in size")
    info = {"directory": str(folder), "files": [{"name": p.name, "bytes": p.stat().st_size} for p in paths.values()]}
    return arrays, info


def read_cifar10(root: str | os.PathLike | None) -> tuple[dict[str, np.ndarray], dict]:
    """CIFAR-10, binary version, from ``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin`` under
    ``root`` (or ``root/cifar-10-batches-bin``). Each record: 1 label byte then 3072 bytes (R, G, B planes, 32x32).

    Returns:
        arrays: ``x_train`` [N, 3, 32, 32] uint8, ``y_train`` [N] uint8, ``x_test``, ``y_test``.
        info: provenance.
    Raises:
        DataError: missing files (expected and found listed), a size that is not a whole number of records.
    """
    folder = find_data_dir(root, ("cifar-10-batches-bin", "cifar10", "cifar-10"), CIFAR10_FILES[0])
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10: {folder} lacks {', '.join(missing)}; expected the binary version "
            f"{', '.join(CIFAR10_FILES)} (not the python pickles); found: {_listing(folder)}"
        )
    parts: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    files = []
    for fname in CIFAR10_FILES:
        p = folder / fname
        raw = p.read_bytes()
        if len(raw) == 0 or len(raw) % CIFAR10_RECORD:
            raise DataError(
                f"{p}: truncated or corrupted: {len(raw)} bytes is not a whole number of {CIFAR10_RECORD}-byte records "
                f"({len(raw) // CIFAR10_RECORD} records + {len(raw) % CIFAR10_RECORD} bytes; a full batch has "
                f"{10000 * CIFAR10_RECORD})"
            )
        rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
        if rec[:, 0].max() > 9:
            bad = np.nonzero(rec[:, 0] > 9)[0][:10].tolist()
            raise DataError(f"{p}: label bytes must lie in 0..9; records {bad} do not (corrupted file)")
        parts["test" if fname == "test_batch.bin" else "train"].append(rec)
        files.append({"name": fname, "bytes": len(raw)})
    arrays = {}
    for split, recs in parts.items():
        rec = np.concatenate(recs)
        arrays[f"x_{split}"] = rec[:, 1:].reshape(-1, 3, 32, 32).copy()
        arrays[f"y_{split}"] = rec[:, 0].copy()
    return arrays, {"directory": str(folder), "files": files}


_NPZ_LAYOUTS = "x [+ y], or x_train + x_test [+ y_train + y_test], optionally levels, or a single array"


def read_array_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays from a ``.npy`` (one array: ``x``) or ``.npz`` file, never unpickling.

    ``.npz`` keys: ``x`` with optional labels ``y``; or a fixed split ``x_train``, ``x_test`` with optional
    ``y_train``, ``y_test``; or a single array of any name. An optional 0-d integer ``levels`` entry fixes the
    number of levels of integer data.

    Returns:
        arrays: a subset of ``x, y, x_train, x_test, y_train, y_test, levels``.
        info: provenance (file name, size, keys).
    """
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = {"x": loaded}
        else:
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
    except ValueError as e:
        if "allow_pickle" in str(e) or "pickle" in str(e).lower():
            raise DataError(f"{path}: holds Python objects (pickled); only plain numeric arrays are accepted") from None
        raise DataError(f"{path}: cannot read as a numpy array file ({e}); truncated or corrupted?") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); truncated or corrupted?") from None
    keys = set(arrays)
    out: dict[str, np.ndarray] = {}
    if "levels" in keys:
        lv = arrays.pop("levels")
        if lv.ndim != 0 or not np.issubdtype(lv.dtype, np.integer):
            raise DataError(f"{path}: 'levels' must be a 0-d integer array, got {lv.dtype} {lv.shape}")
        out["levels"] = lv
        keys.discard("levels")
    if keys <= {"x", "y"} and "x" in keys:
        out.update(arrays)
    elif keys <= {"x_train", "x_test", "y_train", "y_test"} and {"x_train", "x_test"} <= keys:
        if ("y_train" in keys) != ("y_test" in keys):
            raise DataError(f"{path}: has only one of y_train / y_test; give labels for both splits or neither")
        out.update(arrays)
    elif len(keys) == 1:
        out["x"] = arrays[next(iter(keys))]
    else:
        raise DataError(f"{path}: unrecognised keys {sorted(keys)}; expected {_NPZ_LAYOUTS}")
    for k, a in out.items():
        if a.dtype.kind not in "biuf":
            raise DataError(f"{path}: array {k!r} has dtype {a.dtype}; only bool, integer and float arrays work")
    info = {"file": str(path), "files": [{"name": path.name, "bytes": path.stat().st_size}], "keys": sorted(arrays)}
    return out, info


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image_folder(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """8-bit images (PNG/JPEG, read with Pillow) from a folder: either all directly in ``folder`` (unlabelled)
    or one level of class subfolders ``folder/<class>/*.png`` (labels = index of the sorted class names).

    All images must share one size. If every image is greyscale (modes 1, L, LA, I, I;16) they are read as one
    channel, otherwise all are converted to RGB (alpha dropped).

    Returns:
        arrays: ``x`` [N, C, H, W] uint8 and, for class subfolders, ``y`` [N] int64.
        info: provenance (folder, number of files, class names, mode).
    Raises:
        DataError: no images, images both at top level and in subfolders, mismatched sizes, unreadable files.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    top = _image_files(folder)
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and _image_files(p))
    if top and classes:
        raise DataError(
            f"{folder}: has images both at top level ({top[0].name}, ...) and in subfolders "
            f"({', '.join(c.name for c in classes[:5])}); use one layout"
        )
    if not top and not classes:
        raise DataError(
            f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) at top level or in class subfolders; "
            f"found: {_listing(folder)}"
        )
    files = [(p, None) for p in top] if top else [(p, i) for i, c in enumerate(classes) for p in _image_files(c)]
    images, sizes, grey = [], {}, True
    for p, _ in files:
        try:
            with Image.open(p) as im:
                im.load()
                img = im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DataError(f"{p}: cannot read as an image ({e})") from None
        sizes.setdefault(img.size, []).append(p)
        grey &= img.mode in ("1", "L", "LA", "I", "I;16")
        images.append(img)
    if len(sizes) > 1:
        desc = "; ".join(
            f"{w}x{h}: {len(ps)} files (e.g. {ps[0].relative_to(folder)})" for (w, h), ps in sorted(sizes.items())
        )
        raise DataError(f"{folder}: images must all have one size (width x height); found {desc}")
    mode = "L" if grey else "RGB"
    arrs = []
    for img in images:
        if grey and img.mode in ("I", "I;16"):
            raise DataError(f"{folder}: 16/32-bit greyscale images are not supported; convert them to 8-bit")
        a = np.asarray(img.convert(mode), dtype=np.uint8)
        arrs.append(a[None] if grey else a.transpose(2, 0, 1))
    arrays = {"x": np.stack(arrs)}
    info: dict = {"folder": str(folder), "num_files": len(files), "mode": mode}
    if classes:
        arrays["y"] = np.array([lab for _, lab in files], dtype=np.int64)
        info["class_names"] = [c.name for c in classes]
        info["num_classes"] = len(classes)
    return arrays, info
