"""Load a vitspec checkpoint straight into the flax module."""

from __future__ import annotations

import vitspec
from backends.flax_vit.cait import module_for
from backends.flax_vit.convert import from_reference
from backends.flax_vit.model import VisionTransformer


def from_checkpoint(path, **module_kwargs) -> tuple[VisionTransformer, dict]:
    """(module, variables) with `module.apply(variables, images)` giving the logits.

    `module_kwargs` (dtype, param_dtype) go to the module; the variables keep the file's dtype.
    """
    cfg, params = vitspec.load(path)
    return module_for(cfg, **module_kwargs), from_reference(params, cfg)
