"""`.safetensors` files in NumPy: read through the `safetensors` package's checks, written here.

The format is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}, "__metadata__": {str: str}}), then the raw little-endian tensor bytes. Files are
read through the `safetensors` package, the format's reference reader, so that what it rejects is
rejected here too, with a `CheckpointError` naming the file; each tensor is then read straight
into its own array, and bfloat16 (which NumPy lacks) is widened here. Written tensor by tensor
(the header needs only shapes and dtypes), atomically.
"""

from __future__ import annotations

import json
import math
import os
import struct
import weakref
from collections import Counter
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from vitspec.formats.atomic import atomic_write, read_array, write_aligned
from vitspec.formats.lazy import LazyTensors, prefetched, spec_of

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


def write_safetensors(
    path, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` (arrays, or a LazyTensors whose values are produced one at a time while the
    file is written: the header needs only their shapes and dtypes; the next is produced while one
    is written, vitspec.formats.lazy.prefetched)."""
    header: dict = {"__metadata__": dict(metadata or {})}
    offset, dtypes = 0, {}
    for name in tensors:
        shape, dtype = spec_of(tensors, name)
        if dtype not in _ST_NAMES:
            raise CheckpointError(f"tensor {name!r} has dtype {dtype}, which safetensors here does not store")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _ST_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        dtypes[name] = dtype
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format aligns the data to 8 bytes

    def write(f):
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        with closing(prefetched(tensors.__getitem__, dtypes)) as values:
            for name, value in values:
                value = np.ascontiguousarray(value)
                if value.dtype != dtypes[name] or list(value.shape) != header[name]["shape"]:
                    raise CheckpointError(f"tensor {name!r} changed its shape or dtype while being written")
                value = value.astype(value.dtype.newbyteorder("<"), copy=False)
                write_aligned(f, value.reshape(-1).view(np.uint8))  # the array's own memory, no copy

    atomic_write(path, write)


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (bfloat16 widened to float32) and the string metadata of a .safetensors file.

    The `safetensors` package checks the file first (it rejects what no other reader would load:
    overlapping or out-of-range offsets, bytes after the data, bad shapes or JSON); then each
    tensor is read from the file into an array of its own: memory is the tensors once, no copy of
    the whole file. (Not memory maps: arrays that change, or crash the process, when someone
    rewrites the file in place later would be results silently wrong.) Only the 8-byte length is
    read before the header is known to fit the file, so a forged length costs nothing."""
    tensors, metadata = open_safetensors(path)
    return dict(tensors), metadata


def open_safetensors(path) -> tuple[LazyTensors, dict[str, str]]:
    """As read_safetensors, but each tensor is read from the file when asked for (into an array of
    its own, not kept): a conversion holds one tensor at a time. The header is checked now, and
    the file kept open: a file replaced since (a rename over it) is still read as checked, and
    one shortened in place is refused when a tensor past its end is read."""
    path = Path(path)
    f = path.open("rb", buffering=0)  # unbuffered: every read is of the file as it is now
    try:
        header_len, header = _checked_header(path, f, os.fstat(f.fileno()).st_size)
        metadata = header.pop("__metadata__", None) or {}
        specs = {
            name: (tuple(info["shape"]), _read_dtype(path, name, info["dtype"])[1])
            for name, info in header.items()
        }
    except BaseException:
        f.close()
        raise
    data_start = 8 + header_len
    tensors = LazyTensors(specs, lambda name: _read_tensor(path, f, data_start, name, header[name]))
    weakref.finalize(tensors, f.close)
    return tensors, metadata


def _read_dtype(path: Path, name: str, dtype: str) -> tuple[np.dtype, np.dtype]:
    """(stored, returned) dtypes of a safetensors dtype name."""
    if dtype == "BF16":  # no NumPy dtype: widened to float32, exactly
        return np.dtype("<u2"), np.dtype(np.float32)
    if dtype in _ST_DTYPES:
        stored = np.dtype(_ST_DTYPES[dtype]).newbyteorder("<")
        return stored, stored.newbyteorder("=")
    raise CheckpointError(
        f"{path}: tensor {_short(name)} has dtype {dtype}, which this reader does not support"
    )


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
    dtype, shape, (begin, _) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    stored, _ = _read_dtype(path, name, dtype)
    try:  # the package checked that the offsets span the shape's bytes
        value = read_array(f, data_start + begin, shape, stored)
    except EOFError:
        raise CheckpointError(f"{path}: shortened while being read; read it again") from None
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
    return clip(reason)


def clip(text: str, limit: int = 200) -> str:
    # Names and values in messages come from the file: a forged one can be megabytes long.
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _short(name: str) -> str:
    return clip(repr(name), 80)
