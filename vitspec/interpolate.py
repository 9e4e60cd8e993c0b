"""Bicubic resizing as PyTorch computes it on the CPU, in NumPy: `F.interpolate(x, size=..., mode="bicubic",
align_corners=False)` with and without `antialias=True`, written from the kernels' definitions.

Both are separable: an output is a weighted sum of inputs along the width, then along the height
(what `W_h @ grid @ W_w^T` computes, summed tap by tap in PyTorch's order). They differ in their
weights per axis:

- plain (`upsample_bicubic2d`): Keys' cubic convolution with a = -0.75 (OpenCV's), always 4 taps
  around the source position `scale * (i + 0.5) - 0.5` (scale = in / out), taps past an edge read
  the edge input (clamped indices). Downsampling skips inputs, as OpenCV's does.
- antialiased (`_upsample_bicubic2d_aa`): Keys' kernel with a = -0.5 (Pillow's), stretched by the
  scale when downsampling (support 2 * scale, so every input contributes), centred on
  `scale * (i + 0.5)` in pixel-area coordinates; taps past an edge are dropped and the remaining
  weights renormalized to sum to 1.

In float64 every step is float64, as PyTorch's on a float64 tensor, except one: PyTorch floors the
plain kernel's source position through `floorf`, i.e. in float32; that is kept. Against torch 2.13
in float64: <= 9e-15 of the largest value (tests/test_resample.py). `dtype=np.float32` rounds each
step to float32 where the C++ source does (its weights, their sums, the intermediate after the
width pass): <= 4.8e-6 of the largest value, not the bit, because the Keys polynomials cancel
terms of ~5 into weights of ~0.1 (several ulps of error in each float32 weight) and torch's
compiled kernel fuses some multiply-adds that this code rounds one by one.

One known divergence, on purpose: torch 2.13's antialiased CPU kernel gives every output row
the first row's weights when it resizes the height of a grid one column wide (an [h, 1] input
or the intermediate of a resize to width 1). Here such a column is resized as any other, as
torch does the same column inside a wider grid.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

PLAIN_A = -0.75  # upsample_bicubic2d's Keys parameter (OpenCV's)
ANTIALIAS_A = -0.5  # _upsample_bicubic2d_aa's (Keys' own, Pillow's)
FLOAT_DTYPES = (np.float32, np.float64)


class Taps(NamedTuple):
    """One axis of a separable resize: out[i] = sum over k of weights[i, k] * in[indices[i, k]],
    summed in k order. Weights past an output's last tap are 0 (their index is a valid one)."""

    indices: np.ndarray  # [out, K] int64
    weights: np.ndarray  # [out, K] in the compute dtype


def _float_type(dtype) -> type:
    dtype = np.dtype(dtype)
    if dtype.type not in FLOAT_DTYPES:
        raise ValueError(f"bicubic resizing computes in float32 or float64, not {dtype}")
    return dtype.type


def _cubic_near(x: np.ndarray, a) -> np.ndarray:
    """Keys' kernel for |x| <= 1: (a + 2)|x|^3 - (a + 3)|x|^2 + 1, in PyTorch's operation order."""
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x: np.ndarray, a) -> np.ndarray:
    """Keys' kernel for 1 <= |x| <= 2: a|x|^3 - 5a|x|^2 + 8a|x| - 4a, in PyTorch's operation order."""
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def keys_cubic(x: np.ndarray, a: float, dtype=np.float64) -> np.ndarray:
    """Keys' cubic convolution kernel W(x) with parameter `a`; 0 for |x| >= 2."""
    ft = _float_type(dtype)
    x, a = np.abs(np.asarray(x, ft)), ft(a)
    return np.where(x < 1, _cubic_near(x, a), np.where(x < 2, _cubic_far(x, a), ft(0))).astype(ft)


def _scale(in_size: int, out_size: int, ft: type):
    # area_pixel_compute_scale with align_corners=False and no scale_factor: in / out in the compute type.
    return ft(in_size) / ft(out_size)


