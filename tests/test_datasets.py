"""Loaders read small archives written here in the exact official formats, and reject broken ones by name.

Long because every reader and every way a file can be wrong has its case, all sharing the
writers of the official formats at the top.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from vitspec.app import datasets
from vitspec.app.datasets import (
    ChecksumError,
    DatasetError,
    DatasetNotFoundError,
    DownloadError,
    ImageSet,
)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------------------------
# Writers of the official formats


def _pickled(obj: dict, numpy_module: bytes | None = None) -> bytes:
    """Protocol 2, bytes keys: what the official py2 cPickle files decode to with encoding="bytes".

    numpy_module=b"numpy.core" spells the array constructor as NumPy 1 did in the real files.
    """
    blob = pickle.dumps(obj, protocol=2)
    return blob.replace(b"numpy._core.multiarray", numpy_module + b".multiarray") if numpy_module else blob


def _cifar_rows(images_nhwc: np.ndarray) -> np.ndarray:
    """NHWC -> the official [N, 3072] rows: the red plane, then green, then blue."""
    return images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), 3072)


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return path


def _random_split(rng: np.random.Generator, n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), rng.integers(0, num_classes, size=n)


def write_cifar10(directory: Path, per_batch: int = 3, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    members, train_images, train_labels = {}, [], []
    for i in range(1, 6):
        images, labels = _random_split(rng, per_batch, 10)
        train_images.append(images)
        train_labels.append(labels)
        members[f"cifar-10-batches-py/data_batch_{i}"] = _pickled(
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": labels.tolist(),
                b"data": _cifar_rows(images),
                b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
            },
            numpy_module=b"numpy.core",
        )
    test_images, test_labels = _random_split(rng, per_batch, 10)
    members["cifar-10-batches-py/test_batch"] = _pickled(
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": test_labels.tolist(),
            b"data": _cifar_rows(test_images),
        }
    )
    members["cifar-10-batches-py/batches.meta"] = _pickled(
        {
            b"label_names": [n.encode() for n in CIFAR10_NAMES],
            b"num_cases_per_batch": per_batch,
            b"num_vis": 3072,
        }
    )
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    expected = {
        "train_images": np.concatenate(train_images),
        "train_labels": np.concatenate(train_labels),
        "test_images": test_images,
        "test_labels": test_labels,
    }
    return _tar_gz(directory / "cifar-10-python.tar.gz", members), expected


def _cifar100_batch(rng: np.random.Generator, n: int) -> tuple[dict, dict[str, np.ndarray]]:
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    fine, coarse = rng.integers(0, 100, size=n), rng.integers(0, 20, size=n)
    batch = {
        b"filenames": [b"x.png"] * n,
        b"batch_label": b"training batch 1 of 1",
        b"fine_labels": fine.tolist(),
        b"coarse_labels": coarse.tolist(),
        b"data": _cifar_rows(images),
    }
    return batch, {"images": images, "fine": fine, "coarse": coarse}


def write_cifar100(directory: Path, n: int = 6) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(1)
    train, train_expected = _cifar100_batch(rng, n)
    test, test_expected = _cifar100_batch(rng, n)
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    members = {
        "cifar-100-python/train": _pickled(train, numpy_module=b"numpy.core"),
        "cifar-100-python/test": _pickled(test),
        "cifar-100-python/meta": _pickled(meta),
    }
    path = _tar_gz(directory / "cifar-100-python.tar.gz", members)
    return path, {"train": train_expected, "test": test_expected}


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_mnist(directory: Path, n_train: int = 7, n_test: int = 4, gzipped: bool = True) -> dict:
    rng = np.random.default_rng(2)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        if gzipped:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (directory / stem).write_bytes(idx_bytes(array))
    return arrays


# ----------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_archive_reads_back_exactly(tmp_path):
    path, expected = write_cifar10(tmp_path)
    official = datasets.read_cifar10(path)
    assert official.train.images.dtype == np.uint8 and official.train.images.shape == (15, 32, 32, 3)
    assert official.train.labels.dtype == np.int64
    np.testing.assert_array_equal(official.train.images, expected["train_images"])
    np.testing.assert_array_equal(official.train.labels, expected["train_labels"])
    np.testing.assert_array_equal(official.test.images, expected["test_images"])
    np.testing.assert_array_equal(official.test.labels, expected["test_labels"])
    assert official.class_names == tuple(CIFAR10_NAMES)


def test_cifar_rows_are_channel_planes():
    """Row layout per the CIFAR page: the first 1024 bytes are red, row-major, then green, then blue."""
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    image[0, 0, 1, 2] = 7  # blue, row 0, column 1
    batch = {b"data": np.zeros((1, 3072), dtype=np.uint8)}
    batch[b"data"][0, 2 * 1024 + 1] = 7
    np.testing.assert_array_equal(datasets.cifar._cifar_images(batch, "t"), image)


def test_cifar10_extracted_directory_matches_archive(tmp_path):
    path, expected = write_cifar10(tmp_path)
    with tarfile.open(path) as archive:
        # The data filter where this Python has it (3.11.4 on; Debian 12's 3.11.2 has not): the
        # archive is the test's own, so the default is safe too.
        archive.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    official = datasets.read_official("cifar10", tmp_path)  # prefers the extracted directory
    np.testing.assert_array_equal(official.train.images, expected["train_images"])


@pytest.mark.parametrize("label_set,num_classes", [("fine", 100), ("coarse", 20)])
def test_cifar100_both_label_sets(tmp_path, label_set, num_classes):
    path, expected = write_cifar100(tmp_path)
    official = datasets.read_cifar100(path, label_set)
    for split in ("train", "test"):
        got = getattr(official, split)
        np.testing.assert_array_equal(got.images, expected[split]["images"])
        np.testing.assert_array_equal(got.labels, expected[split][label_set])
    assert len(official.class_names) == num_classes
    assert official.class_names[3] == f"{label_set}3"


def test_cifar100_defaults_to_fine_labels(tmp_path):
    path, expected = write_cifar100(tmp_path)
    np.testing.assert_array_equal(datasets.read_cifar100(path).train.labels, expected["train"]["fine"])


def test_truncated_archive_is_named(tmp_path):
    path, _ = write_cifar10(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"cifar-10-python\.tar\.gz: not a readable tar\.gz"):
        datasets.read_cifar10(path)


def test_not_gzip_is_named(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(DatasetError, match=r"cifar-10-python\.tar\.gz: not a readable tar\.gz"):
        datasets.read_cifar10(path)


def test_missing_member_is_named(tmp_path):
    _tar_gz(tmp_path / "cifar-10-python.tar.gz", {"cifar-10-batches-py/data_batch_1": b""})
    with pytest.raises(DatasetError, match=r"has no member .*cifar-10-batches-py/test_batch"):
        datasets.read_cifar10(tmp_path / "cifar-10-python.tar.gz")


def _cifar100_with_train(tmp_path: Path, train_blob: bytes) -> Path:
    _, _ = write_cifar100(tmp_path)
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz") as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive}
    members["cifar-100-python/train"] = train_blob
    return _tar_gz(tmp_path / "cifar-100-python.tar.gz", members)


def test_bad_pickle_is_named(tmp_path):
    path = _cifar100_with_train(tmp_path, b"\x80\x02garbage")
    with pytest.raises(DatasetError, match=r"cifar-100-python\.tar\.gz: train: not a valid pickle"):
        datasets.read_cifar100(path)


def test_pickle_cannot_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = _cifar100_with_train(tmp_path, pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(
        DatasetError,
        match=r"not a valid pickle \(UnpicklingError: refusing to load (__builtin__|builtins)\.print\)",
    ):
        datasets.read_cifar100(path)


def test_wrong_array_size_is_named(tmp_path):
    train = {b"data": np.zeros((2, 3000), dtype=np.uint8), b"fine_labels": [0, 1], b"coarse_labels": [0, 1]}
    path = _cifar100_with_train(tmp_path, _pickled(train))
    with pytest.raises(
        DatasetError, match=r"train: b'data' is uint8 \(2, 3000\), expected uint8 \[N, 3072\]"
    ):
        datasets.read_cifar100(path)


def test_label_count_mismatch_is_named(tmp_path):
    train = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"fine_labels": [0], b"coarse_labels": [0, 1]}
    path = _cifar100_with_train(tmp_path, _pickled(train))
    with pytest.raises(DatasetError, match=r"train: b'fine_labels' has shape \(1,\), expected \(2,\)"):
        datasets.read_cifar100(path)


def test_missing_key_is_named(tmp_path):
    path = _cifar100_with_train(tmp_path, _pickled({b"data": np.zeros((1, 3072), dtype=np.uint8)}))
    with pytest.raises(DatasetError, match=r"train: no b'fine_labels' entry"):
        datasets.read_cifar100(path)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST


@pytest.mark.parametrize("gzipped", [True, False])
def test_fashion_mnist_idx_reads_back_exactly(tmp_path, gzipped):
    arrays = write_fashion_mnist(tmp_path / "fashion-mnist", gzipped=gzipped)
    official = datasets.read_official("fashion_mnist", tmp_path)
    assert official.train.images.shape == (7, 28, 28, 1) and official.train.images.dtype == np.uint8
    np.testing.assert_array_equal(official.train.images[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(official.train.labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(official.test.images[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(official.test.labels, arrays["t10k-labels-idx1-ubyte"])
    assert official.train.labels.dtype == np.int64
    assert official.class_names == datasets.FASHION_MNIST_CLASSES


def test_truncated_idx_is_named(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((3, 28, 28)))[:-10])
    with pytest.raises(
        DatasetError, match=r"train-images-idx3-ubyte: truncated: 2358 bytes, .* implies 2368"
    ):
        datasets.read_idx(path, expected_ndim=3)


def test_truncated_gzip_is_named(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 28, 28))))[:-20])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: not a readable gzip file"):
        datasets.read_idx(path, expected_ndim=3)


def test_wrong_magic_is_named(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros((3, 28, 28))))  # an images file where labels belong
    with pytest.raises(
        DatasetError, match=r"train-labels-idx1-ubyte: bad IDX magic 00000803, expected 00000801"
    ):
        datasets.read_idx(path, expected_ndim=1)


def test_trailing_bytes_are_named(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(3)) + b"\0")
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte: has trailing bytes"):
        datasets.read_idx(path, expected_ndim=1)


def test_image_label_count_mismatch_is_named(tmp_path):
    directory = tmp_path / "fashion-mnist"
    write_fashion_mnist(directory, gzipped=False)
    (directory / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5)))
    with pytest.raises(DatasetError, match=r"has 7 images but .*train-labels-idx1-ubyte has 5 labels"):
        datasets.read_fashion_mnist(directory)


def test_missing_dataset_says_where_to_put_what(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as raised:
        datasets.read_official("cifar10", tmp_path)
    message = str(raised.value)
    assert str((tmp_path / "cifar-10-python.tar.gz").resolve()) in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message

    monkeypatch.setattr(datasets.fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match=r"apt-get install -y dataset-fashion-mnist"):
        datasets.read_official("fashion_mnist", tmp_path)


REAL_FASHION_MNIST = datasets.DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"


@pytest.mark.skipif(not REAL_FASHION_MNIST.exists(), reason=f"needs `{datasets.FASHION_MNIST_APT_COMMAND}`")
def test_real_fashion_mnist(tmp_path):
    data = datasets.load("fashion_mnist", tmp_path)  # nothing in tmp_path: falls back to Debian's copy
    assert (len(data.train), len(data.validation), len(data.test)) == (55_000, 5_000, 10_000)
    official = datasets.read_fashion_mnist(datasets.DEBIAN_FASHION_MNIST_DIR)
    assert official.train.images.shape == (60_000, 28, 28, 1) and official.test.images.shape == (
        10_000,
        28,
        28,
        1,
    )
    for split in (official.train, official.test):
        assert split.labels.min() == 0 and split.labels.max() == 9
        np.testing.assert_array_equal(np.bincount(split.labels), len(split) // 10)  # balanced classes
    stats = datasets.channel_stats(official.train.images)
    np.testing.assert_allclose(stats.mean, datasets.STATS["fashion_mnist"].mean, atol=1e-8)
    np.testing.assert_allclose(stats.std, datasets.STATS["fashion_mnist"].std, atol=1e-8)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_real_cifar_stats(name):
    try:
        official = datasets.read_official(name)
    except DatasetNotFoundError:
        pytest.skip(f"{name} not in {datasets.default_data_dir()}: `vitspec download {name}`")
    assert (len(official.train), len(official.test)) == (50_000, 10_000)
    stats = datasets.channel_stats(official.train.images)
    np.testing.assert_allclose(stats.mean, datasets.STATS[name].mean, atol=1e-8)
    np.testing.assert_allclose(stats.std, datasets.STATS[name].std, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# Download


def _served(tmp_path: Path, name: str, blob: bytes) -> str:
    mirror = tmp_path / "mirror"
    mirror.mkdir(exist_ok=True)
    (mirror / name).write_bytes(blob)
    return mirror.as_uri()


def test_download_verifies_and_renames(tmp_path, monkeypatch):
    archive, _ = write_cifar10(tmp_path)
    blob = archive.read_bytes()
    resource = datasets.Resource(
        "cifar-10-python.tar.gz",
        "https://example.invalid/cifar-10-python.tar.gz",
        hashlib.md5(blob).hexdigest(),
    )
    monkeypatch.setitem(datasets.RESOURCES, "cifar10", (resource,))
    data_dir = tmp_path / "data"
    paths = datasets.download("cifar10", data_dir, mirror=_served(tmp_path, "cifar-10-python.tar.gz", blob))
    assert paths == [data_dir / "cifar-10-python.tar.gz"] and paths[0].read_bytes() == blob
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-10-python.tar.gz"]  # no .part left behind
    assert len(datasets.load("cifar10", data_dir, validation_size=5).train) == 10


def test_download_checksum_mismatch_is_named(tmp_path):
    mirror = _served(tmp_path, "cifar-10-python.tar.gz", b"not the archive")
    data_dir = tmp_path / "data"
    with pytest.raises(ChecksumError) as raised:
        datasets.download("cifar10", data_dir, mirror=mirror)
    message = str(raised.value)
    assert "c58f30108f718f92721af3b95e74349a" in message
    assert hashlib.md5(b"not the archive").hexdigest() in message
    assert str(data_dir / "cifar-10-python.tar.gz") in message
    assert list(data_dir.iterdir()) == []  # neither the target nor a temp file


def test_download_offline_says_what_to_put_where(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DownloadError) as raised:
        datasets.download("fashion_mnist", tmp_path)
    message = str(raised.value)
    assert "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz" in message
    assert str((tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz").resolve()) in message
    assert "8d4fb7e6c68d591d4c3dfef9ec88bf0d" in message
    assert list((tmp_path / "fashion-mnist").iterdir()) == []


def test_download_keeps_verified_files(tmp_path, monkeypatch):
    blob = b"pretend archive"
    resource = datasets.Resource(
        "x.tar.gz", "https://example.invalid/x.tar.gz", hashlib.md5(blob).hexdigest()
    )
    monkeypatch.setitem(datasets.RESOURCES, "cifar100", (resource,))
    (tmp_path / "x.tar.gz").write_bytes(blob)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("should not download"))
    assert datasets.download("cifar100", tmp_path) == [tmp_path / "x.tar.gz"]


def test_load_downloads_missing_files(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_fashion_mnist(mirror)
    resources = tuple(
        datasets.Resource(r.relative_path, (mirror / name).as_uri(), datasets.md5_of(mirror / name))
        for r in datasets.RESOURCES["fashion_mnist"]
        for name in [Path(r.relative_path).name]
    )
    monkeypatch.setitem(datasets.RESOURCES, "fashion_mnist", resources)
    monkeypatch.setattr(datasets.fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "nowhere")
    data = datasets.load("fashion_mnist", tmp_path / "data", validation_size=2, download_missing=True)
    assert (len(data.train), len(data.validation), len(data.test)) == (5, 2, 4)
    assert (tmp_path / "data" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").is_file()


# ----------------------------------------------------------------------------------------------
# Splits, stats, normalization


def test_split_is_deterministic_disjoint_and_complete():
    train, validation = datasets.split_indices(1000, 100, seed=3)
    again = datasets.split_indices(1000, 100, seed=3)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(validation, again[1])
    assert len(validation) == 100 and len(train) == 900
    assert not set(train) & set(validation)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, validation])), np.arange(1000))
    assert not np.array_equal(validation, datasets.split_indices(1000, 100, seed=4)[1])


def test_split_size_is_validated():
    with pytest.raises(ValueError, match=r"validation_size=11: expected 0\.\.10"):
        datasets.split_indices(10, 11, seed=0)


def test_load_splits_cifar10_and_keeps_test_apart(tmp_path):
    write_cifar10(tmp_path)
    data = datasets.load("cifar10", tmp_path, validation_size=4, split_seed=1)
    official = datasets.read_cifar10(tmp_path / "cifar-10-python.tar.gz")
    assert (len(data.train), len(data.validation), len(data.test)) == (11, 4, 3)
    train_idx, validation_idx = datasets.split_indices(15, 4, seed=1)
    np.testing.assert_array_equal(data.validation.images, official.train.images[validation_idx])
    np.testing.assert_array_equal(data.train.labels, official.train.labels[train_idx])
    np.testing.assert_array_equal(data.test.images, official.test.images)
    assert (
        data.num_classes == 10 and data.image_shape == (32, 32, 3) and data.stats == datasets.STATS["cifar10"]
    )


def test_default_validation_size_is_5000():
    assert datasets.DEFAULT_VALIDATION_SIZE == 5000


def test_coarse_labels_only_for_cifar100(tmp_path):
    with pytest.raises(ValueError, match="only cifar100"):
        datasets.load("cifar10", tmp_path, label_set="coarse")


def test_channel_stats_matches_float64_numpy():
    images = np.random.default_rng(0).integers(0, 256, size=(50, 8, 8, 3), dtype=np.uint8)
    stats = datasets.channel_stats(images)
    pixels = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.std, pixels.std(axis=0), rtol=1e-12)


def test_normalize_is_float32_and_standardizes():
    batch = np.array([0, 51, 255], dtype=np.uint8).reshape(1, 1, 3, 1)
    out = datasets.normalize(batch, mean=[0.2], std=[0.5])
    assert out.dtype == np.float32 and out.shape == batch.shape
    expected = (batch.astype(np.float32) / np.float32(255) - np.float32(0.2)) / np.float32(0.5)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(out.ravel(), [-0.4, 0.0, 1.6], atol=1e-6)
    with pytest.raises(ValueError, match="need 1 channels"):
        datasets.normalize(batch, mean=[0.1, 0.2], std=[1, 1])


def test_imageset_rejects_wrong_dtypes():
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(np.zeros((2, 4, 4, 1), dtype=np.float32), np.zeros(2, dtype=np.int64))


def test_a_data_dir_with_part_of_fashion_mnist_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "system")
    write_fashion_mnist(tmp_path / "system")
    write_fashion_mnist(tmp_path / "mine" / "fashion-mnist")
    (tmp_path / "mine" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        datasets.DatasetError, match="holds part of Fashion-MNIST: missing t10k-labels-idx1-ubyte"
    ):
        datasets.load("fashion_mnist", tmp_path / "mine", validation_size=2)
