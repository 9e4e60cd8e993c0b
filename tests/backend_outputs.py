"""The reference's and both backends' float64 outputs for a reference tree: what each family's test
compares with its own library's, so every family is shown to run the same in all three."""

from __future__ import annotations

import numpy as np

import vitspec
from vitspec.config import ViTConfig


def torch_output(cfg: ViTConfig, params: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    import torch

    from backends.torch_vit import from_reference, model_for

    model = model_for(cfg).double().eval()
    model.load_state_dict(from_reference({k: np.asarray(v, np.float64) for k, v in params.items()}, cfg))
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(images, np.float64).transpose(0, 3, 1, 2).copy())).numpy()


def flax_output(cfg: ViTConfig, params: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    import jax

    from backends.flax_vit import from_reference, module_for

    with jax.enable_x64(True):
        variables = from_reference({k: np.asarray(v, np.float64) for k, v in params.items()}, cfg)
        return np.asarray(module_for(cfg).apply(variables, np.asarray(images, np.float64)))


def three_outputs(cfg: ViTConfig, params: dict[str, np.ndarray], images: np.ndarray) -> dict[str, object]:
    """The reference's output and both backends', by name."""
    return {
        "reference": vitspec.forward(cfg, params, images),
        "torch": torch_output(cfg, params, images),
        "flax": flax_output(cfg, params, images),
    }
