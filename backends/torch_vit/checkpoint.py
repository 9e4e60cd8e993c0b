"""Load a reference checkpoint (vitspec.save) as a ready-to-use PyTorch model."""

from __future__ import annotations

import os

from torch import nn

import vitspec
from backends.torch_vit.cait import model_for
from backends.torch_vit.convert import from_reference


def from_checkpoint(path: str | os.PathLike) -> nn.Module:
    """The model of a vitspec checkpoint, in eval mode, in the checkpoint's floating dtype."""
    cfg, params = vitspec.load(path)
    state_dict = from_reference(params, cfg)
    model = model_for(cfg).to(next(iter(state_dict.values())).dtype)
    model.load_state_dict(state_dict)
    return model.eval()
