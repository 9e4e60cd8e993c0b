"""flax's msgpack file of a parameter tree (`flax.serialization.msgpack_serialize`), read and
written one array at a time.

msgpack has no index: the file is nested maps whose leaves are ext records of flax's (`ndarray`:
the packed triple shape, dtype name, bytes). Reading walks the maps' headers to find where each
array's bytes lie, without reading them, then reads an array when asked for; a file of any other
shape (chunked arrays over flax's 1 GB chunk size, scalars, other ext types, keys that are not
strings) is parsed whole by msgpack with flax's own decoder, as msgpack_restore would.
"""

from __future__ import annotations

import math
import os
import struct
import weakref
from collections.abc import Iterator, Mapping
from contextlib import closing
from pathlib import Path

import numpy as np

from vitspec.formats.atomic import read_array, write_aligned
from vitspec.formats.lazy import LazyTensors, prefetched
from vitspec.formats.safetensors_file import CheckpointError

_NDARRAY_EXT = 1  # flax.serialization._MsgpackExtType.ndarray
# msgpack's headers by first byte: (struct of the length that follows, or the length itself).
_MAP = {0xDE: ">H", 0xDF: ">I"}
_STR = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}
_BIN = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}
_EXT = {0xC7: ">B", 0xC8: ">H", 0xC9: ">I"}
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_MAX_DEPTH = 64  # a parameter tree is a few maps deep; deeper is left to msgpack's own limits


def open_msgpack(path: Path) -> LazyTensors:
    """The flat `a/b/c` arrays of a flax msgpack file (as flatten_dict(msgpack_restore(bytes),
    sep="/") gives them), each read from the file when asked for, or the whole file parsed now
    where its layout is not the plain one (see the module's docstring)."""
    f = path.open("rb", buffering=0)  # unbuffered: every read is of the file as it is now
    try:
        index = _Index(f, os.fstat(f.fileno()).st_size).arrays()
    except BaseException:
        f.close()
        raise
    if index is None:
        f.close()
        arrays = _read_msgpack(path)
        return LazyTensors({k: (v.shape, v.dtype) for k, v in arrays.items()}, arrays.__getitem__)

    def get(name: str) -> np.ndarray:
        (shape, dtype), offset = index[name]
        try:
            return read_array(f, offset, shape, dtype)
        except EOFError:
            raise CheckpointError(f"{path}: {name} ends past the end of the file (truncated?)") from None

    tensors = LazyTensors({k: spec for k, (spec, _) in index.items()}, get)
    weakref.finalize(tensors, f.close)
    return tensors


class _Unusual(Exception):
    """Not the plain layout (or not a well-formed file): msgpack's own parse says which."""


class _Index:
    """Where each array of a plain flax msgpack file lies: {name: ((shape, dtype), offset)}."""

    def __init__(self, f, size: int):
        self.f, self.size, self.found = f, size, {}

    def arrays(self) -> dict | None:
        try:
            entries = self._map_length(self._byte())
            self._walk("", entries, depth=1)
            if self.f.tell() != self.size:
                raise _Unusual
        except _Unusual:
            return None
        return self.found

    def _read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise _Unusual
        return data

    def _byte(self) -> int:
        return self._read(1)[0]

    def _length(self, fmt: str) -> int:
        return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]

    def _map_length(self, first: int) -> int:
        if 0x80 <= first <= 0x8F:
            return first & 0x0F
        if first in _MAP:
            return self._length(_MAP[first])
        raise _Unusual

    def _key(self) -> str:
        first = self._byte()
        if 0xA0 <= first <= 0xBF:
            n = first & 0x1F
        elif first in _STR:
            n = self._length(_STR[first])
        else:
            raise _Unusual
        try:
            return self._read(n).decode("utf-8")
        except UnicodeDecodeError:
            raise _Unusual from None

    def _walk(self, prefix: str, entries: int, depth: int) -> None:
        keys = set()
        for _ in range(entries):
            key = self._key()
            if key in keys:  # a dict keeps the last value, in the first one's place: msgpack's parse
                raise _Unusual
            keys.add(key)
            name = prefix + key
            first = self._byte()
            if 0x80 <= first <= 0x8F or first in _MAP:
                if depth == _MAX_DEPTH:
                    raise _Unusual
                self._walk(name + "/", self._map_length(first), depth + 1)
                continue
            if first in _FIXEXT:
                length = _FIXEXT[first]
            elif first in _EXT:
                length = self._length(_EXT[first])
            else:
                raise _Unusual
            if self._byte() != _NDARRAY_EXT or name in self.found:
                raise _Unusual
            start = self.f.tell()
            self.found[name] = self._ndarray(start, length)
            self.f.seek(start + length)

    def _ndarray(self, start: int, length: int):
        """((shape, dtype), offset of the bytes) of flax's packed (shape, dtype name, bytes)."""
        import msgpack
        from flax import serialization

        head = self._read(min(length, 4096))
        unpacker = msgpack.Unpacker(raw=True)
        unpacker.feed(head)
        try:
            if unpacker.read_array_header() != 3:
                raise _Unusual
            shape, dtype_name = unpacker.unpack(), unpacker.unpack()
            dtype = np.dtype(serialization._dtype_from_name(dtype_name))
        except (ValueError, TypeError, msgpack.OutOfData):
            raise _Unusual from None
        at = unpacker.tell()
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _Unusual
        if at >= len(head) or head[at] not in _BIN:
            raise _Unusual
        fmt = _BIN[head[at]]
        header = 1 + struct.calcsize(fmt)
        if at + header > len(head):
            raise _Unusual
        (nbytes,) = struct.unpack(fmt, head[at + 1 : at + header])
        if at + header + nbytes != length or nbytes != math.prod(shape) * dtype.itemsize or dtype.hasobject:
            raise _Unusual
        return (tuple(shape), dtype), start + at + header