def bicubic_taps(in_size: int, out_size: int, dtype=np.float64) -> Taps:
    """upsample_bicubic2d's weights along one axis (align_corners=False, a = -0.75, edge-clamped)."""
    ft = _float_type(dtype)
    i = np.arange(out_size)
    source = _scale(in_size, out_size, ft) * (i.astype(ft) + ft(0.5)) - ft(0.5)
    # floorf: PyTorch floors through float32 whatever the dtype.
    first = np.minimum(np.floor(source.astype(np.float32)).astype(np.int64), in_size - 1)
    t = np.clip(source - first.astype(ft), ft(0), ft(1))
    a = ft(PLAIN_A)
    weights = np.stack(
        [
            _cubic_far(t + ft(1), a),
            _cubic_near(t, a),
            _cubic_near(ft(1) - t, a),
            _cubic_far((ft(1) - t) + ft(1), a),
        ],
        axis=1,
    )
    indices = np.clip(first[:, None] + np.arange(-1, 3), 0, in_size - 1)
    return Taps(indices, weights.astype(ft))


def bicubic_antialias_taps(in_size: int, out_size: int, dtype=np.float64) -> Taps:
    """_upsample_bicubic2d_aa's weights along one axis (align_corners=False, a = -0.5, the kernel
    stretched by in / out when downsampling, taps past the edges dropped and the rest renormalized)."""
    ft = _float_type(dtype)
    scale = _scale(in_size, out_size, ft)
    downsampling = scale >= 1
    support = ft(2 * np.float64(scale)) if downsampling else ft(2)
    max_taps = int(np.ceil(support)) * 2 + 1
    # Where the C++ mixes its float type with double literals the expression is double, then rounded.
    invscale = ft(1 / np.float64(scale)) if downsampling else ft(1)
    center = (np.float64(scale) * (np.arange(out_size) + 0.5)).astype(ft)
    first = np.maximum(np.trunc((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    stop = np.minimum(np.trunc((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size)
    count = np.clip(stop - first, 0, max_taps)
    k = np.arange(max_taps)
    offset = ((k[None, :] + first[:, None]).astype(ft) - center[:, None]).astype(np.float64) + 0.5
    weights = keys_cubic((offset * np.float64(invscale)).astype(ft), ANTIALIAS_A, ft)
    weights = np.where(k[None, :] < count[:, None], weights, ft(0))
    total = np.zeros(out_size, ft)
    for column in weights.T:  # summed in tap order, as the C++ loop
        total = total + column
    weights = np.where(total[:, None] != 0, weights / np.where(total == 0, ft(1), total)[:, None], weights)
    indices = np.minimum(first[:, None] + k[None, :], in_size - 1)
    return Taps(indices, weights.astype(ft))


def apply_taps(x: np.ndarray, taps: Taps, axis: int) -> np.ndarray:
    """Resize `x` along `axis` with `taps` (x in the taps' dtype); the sum runs tap by tap."""
    moved = np.moveaxis(x, axis, 0)
    expand = (slice(None),) + (None,) * (moved.ndim - 1)
    out = moved[taps.indices[:, 0]] * taps.weights[:, 0][expand]
    for k in range(1, taps.indices.shape[1]):
        out = out + moved[taps.indices[:, k]] * taps.weights[:, k][expand]
    return np.moveaxis(out, 0, axis)


def resize_bicubic(
    grid: np.ndarray, size: tuple[int, int], *, antialias: bool, dtype=np.float64
) -> np.ndarray:
    """[h, w, ...] -> [size[0], size[1], ...] as F.interpolate(mode="bicubic", align_corners=False,
    antialias=antialias) on the NCHW permutation, computed in `dtype` (the result's dtype)."""
    ft = _float_type(dtype)
    if grid.ndim < 2 or min(grid.shape[:2]) < 1 or min(size) < 1:
        raise ValueError(
            f"cannot resize a grid of shape {grid.shape} to {size}: need [h, w, ...] and sizes >= 1"
        )
    taps_for = bicubic_antialias_taps if antialias else bicubic_taps
    out = np.asarray(grid, ft)
    # Width first, then height, as PyTorch (its intermediate is rounded to the dtype). An axis whose
    # size does not change is the identity under both kernels, and PyTorch's antialiased one skips it.
    for axis in (1, 0):
        if out.shape[axis] != size[axis]:
            out = apply_taps(out, taps_for(out.shape[axis], size[axis], ft), axis)
    return out.astype(ft, copy=False)
