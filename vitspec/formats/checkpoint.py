"""Checkpoint files of the reference tree: `.safetensors` (config JSON in the metadata) and `.npz`.

`.safetensors` is read and written here in NumPy: the format is an 8-byte little-endian header
length, a JSON header ({name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}), then
the raw little-endian tensor bytes. Owning the parser means a truncated or foreign file gives an
error that names the file and the problem. The `safetensors` package is used in tests only, as
the oracle that these files are the format everyone else reads.

Writes go to a temporary file in the same directory and are renamed into place, so a crash never
leaves a partial checkpoint under the real name.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vitspec.config import ViTConfig
from vitspec.params import ParamTreeError, validate_params

CONFIG_KEY = "vitspec_config"
FORMAT_KEY = "format"
FORMAT_VALUE = "vitspec-reference"
NPZ_CONFIG_KEY = "__vitspec_config__"

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint, or that does not match its config."""


def atomic_write(path: str | os.PathLike, write: Callable[[object], None]) -> None:
    """Call write(file) on a temp file beside `path`, fsync, then rename it over `path`.

    The file gets the permissions an ordinary write would give it (0666 less the umask; the temp
    file's own are 0600). A symlink is written through: the file it points to is replaced and the
    link kept, as an ordinary write would (a `latest.pt` link stays a link). Temp files that an
    earlier killed write to the same path left behind (our naming: .<name>.*.tmp) are removed first.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    header: dict = {"__metadata__": dict(metadata or {})}
    offset, blobs = 0, []
    for name, value in tensors.items():
        value = np.ascontiguousarray(value)
        if value.dtype not in _ST_NAMES:
            raise CheckpointError(
                f"tensor {name!r} has dtype {value.dtype}, which safetensors here does not store"
            )
        blob = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _ST_NAMES[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format aligns the data to 8 bytes

    def write(f):
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for blob in blobs:
            f.write(blob)

    atomic_write(path, write)


def _bf16_to_f32(raw: bytes, shape) -> np.ndarray:
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (bfloat16 widened to float32) and the string metadata of a .safetensors file."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise CheckpointError(f"{path}: {len(data)} bytes is too short for a safetensors file (truncated?)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(_MAX_HEADER, len(data) - 8):
        raise CheckpointError(
            f"{path}: header length {header_len} exceeds the file's {len(data)} bytes "
            "(truncated, or not a safetensors file)"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path}: the safetensors header is not valid JSON ({e}); not a safetensors file?"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {info!r}") from None
        if end > len(body) or begin > end:
            raise CheckpointError(
                f"{path}: tensor {name!r} needs bytes [{begin}, {end}) but the data section has "
                f"{len(body)} (truncated file)"
            )
        raw = bytes(body[begin:end])
        if dtype == "BF16":
            expected = 2 * int(np.prod(shape))
            value = _bf16_to_f32(raw, shape) if len(raw) == expected else None
        elif dtype in _ST_DTYPES:
            np_dtype = np.dtype(_ST_DTYPES[dtype]).newbyteorder("<")
            expected = np_dtype.itemsize * int(np.prod(shape))
            value = (
                np.frombuffer(raw, dtype=np_dtype).reshape(shape).astype(np_dtype.newbyteorder("="))
                if len(raw) == expected
                else None
            )
        else:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype}, which this reader does not support"
            )
        if value is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {shape} ({dtype}) should have {expected} bytes, "
                f"has {len(raw)}"
            )
        tensors[name] = value
    return tensors, metadata


def nonfinite_names(params: dict[str, np.ndarray]) -> list[str]:
    """The names of the tensors holding a NaN or an infinity."""
    return [k for k, v in params.items() if not np.isfinite(np.asarray(v, dtype=np.float64)).all()]


def _refuse_nonfinite(path, params: dict[str, np.ndarray], what: str) -> None:
    bad = nonfinite_names(params)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"{path}: {what + ' ' if what else ''}NaN or infinite values in {len(bad)} tensor(s): {shown}"
        )


def save(path: str | os.PathLike, cfg: ViTConfig, params: dict[str, np.ndarray]) -> None:
    """Write the reference tree and its config; `.safetensors` or `.npz` by the file's suffix.

    A tree with a NaN or an infinity is refused: such a model computes nothing, and a file of it
    would pass for one that does."""
    path = Path(path)
    validate_params(cfg, params)
    arrays = {k: np.asarray(v) for k, v in params.items()}
    _refuse_nonfinite(path, arrays, "refusing to write")
    if path.suffix == ".safetensors":
        write_safetensors(path, arrays, {FORMAT_KEY: FORMAT_VALUE, CONFIG_KEY: cfg.to_json()})
    elif path.suffix == ".npz":
        config = np.frombuffer(cfg.to_json().encode(), dtype=np.uint8)
        atomic_write(path, lambda f: np.savez(f, **arrays, **{NPZ_CONFIG_KEY: config}))
    else:
        raise CheckpointError(f"{path}: unknown checkpoint suffix {path.suffix!r}; use .safetensors or .npz")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file (no pickles), or a CheckpointError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


def load(path: str | os.PathLike, allow_nonfinite: bool = False) -> tuple[ViTConfig, dict[str, np.ndarray]]:
    """Read a checkpoint written by `save`; the tree is validated against its config.

    Tensors with a NaN or an infinity are refused by name unless `allow_nonfinite` (to inspect a
    broken file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        params, metadata = read_safetensors(path)
        config_json = metadata.get(CONFIG_KEY)
    elif path.suffix == ".npz":
        params = read_npz(path)
        config = params.pop(NPZ_CONFIG_KEY, None)
        config_json = None if config is None else config.tobytes().decode()
    else:
        raise CheckpointError(f"{path}: unknown checkpoint suffix {path.suffix!r}; use .safetensors or .npz")
    if config_json is None:
        raise CheckpointError(
            f"{path}: no vitspec config in the file; it is not a vitspec reference checkpoint "
            "(convert foreign checkpoints with `vitspec convert`)"
        )
    try:
        cfg = ViTConfig.from_json(config_json)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: the stored config is invalid: {e}") from None
    try:
        validate_params(cfg, params, source=str(path))
    except ParamTreeError as e:
        raise CheckpointError(str(e)) from None
    if not allow_nonfinite:
        _refuse_nonfinite(path, params, "")
    return cfg, params
