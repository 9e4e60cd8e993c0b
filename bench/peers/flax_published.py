"""The ViTs of the two published flax codebases, module for module, so that their parameter trees
are those codebases' own: big_vision/models/vit.py (`_Model`, what `vit.Model(...)` builds, with
its `scan=True` encoder) and vision_transformer's vit_jax/models_vit.py (`VisionTransformer`,
without the ResNet stem).

Inference path only (no dropout, which is the identity at inference). Kept as published, traps
included: `nn.gelu` is flax's default, the tanh approximation; `nn.LayerNorm` has flax's default
epsilon 1e-6; vit_jax computes its encoder blocks in float32 whatever the parameters' dtype.
tests/test_flax_export.py applies `vitspec convert --to flax / --to vit_jax` files in them;
tests/test_big_vision_families.py a SigLIP-style image tower, plain and scanned.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0, dtype=jnp.float32):
    """big_vision's fixed embedding (MoCo v3): [sin x, cos x, sin y, cos y] over the patch grid."""
    y, x = jnp.mgrid[:h, :w]
    omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4 - 1))
    y = jnp.einsum("m,d->md", y.flatten(), omega)
    x = jnp.einsum("m,d->md", x.flatten(), omega)
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1).astype(dtype)[None]


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: object = None  # vit_jax passes float32; big_vision leaves flax's promotion

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype)(x))
        return nn.Dense(x.shape[-1], dtype=self.dtype)(y)


class Encoder1DBlock(nn.Module):
    mlp_dim: int
    num_heads: int
    dtype: object = None

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(dtype=self.dtype)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(y, y)
        y = nn.LayerNorm(dtype=self.dtype)(x)
        return x + MlpBlock(self.mlp_dim, self.dtype)(y)


class ScannedBlock(Encoder1DBlock):
    """The block as big_vision's `nn.scan` steps it: (carry, per-step output)."""

    @nn.compact
    def __call__(self, x, _):
        return super().__call__(x), None


class AddPositionEmbs(nn.Module):
    """vit_jax's learned embedding over every token, class token included."""

    @nn.compact
    def __call__(self, x):
        return x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, *x.shape[1:]))


class Encoder(nn.Module):
    depth: int
    mlp_dim: int
    num_heads: int
    block_dtype: object = None
    position_embedding: bool = False  # vit_jax's `add_position_embedding`; big_vision adds it outside
    scan: bool = False  # big_vision's: one block scanned over depth, its parameters stacked on axis 0

    @nn.compact
    def __call__(self, x):
        if self.position_embedding:
            x = AddPositionEmbs(name="posembed_input")(x)
        if self.scan:
            # As big_vision: remat'ed, scanned with params on axis 0 and a fresh rng per step.
            block = nn.remat(ScannedBlock, prevent_cse=False)
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.depth,
            )
            x, _ = scanned(self.mlp_dim, self.num_heads, self.block_dtype, name="encoderblock")(x, None)
        else:
            for i in range(self.depth):
                block = Encoder1DBlock(
                    self.mlp_dim, self.num_heads, self.block_dtype, name=f"encoderblock_{i}"
                )
                x = block(x)
        return nn.LayerNorm(name="encoder_norm")(x)


class MAPHead(nn.Module):
    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x):
        n, _, d = x.shape
        probe = jnp.tile(self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), x.dtype), (n, 1, 1))
        x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(probe, x)
        return (x + MlpBlock(self.mlp_dim)(nn.LayerNorm()(x)))[:, 0]


class BigVisionViT(nn.Module):
    """big_vision's `vit.Model(num_classes, patch_size=..., width=..., ...)`, NHWC images -> logits."""

    num_classes: int | None = None
    patch_size: Sequence[int] = (16, 16)
    width: int = 768
    depth: int = 12
    mlp_dim: int | None = None
    num_heads: int = 12
    posemb: str = "learn"  # or "sincos2d"
    rep_size: int | bool = False
    pool_type: str = "gap"  # or "map", "tok"
    scan: bool = False

    @nn.compact
    def __call__(self, images):
        patch = tuple(self.patch_size)
        x = nn.Conv(self.width, patch, strides=patch, padding="VALID", name="embedding")(images)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        if self.posemb == "learn":
            init = nn.initializers.normal(1 / np.sqrt(c))
            x = x + self.param("pos_embedding", init, (1, h * w, c), x.dtype)
        else:
            x = x + posemb_sincos_2d(h, w, c, dtype=x.dtype)
        if self.pool_type == "tok":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c), x.dtype)
            x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
        mlp_dim = self.mlp_dim or 4 * c
        x = Encoder(self.depth, mlp_dim, self.num_heads, scan=self.scan, name="Transformer")(x)
        if self.pool_type == "map":
            x = MAPHead(mlp_dim, self.num_heads)(x)
        elif self.pool_type == "gap":
            x = x.mean(axis=1)
        else:
            x = x[:, 0]
        if self.rep_size:
            rep_size = self.width if self.rep_size is True else self.rep_size
            x = nn.tanh(nn.Dense(rep_size, name="pre_logits")(x))
        if self.num_classes:
            x = nn.Dense(self.num_classes, name="head")(x)
        return x


class VitJaxViT(nn.Module):
    """vit_jax's `VisionTransformer` (`classifier` 'token' or 'gap'), NHWC images -> logits."""

    num_classes: int
    patch_size: Sequence[int]
    hidden_size: int
    num_layers: int
    mlp_dim: int
    num_heads: int
    representation_size: int | None = None
    classifier: str = "token"

    @nn.compact
    def __call__(self, images):
        patch = tuple(self.patch_size)
        x = nn.Conv(self.hidden_size, patch, strides=patch, padding="VALID", name="embedding")(images)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        if self.classifier == "token":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
            x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
        x = Encoder(
            self.num_layers,
            self.mlp_dim,
            self.num_heads,
            block_dtype=jnp.float32,
            position_embedding=True,
            name="Transformer",
        )(x)
        x = x[:, 0] if self.classifier == "token" else x.mean(axis=1)
        if self.representation_size is not None:
            x = nn.tanh(nn.Dense(self.representation_size, name="pre_logits")(x))
        if self.num_classes:
            x = nn.Dense(self.num_classes, name="head")(x)
        return x
