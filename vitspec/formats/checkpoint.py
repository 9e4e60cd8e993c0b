"""Checkpoint files of the reference tree: `.safetensors` (config JSON in the metadata) and `.npz`.

`.safetensors` is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}, "__metadata__": {str: str}}), then the raw little-endian tensor bytes. Files are
written here in NumPy. They are read through the `safetensors` package, the format's reference
reader, so that what it rejects is rejected here too, with a `CheckpointError` naming the file;
each tensor is then read straight into its own array, and bfloat16 (which NumPy lacks) is widened
here.

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
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from vitspec.config import ViTConfig
from vitspec.params import ParamTreeError, size_text, tree_size, validate_params

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
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors package's own limit


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
    offset, arrays = 0, []
    for name, value in tensors.items():
        value = np.ascontiguousarray(value)
        if value.dtype not in _ST_NAMES:
            raise CheckpointError(
                f"tensor {name!r} has dtype {value.dtype}, which safetensors here does not store"
            )
        value = value.astype(value.dtype.newbyteorder("<"), copy=False)
        header[name] = {
            "dtype": _ST_NAMES[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + value.nbytes],
        }
        arrays.append(value)
        offset += value.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format aligns the data to 8 bytes

    def write(f):
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for value in arrays:
            f.write(value.data)  # the array's own memory: no bytes copy of the whole tree

    atomic_write(path, write)


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (bfloat16 widened to float32) and the string metadata of a .safetensors file.

    The `safetensors` package checks the file first (it rejects what no other reader would load:
    overlapping or out-of-range offsets, bytes after the data, bad shapes or JSON); then each
    tensor is read from the file into an array of its own: memory is the tensors once, no copy of
    the whole file. (Not memory maps: arrays that change, or crash the process, when someone
    rewrites the file in place later would be results silently wrong.) Only the 8-byte length is
    read before the header is known to fit the file, so a forged length costs nothing."""
    path = Path(path)
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        header_len, header = _checked_header(path, f, size)
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        return {
            name: _read_tensor(path, f, data_start, name, info) for name, info in header.items()
        }, metadata


def _checked_header(path: Path, f, size: int) -> tuple[int, dict]:
    """(length, parsed JSON) of the header of the open file `f`, once the package has accepted it."""
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > size - 8:
        raise CheckpointError(
            f"{path}: header length {header_len} runs past the file's {size} bytes "
            "(truncated, or not a safetensors file)"
        )
    if header_len > _MAX_HEADER:
        raise CheckpointError(
            f"{path}: header length {header_len} exceeds the format's limit of {_MAX_HEADER} "
            "(not a safetensors file?)"
        )
    try:
        with safe_open(path, framework="np"):
            pass
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file: {_reason(e)}") from None
    if not os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
        raise CheckpointError(f"{path}: replaced by another file while being read; read it again")
    try:
        return header_len, json.loads(f.read(header_len), object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: the safetensors header has the key {e} twice") from None


def _read_tensor(path: Path, f, data_start: int, name: str, info: dict) -> np.ndarray:
    dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    if dtype == "BF16":
        stored = np.dtype("<u2")
    elif dtype in _ST_DTYPES:
        stored = np.dtype(_ST_DTYPES[dtype]).newbyteorder("<")
    else:
        raise CheckpointError(
            f"{path}: tensor {_short(name)} has dtype {dtype}, which this reader does not support"
        )
    value = np.empty(shape, stored)  # the package has checked that its size is end - begin
    f.seek(data_start + begin)
    if f.readinto(value.reshape(-1).view(np.uint8)) != end - begin:
        raise CheckpointError(f"{path}: shortened while being read; read it again")
    if dtype == "BF16":  # no NumPy dtype: widened to float32, exactly
        return (value.astype(np.uint32) << 16).view(np.float32)
    return value if stored.isnative else value.astype(stored.newbyteorder("="))


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # The package keeps the last of two same-named entries when their offsets happen to pass;
    # which of two configs or tensors is meant is not ours to guess.
    out = dict(pairs)
    if len(out) < len(pairs):
        raise _DuplicateKey(_short(next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)))
    return out


def _reason(e: Exception) -> str:
    reason = str(e).partition("\n")[0].removeprefix("Error while deserializing header: ")
    if "not fully covered" in reason:
        reason += " (a truncated file, or bytes after the last tensor)"
    return _clip(reason)


def _clip(text: str, limit: int = 200) -> str:
    # Names and values in messages come from the file: a forged one can be megabytes long.
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _short(name: str) -> str:
    return _clip(repr(name), 80)


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
        raise CheckpointError(f"{path}: the stored config is invalid: {_clip(str(e))}") from None
    _, values = tree_size(cfg)
    held = sum(v.nbytes for v in params.values())
    if 2 * values > held:  # every parameter is a float of 2 bytes or more
        raise CheckpointError(
            f"{path}: the stored config implies {size_text(values)} parameters, at least "
            f"{size_text(2 * values)} bytes, but the file's tensors hold {held} bytes"
        )
    try:
        validate_params(cfg, params, source=str(path))
    except ParamTreeError as e:
        raise CheckpointError(str(e)) from None
    if not allow_nonfinite:
        _refuse_nonfinite(path, params, "")
    return cfg, params
