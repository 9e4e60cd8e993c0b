"""Checkpoint files of the reference tree: `.safetensors` (config JSON in the metadata, the file
itself in vitspec/formats/safetensors_file.py) and `.npz`.

Writes go to a temporary file in the same directory and are renamed into place, so a crash never
leaves a partial checkpoint under the real name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.atomic import atomic_write
from vitspec.formats.lazy import LazyTensors, finite, stand_ins
from vitspec.formats.npz_file import open_npz, write_npz
from vitspec.formats.safetensors_file import (
    CheckpointError,
    clip,
    open_safetensors,
    write_safetensors,
)
from vitspec.params import ParamTreeError, size_text, tree_size, validate_params

CONFIG_KEY = "vitspec_config"
FORMAT_KEY = "format"
FORMAT_VALUE = "vitspec-reference"
NPZ_CONFIG_KEY = "__vitspec_config__"


def nonfinite_names(params: dict[str, np.ndarray]) -> list[str]:
    """The names of the tensors holding a NaN or an infinity."""
    return [k for k, v in params.items() if not finite(v)]


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
    if isinstance(params, LazyTensors) and params.refuses_nonfinite:
        arrays = params  # its reader refuses a bad value as it is read: no second pass over the values
    elif isinstance(params, LazyTensors):
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
        raise CheckpointError(f"{path}: the stored config is invalid: {clip(str(e))}") from None
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
        params = raw.checked(
            lambda name, value: _refuse_nonfinite_tensor(path, raw, value, ""), refuses_nonfinite=True
        )
    return cfg, params
