"""A ViT from stock flax.linen layers, as big_vision and scenic write it: nn.Conv patchify,
nn.MultiHeadDotProductAttention, nn.LayerNorm, nn.Dense, nn.gelu. The GELU is the config's (flax's
default would be tanh), so that every implementation in a row computes the same function."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vitspec.config import ViTConfig


class MlpBlock(nn.Module):
    mlp_dim: int
    tanh_gelu: bool

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        return nn.Dense(width)(nn.gelu(nn.Dense(self.mlp_dim)(x), approximate=self.tanh_gelu))


class EncoderBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    ln_eps: float
    tanh_gelu: bool

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(epsilon=self.ln_eps)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y)
        y = nn.LayerNorm(epsilon=self.ln_eps)(x)
        return x + MlpBlock(self.mlp_dim, self.tanh_gelu)(y)


class StockViT(nn.Module):
    """NHWC images -> logits; class token, learned position embedding, class-token head."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        patch = (cfg.patch_size, cfg.patch_size) if isinstance(cfg.patch_size, int) else tuple(cfg.patch_size)
        x = nn.Conv(cfg.width, patch, strides=patch, padding="VALID", name="embedding")(images)
        n, h, w, d = x.shape
        x = x.reshape(n, h * w, d)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, d))
        for i in range(cfg.depth):
            x = EncoderBlock(
                cfg.num_heads, cfg.mlp_dim, cfg.ln_eps, cfg.gelu == "tanh", name=f"encoderblock_{i}"
            )(x)
        x = nn.LayerNorm(epsilon=cfg.ln_eps, name="encoder_norm")(x)
        return nn.Dense(cfg.num_classes, name="head")(x[:, 0])
