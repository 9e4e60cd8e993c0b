"""Load a reference checkpoint (vitspec.save) as a ready-to-use PyTorch model."""

from __future__ import annotations

import os

import vitspec
from backends.torch_vit.convert import from_reference
from backends.torch_vit.model import VisionTransformer


def from_checkpoint(path: str | os.PathLike) -> VisionTransformer:
    """The model of a vitspec checkpoint, in eval mode, in the checkpoint's floating dtype."""
    cfg, params = vitspec.load(path)
    state_dict = from_reference(params, cfg)
    model = VisionTransformer(cfg).to(next(iter(state_dict.values())).dtype)
    model.load_state_dict(state_dict)
    return model.eval()
