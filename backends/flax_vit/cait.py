"""CaiT (Touvron et al. 2021, arXiv:2103.17239) as a flax.linen module in big_vision's naming style.

big_vision has no CaiT; the tree extends its ViT's names (backends/flax_vit/model.py) and the
reference's CaiT parameters map onto it one to one (vitspec.formats.big_vision):

    embedding/{kernel [ph, pw, C, D], bias [D]}             patch embedding
    cls [1, 1, D]                                           class token (enters at the class blocks)
    pos_embedding [1, patches, D]                           learned posemb, on the patches only
    pre_norm/{scale, bias}                                  with pre_norm: over the patches
    Transformer/encoderblock_{i}/                           self-attention over the patches: the ViT's
        LayerNorm_0, MultiHeadDotProductAttention_0/        block, talking heads when configured:
            {query, key, value, out, talk_logits, talk_weights}
        LayerScale_0, LayerNorm_1, MlpBlock_0, LayerScale_1
    Transformer/classblock_{j}/                             class attention: the class token queries
        LayerNorm_0, MultiHeadDotProductAttention_0/        [class, patches]; only it is updated
            {query, key, value, out}
        LayerScale_0, LayerNorm_1,
        MlpBlock_0/{Dense_0 [D, class_attention_mlp_dim], Dense_1}, LayerScale_1
    Transformer/encoder_norm/{scale, bias}                  on [class, patches] (not without
                                                            final_norm)
    head/{kernel, bias}

Training mode: token dropout on the patches and dropout, attention dropout and stochastic depth in
the self-attention blocks, drawn as the ViT's; the class blocks have none (as timm's released
models were trained).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from backends.flax_vit.embedding import add_posemb, embedded_tokens
from backends.flax_vit.layers import (
    Dtype,
    LayerScale,
    MlpBlock,
    MultiHeadDotProductAttention,
    layer_norm,
    shape_only,
)
from backends.flax_vit.model import Encoder1DBlock, VisionTransformer
from vitspec.config import ViTConfig
from vitspec.reference import select_outputs


class ClassAttentionBlock(nn.Module):
    """cls + ls1 * Attn(queries LN(cls), keys/values LN([cls, x])), then cls + ls2 * MLP(LN(cls))."""

    config: ViTConfig
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cls, x, *, return_probs: bool = False):
        """[n, 1, d], [n, patches, d] -> ([n, 1, d], probabilities [n, heads, 1, 1 + patches] or None)."""
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        y = layer_norm(cfg.ln_eps, **kw)(jnp.concatenate([cls, x], axis=1))
        attention = MultiHeadDotProductAttention(
            cfg.num_heads,
            cfg.qkv_bias,
            ln_eps=cfg.ln_eps,
            attention_dim=cfg.attention_dim,
            out_bias=cfg.proj_bias,
            **kw,
        )
        y, probs = attention(y[:, :1], y, return_probs=return_probs)
        cls = cls + self._scaled(y)
        mlp = MlpBlock(cfg.class_attention_mlp_dim, cfg.gelu, use_bias=cfg.proj_bias, **kw)
        y = mlp(layer_norm(cfg.ln_eps, **kw)(cls))
        return cls + self._scaled(y), probs

    def _scaled(self, y):
        if self.config.layer_scale is None:
            return y
        return LayerScale(self.config.layer_scale, self.dtype, self.param_dtype)(y)


class ClassAttentionEncoder(nn.Module):
    """CaiT's `Transformer`: the self-attention blocks over the patches, then the class-attention
    blocks, then the final norm over [class, patches]."""

    config: ViTConfig
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cls, *, deterministic: bool = True, return_probs: bool = False):
        """[n, patches, d], [n, 1, d] -> (encoded [n, 1 + patches, d], the reference's named values of
        the blocks: block_{i}, attn_{i}, class_block_{j}, class_attn_{j})."""
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        named = {}
        for i, rate in enumerate(cfg.drop_path_rates):
            block = Encoder1DBlock(cfg, rate, name=f"encoderblock_{i}", **kw)
            x, named[f"attn_{i}"] = block(x, deterministic=deterministic, return_probs=return_probs)
            named[f"block_{i}"] = x
        for j in range(cfg.class_attention_depth):
            block = ClassAttentionBlock(cfg, name=f"classblock_{j}", **kw)
            cls, named[f"class_attn_{j}"] = block(cls, x, return_probs=return_probs)
            named[f"class_block_{j}"] = cls
        x = jnp.concatenate([cls, x], axis=1)
        if cfg.final_norm:
            x = layer_norm(cfg.ln_eps, name="encoder_norm", **kw)(x)
        return x, named


class CaiT(VisionTransformer):
    """`module.apply(variables, images)` -> logits for a config with class_attention_depth > 0.

    The ViT module's dtypes, `init` (the reference's values) and `train`; `intermediates` and
    `attention_maps` give the reference's CaiT keys: patch_embed, tokens, block_{i}, class_block_{j},
    encoded, pooled, pre_logits, logits, attn_{i} [n, heads, patches, patches] (after the weights'
    talking-heads mix) and class_attn_{j} [n, heads, 1, 1 + patches].
    """

    @nn.compact
    def __call__(
        self, images, *, train: bool = False, intermediates: bool = False, attention_maps: bool = False
    ):
        cfg = self.config
        if not cfg.class_attention_depth:
            raise ValueError(
                "class_attention_depth=0 is a ViT: apply it with backends.flax_vit.VisionTransformer"
            )
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        out = {}
        x = embedded_tokens(self, images, add_posemb, train, out)
        n, _, d = x.shape
        cls = self.param("cls", shape_only, (1, 1, d), self.param_dtype)
        cls = jnp.broadcast_to(jnp.asarray(cls, x.dtype), (n, 1, d))
        x, named = ClassAttentionEncoder(cfg, name="Transformer", **kw)(
            x, cls, deterministic=not train, return_probs=attention_maps
        )
        out |= named
        out["encoded"] = x
        x = out["pooled"] = out["pre_logits"] = x[:, 0]
        if cfg.num_classes:
            x = nn.Dense(cfg.num_classes, name="head", kernel_init=shape_only, **kw)(x)
        out["logits"] = x
        return select_outputs(out, intermediates, attention_maps)


def module_for(config: ViTConfig, **module_kwargs) -> VisionTransformer:
    """The module that applies `config`: CaiT for class_attention_depth > 0, else the ViT.
    `module_kwargs`: dtype, param_dtype."""
    module = CaiT if config.class_attention_depth else VisionTransformer
    return module(config=config, **module_kwargs)
