"""Reading and writing flat {name: array} files: .safetensors, .npz, torch pickles, flax msgpack.

NumPy-only except where a suffix needs its framework: torch for .pt/.pth/.bin (loaded with
`weights_only=True`, so a checkpoint cannot run code), flax for .msgpack. Every write is atomic
(temp file, fsync, rename), so a failed conversion never leaves a partial file.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import closing
from pathlib import Path

import numpy as np

from vitspec.formats.atomic import atomic_write, write_aligned
from vitspec.formats.lazy import LazyTensors, prefetched
from vitspec.formats.npz_file import open_npz, write_npz
from vitspec.formats.safetensors_file import CheckpointError, open_safetensors, write_safetensors
from vitspec.formats.torch_file import write_state_dict

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SUFFIXES = (".safetensors", ".npz", ".msgpack") + TORCH_SUFFIXES
# Wrappers that training scripts put around a state dict; big_vision/flax trees may sit under
# "params", and old vision_transformer files under "opt/target".
_STATE_DICT_WRAPPERS = ("state_dict", "model")
_TREE_PREFIXES = ("params/", "opt/target/")
# What torch.load(weights_only=True) refused, from its error: "WeightsUnpickler error: Unsupported
# global: GLOBAL __main__.Net was not an allowed global by default. Please use ..." (torch 2.4 on;
# before: "Unsupported class __main__.Net"), or "... error: \n\nUnsupported operand 110" for no pickle.
_WEIGHTS_ONLY_REFUSAL = re.compile(
    r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global|\. Please|$)", re.M
)


def read_tensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays of a file under flat names, and its string metadata (safetensors/npz only)."""
    arrays, metadata = open_tensors(path)
    return dict(arrays), metadata


def open_tensors(path: str | Path) -> tuple[LazyTensors, dict[str, str]]:
    """As read_tensors, but each tensor is read when asked for and not kept, where the file type
    allows: .safetensors and .npz read one tensor from the file; torch files are memory-mapped
    (torch.load(mmap=True), where the file is a zip, today's format) and each tensor copied out;
    a .msgpack file is parsed whole (msgpack has no index), streamed from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix
    if suffix == ".safetensors":
        arrays, metadata = open_safetensors(path)
    elif suffix == ".npz":
        arrays, metadata = open_npz(path), {}
    elif suffix in TORCH_SUFFIXES:
        arrays, metadata = _open_torch(path), {}
    elif suffix == ".msgpack":
        arrays, metadata = _in_memory(_read_msgpack(path)), {}
    else:
        raise CheckpointError(f"{path}: unknown suffix {suffix!r}; known: {list(SUFFIXES)}")
    return _strip_tree_prefix(arrays), metadata


def _in_memory(arrays: dict[str, np.ndarray]) -> LazyTensors:
    return LazyTensors({k: (v.shape, v.dtype) for k, v in arrays.items()}, arrays.__getitem__)


def write_tensors(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write flat arrays (or a LazyTensors, whose values are produced and written one at a time;
    torch files too, vitspec.formats.torch_file)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        write_safetensors(path, arrays)
    elif path.suffix == ".npz":
        atomic_write(path, lambda f: write_npz(f, _Contiguous(arrays)))
    elif path.suffix in TORCH_SUFFIXES:
        atomic_write(path, lambda f: write_state_dict(f, arrays))
    elif path.suffix == ".msgpack":
        atomic_write(path, lambda f: write_msgpack(f, _Contiguous(arrays)))
    else:
        raise CheckpointError(f"{path}: unknown suffix {path.suffix!r}; known: {list(SUFFIXES)}")


def _write_ndarray_ext(f, value: np.ndarray) -> None:
    """Write what flax's _msgpack_ext_pack(value) packs, ExtType(ndarray, packb((shape, dtype name,
    bytes))), with the array's bytes written from its own memory: packing copies them three times."""
    import msgpack
    from flax import serialization

    n = value.nbytes
    prefix = msgpack.packb((value.shape, value.dtype.name, b""), use_bin_type=True)[:-2]  # less bin8 b""
    if n < 2**8:
        prefix += b"\xc4" + struct.pack(">B", n)
    elif n < 2**16:
        prefix += b"\xc5" + struct.pack(">H", n)
    else:
        prefix += b"\xc6" + struct.pack(">I", n)
    length, code = len(prefix) + n, struct.pack(">b", serialization._MsgpackExtType.ndarray)
    fixext = {1: b"\xd4", 2: b"\xd5", 4: b"\xd6", 8: b"\xd7", 16: b"\xd8"}
    if length in fixext:
        head = fixext[length]
    elif length < 2**8:
        head = b"\xc7" + struct.pack(">B", length)
    elif length < 2**16:
        head = b"\xc8" + struct.pack(">H", length)
    else:
        head = b"\xc9" + struct.pack(">I", length)
    f.write(head + code + prefix)
    write_aligned(f, value.reshape(-1).view(np.uint8))


