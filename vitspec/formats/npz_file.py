"""NumPy's .npz file: a zip of stored `<name>.npy` members, as np.savez writes it.

Written and read here rather than through `zipfile` for the CRC-32 every member carries: zipfile
computes it with zlib's (4.3 GB/s here; 0.6 s of a ViT-H file), zlib-ng's runs at 34 GB/s. The
writer produces np.savez's bytes exactly (tests/test_npz_file.py compares them, zip64 records
included); the reader reads a stored member's data straight into memory and checks it against the
member's CRC-32, and leaves anything else (compressed members, Fortran order, pickles) to np.load.
The zip layout is PKWARE's APPNOTE, with the choices zipfile makes for np.savez's members.
"""

from __future__ import annotations

import io
import math
import struct
import sys
import weakref
import zipfile
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

import numpy as np
from zlib_ng.zlib_ng import crc32

from vitspec.formats.atomic import read_array, write_aligned
from vitspec.formats.lazy import LazyTensors, prefetched
from vitspec.formats.safetensors_file import CheckpointError

# Fields in zipfile's order and meaning. zipfile (and so np.savez) marks sizes past 2^31 - 1, not
# 2^32 - 1, as zip64, and gives every np.savez member zip64 sizes in its local header.
_ZIP64_LIMIT = (1 << 31) - 1
_FILECOUNT_LIMIT = (1 << 16) - 1
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_END64 = struct.Struct("<4sQ2H2L4Q")
_END64_LOCATOR = struct.Struct("<4sLQL")
_END = struct.Struct("<4s4H2LH")
_ZIP64_VERSION = 45
_UTF8_NAME = 0x800
_DOS_DATE_1980_01_01 = (0 << 9) | (1 << 5) | 1  # zipfile's date for a member opened by name
_CREATE_SYSTEM = 0 if sys.platform == "win32" else 3  # as zipfile records it
_EXTERNAL_ATTR = 0o600 << 16  # zipfile's rw------- for a member opened by name


class _Entry(NamedTuple):
    name: bytes
    flags: int
    crc: int
    size: int
    offset: int


