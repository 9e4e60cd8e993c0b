"""CIFAR-10 and CIFAR-100: pickled dicts inside the official tar.gz (or its extracted directory)."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from vitspec.app.datasets.download import RESOURCES, not_found_error
from vitspec.app.datasets.records import LABEL_SETS, DatasetError, ImageSet, OfficialSplits


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


def cifar_source(name: str, data_dir: Path) -> Path:
    archive = data_dir / RESOURCES[name][0].relative_path
    extracted = data_dir / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    for candidate in (extracted, archive):
        if candidate.exists():
            return candidate
    raise not_found_error(name, data_dir, [extracted, archive])