class _Contiguous(Mapping):
    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self._arrays = arrays

    def __getitem__(self, key):
        return np.ascontiguousarray(self._arrays[key])

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self):
        return len(self._arrays)


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


def _open_torch(path: Path) -> LazyTensors:
    """A torch state dict, memory-mapped where torch can (a zip file: torch.load(mmap=True)); each
    tensor is copied into its own array when asked for."""
    import pickle

    import torch

    errors = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError, zipfile.BadZipFile)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except errors:  # a legacy (non-zip) file cannot be mapped; the plain load says what else is wrong
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except errors as e:
            raise _torch_refusal(path, e) from None
    for wrapper in _STATE_DICT_WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    foreign = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if foreign:
        raise CheckpointError(
            f"{path}: entries that are not tensors: {foreign}; not a plain state dict "
            f"(wrappers understood: {list(_STATE_DICT_WRAPPERS)})"
        )
    specs = {k: (tuple(v.shape), _numpy_dtype(v.dtype)) for k, v in obj.items()}
    return LazyTensors(specs, lambda k: tensor_to_numpy(obj[k]))


def _numpy_dtype(dtype) -> np.dtype:
    import torch

    if dtype in (torch.bfloat16, torch.float16):
        return np.dtype(np.float32)
    return torch.empty(0, dtype=dtype).numpy().dtype


def _torch_refusal(path: Path, error: Exception) -> CheckpointError:
    """What torch.load refused, in our words: its own message advises retrying with weights_only=False
    (even for a file that is no pickle), which vitspec never does."""
    message = str(error)
    unpickler = _WEIGHTS_ONLY_REFUSAL.search(message)
    if unpickler and unpickler.group(1).startswith(("Unsupported global", "Unsupported class")):
        return CheckpointError(
            f"{path}: holds Python objects beyond tensors, which torch's safe loader refuses "
            f"({unpickler.group(1)}). vitspec never unpickles arbitrary objects, because loading a "
            "pickle can run any code. Where you trust the file, save its tensors alone "
            "(torch.save(model.state_dict(), path)) or convert them to .safetensors, and read that"
        )
    if unpickler:
        reason = f"torch's safe loader: {unpickler.group(1)}"
    elif "weights_only" in message:
        reason = "torch's safe loader refused it"
    else:
        reason = message.splitlines()[0] if message else ""
    return CheckpointError(
        f"{path}: not a readable torch checkpoint ({type(error).__name__}: {reason}); truncated or foreign?"
    )


def tensor_to_numpy(tensor) -> np.ndarray:
    """A torch tensor as a NumPy array of its own memory; bfloat16 and float16 widened to float32,
    which holds them exactly (NumPy has no bfloat16)."""
    import torch

    tensor = torch.as_tensor(tensor).detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.numpy().copy()


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


def _strip_tree_prefix(arrays: LazyTensors) -> LazyTensors:
    for prefix in _TREE_PREFIXES:
        if len(arrays) and all(k.startswith(prefix) for k in arrays):
            specs = {k[len(prefix) :]: arrays.spec(k) for k in arrays}
            return LazyTensors(specs, lambda k, prefix=prefix: arrays[prefix + k])
    return arrays
