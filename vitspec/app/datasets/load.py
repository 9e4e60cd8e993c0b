"""A dataset by name: its official splits, a seeded validation split, channel statistics, normalization."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vitspec.app.datasets.cifar import cifar_source, read_cifar10, read_cifar100
from vitspec.app.datasets.download import check_name, default_data_dir, download
from vitspec.app.datasets.fashion_mnist import fashion_mnist_source, read_fashion_mnist
from vitspec.app.datasets.records import (
    DEFAULT_VALIDATION_SIZE,
    STATS,
    ChannelStats,
    Dataset,
    DatasetNotFoundError,
    OfficialSplits,
)

# Mixed into every split's seed so a split never shares a random stream with the pipeline's
# shuffles, which use the same user-facing integers as seeds.
_SPLIT_STREAM = 0x5B117


def read_official(
    name: str, data_dir: str | Path | None = None, *, label_set: str = "fine"
) -> OfficialSplits:
    """The official train and test sets of `name`, from wherever they are (see the module doc)."""
    check_name(name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if name == "cifar10":
        return read_cifar10(cifar_source(name, data_dir))
    if name == "cifar100":
        return read_cifar100(cifar_source(name, data_dir), label_set)
    return read_fashion_mnist(fashion_mnist_source(data_dir))


def split_indices(num_examples: int, validation_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices, each sorted: disjoint, covering range(num_examples), fixed by seed."""
    if not 0 <= validation_size <= num_examples:
        raise ValueError(f"validation_size={validation_size}: expected 0..{num_examples}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SPLIT_STREAM,)))
    order = rng.permutation(num_examples)
    return np.sort(order[validation_size:]), np.sort(order[:validation_size])


def load(
    name: str,
    data_dir: str | Path | None = None,
    *,
    label_set: str = "fine",
    validation_size: int = DEFAULT_VALIDATION_SIZE,
    split_seed: int = 0,
    download_missing: bool = False,
) -> Dataset:
    """`name` with `validation_size` training images held out (seeded by split_seed) and the test set apart.

    label_set applies to CIFAR-100 only. download_missing=True fetches absent files first.
    """
    check_name(name)
    if label_set != "fine" and name != "cifar100":
        raise ValueError(f"label_set={label_set!r}: only cifar100 has a coarse label set")
    if download_missing:
        try:
            official = read_official(name, data_dir, label_set=label_set)
        except DatasetNotFoundError:
            download(name, data_dir)
            official = read_official(name, data_dir, label_set=label_set)
    else:
        official = read_official(name, data_dir, label_set=label_set)
    train_idx, validation_idx = split_indices(len(official.train), validation_size, split_seed)
    return Dataset(
        name=name,
        train=official.train.take(train_idx),
        validation=official.train.take(validation_idx),
        test=official.test,
        class_names=official.class_names,
        stats=STATS[name],
    )


def channel_stats(images: np.ndarray) -> ChannelStats:
    """Population mean and std per channel of uint8 NHWC images, in [0, 1] units.

    Sums are exact integers, so the result depends on nothing but the pixels.
    """
    pixels = images.reshape(-1, images.shape[-1])
    count = len(pixels)
    total = np.zeros(pixels.shape[1], dtype=np.int64)
    total_sq = np.zeros(pixels.shape[1], dtype=np.int64)
    for chunk in np.array_split(pixels, max(1, count // (1 << 20))):  # bounds the int64 copy
        wide = chunk.astype(np.int64)
        total += wide.sum(axis=0)
        total_sq += (wide * wide).sum(axis=0)
    sums, sums_sq = total.tolist(), total_sq.tolist()  # Python ints: count * sum_sq overflows int64
    mean = tuple(s / count / 255 for s in sums)
    std = tuple(math.sqrt((count * sq - s * s) / count**2) / 255 for s, sq in zip(sums, sums_sq, strict=True))
    return ChannelStats(mean=mean, std=std)


def normalize(batch: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC -> float32 NHWC as `(x / 255 - mean) / std`, every step in float32.

    The reference the backends mirror op for op (cast, divide by 255, subtract, divide), so that
    the same uint8 batch normalizes to the same floats in NumPy, PyTorch and JAX.
    """
    if batch.dtype != np.uint8:
        raise ValueError(f"normalize: expected a uint8 batch, got {batch.dtype}")
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    if mean32.shape != (batch.shape[-1],) or std32.shape != (batch.shape[-1],):
        raise ValueError(
            f"normalize: mean/std need {batch.shape[-1]} channels, got {mean32.shape}, {std32.shape}"
        )
    return (batch.astype(np.float32) / np.float32(255) - mean32) / std32