def write_npz(f, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez(f, **arrays), one member at a time: the next value is produced (and its CRC-32
    computed) by a background thread while one is written, from the array's own memory; np.savez
    takes them all at once. `f`: a new file, written from its start; it need not seek."""
    entries, position = [], 0
    with closing(prefetched(lambda name: _npy_member(name, arrays[name]), arrays)) as members:
        for name, (header, data, crc) in members:
            filename, flags = _encoded(name + ".npy")
            size = len(header) + data.nbytes
            entries.append(_Entry(filename, flags, crc, size, position))
            head = _local_header(entries[-1]) + header
            f.write(head)
            write_aligned(f, data, position + len(head))
            position += len(head) + data.nbytes
    _write_central_directory(f, entries, position)


def _npy_member(name: str, value) -> tuple[bytes, np.ndarray, int]:
    """(.npy header, data bytes, CRC-32 of both) of one array, as np.save writes it: a C-ordered
    copy of an array that is not already (np.save would write a Fortran array Fortran-ordered;
    np.load reads both as the same array)."""
    value = np.asanyarray(value)
    if value.dtype.hasobject:
        raise ValueError(f"{name}: an array of Python objects cannot be written to an .npz without pickle")
    if not value.flags.c_contiguous:
        value = np.ascontiguousarray(value)
    header = io.BytesIO()
    fields = np.lib.format.header_data_from_array_1_0(value)
    try:
        np.lib.format.write_array_header_1_0(header, fields)
    except ValueError:  # a header too long for format 1.0, as np.save decides
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, fields)
    data = value.reshape(-1).view(np.uint8)
    return header.getvalue(), data, crc32(data, crc32(header.getvalue()))


def _encoded(name: str) -> tuple[bytes, int]:
    try:
        return name.encode("ascii"), 0
    except UnicodeEncodeError:
        return name.encode("utf-8"), _UTF8_NAME


def _local_header(e: _Entry) -> bytes:
    zip64_sizes = struct.pack("<2HQQ", 1, 16, e.size, e.size)
    fields = (_ZIP64_VERSION, 0, e.flags, zipfile.ZIP_STORED, 0, _DOS_DATE_1980_01_01, e.crc)
    sizes = (0xFFFFFFFF, 0xFFFFFFFF, len(e.name), len(zip64_sizes))
    return _LOCAL.pack(b"PK\x03\x04", *fields, *sizes) + e.name + zip64_sizes


def _central_record(e: _Entry) -> bytes:
    large, far = e.size > _ZIP64_LIMIT, e.offset > _ZIP64_LIMIT
    extra_values = [e.size, e.size] * large + [e.offset] * far
    extra = (
        struct.pack(f"<2H{len(extra_values)}Q", 1, 8 * len(extra_values), *extra_values)
        if extra_values
        else b""
    )
    fields = (_ZIP64_VERSION, _CREATE_SYSTEM, _ZIP64_VERSION, 0, e.flags, zipfile.ZIP_STORED, 0)
    size = 0xFFFFFFFF if large else e.size
    rest = (len(e.name), len(extra), 0, 0, 0, _EXTERNAL_ATTR, 0xFFFFFFFF if far else e.offset)
    return (
        _CENTRAL.pack(b"PK\x01\x02", *fields, _DOS_DATE_1980_01_01, e.crc, size, size, *rest) + e.name + extra
    )


def _write_central_directory(f, entries: list[_Entry], start: int) -> None:
    records = b"".join(_central_record(e) for e in entries)
    f.write(records)
    count, size, end = len(entries), len(records), start + len(records)
    if count > _FILECOUNT_LIMIT or start > _ZIP64_LIMIT or size > _ZIP64_LIMIT:
        f.write(_END64.pack(b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, start))
        f.write(_END64_LOCATOR.pack(b"PK\x06\x07", 0, end, 1))
        count, size, start = min(count, 0xFFFF), min(size, 0xFFFFFFFF), min(start, 0xFFFFFFFF)
    f.write(_END.pack(b"PK\x05\x06", 0, 0, count, count, size, start, 0))


class _Stored(NamedTuple):
    """Where a stored member's array data starts in the file, and the CRC-32 of the bytes before it."""

    data: int
    header_crc: int
    crc: int


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file (no pickles), or a CheckpointError naming the file."""
    return dict(open_npz(path))


def open_npz(path: Path) -> LazyTensors:
    """As read_npz, but each array is read from its zip member when asked for, and not kept.

    A stored C-ordered member (np.savez's) is read from the file into an array of its own and
    checked against its CRC-32; any other member through np.load, which checks the same. Shapes
    and dtypes come from each member's .npy header; a member that has none readable is read now,
    so that what np.load refuses is refused here as before."""
    path = Path(path)
    f = path.open("rb", buffering=0)  # unbuffered: every read is of the file as it is now
    try:
        npz = np.load(f, allow_pickle=False)
        specs, eager, stored = {}, {}, {}
        for name in npz.files:
            found = _stored_member(f, npz.zip, name + ".npy")
            if found is not None:
                specs[name], stored[name] = found
            elif (spec := _npy_spec(npz, name)) is not None:
                specs[name] = spec
            else:
                eager[name] = npz[name]
                specs[name] = (np.shape(eager[name]), np.asarray(eager[name]).dtype)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        f.close()
        raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    except BaseException:
        f.close()
        raise

    def get(name: str) -> np.ndarray:
        if name in eager:
            return eager[name]
        if name in stored:
            return _read_stored(path, f, name, specs[name], stored[name])
        try:
            return npz[name]
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None

    tensors = LazyTensors(specs, get)
    weakref.finalize(tensors, f.close)
    return tensors


def _stored_member(f, archive: zipfile.ZipFile, member: str):
    """((shape, dtype), _Stored) of a member this module reads itself: stored, not encrypted, a
    C-ordered array of plain values whose header and data fill the member exactly; else None."""
    try:
        info = archive.getinfo(member)
    except KeyError:
        return None
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    f.seek(info.header_offset)
    local = f.read(_LOCAL.size)
    if len(local) != _LOCAL.size or local[:4] != b"PK\x03\x04":
        return None  # np.load's reading of it says what is wrong
    start = info.header_offset + _LOCAL.size + sum(struct.unpack("<2H", local[26:30]))
    f.seek(start)
    header = _npy_header(f)
    if header is None:
        return None
    shape, fortran_order, dtype = header
    header_len = f.tell() - start
    if fortran_order or dtype.hasobject or info.file_size != header_len + math.prod(shape) * dtype.itemsize:
        return None
    f.seek(start)
    return (shape, dtype), _Stored(start + header_len, crc32(f.read(header_len)), info.CRC)


def _read_stored(path: Path, f, name: str, spec, member: _Stored) -> np.ndarray:
    try:
        value = read_array(f, member.data, *spec)
    except EOFError:
        raise CheckpointError(f"{path}: {name}.npy ends past the end of the file (truncated?)") from None
    if crc32(value.reshape(-1).view(np.uint8), member.header_crc) != member.crc:
        raise CheckpointError(f"{path}: {name}.npy does not match its CRC-32: the file is damaged")
    return value


def _npy_spec(npz, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) from a member's .npy header, or None where that is not a plain array."""
    member = name + ".npy"
    if member not in npz.zip.namelist():
        return None
    with npz.zip.open(member) as f:
        header = _npy_header(f)
    return None if header is None or header[2].hasobject else (header[0], header[2])


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) of the .npy header `f` starts at (format 1.0 or 2.0), or None."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except ValueError:
        pass
    return None
