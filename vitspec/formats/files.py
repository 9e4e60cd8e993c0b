"""Reading and writing flat {name: array} files: .safetensors, .npz, torch pickles, flax msgpack.

NumPy-only except where a suffix needs its framework: torch for .pt/.pth/.bin (loaded with
`weights_only=True`, so a checkpoint cannot run code), flax for .msgpack. Every write is atomic
(temp file, fsync, rename), so a failed conversion never leaves a partial file.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from vitspec.formats.checkpoint import (
    CheckpointError,
    atomic_write,
    read_npz,
    read_safetensors,
    write_safetensors,
)

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
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix
    if suffix == ".safetensors":
        arrays, metadata = read_safetensors(path)
    elif suffix == ".npz":
        arrays, metadata = read_npz(path), {}
    elif suffix in TORCH_SUFFIXES:
        arrays, metadata = _read_torch(path), {}
    elif suffix == ".msgpack":
        arrays, metadata = _read_msgpack(path), {}
    else:
        raise CheckpointError(f"{path}: unknown suffix {suffix!r}; known: {list(SUFFIXES)}")
    return _strip_tree_prefix(arrays), metadata


def write_tensors(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    path = Path(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    if path.suffix == ".safetensors":
        write_safetensors(path, arrays)
    elif path.suffix == ".npz":
        atomic_write(path, lambda f: np.savez(f, **arrays))
    elif path.suffix in TORCH_SUFFIXES:
        import torch

        state_dict = {k: torch.from_numpy(v) for k, v in arrays.items()}
        atomic_write(path, lambda f: torch.save(state_dict, f))
    elif path.suffix == ".msgpack":
        from flax import serialization, traverse_util

        tree = traverse_util.unflatten_dict(arrays, sep="/")
        atomic_write(path, lambda f: f.write(serialization.msgpack_serialize(tree)))
    else:
        raise CheckpointError(f"{path}: unknown suffix {path.suffix!r}; known: {list(SUFFIXES)}")


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError, zipfile.BadZipFile) as e:
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
    return {k: tensor_to_numpy(v) for k, v in obj.items()}


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
    from flax import serialization, traverse_util

    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except ValueError as e:  # msgpack's errors on a bad or truncated file are all ValueErrors
        raise CheckpointError(f"{path}: not a readable flax msgpack file ({type(e).__name__}: {e})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: holds a {type(tree).__name__}, not a parameter tree")
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def _strip_tree_prefix(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in _TREE_PREFIXES:
        if arrays and all(k.startswith(prefix) for k in arrays):
            return {k[len(prefix) :]: v for k, v in arrays.items()}
    return arrays
