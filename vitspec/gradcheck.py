"""Finite-difference check of the analytic gradients: one directional derivative per tensor.

A 5-point central stencil along a unit direction: truncation O(h^4) ~ 1e-12 and rounding
~ 1.5 * 2.2e-16 * |loss| / h ~ 3e-13 at h = 1e-3. Where the loss is sharply curved (LayerNorm over
a 2-wide head with qk_norm is nearly a step function) h = 1e-3 is not small, so smaller steps
are tried; a wrong gradient matches at none of them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vitspec.config import ViTConfig
from vitspec.params import param_shapes

STEPS = (1e-3, 1e-4, 1e-5, 1e-6)  # at 1e-6 rounding is still ~3e-10 * |loss|
REL_BOUND = 1e-6
# Below this a directional derivative is compared absolutely, to REL_BOUND * ZERO_GRAD = 1e-11, about
# 30x the stencil's rounding noise for a loss near 1. Only mathematically zero gradients get there
# with the directions used: the key bias and the k_norm bias shift a whole softmax row by a constant.
ZERO_GRAD = 1e-5


def directional_fd(f: Callable[[float], float], step: float) -> float:
    return (-f(2 * step) + 8 * f(step) - 8 * f(-step) + f(-2 * step)) / (12 * step)


def fd_errors(
    loss_of, params: dict, images: np.ndarray, grads: dict, rng: np.random.Generator
) -> dict[str, float]:
    """|fd - analytic| / max(|fd|, |analytic|, ZERO_GRAD) per tensor (and "images").

    Each direction is random in size but takes the sign of the analytic gradient entry-wise, so
    the directional derivative cannot cancel down to the stencil's noise; the stencil still
    measures the true derivative along it, which a wrong gradient does not match.
    `loss_of(params, images) -> float`.
    """
    errors = {}
    for name in [*params, "images"]:
        base = images if name == "images" else params[name]
        magnitude = rng.standard_normal(base.shape)
        direction = np.where(grads[name] != 0, np.sign(grads[name]) * np.abs(magnitude), magnitude)
        direction /= np.linalg.norm(direction)

        def along(s, name=name, base=base, direction=direction):
            if name == "images":
                return loss_of(params, base + s * direction)
            return loss_of({**params, name: base + s * direction}, images)

        analytic = float(np.sum(grads[name] * direction))
        for step in STEPS:
            numeric = directional_fd(along, step)
            errors[name] = abs(numeric - analytic) / max(abs(numeric), abs(analytic), ZERO_GRAD)
            if errors[name] <= REL_BOUND:
                break
    return errors


def random_small_config(rng: np.random.Generator) -> ViTConfig:
    """A small model (8x12 images in 4x4 patches, width 16, 4 heads, depth 2) with its knobs drawn:
    one draw in three is a CaiT (`vitspec gradcheck` checks both kinds), one in four of the rest a
    DeiT (distillation token and head). Max pools need no care about ties: with random parameters
    two tokens tie with probability zero."""
    fields = dict(image_size=(8, 12), patch_size=(4, 4), width=16, depth=2, mlp_dim=32)
    heads, attention_dim = [(4, None), (2, 8), (2, 24)][rng.integers(3)]  # heads >= 4 wide (qk_norm)
    common = dict(
        num_classes=5,
        num_heads=heads,
        attention_dim=attention_dim,
        qkv_bias=bool(rng.integers(2)),
        layer_scale=[None, 0.1][rng.integers(2)],
        gelu=str(rng.choice(["exact", "tanh", "quick"])),
        pre_norm=bool(rng.integers(2)),
        patch_bias=bool(rng.integers(2)),
        proj_bias=bool(rng.integers(2)),
    )
    if rng.integers(3) == 0:
        return ViTConfig(
            **fields,
            **common,
            talking_heads=bool(rng.integers(2)),
            class_attention_depth=int(rng.integers(1, 3)),
            class_attention_mlp_dim=int(rng.choice([8, 32])),
            posemb=str(rng.choice(["learned", "sincos2d", "sinusoidal_1d", "sinusoidal_2d", "none"])),
            posemb_on_cls=False,
            final_norm=bool(rng.integers(2)),
        )
    distilled = rng.integers(4) == 0
    pool = "token" if distilled else str(rng.choice(["token", "gap", "max", "avgmax", "sum", "map"]))
    class_token = pool == "token" or bool(rng.integers(2))
    registers = int(rng.integers(0, 3))
    posemb = str(rng.choice(["learned", "sincos2d", "sinusoidal_1d", "sinusoidal_2d", "none"]))
    prefix = class_token or distilled or registers
    grid_only = posemb in ("sincos2d", "sinusoidal_2d") and prefix
    fc_norm = not distilled and bool(rng.integers(2))
    return ViTConfig(
        **fields,
        **common,
        pool=pool,
        class_token=class_token,
        num_registers=registers,
        posemb=posemb,
        posemb_on_cls=False if grid_only else bool(rng.integers(2)),
        fc_norm=fc_norm,
        final_norm=fc_norm or bool(rng.integers(2)),
        qk_norm=bool(rng.integers(2)),
        representation_size=None if distilled else [None, 6][rng.integers(2)],
        pool_include_prefix=pool not in ("token", "none") and bool(rng.integers(2)),
        distilled=bool(distilled),
    )


def random_params(cfg: ViTConfig, seed: int, dtype: type = np.float64) -> dict[str, np.ndarray]:
    """Every parameter drawn away from its init (nonzero head, LN scales off 1, random biases).

    The default init zeroes the head and the class token, which makes most gradients exactly
    zero and would let a wrong backward pass a gradient test.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif leaf == "scale" and "/ls" not in name:
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            value = 0.3 * rng.standard_normal(shape)
        params[name] = value.astype(dtype)
    return params


def random_images(cfg: ViTConfig, batch: int, seed: int, dtype: type = np.float64) -> np.ndarray:
    h, w = cfg.image_size
    return np.random.default_rng(seed).standard_normal((batch, h, w, cfg.in_channels)).astype(dtype)
