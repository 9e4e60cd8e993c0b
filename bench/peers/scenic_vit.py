"""Scenic's baseline ViT (scenic/projects/baselines/vit.py: `ViT`, `Encoder`, `Encoder1DBlock`,
`AddPositionEmbs`, with scenic/model_lib/layers' `MlpBlock` and fixed position embeddings), module
for module, so that its parameter tree is Scenic's own: `embedding` (conv), `cls` (classifier
'token' only), `Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}`,
`Transformer/encoder_norm`, `pre_logits` (Dense then tanh), `output_projection`.

Inference path only (dropout and stochastic depth are the identity there). Kept as published, traps
included: the class token is prepended before the encoder adds its position embedding, so a
learned or 'sinusoidal_1d' embedding has a row for it; 'sinusoidal_2d' needs a square token count
(no class token); `nn.gelu` is flax's default, the tanh approximation; LayerNorms have flax's default
epsilon 1e-6. One departure: Scenic builds its fixed tables in float32; here they are computed in
the tokens' dtype, so a float64 model is compared with the float64 definition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


def sinusoidal_1d(length: int, width: int, dtype, max_timescale: float = 1.0e4):
    """Scenic's `sinusoidal_init`: sin in the even columns, cos in the odd ones. -> [1, length, width]"""
    position = jnp.arange(length, dtype=dtype)[:, None]
    div_term = jnp.exp(jnp.arange(0, width, 2, dtype=dtype) * -(math.log(max_timescale) / width))
    table = jnp.zeros((length, width), dtype)
    table = table.at[:, 0::2].set(jnp.sin(position * div_term))
    return table.at[:, 1::2].set(jnp.cos(position * div_term))[None]


def sinusoidal_2d(h: int, w: int, width: int, dtype, temperature: float = 10_000.0):
    """Scenic's `get_fixed_sincos_position_embedding` for 2-D inputs. -> [1, h * w, width]"""
    omega = 1.0 / temperature ** (jnp.arange(width // 4, dtype=dtype) / (width / 4))
    y, x = jnp.mgrid[:h, :w]
    y = jnp.einsum("m,d->md", y.flatten().astype(dtype), omega)
    x = jnp.einsum("m,d->md", x.flatten().astype(dtype), omega)
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)[None]


class AddPositionEmbs(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, *x.shape[1:]), x.dtype)


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.mlp_dim)(x))
        return nn.Dense(x.shape[-1])(y)


class Encoder1DBlock(nn.Module):
    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, inputs):
        x = nn.LayerNorm()(inputs)
        x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(x, x) + inputs
        y = MlpBlock(self.mlp_dim)(nn.LayerNorm()(x))
        return y + x


class Encoder(nn.Module):
    num_layers: int
    mlp_dim: int
    num_heads: int
    positional_embedding: str = "learned_1d"

    @nn.compact
    def __call__(self, x):
        n, tokens, width = x.shape
        if self.positional_embedding == "learned_1d":
            x = AddPositionEmbs(name="posembed_input")(x)
        elif self.positional_embedding == "sinusoidal_1d":
            x = x + sinusoidal_1d(tokens, width, x.dtype)
        elif self.positional_embedding == "sinusoidal_2d":
            side = math.isqrt(tokens)
            if side * side != tokens:
                raise ValueError("Input is assumed to be square for sinusoidal init.")
            x = x + sinusoidal_2d(side, side, width, x.dtype)
        elif self.positional_embedding != "none":
            raise ValueError(f"Unknown positional embedding: {self.positional_embedding}")
        for i in range(self.num_layers):
            x = Encoder1DBlock(self.mlp_dim, self.num_heads, name=f"encoderblock_{i}")(x)
        return nn.LayerNorm(name="encoder_norm")(x)


class ViT(nn.Module):
    """Scenic's `ViT(num_classes, mlp_dim, num_layers, num_heads, patches, hidden_size, ...)`; `patches`
    is the patch size (Scenic's `patches.size`). NHWC images -> logits."""

    num_classes: int
    mlp_dim: int
    num_layers: int
    num_heads: int
    patches: Sequence[int]
    hidden_size: int
    positional_embedding: str = "learned_1d"
    representation_size: int | None = None
    classifier: str = "gap"

    @nn.compact
    def __call__(self, x):
        fh, fw = self.patches
        x = nn.Conv(self.hidden_size, (fh, fw), strides=(fh, fw), padding="VALID", name="embedding")(x)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        if self.classifier == "token":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c), x.dtype)
            x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
        x = Encoder(
            self.num_layers, self.mlp_dim, self.num_heads, self.positional_embedding, name="Transformer"
        )(x)
        if self.classifier == "token":
            x = x[:, 0]
        else:
            x = {"gap": jnp.mean, "gmp": jnp.max, "gsp": jnp.sum}[self.classifier](x, axis=1)
        if self.representation_size is not None:
            x = nn.tanh(nn.Dense(self.representation_size, name="pre_logits")(x))
        return nn.Dense(self.num_classes, name="output_projection")(x)
