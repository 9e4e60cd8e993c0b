"""Reference parameter tree <-> timm-named PyTorch state dict.

The table is `vitspec.formats.timm`'s: the one the checkpoint converter (`python -m
vitspec.convert`) reads and writes timm files with, so this backend and timm files cannot drift
apart. This module only moves arrays between NumPy and torch. Errors list every missing,
unexpected and mis-shaped key at once (`ConversionError`, vitspec.formats' `FormatError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch

from vitspec.config import ViTConfig
from vitspec.formats import timm
from vitspec.formats.table import FormatError as ConversionError

__all__ = ["ConversionError", "Rule", "from_reference", "mapping_table", "timm_shapes", "to_reference"]


class Rule(NamedTuple):
    """One row of the timm table as this backend names it."""
    reference_names: tuple[str, ...]
    timm_name: str
    layout: str


def mapping_table(cfg: ViTConfig) -> list[Rule]:
    """Every parameter of `cfg` as (reference names, timm name, layout), in forward order."""
    return [Rule(row.reference, row.native, row.layout.value) for row in timm.table(cfg)]


def timm_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict name of `cfg` and its shape."""
    return {row.native: row.native_shape for row in timm.table(cfg)}


def from_reference(params: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """The timm-named state dict of a reference parameter tree (dtypes kept, memory not shared)."""
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in timm.from_reference(params, cfg).items()}


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = torch.as_tensor(tensor).detach().cpu()
    # NumPy has no bfloat16: widen it (and float16, for symmetry) to float32, which holds it exactly.
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.numpy()


def to_reference(state_dict: Mapping[str, torch.Tensor], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """The reference parameter tree of a timm-named state dict (dtypes kept; bf16/fp16 -> float32)."""
    params = timm.to_reference({k: _to_numpy(v) for k, v in state_dict.items()}, cfg)
    return {k: np.array(v, copy=True) for k, v in params.items()}  # never a view of the tensors' memory
