"""Fixed (parameter-free) position embeddings: float64 tables [rows, width] added to the tokens.

Three definitions that a converted checkpoint tells apart: big_vision's `sincos2d` and Scenic's
`sinusoidal_2d` differ only in the frequency ladder's denominator (width/4 - 1 against width/4);
Scenic's `sinusoidal_1d` numbers the tokens in sequence and interleaves sin and cos. The tables are
the definitions in float64; big_vision and Scenic compute them in float32 (a rounding of these).
"""

from __future__ import annotations

import math

import numpy as np

from vitspec.config import ViTConfig


def posemb_sincos2d(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """big_vision's fixed 2-D embedding (MoCo v3): [sin x, cos x, sin y, cos y], float64.

    # -> [grid_h * grid_w, width]; x is the column index, y the row index, row-major order; each
    quarter holds frequencies omega_i = temperature ** -(i / (width/4 - 1)), i < width/4, so the
    last is exactly 1/temperature.
    """
    return _sincos_grid(grid_h, grid_w, width, width // 4 - 1, temperature)


def posemb_sinusoidal_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Scenic's `get_fixed_sincos_position_embedding` (its ViT's "sinusoidal_2d"), float64.

    # -> [grid_h * grid_w, width]; the layout of `posemb_sincos2d` ([sin x, cos x, sin y, cos y],
    x the column, row-major) with omega_i = temperature ** -(i / (width/4)): the denominator is
    width/4, not width/4 - 1, so the lowest frequency stops one step short of 1/temperature.
    Scenic adds it to the patches only (its ViT refuses a class token with it).
    """
    return _sincos_grid(grid_h, grid_w, width, width // 4, temperature)


def _sincos_grid(grid_h: int, grid_w: int, width: int, denominator: int, temperature: float) -> np.ndarray:
    # -> [grid_h * grid_w, width]
    y, x = np.mgrid[:grid_h, :grid_w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / denominator)
    x = np.einsum("m,d->md", x.reshape(-1), omega)
    y = np.einsum("m,d->md", y.reshape(-1), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)


def posemb_sinusoidal_1d(length: int, width: int, max_timescale: float = 10_000.0) -> np.ndarray:
    """Scenic's `sinusoidal_init` (its ViT's "sinusoidal_1d"; Vaswani et al. 2017), float64.

    # -> [length, width]; row p (the token's index in the sequence) holds sin(p w_i) in column 2i
    and cos(p w_i) in column 2i + 1 (interleaved, not in halves), w_i = exp(-2i ln(max_timescale) /
    width) for i < width/2. Scenic adds it to the whole sequence, the class token being row 0.
    """
    position = np.arange(length)[:, None]
    omega = np.exp(np.arange(0, width, 2) * -(math.log(max_timescale) / width))
    table = np.empty((length, width))
    table[:, 0::2] = np.sin(position * omega)
    table[:, 1::2] = np.cos(position * omega)
    return table


def fixed_posemb(cfg: ViTConfig) -> np.ndarray | None:
    """The config's fixed table, [cfg.posemb_length, width] (every token where `posemb_on_cls`, else
    the patches), or None for a learned posemb or none."""
    if cfg.posemb == "sincos2d":
        return posemb_sincos2d(*cfg.grid_size, cfg.width)
    if cfg.posemb == "sinusoidal_2d":
        return posemb_sinusoidal_2d(*cfg.grid_size, cfg.width)
    if cfg.posemb == "sinusoidal_1d":
        return posemb_sinusoidal_1d(cfg.posemb_length, cfg.width)
    return None
