"""The official files of each dataset: where they live, their URLs and MD5s, and the verified download."""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from vitspec.app.datasets.records import (
    DATASET_NAMES,
    FASHION_MNIST_APT_COMMAND,
    ChecksumError,
    DatasetNotFoundError,
    DownloadError,
)

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


def check_name(name: str) -> None:
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
    check_name(name)
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


def not_found_error(name: str, data_dir: Path, looked_at: Sequence[Path]) -> DatasetNotFoundError:
    wanted = "\n".join(f"  {(data_dir / r.relative_path).resolve()}  <-  {r.url}" for r in RESOURCES[name])
    extra = f"\nor install Debian's copy: {FASHION_MNIST_APT_COMMAND}" if name == "fashion_mnist" else ""
    return DatasetNotFoundError(
        f"{name}: not found (looked at {', '.join(map(str, looked_at))}).\n"
        f"Run `vitspec download {name} --data-dir {data_dir}`, or put these files there:\n"
        f"{wanted}{extra}"
    )
