"""A ViT from stock flax.linen layers, as big_vision and scenic write it: nn.Conv patchify,
nn.MultiHeadDotProductAttention, nn.LayerNorm, nn.Dense, nn.gelu. The GELU is the config's (flax's
default would be tanh), so that every implementation in a row computes the same function. `dtype`
(None: the inputs') is the computation's, as flax's layers take it: bfloat16 on a GPU, with float32
parameters, as our backend runs there."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vitspec.config import ViTConfig


class MlpBlock(nn.Module):
    mlp_dim: int
    tanh_gelu: bool
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        hidden = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype)(x), approximate=self.tanh_gelu)
        return nn.Dense(width, dtype=self.dtype)(hidden)


class EncoderBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    ln_eps: float
    tanh_gelu: bool
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(y, y)
        y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype)(x)
        return x + MlpBlock(self.mlp_dim, self.tanh_gelu, self.dtype)(y)


class StockViT(nn.Module):
    """NHWC images -> logits; class token, learned position embedding, class-token head."""

    config: ViTConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        patch = (cfg.patch_size, cfg.patch_size) if isinstance(cfg.patch_size, int) else tuple(cfg.patch_size)
        embed = nn.Conv(cfg.width, patch, strides=patch, padding="VALID", dtype=self.dtype, name="embedding")
        x = embed(images)
        n, h, w, d = x.shape
        x = x.reshape(n, h * w, d)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)).astype(x.dtype), x], axis=1)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, d)).astype(x.dtype)
        for i in range(cfg.depth):
            x = EncoderBlock(
                cfg.num_heads,
                cfg.mlp_dim,
                cfg.ln_eps,
                cfg.gelu == "tanh",
                self.dtype,
                name=f"encoderblock_{i}",
            )(x)
        x = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=self.dtype, name="encoder_norm")(x)
        return nn.Dense(cfg.num_classes, dtype=self.dtype, name="head")(x[:, 0])
