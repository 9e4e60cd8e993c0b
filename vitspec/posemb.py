"""Resampling a learned position embedding to a new patch grid (fine-tuning at another resolution),
as each ecosystem does it. Class, distillation and register rows are position-free and kept as they
are; only the [gh, gw] grid of patch rows is resized.

- "big_vision": big_vision's `resample_posemb` (and vision_transformer's and Scenic's):
  `scipy.ndimage.zoom(grid, zoom, order=1)`, bilinear with the corner rows pinned to the corners
  (the align_corners=True sampling), in float64 (SciPy's). Its weights are convex: a resampled row
  never leaves the range of its neighbours.
- "timm": timm's `resample_abs_pos_embed`: `F.interpolate(grid, size, mode="bicubic",
  antialias=True)` (align_corners False), in float32 whatever the tensor's dtype, then cast back.
- "hf": transformers' `interpolate_pos_encoding` (ViT, DeiT, CLIP, SigLIP, DINOv2):
  `F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False)`, no antialias,
  in the model's dtype (DINOv2: float32). transformers assumes a square source grid; here the
  source grid is the config's, square or not.

The bicubic kernels are vitspec.interpolate's (PyTorch's, written in NumPy). Computed in float64
by default (torch's float64 F.interpolate to <= 1e-14 relative); compute_dtype="float32" rounds
as the library's float32 computation does, to <= 5e-6 of the largest value rather than the bit
(vitspec.interpolate says why). Bicubic can overshoot its neighbours.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from vitspec.config import ViTConfig
from vitspec.interpolate import resize_bicubic

# Method -> how it resizes, as the conversion summary and fine-tuning notes print it.
RESAMPLE_METHODS = {
    "big_vision": "bilinear, big_vision's",
    "timm": "bicubic antialiased, timm's",
    "hf": "bicubic, transformers'",
}
COMPUTE_DTYPES = ("float64", "float32")


def describe(method: str, compute_dtype: str = "float64") -> str:
    """'bicubic antialiased, timm's' (', in float32' where not float64)."""
    return RESAMPLE_METHODS[method] + ("" if compute_dtype == "float64" else f", in {compute_dtype}")


def check_method(method: str, compute_dtype: str = "float64") -> None:
    if method not in RESAMPLE_METHODS:
        raise ValueError(f"resample method {method!r}: expected one of {', '.join(RESAMPLE_METHODS)}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"resample compute dtype {compute_dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}"
        )
    if method == "big_vision" and compute_dtype != "float64":
        raise ValueError(
            f"resample compute dtype {compute_dtype!r}: big_vision's zoom computes in float64 (SciPy's), "
            "only timm's and transformers' bicubic have a float32 form"
        )


def resample_grid(
    grid: np.ndarray, new_grid: tuple[int, int], method: str = "big_vision", compute_dtype: str = "float64"
) -> np.ndarray:
    """[h, w, D] -> [new_h, new_w, D] in `compute_dtype`, resized as `method` does."""
    check_method(method, compute_dtype)
    if method == "big_vision":
        zoom = (new_grid[0] / grid.shape[0], new_grid[1] / grid.shape[1], 1)
        resized = scipy.ndimage.zoom(grid.astype(np.float64), zoom, order=1, grid_mode=False)
        if resized.shape[:2] != tuple(new_grid):
            raise AssertionError(f"zoom produced a {resized.shape[:2]} grid, not {new_grid}")
        return resized
    return resize_bicubic(grid, tuple(new_grid), antialias=method == "timm", dtype=np.dtype(compute_dtype))


def resample_posemb(
    posemb: np.ndarray,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix: int,
    method: str = "big_vision",
    compute_dtype: str = "float64",
) -> np.ndarray:
    """[num_prefix + old_h * old_w, D] -> [num_prefix + new_h * new_w, D] in posemb's dtype;
    identity at the same size (as every method is)."""
    check_method(method, compute_dtype)
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
    resized = resample_grid(grid, new_grid, method, compute_dtype)
    return np.concatenate([prefix, resized.reshape(new_grid[0] * new_grid[1], -1).astype(posemb.dtype)])


def resample_model(
    cfg: ViTConfig,
    params: dict[str, np.ndarray],
    image_size: tuple[int, int],
    method: str = "big_vision",
    compute_dtype: str = "float64",
) -> tuple[ViTConfig, dict[str, np.ndarray]]:
    """The model at another image size: a learned position embedding is resampled to the new grid
    (ValueError where the size does not divide into patches)."""
    new_cfg = cfg.replace(image_size=image_size)
    params = dict(params)
    if cfg.posemb == "learned":
        prefix = cfg.num_prefix_tokens if cfg.posemb_on_cls else 0
        params["pos_embed"] = resample_posemb(
            params["pos_embed"], cfg.grid_size, new_cfg.grid_size, prefix, method, compute_dtype
        )
    return new_cfg, params
