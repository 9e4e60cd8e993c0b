"""Resampling a learned position embedding to a new patch grid (fine-tuning at another resolution).

The method is big_vision's `resample_posemb`: `scipy.ndimage.zoom(grid, zoom, order=1)`, i.e.
bilinear interpolation on the [gh, gw] grid with the corner rows pinned to the corners (the
align_corners=True sampling). Class and register rows are position-free and kept as they are.
It is pure SciPy, exactly reproduces big_vision's high-res fine-tuning, and bilinear weights
are convex: a resampled row never leaves the range of its neighbours (bicubic can overshoot).
timm and HF resample with bicubic `F.interpolate(align_corners=False)` instead; a model
resampled here is a different (equally valid) starting point from timm's, not a bit-identical one.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from vitspec.config import ViTConfig


def resample_posemb(
    posemb: np.ndarray, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int
) -> np.ndarray:
    """[num_prefix + old_h * old_w, D] -> [num_prefix + new_h * new_w, D]; identity at the same size."""
    posemb = np.asarray(posemb)
    old_h, old_w = old_grid
    expected = num_prefix + old_h * old_w
    if posemb.ndim != 2 or posemb.shape[0] != expected:
        raise ValueError(
            f"posemb of shape {posemb.shape} does not hold {num_prefix} prefix rows and an "
            f"{old_h}x{old_w} grid (expected [{expected}, D])"
        )
    if tuple(old_grid) == tuple(new_grid):
        return posemb.copy()
    prefix, grid = posemb[:num_prefix], posemb[num_prefix:].reshape(old_h, old_w, -1)
    zoom = (new_grid[0] / old_h, new_grid[1] / old_w, 1)
    # Computed in float64 whatever the storage dtype, then cast back, so float32 files lose nothing extra.
    resized = scipy.ndimage.zoom(grid.astype(np.float64), zoom, order=1, grid_mode=False)
    if resized.shape[:2] != tuple(new_grid):
        raise AssertionError(f"zoom produced a {resized.shape[:2]} grid, not {new_grid}")
    return np.concatenate([prefix, resized.reshape(new_grid[0] * new_grid[1], -1).astype(posemb.dtype)])


def resample_model(
    cfg: ViTConfig, params: dict[str, np.ndarray], image_size: tuple[int, int]
) -> tuple[ViTConfig, dict[str, np.ndarray]]:
    """The model at another image size: a learned position embedding is resampled to the new grid
    (ValueError where the size does not divide into patches)."""
    new_cfg = cfg.replace(image_size=image_size)
    params = dict(params)
    if cfg.posemb == "learned":
        prefix = cfg.num_prefix_tokens if cfg.posemb_on_cls else 0
        params["pos_embed"] = resample_posemb(params["pos_embed"], cfg.grid_size, new_cfg.grid_size, prefix)
    return new_cfg, params
