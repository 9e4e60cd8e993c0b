"""conceptofmind/vit-flax's `ViT` (vit_flax/vit.py), module for module, so that its parameter tree is
the library's own: patches flattened as einops' 'b (h p1) (w p2) c -> b (h w) (p1 p2 c)' into a Dense,
a class token, a learned position embedding over [class, patches], `Transformer` of
Residual(PreNorm(Attention)) / Residual(PreNorm(FeedForward)) pairs, no norm after the blocks, pool
'cls' or 'mean' (over every token, the class token included), then LayerNorm and Dense.

Inference path only (vit-flax's dropout is always on, `deterministic=False`; at rate 0 it is the
identity, and this module leaves it out). Kept as published, traps included: `dim_head` is a plain
class attribute of `ViT` (64, no constructor field); q/k/v are one bias-free Dense split in three;
the output projection is skipped when heads == 1 and dim_head == dim; `nn.gelu` is flax's default,
the tanh approximation; `nn.LayerNorm` has flax's default epsilon 1e-6. The modules that wrap
others are built inside `Transformer`'s compact call, so linen names every one of them there, in
the order built: Attention_i, PreNorm_{2i}, Residual_{2i}, FeedForward_i, PreNorm_{2i+1}, ...
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp


class IdentityLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x


class PreNorm(nn.Module):
    fn: Callable

    @nn.compact
    def __call__(self, x):
        return self.fn(nn.LayerNorm()(x))


class Residual(nn.Module):
    fn: Callable

    @nn.compact
    def __call__(self, x):
        return self.fn(x) + x


class FeedForward(nn.Module):
    dim: int
    hidden_dim: int

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(self.hidden_dim)(x))  # built first: Dense_0, as published
        return nn.Dense(self.dim)(x)


def _split_heads(x, heads: int):  # [b, n, heads * d] -> [b, heads, n, d]
    b, n, inner = x.shape
    return x.reshape(b, n, heads, inner // heads).transpose(0, 2, 1, 3)


class Attention(nn.Module):
    dim: int
    heads: int = 8
    dim_head: int = 64

    @nn.compact
    def __call__(self, x):
        inner = self.dim_head * self.heads
        project_out = not (self.heads == 1 and self.dim_head == self.dim)
        qkv = jnp.split(nn.Dense(inner * 3, use_bias=False)(x), 3, axis=-1)
        q, k, v = (_split_heads(t, self.heads) for t in qkv)
        weights = nn.softmax(jnp.einsum("bhid,bhjd->bhij", q, k) * self.dim_head**-0.5, axis=-1)
        out = jnp.einsum("bhij,bhjd->bhid", weights, v)
        b, _, n, _ = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(b, n, inner)
        return nn.Dense(self.dim)(out) if project_out else IdentityLayer()(out)


class Transformer(nn.Module):
    dim: int
    depth: int
    heads: int
    dim_head: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        layers = [
            (
                Residual(PreNorm(Attention(self.dim, self.heads, self.dim_head))),
                Residual(PreNorm(FeedForward(self.dim, self.mlp_dim))),
            )
            for _ in range(self.depth)
        ]
        for attn, ff in layers:
            x = ff(attn(x))
        return x


class ViT(nn.Module):
    """NHWC images -> logits."""

    image_size: int | tuple[int, int]
    patch_size: int | tuple[int, int]
    num_classes: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    pool: str = "cls"
    dim_head = 64  # a class attribute, as published: ViT(...) cannot change it

    @nn.compact
    def __call__(self, x):
        ih, iw = _pair(self.image_size)
        ph, pw = _pair(self.patch_size)
        assert ih % ph == 0 and iw % pw == 0 and self.pool in ("cls", "mean")
        num_patches = (ih // ph) * (iw // pw)
        pos_embedding = self.param("pos_embedding", nn.initializers.zeros, (1, num_patches + 1, self.dim))
        cls_token = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
        b, h, w, c = x.shape
        x = x.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
        x = nn.Dense(self.dim)(x.reshape(b, (h // ph) * (w // pw), ph * pw * c))
        n = x.shape[1]
        x = jnp.concatenate([jnp.tile(cls_token, (b, 1, 1)), x], axis=1)
        x = x + pos_embedding[:, : n + 1]
        x = Transformer(self.dim, self.depth, self.heads, self.dim_head, self.mlp_dim)(x)
        x = jnp.mean(x, axis=1) if self.pool == "mean" else x[:, 0]
        x = nn.LayerNorm()(IdentityLayer()(x))
        return nn.Dense(self.num_classes)(x)


def _pair(t):
    return t if isinstance(t, tuple) else (t, t)
