"""Reference parameter tree <-> timm-named PyTorch state dict.

The table is `vitspec.formats.timm`'s: the one the checkpoint converter (`python -m
vitspec.convert`) reads and writes timm files with, so this backend and timm files cannot drift
apart. It is taken without the format's refusals of what timm's classes cannot build
(`timm.state_dict_table`): the backend runs those configs too, under the same names. This module
only moves arrays between NumPy and torch. Errors list every missing,
unexpected and mis-shaped key at once (`ConversionError`, vitspec.formats' `FormatError`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from vitspec.config import ViTConfig
from vitspec.formats import timm
from vitspec.formats.files import tensor_to_numpy
from vitspec.formats.table import FormatError as ConversionError
from vitspec.formats.table import Rule, native_from_reference, reference_from_native

__all__ = ["ConversionError", "from_reference", "mapping_table", "timm_shapes", "to_reference"]


def mapping_table(cfg: ViTConfig) -> list[Rule]:
    """The timm table's rows for `cfg`, in forward order: `.reference` names (several where timm fuses
    them, as q/k/v), `.native` (the state-dict name), `.layout`, shapes on both sides."""
    return timm.state_dict_table(cfg)


def timm_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict name of `cfg` and its shape."""
    return {row.native: row.native_shape for row in timm.state_dict_table(cfg)}


def from_reference(params: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """The timm-named state dict of a reference parameter tree (dtypes kept, memory not shared)."""
    return {
        k: torch.from_numpy(np.array(v, copy=True))
        for k, v in native_from_reference(timm.state_dict_table(cfg), params, cfg).items()
    }


def to_reference(state_dict: Mapping[str, torch.Tensor], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """The reference parameter tree of a timm-named state dict (dtypes kept; bf16/fp16 -> float32)."""
    native = {k: tensor_to_numpy(v) for k, v in state_dict.items()}
    params = reference_from_native(timm.state_dict_table(cfg), native, cfg, timm.NAME)
    return {k: np.array(v, copy=True) for k, v in params.items()}  # never a view of the tensors' memory
