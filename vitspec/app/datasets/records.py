"""What a dataset is in memory: image sets, splits, channel statistics, the named errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

DATASET_NAMES = ("cifar10", "cifar100", "fashion_mnist")
LABEL_SETS = ("fine", "coarse")
DEFAULT_VALIDATION_SIZE = 5000
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_APT_COMMAND = "apt-get install -y dataset-fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class DatasetError(ValueError):
    """A dataset file is missing, corrupt, or not in the official format; the message names it."""


class DatasetNotFoundError(DatasetError):
    """The files are not on disk; the message says which file to put where and where to get it."""


class DownloadError(DatasetError):
    """A download failed (offline, HTTP error); the message gives the URL and the target path."""


class ChecksumError(DatasetError):
    """A file's MD5 is not the official one."""

    def __init__(self, path: Path, expected: str, actual: str, url: str | None = None):
        origin = f" (downloaded from {url})" if url else ""
        super().__init__(
            f"{path}{origin}: MD5 is {actual}, expected {expected}; "
            "the file is corrupt or not the official one"
        )
        self.path, self.expected, self.actual = path, expected, actual


@dataclasses.dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and std of a training set's pixels, in [0, 1] units (pixel / 255)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


# Population mean/std over every pixel of the full official training set (all 50,000 or 60,000
# images, before the validation split), per channel, in float64: `channel_stats(train.images)`.
# Fashion-MNIST was computed here from Debian's dataset-fashion-mnist; the CIFAR values are the
# widely published results of the same computation (the 0.2023/0.1994/0.2010 "CIFAR std" seen in
# many repos is a mean of per-image stds, not this). tests/test_datasets.py rechecks whichever
# datasets are on disk.
STATS = {
    "cifar10": ChannelStats(
        mean=(0.49139968, 0.48215841, 0.44653091), std=(0.24703223, 0.24348513, 0.26158784)
    ),
    "cifar100": ChannelStats(
        mean=(0.50707516, 0.48654887, 0.44091784), std=(0.26733429, 0.25643846, 0.27615047)
    ),
    "fashion_mnist": ChannelStats(mean=(0.28604060,), std=(0.35302424,)),
}


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Images uint8 [N, H, W, C] and their labels int64 [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images: expected uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.dtype != np.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels: expected int64 [{len(self.images)}], got {self.labels.dtype} {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, indices: np.ndarray) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices])


@dataclasses.dataclass(frozen=True)
class OfficialSplits:
    """A dataset as published: its train and test sets and the class names."""

    train: ImageSet
    test: ImageSet
    class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset ready for training: train/validation carved from the official train set, test untouched."""

    name: str
    train: ImageSet
    validation: ImageSet
    test: ImageSet
    class_names: tuple[str, ...]
    stats: ChannelStats

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])
