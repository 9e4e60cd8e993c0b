"""Fashion-MNIST: IDX files (a big-endian header, then raw bytes), gzipped or not."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from vitspec.app.datasets.download import not_found_error
from vitspec.app.datasets.records import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    DatasetError,
    ImageSet,
    OfficialSplits,
)

_IDX_UBYTE = 0x08


def read_idx(path: str | Path, expected_ndim: int) -> np.ndarray:
    """A uint8 IDX file (gzipped when its name ends in .gz): magic 00 00 08 NDIM, NDIM big-endian
    uint32 sizes, then the data. Raises DatasetError naming the file on any mismatch."""
    path = Path(path)
    raw = _read_maybe_gzipped(path)
    if len(raw) < 4:
        raise DatasetError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != _IDX_UBYTE or ndim != expected_ndim:
        raise DatasetError(
            f"{path}: bad IDX magic {raw[:4].hex()}, "
            f"expected 000008{expected_ndim:02x} (uint8, {expected_ndim}-d)"
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} of {header_size} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = header_size + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DatasetError(f"{path}: {problem}: {len(raw)} bytes, the header {shape} implies {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _read_maybe_gzipped(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as file:
                return file.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DatasetError(f"{path}: not a readable gzip file ({type(error).__name__}: {error})") from None


_FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_set(images_path: Path, labels_path: Path) -> ImageSet:
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(f"{labels_path}: label {labels.max()} outside [0, {len(FASHION_MNIST_CLASSES)})")
    return ImageSet(images[..., None].copy(), labels.astype(np.int64))


def read_fashion_mnist(directory: str | Path) -> OfficialSplits:
    """Fashion-MNIST from the four IDX files (each NAME.gz or NAME) in `directory`."""
    directory = Path(directory)
    paths = {key: _find_idx(directory, stem) for key, stem in _FASHION_MNIST_FILES.items()}
    missing = [f"{_FASHION_MNIST_FILES[k]}[.gz]" for k, p in paths.items() if p is None]
    if missing:
        raise DatasetError(f"{directory}: missing {', '.join(missing)}")
    return OfficialSplits(
        train=_fashion_mnist_set(paths["train_images"], paths["train_labels"]),
        test=_fashion_mnist_set(paths["test_images"], paths["test_labels"]),
        class_names=FASHION_MNIST_CLASSES,
    )


def fashion_mnist_source(data_dir: Path) -> Path:
    """The directory that holds all four files: data_dir's own, else the system copy. A data_dir
    holding some of them is an error naming the missing ones, never a silent switch to the other
    copy (a run's data come from one place)."""
    candidates = [data_dir / "fashion-mnist", DEBIAN_FASHION_MNIST_DIR]
    for directory in candidates:
        found = {stem: _find_idx(directory, stem) for stem in _FASHION_MNIST_FILES.values()}
        if all(found.values()):
            return directory
        if any(found.values()):
            missing = [f"{stem}[.gz]" for stem, path in found.items() if path is None]
            raise DatasetError(f"{directory} holds part of Fashion-MNIST: missing {', '.join(missing)}")
    raise not_found_error("fashion_mnist", data_dir, candidates)
