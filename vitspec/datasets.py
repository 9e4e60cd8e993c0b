"""CIFAR-10, CIFAR-100 and Fashion-MNIST, read from their official files into NumPy arrays.

Every loader returns images as uint8 NHWC and labels as int64; normalization to float happens
on the device, in the backends, mirroring `normalize` below. Nothing here imports a deep
learning framework, so the PyTorch and JAX trainers see the very same arrays.

Where the files go (`data_dir` defaults to $VITSPEC_DATA_DIR, else ./data):

    cifar10        data_dir/cifar-10-python.tar.gz   or the extracted data_dir/cifar-10-batches-py/
    cifar100       data_dir/cifar-100-python.tar.gz  or the extracted data_dir/cifar-100-python/
    fashion_mnist  data_dir/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
                   or /usr/share/datasets/fashion-mnist/ (Debian: apt-get install dataset-fashion-mnist)

`download(name, data_dir)` fetches the official archives and checks their MD5s;
`python -m vitspec.datasets download NAME [--data-dir DIR]` does the same from a shell.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import http.client
import io
import math
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

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

# Mixed into every split's seed so a split never shares a random stream with the pipeline's
# shuffles, which use the same user-facing integers as seeds.
_SPLIT_STREAM = 0x5B117


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


# ---------------------------------------------------------------------------------------------
# Official files and where they come from


@dataclasses.dataclass(frozen=True)
class Resource:
    """One official file: where it lives under data_dir, its URL and its MD5."""

    relative_path: str
    url: str
    md5: str


_FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# MD5s from the zalandoresearch/fashion-mnist README (also what torchvision checks); the
# CIFAR ones from https://www.cs.toronto.edu/~kriz/cifar.html.
RESOURCES: dict[str, tuple[Resource, ...]] = {
    "cifar10": (
        Resource(
            "cifar-10-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
        ),
    ),
    "cifar100": (
        Resource(
            "cifar-100-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "eb9058c3a382ffc7106e4002c42a8d85",
        ),
    ),
    "fashion_mnist": tuple(
        Resource(f"fashion-mnist/{file}", _FASHION_MNIST_URL + file, md5)
        for file, md5 in (
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        )
    ),
}


def default_data_dir() -> Path:
    return Path(os.environ.get("VITSPEC_DATA_DIR", "data"))


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise ValueError(f"dataset {name!r}: expected one of {', '.join(DATASET_NAMES)}")


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(name: str, data_dir: str | Path | None = None, *, mirror: str | None = None) -> list[Path]:
    """Fetch `name`'s official files into data_dir, verifying each MD5; returns their paths.

    Files already present with the right MD5 are kept. `mirror` replaces the official URLs'
    directory (any urllib URL, file:// included), e.g. for a local copy.
    """
    _check_name(name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    paths = []
    for resource in RESOURCES[name]:
        target = data_dir / resource.relative_path
        if not (target.is_file() and md5_of(target) == resource.md5):
            url = (
                resource.url if mirror is None else mirror.rstrip("/") + "/" + resource.url.rsplit("/", 1)[1]
            )
            _fetch_verified(url, target, resource.md5)
        paths.append(target)
    return paths


def _fetch_verified(url: str, target: Path, md5: str) -> None:
    """Download to a temp file beside `target`, check the MD5, then rename: never a half file at `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    partial = Path(partial_name)
    try:
        with os.fdopen(fd, "wb") as partial_file:
            actual = _copy_url(url, partial_file, target, md5)
        if actual != md5:
            raise ChecksumError(target, md5, actual, url=url)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _copy_url(url: str, out: io.BufferedWriter, target: Path, md5: str) -> str:
    """Stream `url` into `out`; returns the MD5 of what was written."""
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise DownloadError(
            f"could not download {url} ({error}); if this machine is offline, fetch that URL elsewhere "
            f"and put the file at {target.resolve()} (MD5 {md5})"
        ) from None
    return digest.hexdigest()


def _not_found(name: str, data_dir: Path, looked_at: Sequence[Path]) -> DatasetNotFoundError:
    wanted = "\n".join(f"  {(data_dir / r.relative_path).resolve()}  <-  {r.url}" for r in RESOURCES[name])
    extra = f"\nor install Debian's copy: {FASHION_MNIST_APT_COMMAND}" if name == "fashion_mnist" else ""
    return DatasetNotFoundError(
        f"{name}: not found (looked at {', '.join(map(str, looked_at))}).\n"
        f"Run `python -m vitspec.datasets download {name} --data-dir {data_dir}`, or put these files there:\n"
        f"{wanted}{extra}"
    )


# ---------------------------------------------------------------------------------------------
# CIFAR: pickled dicts inside a tar.gz (or its extracted directory)


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what the CIFAR pickles hold (dicts, lists, bytes, NumPy arrays): a tampered
    archive cannot run code through pickle."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),  # written by NumPy 1 (the official files)
            ("numpy._core.multiarray", "_reconstruct"),  # written by NumPy 2
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # Python 3's protocol-2 spelling of bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        obj = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as error:  # noqa: BLE001 - a corrupt pickle can raise nearly anything; all mean the same
        raise DatasetError(f"{where}: not a valid pickle ({type(error).__name__}: {error})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _read_members(source: Path, root: str, members: Sequence[str]) -> dict[str, bytes]:
    """The bytes of root/member for each member, from a .tar.gz or from its extracted directory."""
    if source.is_dir():
        missing = [m for m in members if not (source / m).is_file()]
        if missing:
            raise DatasetError(f"{source}: missing {', '.join(missing)}")
        return {m: (source / m).read_bytes() for m in members}
    wanted = {f"{root}/{m}": m for m in members}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(source, "r:gz") as archive:
            for info in archive:  # one pass: the gzip stream is read once
                if info.name in wanted and info.isfile():
                    found[wanted[info.name]] = archive.extractfile(info).read()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DatasetError(f"{source}: not a readable tar.gz ({type(error).__name__}: {error})") from None
    missing = [name for name, m in wanted.items() if m not in found]
    if missing:
        raise DatasetError(f"{source}: archive has no member {', '.join(missing)}")
    return found


def _field(batch: dict, key: bytes, where: str) -> Any:
    if key not in batch:
        raise DatasetError(f"{where}: no {key!r} entry (has {sorted(batch)})")
    return batch[key]


def _cifar_images(batch: dict, where: str) -> np.ndarray:
    """The b"data" rows ([N, 3072]: 1024 red, 1024 green, 1024 blue, each row-major 32x32) as NHWC."""
    data = np.asarray(_field(batch, b"data", where))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{where}: b'data' is {data.dtype} {data.shape}, expected uint8 [N, 3072]")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _cifar_labels(batch: dict, key: bytes, num_classes: int, num_images: int, where: str) -> np.ndarray:
    raw = _field(batch, key, where)
    try:
        labels = np.asarray(raw, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{where}: {key!r} is not a list of integers") from None
    if labels.shape != (num_images,):
        raise DatasetError(
            f"{where}: {key!r} has shape {labels.shape}, expected ({num_images},) to match b'data'"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{where}: {key!r} outside [0, {num_classes})")
    return labels


def _class_names(meta: dict, key: bytes, num_classes: int, where: str) -> tuple[str, ...]:
    names = _field(meta, key, where)
    if not isinstance(names, list) or len(names) != num_classes:
        raise DatasetError(f"{where}: {key!r} should list {num_classes} class names")
    return tuple(n.decode("ascii") if isinstance(n, bytes) else str(n) for n in names)


def _cifar_set(
    blobs: dict[str, bytes], members: Sequence[str], label_key: bytes, num_classes: int, source: Path
) -> ImageSet:
    images, labels = [], []
    for member in members:
        where = f"{source}: {member}"
        batch = _unpickle(blobs[member], where)
        images.append(_cifar_images(batch, where))
        labels.append(_cifar_labels(batch, label_key, num_classes, len(images[-1]), where))
    return ImageSet(np.concatenate(images), np.concatenate(labels))


_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def read_cifar10(source: str | Path) -> OfficialSplits:
    """CIFAR-10 from cifar-10-python.tar.gz or its extracted cifar-10-batches-py/ directory."""
    source = Path(source)
    blobs = _read_members(source, "cifar-10-batches-py", [*_CIFAR10_TRAIN, "test_batch", "batches.meta"])
    meta = _unpickle(blobs["batches.meta"], f"{source}: batches.meta")
    return OfficialSplits(
        train=_cifar_set(blobs, _CIFAR10_TRAIN, b"labels", 10, source),
        test=_cifar_set(blobs, ["test_batch"], b"labels", 10, source),
        class_names=_class_names(meta, b"label_names", 10, f"{source}: batches.meta"),
    )


def read_cifar100(source: str | Path, label_set: str = "fine") -> OfficialSplits:
    """CIFAR-100 from cifar-100-python.tar.gz or its extracted cifar-100-python/ directory.

    label_set "fine" gives the 100 classes, "coarse" the 20 superclasses.
    """
    if label_set not in LABEL_SETS:
        raise ValueError(f"label_set={label_set!r}: expected one of {', '.join(LABEL_SETS)}")
    source = Path(source)
    num_classes = 100 if label_set == "fine" else 20
    blobs = _read_members(source, "cifar-100-python", ["train", "test", "meta"])
    meta = _unpickle(blobs["meta"], f"{source}: meta")
    label_key = f"{label_set}_labels".encode()
    return OfficialSplits(
        train=_cifar_set(blobs, ["train"], label_key, num_classes, source),
        test=_cifar_set(blobs, ["test"], label_key, num_classes, source),
        class_names=_class_names(meta, f"{label_set}_label_names".encode(), num_classes, f"{source}: meta"),
    )


def _cifar_source(name: str, data_dir: Path) -> Path:
    archive = data_dir / RESOURCES[name][0].relative_path
    extracted = data_dir / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    for candidate in (extracted, archive):
        if candidate.exists():
            return candidate
    raise _not_found(name, data_dir, [extracted, archive])


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files (big-endian header, then raw bytes), gzipped or not

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


def _fashion_mnist_source(data_dir: Path) -> Path:
    candidates = [data_dir / "fashion-mnist", DEBIAN_FASHION_MNIST_DIR]
    for directory in candidates:
        if all(_find_idx(directory, stem) for stem in _FASHION_MNIST_FILES.values()):
            return directory
    raise _not_found("fashion_mnist", data_dir, candidates)


# ---------------------------------------------------------------------------------------------
# Splits, stats, normalization


def read_official(
    name: str, data_dir: str | Path | None = None, *, label_set: str = "fine"
) -> OfficialSplits:
    """The official train and test sets of `name`, from wherever they are (see the module doc)."""
    _check_name(name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if name == "cifar10":
        return read_cifar10(_cifar_source(name, data_dir))
    if name == "cifar100":
        return read_cifar100(_cifar_source(name, data_dir), label_set)
    return read_fashion_mnist(_fashion_mnist_source(data_dir))


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
    _check_name(name)
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
    std = tuple(math.sqrt((count * sq - s * s) / count**2) / 255 for s, sq in zip(sums, sums_sq))
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vitspec.datasets", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="fetch and verify a dataset's official files")
    fetch.add_argument("name", choices=DATASET_NAMES)
    fetch.add_argument("--data-dir", type=Path, default=None, help="default: $VITSPEC_DATA_DIR or ./data")
    args = parser.parse_args(argv)
    try:
        paths = download(args.name, args.data_dir)
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None
    print("\n".join(map(str, paths)))


if __name__ == "__main__":
    main()
