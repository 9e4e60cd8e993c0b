"""vitspec's canonical parameters <-> the flax module's (big_vision's) tree.

The table is `vitspec.formats.big_vision.FLAX`'s: the one the checkpoint converter (`python -m
vitspec.convert`) reads and writes big_vision files with; this module only nests and flattens
the tree. Every layout change is a row-major reshape (heads split out of q/k/v/out, batch axes
on tokens). Mismatches raise `vitspec.ParamTreeError` listing every problem.
"""

from __future__ import annotations

import numpy as np
from flax import traverse_util

from vitspec.config import ViTConfig
from vitspec.formats import big_vision
from vitspec.formats.table import Rule


def mapping(cfg: ViTConfig) -> list[Rule]:
    """The big_vision table's rows for `cfg`: `.reference` (one name each: big_vision fuses nothing),
    `.native` (the '/'-joined path in the module's tree), `.layout`, shapes on both sides."""
    return big_vision.FLAX.table(cfg)


def to_reference(variables: dict, cfg: ViTConfig) -> dict[str, np.ndarray]:
    """Flax variables ({'params': tree}, or the tree itself) -> vitspec's flat NumPy parameters."""
    tree = variables["params"] if "params" in variables else variables
    flat = traverse_util.flatten_dict(dict(tree), sep="/")
    return big_vision.FLAX.to_reference({k: np.asarray(v) for k, v in flat.items()}, cfg)


def from_reference(params: dict[str, np.ndarray], cfg: ViTConfig) -> dict[str, dict]:
    """vitspec's flat parameters -> {'params': big_vision tree} of NumPy arrays (dtype kept)."""
    return {"params": traverse_util.unflatten_dict(big_vision.FLAX.from_reference(params, cfg), sep="/")}
