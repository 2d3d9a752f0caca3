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
    "max_bytes",
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
CIFAR10_BATCH_RECORDS = 10000  # records in each official batch file
DEFAULT_MAX_BYTES = 8 << 30
_DEFLATE_MAX_RATIO = 1032  # deflate's largest expansion: ~1032 output bytes per input byte


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


def max_bytes() -> int:
    """The largest array a reader will allocate for one file, in bytes: ``$SCOREDENSITY_MAX_BYTES`` if set,
    else 8 GiB. A header that claims more is refused before anything is read or decompressed."""
    raw = os.environ.get("SCOREDENSITY_MAX_BYTES", "").strip()
    if raw:
        try:
            value = int(float(raw))
        except ValueError:
            raise DataError(f"SCOREDENSITY_MAX_BYTES must be a number of bytes, got {raw!r}") from None
        if value < 1:
            raise DataError(f"SCOREDENSITY_MAX_BYTES must be >= 1, got {raw!r}")
        return value
    return DEFAULT_MAX_BYTES


def _read_exactly(f, n: int) -> bytearray:
    """Read exactly up to ``n`` bytes from a stream in blocks (fewer at end of file), without over-reading."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got : got + (1 << 24)])
        if not k:
            break
        got += k
    return buf[:got] if got < n else buf


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file (``.gz`` allowed): magic ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32 sizes, data.

    The header is checked first: a size over :func:`max_bytes`, or one that a gzip file of this size cannot hold
    (deflate expands at most about 1032:1), is refused before any data is read; the data are then streamed, so a
    file with more bytes than its header says is never decompressed beyond the first extra byte.

    Raises:
        DataError: bad magic, unknown type code, an impossible size, or a byte size different from the header's
        (truncated file, trailing bytes).
    """
    path = Path(path)
    gz = path.suffix == ".gz"
    try:
        on_disk = path.stat().st_size
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            raw = f.read(4)
            if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
                magic = raw[:4].hex() or "missing"
                raise DataError(f"{path}: not an idx file (magic bytes {magic}, expected 0000<type><ndim>)")
            code, ndim = raw[2], raw[3]
            if code not in _IDX_DTYPES:
                raise DataError(f"{path}: unknown idx type code 0x{code:02x}")
            head = 4 + 4 * ndim
            raw += f.read(4 * ndim)
            if len(raw) < head:
                raise DataError(f"{path}: truncated idx header ({len(raw)} bytes, header needs {head})")
            dims = struct.unpack(">" + "I" * ndim, raw[4:head])
            dtype = np.dtype(_IDX_DTYPES[code])
            n_data = math.prod(dims) * dtype.itemsize
            expected = head + n_data
            limit = max_bytes()
            if n_data > limit:
                raise DataError(
                    f"{path}: header says shape {tuple(dims)} ({n_data} bytes), over the {limit}-byte limit of one "
                    "file (corrupted or crafted header; set SCOREDENSITY_MAX_BYTES to allow more)"
                )
            if gz and expected > _DEFLATE_MAX_RATIO * on_disk + 4096:
                raise DataError(
                    f"{path}: header says shape {tuple(dims)} ({expected} bytes), which a {on_disk}-byte gzip file "
                    "cannot hold (corrupted or crafted header)"
                )
            if not gz and on_disk != expected:
                what = "truncated" if on_disk < expected else "has trailing bytes"
                raise DataError(
                    f"{path}: {what}: header says shape {tuple(dims)} ({expected} bytes with the header), "
                    f"file has {on_disk} bytes"
                )
            data = _read_exactly(f, n_data)
            if len(data) < n_data:
                raise DataError(
                    f"{path}: truncated: header says shape {tuple(dims)} ({expected} bytes with the header), "
                    f"file has {head + len(data)} bytes"
                )
            if f.read(1):
                raise DataError(
                    f"{path}: has trailing bytes: header says shape {tuple(dims)} ({expected} bytes with the "
                    "header), the file holds more"
                )
    except (EOFError, gzip.BadGzipFile, OSError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); the file is truncated or corrupted") from None
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


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
        DataError: missing files (expected and found listed), a size that is not a whole number of records, a
        batch with more than 10000 records, or record counts that disagree (official batches hold 10000 each; a
        batch cut at a record boundary differs from its siblings).
    """
    folder = find_data_dir(root, ("cifar-10-batches-bin", "cifar10", "cifar-10"), CIFAR10_FILES[0])
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10: {folder} lacks {', '.join(missing)}; expected the binary version "
            f"{', '.join(CIFAR10_FILES)} (not the python pickles); found: {_listing(folder)}"
        )
    sizes = {}
    for fname in CIFAR10_FILES:
        p = folder / fname
        size = p.stat().st_size
        if size == 0 or size % CIFAR10_RECORD:
            raise DataError(
                f"{p}: truncated or corrupted: {size} bytes is not a whole number of {CIFAR10_RECORD}-byte records "
                f"({size // CIFAR10_RECORD} records + {size % CIFAR10_RECORD} bytes; a full batch has "
                f"{CIFAR10_BATCH_RECORDS * CIFAR10_RECORD})"
            )
        if size > CIFAR10_BATCH_RECORDS * CIFAR10_RECORD:
            raise DataError(
                f"{p}: {size // CIFAR10_RECORD} records, more than the {CIFAR10_BATCH_RECORDS} of a CIFAR-10 batch "
                "(not a CIFAR-10 file, or a corrupted one)"
            )
        sizes[fname] = size // CIFAR10_RECORD
    # the record counts are known when the batches are the official ones (10000 each): a batch cut at a record
    # boundary then shows as a count that differs from its siblings'
    train_counts = {sizes[f] for f in CIFAR10_FILES if f != "test_batch.bin"}
    official = CIFAR10_BATCH_RECORDS in sizes.values()
    if len(train_counts) > 1 or (official and set(sizes.values()) != {CIFAR10_BATCH_RECORDS}):
        want = CIFAR10_BATCH_RECORDS if official else max(train_counts)
        short = [f"{f} ({n})" for f, n in sizes.items() if n != want and (official or f != "test_batch.bin")]
        raise DataError(
            f"CIFAR-10 in {folder}: every batch should hold {want} records; {', '.join(short)} hold fewer or more "
            "(a file cut short at a record boundary, or batches from different sources)"
        )
    parts: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    files = []
    for fname in CIFAR10_FILES:
        p = folder / fname
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise DataError(f"{p}: cannot read ({type(e).__name__}: {e})") from None
        if len(raw) != sizes[fname] * CIFAR10_RECORD:
            raise DataError(f"{p}: changed while being read ({len(raw)} bytes, was {sizes[fname] * CIFAR10_RECORD})")
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


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


def _npy_header(f, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data bytes)`` from the header of a ``.npy`` stream positioned at its start, unpickling
    nothing; raises DataError for a header that does not parse or describes Python objects."""
    from numpy.lib import format as npf

    try:
        version = npf.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npf.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = npf.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, SyntaxError, EOFError) as e:
        raise DataError(f"{name}: not a readable .npy array (bad header: {e})") from None
    if dtype.hasobject:
        raise DataError(f"{name}: holds Python objects (pickled); only plain numeric arrays are accepted")
    return tuple(shape), dtype, math.prod(shape) * dtype.itemsize


