"""torch.save's file of a state dict, written one tensor at a time: the same bytes, without the whole
dict in memory.

torch.save needs every tensor at once. Here torch writes the file with the tensors' bytes left out
(torch.serialization.skip_data), from stand-ins that hold no memory: the pickle, the records' names,
sizes and alignment are torch's own. Then each tensor is computed, written into its record and
dropped, and the CRC-32s that torch computes are put where it puts them: the record's data
descriptor, its central directory entry, and the serialization id (the record names' hash, then
the CRCs' hash, 20 digits each). The id torch wrote for the stand-ins is checked against that hash
first; where it differs (another torch), or torch cannot skip the data, torch.save writes the
whole dict instead.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
from collections.abc import Mapping
from contextlib import closing

import numpy as np
from zlib_ng.zlib_ng import crc32

from vitspec.formats.atomic import write_aligned
from vitspec.formats.lazy import prefetched, spec_of
from vitspec.formats.safetensors_file import CheckpointError

_MASK = 2**64 - 1
_DESCRIPTOR = b"PK\x07\x08"
_DATA_RECORD = re.compile(r"[^/]+/data/(\d+)")
_ID_RECORD = re.compile(r"[^/]+/\.data/serialization_id")


def write_state_dict(f, arrays: Mapping[str, np.ndarray]) -> None:
    """torch.save({name: tensor of arrays[name]}, f), byte for byte, with one tensor in memory at a
    time (and the next being produced, vitspec.formats.lazy.prefetched). `f`: a seekable file
    opened for writing whose descriptor can also be read (atomic_write's)."""
    import torch

    # np.ascontiguousarray, which the tensors pass through as torch.save's did, makes a 0-d array 1-d.
    specs = {name: (spec_of(arrays, name)[0] or (1,), spec_of(arrays, name)[1]) for name in arrays}
    start = f.tell()
    if hasattr(torch.serialization, "skip_data"):
        # np.empty is never written to: its pages are never touched, so it costs no memory.
        stand_ins = {name: torch.from_numpy(np.empty(shape, dtype)) for name, (shape, dtype) in specs.items()}
        with torch.serialization.skip_data():
            torch.save(stand_ins, f)
        del stand_ins
        f.flush()
        skeleton = _records(f, len(specs))
        if skeleton is not None:
            _fill(f, arrays, specs, *skeleton)
            return
        f.seek(start)
        f.truncate()
    state_dict = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    torch.save(state_dict, f)


class _Record:
    """Where one zip record's data, data-descriptor CRC and central directory CRC are in the file."""

    def __init__(self, info: zipfile.ZipInfo, data: int, descriptor_crc: int, central_crc: int):
        self.info, self.data, self.descriptor_crc, self.central_crc = info, data, descriptor_crc, central_crc


def _records(f, tensors: int) -> tuple[list[_Record], bytes] | None:
    """The records of the file torch just wrote with its data skipped, in the order written, and
    the first half of its serialization id (the names' hash); None where it is not the file this
    module knows how to fill. (zipfile gives offsets in the file, wherever the zip starts.)"""
    fd = f.fileno()
    with zipfile.ZipFile(os.fdopen(os.dup(fd), "rb")) as skeleton:
        infos = skeleton.infolist()
        central = skeleton.start_dir
        stored_id = next((skeleton.read(i) for i in infos if _ID_RECORD.fullmatch(i.filename)), b"")
    records = []
    for info in infos:
        if info.flag_bits & 0x8 == 0 or info.compress_type != zipfile.ZIP_STORED:
            return None  # torch writes every record stored, its CRC in a data descriptor
        name_len, extra_len = struct.unpack("<HH", os.pread(fd, 4, info.header_offset + 26))
        data = info.header_offset + 30 + name_len + extra_len
        descriptor = data + info.file_size
        has_signature = os.pread(fd, 4, descriptor) == _DESCRIPTOR
        records.append(_Record(info, data, descriptor + 4 * has_signature, central + 16))
        central += 46 + len(info.filename.encode()) + len(info.extra) + len(info.comment)
    data_records = [r for r in records if _DATA_RECORD.fullmatch(r.info.filename)]
    keys = [int(_DATA_RECORD.fullmatch(r.info.filename).group(1)) for r in data_records]
    if keys != list(range(tensors)) or not _ID_RECORD.fullmatch(records[-1].info.filename):
        return None
    crcs = [0 if _DATA_RECORD.fullmatch(r.info.filename) else r.info.CRC for r in records[:-1]]
    if len(stored_id) != 40 or stored_id[20:] != b"%020d" % _combined(records[:-1], crcs):
        return None
    return records, stored_id[:20]


def _combined(records: list[_Record], crcs: list[int]) -> int:
    """torch's hash of the CRCs of the records it wrote (c10::hash_combine; empty records left out)."""
    seed = 0
    for record, crc in zip(records, crcs, strict=True):
        if record.info.file_size:
            seed ^= (crc + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _MASK
    return seed


def _fill(
    f, arrays: Mapping[str, np.ndarray], specs: dict, records: list[_Record], names_hash: bytes
) -> None:
    end = f.tell()
    by_key = {int(m.group(1)): r for r in records if (m := _DATA_RECORD.fullmatch(r.info.filename))}
    crcs = {id(r): r.info.CRC for r in records}
    with closing(prefetched(lambda name: _bytes_and_crc(arrays[name]), specs)) as values:
        for key, (name, (data, crc)) in enumerate(values):
            if (data.shape, data.dtype) != specs[name]:
                raise CheckpointError(f"tensor {name!r} changed its shape or dtype while being written")
            record = by_key[key]
            f.seek(record.data)
            write_aligned(f, data.reshape(-1).view(np.uint8))
            crcs[id(record)] = _write_crc(f, record, crc)
    *written, id_record = records
    serialization_id = names_hash + b"%020d" % _combined(written, [crcs[id(r)] for r in written])
    f.seek(id_record.data)
    f.write(serialization_id)
    _write_crc(f, id_record, crc32(serialization_id))
    f.seek(end)


def _bytes_and_crc(value: np.ndarray) -> tuple[np.ndarray, int]:
    """The array as torch.save got it, and its CRC-32: computed beside the tensor being written."""
    value = np.ascontiguousarray(value)
    return value, crc32(value.reshape(-1).view(np.uint8))


def _write_crc(f, record: _Record, crc: int) -> int:
    for position in (record.descriptor_crc, record.central_crc):
        f.seek(position)
        f.write(struct.pack("<I", crc))
    return crc