def _read_msgpack(path: Path) -> dict[str, np.ndarray]:
    """flax's msgpack_restore, streamed from the file: the file's bytes are never all in memory
    beside the arrays (msgpack_restore takes the whole file as one bytes object)."""
    import msgpack
    from flax import serialization, traverse_util

    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        unpacker = msgpack.Unpacker(
            f,
            ext_hook=serialization._msgpack_ext_unpack,
            raw=False,
            strict_map_key=False,
            max_buffer_size=max(size, 1 << 20),
        )
        try:
            tree = unpacker.unpack()
            try:
                unpacker.unpack()
            except msgpack.OutOfData:
                pass
            else:
                raise msgpack.ExtraData(tree, b"")
            tree = serialization._unchunk_array_leaves_in_place(tree)
        except msgpack.OutOfData:  # as msgpack_restore words it
            raise CheckpointError(
                f"{path}: not a readable flax msgpack file (ValueError: Unpack failed: incomplete input)"
            ) from None
        except ValueError as e:  # msgpack's other errors on a bad file are all ValueErrors
            raise CheckpointError(
                f"{path}: not a readable flax msgpack file ({type(e).__name__}: {e})"
            ) from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: holds a {type(tree).__name__}, not a parameter tree")
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def write_msgpack(f, arrays: Mapping[str, np.ndarray]) -> None:
    """Write flat `a/b/c` arrays as flax's msgpack_serialize(unflatten_dict(arrays, sep="/")) does,
    byte for byte, one array at a time (flax builds the whole file's bytes in memory first).

    The nesting is written as msgpack maps with sorted keys (flax copies the tree with jax's
    tree_map, which sorts them); each array is packed by flax's own ext packer, and one over flax's
    chunk limit in flax's chunked form. The next array is produced while one is written
    (vitspec.formats.lazy.prefetched)."""
    import msgpack
    from flax import serialization

    tree: dict = {}
    for name in arrays:
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"{name!r}: a tensor's name is also a prefix of another's")
        if leaf in node:
            raise CheckpointError(f"{name!r}: a tensor's name is also a prefix of another's")
        node[leaf] = name
    packer = msgpack.Packer(default=serialization._msgpack_ext_pack, strict_types=True)

    def write(node, values: Iterator[tuple[str, np.ndarray]]) -> None:
        if isinstance(node, str):
            _, value = next(values)
            value = np.asarray(value)
            if value.size * value.dtype.itemsize > serialization.MAX_CHUNK_SIZE:
                f.write(packer.pack(serialization._chunk(value)))
            elif value.dtype.hasobject or value.dtype.isalignedstruct or not value.flags.c_contiguous:
                f.write(packer.pack(value))  # flax's own packing (and refusal)
            else:
                _write_ndarray_ext(f, value)
            return
        f.write(packer.pack_map_header(len(node)))
        for key in sorted(node):  # flax's tree_map copy sorts every dict's keys
            f.write(packer.pack(key))
            write(node[key], values)

    with closing(prefetched(arrays.__getitem__, _leaves(tree))) as values:
        write(tree, values)


def _leaves(node) -> Iterator[str]:
    """The names of a write_msgpack tree's arrays, in the order it writes them."""
    if isinstance(node, str):
        yield node
        return
    for key in sorted(node):
        yield from _leaves(node[key])


def _write_ndarray_ext(f, value: np.ndarray) -> None:
    """Write what flax's _msgpack_ext_pack(value) packs, ExtType(ndarray, packb((shape, dtype name,
    bytes))), with the array's bytes written from its own memory: packing copies them three times."""
    import msgpack
    from flax import serialization

    n = value.nbytes
    prefix = msgpack.packb((value.shape, value.dtype.name, b""), use_bin_type=True)[:-2]  # less bin8 b""
    prefix += _sized(_BIN, n)
    length, code = len(prefix) + n, struct.pack(">b", serialization._MsgpackExtType.ndarray)
    fixext = {size: bytes([first]) for first, size in _FIXEXT.items()}
    f.write(fixext.get(length) or _sized(_EXT, length))
    f.write(code + prefix)
    write_aligned(f, value.reshape(-1).view(np.uint8))


def _sized(headers: dict[int, str], n: int) -> bytes:
    """msgpack's shortest header of `headers` (first byte: struct of the length) for length n."""
    first, fmt = next((b, fmt) for b, fmt in headers.items() if n < 2 ** (8 * struct.calcsize(fmt)))
    return bytes([first]) + struct.pack(fmt, n)