def _describe_start(head: bytes) -> str:
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "is a Python pickle, not a numpy array file (pickles are never loaded)"
    if head[:2] == b"\x1f\x8b":
        return "is gzip-compressed; decompress it to a .npy first"
    if not head:
        return "is empty"
    return f"is not a numpy .npy/.npz file (it starts with bytes {head[:8].hex()}, not the .npy magic 934e554d5059)"


def _check_array_file(path: Path) -> None:
    """Check a ``.npy``/``.npz`` file's headers before numpy reads it: the magic bytes (random data and pickles are
    named as what they are), shapes against :func:`max_bytes` and against the bytes present, members of a ``.npz``
    against their stored sizes. Reads only the headers.

    Raises:
        DataError: naming the file (and the member of a ``.npz``) and what is wrong.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(_NPY_MAGIC):
                f.seek(0)
                shape, dtype, need = _npy_header(f, str(path))
                have = size - f.tell()
                _check_size(str(path), shape, dtype, need, have)
                return
    except OSError as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not head.startswith(_ZIP_MAGIC):
        raise DataError(f"{path}: {_describe_start(head)}")
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = f"{path}[{info.filename[:-4]}]"
                with z.open(info) as m:
                    if m.read(6) != _NPY_MAGIC:
                        raise DataError(f"{name}: not a .npy array inside the .npz")
                with z.open(info) as m:
                    shape, dtype, need = _npy_header(m, name)
                    _check_size(name, shape, dtype, need, info.file_size - m.tell())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error, NotImplementedError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); truncated or corrupted?") from None


def _check_size(name: str, shape: tuple[int, ...], dtype: np.dtype, need: int, have: int) -> None:
    limit = max_bytes()
    if need > limit:
        raise DataError(
            f"{name}: header says shape {shape} {dtype} ({need} bytes), over the {limit}-byte limit of one file "
            "(corrupted or crafted header; set SCOREDENSITY_MAX_BYTES to allow more)"
        )
    if have < need:
        raise DataError(
            f"{name}: cannot read: truncated (header says shape {shape} {dtype}, {need} bytes of data; "
            f"the file has {max(have, 0)})"
        )


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
    _check_array_file(path)
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
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, zlib.error) as e:
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


def _open_image(p: Path):
    """One image file read fully with Pillow; a decompression bomb (more pixels than Pillow's
    ``Image.MAX_IMAGE_PIXELS``, about 89 million) or an unreadable file is a one-line DataError."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                im.load()
                return im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(
            f"{p}: image too large to decode safely ({e}); a possible decompression bomb, refused"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{p}: cannot read as an image ({e})") from None


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
        img = _open_image(p)
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
