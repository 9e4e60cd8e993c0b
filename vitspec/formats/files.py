"""Reading and writing flat {name: array} files: .safetensors, .npz, torch pickles, flax msgpack.

NumPy-only except where a suffix needs its framework: torch for .pt/.pth/.bin (loaded with
`weights_only=True`, so a checkpoint cannot run code), flax for .msgpack. Every write is atomic
(temp file, fsync, rename), so a failed conversion never leaves a partial file.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from vitspec.formats.atomic import atomic_write
from vitspec.formats.lazy import LazyTensors
from vitspec.formats.msgpack_file import open_msgpack, write_msgpack
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
    a .msgpack file's arrays are found by walking its maps, then each read (vitspec.formats.msgpack_file)."""
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
        arrays, metadata = open_msgpack(path), {}
    else:
        raise CheckpointError(f"{path}: unknown suffix {suffix!r}; known: {list(SUFFIXES)}")
    return _strip_tree_prefix(arrays), metadata


def write_tensors(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write flat arrays (or a LazyTensors, whose values are produced and written one at a time;
    torch files too, vitspec.formats.torch_file)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        write_safetensors(path, arrays)
    elif path.suffix == ".npz":
        atomic_write(path, lambda f: write_npz(f, arrays))  # it writes C order itself
    elif path.suffix in TORCH_SUFFIXES:
        atomic_write(path, lambda f: write_state_dict(f, arrays))
    elif path.suffix == ".msgpack":
        atomic_write(path, lambda f: write_msgpack(f, _Contiguous(arrays)))
    else:
        raise CheckpointError(f"{path}: unknown suffix {path.suffix!r}; known: {list(SUFFIXES)}")


class _Contiguous(Mapping):
    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self._arrays = arrays

    def __getitem__(self, key):
        return np.ascontiguousarray(self._arrays[key])

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self):
        return len(self._arrays)


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


def _strip_tree_prefix(arrays: LazyTensors) -> LazyTensors:
    for prefix in _TREE_PREFIXES:
        if len(arrays) and all(k.startswith(prefix) for k in arrays):
            specs = {k[len(prefix) :]: arrays.spec(k) for k in arrays}
            return LazyTensors(specs, lambda k, prefix=prefix: arrays[prefix + k])
    return arrays
