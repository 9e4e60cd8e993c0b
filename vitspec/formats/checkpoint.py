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
import math
import os
import struct
import tempfile
import weakref
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from vitspec.config import ViTConfig
from vitspec.formats.lazy import LazyTensors, finite, spec_of, stand_ins
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


def write_safetensors(
    path, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` (arrays, or a LazyTensors whose values are produced one at a time while the
    file is written: the header needs only their shapes and dtypes)."""
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
        for name, dtype in dtypes.items():
            value = np.ascontiguousarray(tensors[name])
            if value.dtype != dtype or list(value.shape) != header[name]["shape"]:
                raise CheckpointError(f"tensor {name!r} changed its shape or dtype while being written")
            value = value.astype(value.dtype.newbyteorder("<"), copy=False)
            f.write(value.data)  # the array's own memory: no bytes copy of the tensor

    atomic_write(path, write)


def write_npz(f, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez(f, **arrays), one member at a time: each value is produced, written and dropped
    (np.savez takes them all at once). The same zip layout: stored members `<name>.npy`, zip64."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zipf:
        for name in arrays:
            value = np.asanyarray(arrays[name])
            with zipf.open(name + ".npy", "w", force_zip64=True) as member:
                if value.dtype.hasobject or not value.flags.c_contiguous or value.dtype.byteorder == ">":
                    np.lib.format.write_array(member, value, allow_pickle=False)
                else:  # write_array's header, then the data from the array's own memory (it copies)
                    _write_npy_header(member, np.lib.format.header_data_from_array_1_0(value))
                    member.write(memoryview(value.reshape(-1).view(np.uint8)))


def _write_npy_header(f, header: dict) -> None:
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:  # a header too long for format 1.0, as write_array decides
        np.lib.format.write_array_header_2_0(f, header)


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
    dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    stored, _ = _read_dtype(path, name, dtype)
    value = np.empty(shape, stored)  # the package has checked that its size is end - begin
    f.seek(data_start + begin)
    view, done = memoryview(value.reshape(-1).view(np.uint8)), 0
    while done < end - begin:  # an unbuffered read may return less than asked (2 GiB at most)
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{path}: shortened while being read; read it again")
        done += n
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


def save(path: str | os.PathLike, cfg: ViTConfig, params: Mapping[str, np.ndarray]) -> None:
    """Write the reference tree and its config; `.safetensors` or `.npz` by the file's suffix.

    A tree with a NaN or an infinity is refused: such a model computes nothing, and a file of it
    would pass for one that does. `params` may be a LazyTensors (a conversion's source, read as it
    is written): each tensor is checked as it is written, and a bad one abandons the write."""
    path = Path(path)
    validate_params(cfg, stand_ins(params))
    if path.suffix not in (".safetensors", ".npz"):
        raise CheckpointError(f"{path}: unknown checkpoint suffix {path.suffix!r}; use .safetensors or .npz")
    if isinstance(params, LazyTensors):
        arrays = params.checked(
            lambda name, value: _refuse_nonfinite_tensor(path, params, value, "refusing to write")
        )
    else:
        arrays = {k: np.asarray(v) for k, v in params.items()}
        _refuse_nonfinite(path, arrays, "refusing to write")
    if path.suffix == ".safetensors":
        write_safetensors(path, arrays, {FORMAT_KEY: FORMAT_VALUE, CONFIG_KEY: cfg.to_json()})
    else:
        config = np.frombuffer(cfg.to_json().encode(), dtype=np.uint8)
        atomic_write(path, lambda f: write_npz(f, _Joined(arrays, {NPZ_CONFIG_KEY: config})))


def _refuse_nonfinite_tensor(path, params: Mapping[str, np.ndarray], value: np.ndarray, what: str) -> None:
    """As _refuse_nonfinite, from a streamed tree as soon as one tensor is bad: the message lists
    every bad tensor, as a check of the whole tree would (the rest are read to find them)."""
    if not finite(value):
        _refuse_nonfinite(path, params, what)


class _Joined(Mapping):
    def __init__(self, first: Mapping, second: Mapping):
        self._first, self._second = first, second

    def __getitem__(self, key):
        return self._first[key] if key in self._first else self._second[key]

    def __iter__(self):
        yield from self._first
        yield from (k for k in self._second if k not in self._first)

    def __len__(self):
        return len(set(self._first) | set(self._second))


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file (no pickles), or a CheckpointError naming the file."""
    return dict(open_npz(path))


def open_npz(path: Path) -> LazyTensors:
    """As read_npz, but each array is read from its zip member when asked for, and not kept.

    Shapes and dtypes come from each member's .npy header; a member that has none readable is
    read now, so that what np.load refuses is refused here as before."""
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
        specs, eager = {}, {}
        for name in npz.files:
            spec = _npy_spec(npz, name)
            if spec is None:
                eager[name] = npz[name]
                specs[name] = (np.shape(eager[name]), np.asarray(eager[name]).dtype)
            else:
                specs[name] = spec
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None

    def get(name: str) -> np.ndarray:
        if name in eager:
            return eager[name]
        try:
            return npz[name]
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None

    return LazyTensors(specs, get)


def _npy_spec(npz, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) from a member's .npy header, or None where that is not a plain array."""
    member = name + ".npy"
    if member not in npz.zip.namelist():
        return None
    with npz.zip.open(member) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
        except ValueError:
            return None
    return None if dtype.hasobject else (shape, dtype)


def load(path: str | os.PathLike, allow_nonfinite: bool = False) -> tuple[ViTConfig, dict[str, np.ndarray]]:
    """Read a checkpoint written by `save`; the tree is validated against its config.

    Tensors with a NaN or an infinity are refused by name unless `allow_nonfinite` (to inspect a
    broken file)."""
    cfg, params = open_reference(path, allow_nonfinite)
    return cfg, dict(params)


def open_reference(path: str | os.PathLike, allow_nonfinite: bool = False) -> tuple[ViTConfig, LazyTensors]:
    """As load, but each tensor is read when asked for (and checked for NaN/inf then)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        params, metadata = open_safetensors(path)
        config_json = metadata.get(CONFIG_KEY)
    elif path.suffix == ".npz":
        arrays = open_npz(path)
        config_json = arrays[NPZ_CONFIG_KEY].tobytes().decode() if NPZ_CONFIG_KEY in arrays else None
        params = LazyTensors({k: arrays.spec(k) for k in arrays if k != NPZ_CONFIG_KEY}, arrays.__getitem__)
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
    held = sum(math.prod(params.spec(k)[0]) * params.spec(k)[1].itemsize for k in params)
    if 2 * values > held:  # every parameter is a float of 2 bytes or more
        raise CheckpointError(
            f"{path}: the stored config implies {size_text(values)} parameters, at least "
            f"{size_text(2 * values)} bytes, but the file's tensors hold {held} bytes"
        )
    try:
        validate_params(cfg, stand_ins(params), source=str(path))
    except ParamTreeError as e:
        raise CheckpointError(str(e)) from None
    if not allow_nonfinite:
        raw = params
        params = raw.checked(lambda name, value: _refuse_nonfinite_tensor(path, raw, value, ""))
    return cfg, params
