"""Readers for data on disk, on tiny files written by hand in tmp_path: MNIST idx, CIFAR-10 binary, image
folders, .npy/.npz. Round trips (values, labels, shapes), seeded splits, and every bad-input error."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from scoredensity.data import DataError, load_dataset
from scoredensity.data.files import CIFAR10_FILES, CIFAR10_RECORD, MNIST_FILES, read_idx

RNG: np.random.Generator  # a fresh generator per test (below): no test's data depends on which tests ran before


@pytest.fixture(autouse=True)
def _fresh_rng():
    global RNG
    RNG = np.random.default_rng(0)
    yield


# ---------------------------------------------------------------------- writers (the formats, by hand)
def write_idx(path: Path, a: np.ndarray, gz: bool = False) -> Path:
    """idx: 0x00 0x00, type code (0x08 = ubyte), ndim, big-endian uint32 sizes, raw data."""
    assert a.dtype == np.uint8
    raw = bytes([0, 0, 0x08, a.ndim]) + struct.pack(">" + "I" * a.ndim, *a.shape) + a.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def make_mnist(folder: Path, n_train=10, n_test=4, h=6, w=5, gz=False) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": RNG.integers(0, 256, (n_train, h, w), dtype=np.uint8),
        "y_train": RNG.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": RNG.integers(0, 256, (n_test, h, w), dtype=np.uint8),
        "y_test": RNG.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, fname in MNIST_FILES.items():
        write_idx(folder / fname, arrays[key], gz=gz)
    return arrays


def make_cifar(folder: Path, per_batch=3, n_test=4) -> dict[str, np.ndarray]:
    """Binary CIFAR-10: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32)."""
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = {"train": [], "test": []}, {"train": [], "test": []}
    for fname in CIFAR10_FILES:
        split = "test" if fname == "test_batch.bin" else "train"
        n = n_test if split == "test" else per_batch
        x = RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = RNG.integers(0, 10, n, dtype=np.uint8)
        with open(folder / fname, "wb") as f:
            for i in range(n):
                f.write(bytes([y[i]]))
                for c in range(3):
                    f.write(x[i, c].tobytes())  # row-major 32x32 plane
        xs[split].append(x)
        ys[split].append(y)
    return {f"{v}_{s}": np.concatenate(d[s]) for v, d in (("x", xs), ("y", ys)) for s in ("train", "test")}


def write_png(path: Path, a: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


# ---------------------------------------------------------------------- MNIST
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_round_trip(tmp_path, gz):
    arrays = make_mnist(tmp_path / "m", gz=gz)
    ds = load_dataset("mnist", root=tmp_path / "m")
    assert ds.levels == 256 and ds.shape == (1, 6, 5) and ds.num_classes == 10
    assert ds.x_train.dtype == torch.int64 and ds.y_train.dtype == torch.int64
    assert np.array_equal(ds.x_train[:, 0].numpy(), arrays["x_train"])
    assert np.array_equal(ds.y_train.numpy(), arrays["y_train"])
    assert np.array_equal(ds.x_test[:, 0].numpy(), arrays["x_test"])
    assert np.array_equal(ds.y_test.numpy(), arrays["y_test"])
    assert ds.meta["split"] == "fixed" and len(ds.meta["files"]) == 4
    # a folder holding the idx files also works as a path, and torchvision's MNIST/raw layout is found
    assert torch.equal(load_dataset(str(tmp_path / "m")).x_train, ds.x_train)
    make_mnist(tmp_path / "tv" / "MNIST" / "raw")
    assert load_dataset("mnist", root=tmp_path / "tv").shape == (1, 6, 5)


def test_mnist_subset_is_seeded_and_drawn_from_the_official_parts(tmp_path):
    arrays = make_mnist(tmp_path, n_train=12, n_test=6)
    a = load_dataset("mnist", root=tmp_path, n=5, test_fraction=0.4, seed=1)
    b = load_dataset("mnist", root=tmp_path, n=5, test_fraction=0.4, seed=1)
    assert len(a.x_train) == 3 and len(a.x_test) == 2
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    train_rows = {r.tobytes() for r in arrays["x_train"]}
    test_rows = {r.tobytes() for r in arrays["x_test"]}
    assert all(r.numpy().astype(np.uint8).tobytes() in train_rows for r in a.x_train[:, 0])
    assert all(r.numpy().astype(np.uint8).tobytes() in test_rows for r in a.x_test[:, 0])


def test_truncated_idx_is_reported_with_sizes(tmp_path):
    make_mnist(tmp_path)
    p = tmp_path / MNIST_FILES["x_test"]
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated: header says shape \(4, 6, 5\)"):
        load_dataset("mnist", root=tmp_path)
    with pytest.raises(DataError, match="not an idx file"):
        (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04")
        read_idx(tmp_path / "junk")


def test_truncated_gzip_is_reported(tmp_path):
    make_mnist(tmp_path, gz=True)
    p = tmp_path / (MNIST_FILES["x_train"] + ".gz")
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot read.*truncated"):
        load_dataset("mnist", root=tmp_path)


def test_mnist_wrong_files_names_expected_and_found(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / MNIST_FILES["y_test"]).unlink()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError) as e:
        load_dataset("mnist", root=tmp_path)
    msg = str(e.value)
    assert "lacks t10k-labels-idx1-ubyte[.gz]" in msg and "expected the idx files" in msg
    assert "found: notes.txt, t10k-images-idx3-ubyte, train-images-idx3-ubyte" in msg
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", root=tmp_path / "missing")


def test_mnist_label_count_mismatch(tmp_path):
    make_mnist(tmp_path)
    write_idx(tmp_path / MNIST_FILES["y_train"], np.zeros(9, dtype=np.uint8))
    with pytest.raises(DataError, match="10 images but 9 labels"):
        load_dataset("mnist", root=tmp_path)


# ---------------------------------------------------------------------- CIFAR-10
def test_cifar_round_trip(tmp_path):
    arrays = make_cifar(tmp_path / "cifar-10-batches-bin")
    ds = load_dataset("cifar10", root=tmp_path)  # the archive's own sub-folder is found
    assert ds.shape == (3, 32, 32) and ds.levels == 256 and len(ds.x_train) == 15 and len(ds.x_test) == 4
    assert np.array_equal(ds.x_train.numpy(), arrays["x_train"])
    assert np.array_equal(ds.y_train.numpy(), arrays["y_train"])
    assert np.array_equal(ds.x_test.numpy(), arrays["x_test"])
    assert np.array_equal(ds.y_test.numpy(), arrays["y_test"])
    # the red plane of the first pixel row is the record's bytes 1..32
    rec = (tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin").read_bytes()[:CIFAR10_RECORD]
    assert ds.y_train[0] == rec[0] and ds.x_train[0, 0, 0].tolist() == list(rec[1:33])
    assert torch.equal(load_dataset(str(tmp_path / "cifar-10-batches-bin")).x_test, ds.x_test)


def test_cifar_truncated_batch(tmp_path):
    make_cifar(tmp_path)
    p = tmp_path / "data_batch_3.bin"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"data_batch_3.bin: truncated.*3073-byte records \(2 records \+ 3063 bytes"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_pickle_version_is_refused_with_listing(tmp_path):
    for name in ("data_batch_1", "data_batch_2", "test_batch", "batches.meta"):
        (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=tmp_path)
    msg = str(e.value)
    assert "lacks data_batch_1.bin" in msg and "test_batch.bin" in msg and "not the python pickles" in msg
    assert "found: batches.meta, data_batch_1, data_batch_2, test_batch" in msg


def test_cifar_bad_label_byte(tmp_path):
    make_cifar(tmp_path)
    p = tmp_path / "test_batch.bin"
    raw = bytearray(p.read_bytes())
    raw[CIFAR10_RECORD] = 200  # label of the second record
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"test_batch.bin: label bytes must lie in 0..9; records \[1\]"):
        load_dataset("cifar10", root=tmp_path)


# ---------------------------------------------------------------------- image folders
def test_image_folder_flat_greyscale_round_trip(tmp_path):
    imgs = RNG.integers(0, 256, (7, 6, 5), dtype=np.uint8)
    for i, a in enumerate(imgs):
        write_png(tmp_path / f"img{i:02d}.png", a)
    ds = load_dataset(str(tmp_path), test_fraction=2 / 7, seed=3)
    assert ds.shape == (1, 6, 5) and ds.levels == 256 and ds.y_train is None and ds.num_classes is None
    assert len(ds.x_train) == 5 and len(ds.x_test) == 2
    got = torch.cat([ds.x_train, ds.x_test])[:, 0].numpy().astype(np.uint8)
    assert sorted(r.tobytes() for r in got) == sorted(r.tobytes() for r in imgs)  # disjoint and complete
    again = load_dataset(str(tmp_path), test_fraction=2 / 7, seed=3)
    assert torch.equal(again.x_test, ds.x_test)


def test_image_folder_classes_and_rgb(tmp_path):
    imgs = RNG.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    for i, a in enumerate(imgs):
        write_png(tmp_path / ("cat" if i < 2 else "dog") / f"{i}.png", a)
    ds = load_dataset(str(tmp_path), test_fraction=0.5, seed=0)
    assert ds.shape == (3, 4, 4) and ds.num_classes == 2 and ds.meta["class_names"] == ["cat", "dog"]
    x = torch.cat([ds.x_train, ds.x_test]).numpy()
    y = torch.cat([ds.y_train, ds.y_test]).numpy()
    for xi, yi in zip(x, y, strict=True):
        i = next(j for j, a in enumerate(imgs) if np.array_equal(a.transpose(2, 0, 1), xi))
        assert yi == (0 if i < 2 else 1)


def test_jpeg_is_read(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg", quality=95)
    ds = load_dataset(str(tmp_path), n=3, test_fraction=0.34)
    assert ds.shape == (3, 8, 8) and len(ds.x_train) == 2


def test_image_folder_mismatched_sizes(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((6, 5), np.uint8))
    write_png(tmp_path / "b.png", np.zeros((6, 5), np.uint8))
    write_png(tmp_path / "c.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"one size.*5x6: 2 files \(e.g. a.png\); 8x8: 1 files \(e.g. c.png\)"):
        load_dataset(str(tmp_path))


def test_empty_and_mixed_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*no images.*found: nothing \(empty folder\)"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images.*found: readme.txt"):
        load_dataset(str(tmp_path / "docs"))
    write_png(tmp_path / "mixed" / "a.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "mixed" / "cls" / "b.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="both at top level"):
        load_dataset(str(tmp_path / "mixed"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"x.png: cannot read as an image"):
        load_dataset(str(tmp_path / "broken"))


# ---------------------------------------------------------------------- .npy / .npz
def test_float_npy_is_continuous(tmp_path):
    x = RNG.normal(size=(50, 3)).astype(np.float64)
    np.save(tmp_path / "a.npy", x)
    ds = load_dataset(str(tmp_path / "a.npy"), seed=2)
    assert ds.levels is None and ds.x_train.dtype == torch.float32 and ds.shape == (3,)
    got = torch.cat([ds.x_train, ds.x_test]).numpy()
    assert sorted(map(tuple, got)) == sorted(map(tuple, x.astype(np.float32)))
    assert ds.meta["files"][0]["name"] == "a.npy" and len(ds.meta["sha256"]["x_train"]) == 64


def test_npz_nan_rows_named(tmp_path):
    x = RNG.normal(size=(30, 2))
    x[[4, 11, 12]] = np.nan
    np.savez(tmp_path / "bad.npz", x=x)
    with pytest.raises(DataError, match=r"bad.npz: x contains NaN or Inf in rows \[4, 11, 12\]"):
        load_dataset(str(tmp_path / "bad.npz"))


@pytest.mark.parametrize("hi,levels", [(1, 2), (9, 17), (16, 17), (200, 256)])
def test_integer_levels_inferred(tmp_path, hi, levels):
    x = RNG.integers(0, hi + 1, (40, 5)).astype(np.int32)
    x[0, 0] = hi
    np.save(tmp_path / "i.npy", x)
    ds = load_dataset(str(tmp_path / "i.npy"))
    assert ds.levels == levels and ds.x_train.dtype == torch.int64 and ds.meta["levels_inferred"]


def test_levels_explicit_and_errors(tmp_path):
    x = RNG.integers(0, 16, (40, 5)).astype(np.uint8)
    np.save(tmp_path / "i.npy", x)
    assert load_dataset(str(tmp_path / "i.npy"), levels=16).levels == 16
    np.savez(tmp_path / "l.npz", x=x, levels=np.int64(16))
    assert load_dataset(str(tmp_path / "l.npz")).levels == 16
    with pytest.raises(DataError, match="stores levels=16, but levels=17"):
        load_dataset(str(tmp_path / "l.npz"), levels=17)
    with pytest.raises(DataError, match="outside 0..7"):
        load_dataset(str(tmp_path / "i.npy"), levels=8)
    np.save(tmp_path / "big.npy", np.array([[0], [1000]]))
    with pytest.raises(DataError, match="exceed 8 bits; pass levels="):
        load_dataset(str(tmp_path / "big.npy"))
    np.save(tmp_path / "neg.npy", np.array([[0], [-1]]))
    with pytest.raises(DataError, match="non-negative"):
        load_dataset(str(tmp_path / "neg.npy"))


def test_big_endian_and_wide_integer_arrays(tmp_path):
    x = RNG.integers(0, 1024, (30, 4)).astype(">u2")
    np.save(tmp_path / "be.npy", x)
    ds = load_dataset(str(tmp_path / "be.npy"), levels=1024)
    got = torch.cat([ds.x_train, ds.x_test]).numpy()
    assert sorted(map(tuple, got)) == sorted(map(tuple, x.astype(np.int64)))
    np.save(tmp_path / "bef.npy", RNG.normal(size=(10, 2)).astype(">f8"))
    assert load_dataset(str(tmp_path / "bef.npy")).x_train.dtype == torch.float32


def test_npz_fixed_split_with_labels(tmp_path):
    xtr = RNG.integers(0, 256, (8, 1, 3, 3)).astype(np.uint8)
    xte = RNG.integers(0, 256, (3, 1, 3, 3)).astype(np.uint8)
    ytr, yte = np.arange(8) % 3, np.array([2, 0, 1])
    np.savez(tmp_path / "s.npz", x_train=xtr, x_test=xte, y_train=ytr, y_test=yte)
    ds = load_dataset(str(tmp_path / "s.npz"), logit=True)
    assert ds.levels == 256 and ds.logit_alpha == 0.05 and ds.num_classes == 3
    assert np.array_equal(ds.x_train.numpy(), xtr) and np.array_equal(ds.y_test.numpy(), yte)


def test_npz_with_labels_splits_rows_together(tmp_path):
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    y = np.arange(20) % 4
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    ds = load_dataset(str(tmp_path / "xy.npz"), test_fraction=0.25, seed=9)
    assert len(ds.x_test) == 5
    rows = (ds.x_train[:, 0] / 3).long()
    assert torch.equal(ds.y_train, rows % 4)
    assert set(rows.tolist()).isdisjoint((ds.x_test[:, 0] / 3).long().tolist())


def test_npz_bad_contents(tmp_path):
    np.savez(tmp_path / "k.npz", a=np.zeros((3, 2)), b=np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"unrecognised keys \['a', 'b'\]; expected x \[\+ y\]"):
        load_dataset(str(tmp_path / "k.npz"))
    np.save(tmp_path / "o.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="o.npy: holds Python objects"):
        load_dataset(str(tmp_path / "o.npy"))
    np.savez(tmp_path / "t.npz", x=np.zeros((100, 4)))
    p = tmp_path / "t.npz"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DataError, match="t.npz: cannot read"):
        load_dataset(str(p))
    np.save(tmp_path / "tr.npy", np.zeros((100, 4)))
    p = tmp_path / "tr.npy"
    p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(DataError, match="tr.npy: cannot read"):
        load_dataset(str(p))
    (tmp_path / "a.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_dataset(str(tmp_path / "a.csv"))
