"""The vitspec Vision Transformer as a flax.linen module whose parameter tree is big_vision's ViT.

Module and parameter names follow google-research/big_vision `models/vit.py`, so its checkpoints
load by name. Knobs big_vision lacks get names in the same style:

    embedding/{kernel [ph, pw, C, D], bias [D]}             patch embedding (a strided conv)
    cls [1, 1, D]                                           class token
    reg [1, R, D]                                           register tokens (not in big_vision)
    pos_embedding [1, L, D]                                 learned posemb; L = patches, or
                                                            tokens when posemb_on_cls
    Transformer/encoderblock_{i}/
        LayerNorm_0, LayerNorm_1/{scale, bias}              pre-attention, pre-MLP norms
        MultiHeadDotProductAttention_0/
            {query, key, value}/{kernel [D, H, dh], bias [H, dh]}   (no bias if not qkv_bias)
            {query_ln, key_ln}/{scale, bias} [dh]           qk_norm; flax's own MHDPA names,
                                                            with a bias flax's version lacks
            {talk_logits, talk_weights}/{kernel [H, H],     talking heads (CaiT; not in big_vision):
                bias [H]}                                   mixes of the head axis, [heads in, out]
            out/{kernel [H, dh, D], bias [D]}
        LayerScale_0, LayerScale_1/scale [D]                layer scale (not in big_vision)
        MlpBlock_0/{Dense_0, Dense_1}/{kernel, bias}
    Transformer/encoder_norm/{scale, bias}                  final norm (absent with fc_norm)
    MAPHead_0/{probe [1, 1, D], MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}
    fc_norm/{scale, bias}                                   norm after pooling (not in big_vision)
    pre_logits/{kernel, bias}, head/{kernel, bias}

CaiT configs (class_attention_depth > 0) are applied by backends/flax_vit/cait.py's `CaiT`, a
subclass on the same stem and blocks; `module_for(cfg)` picks the module for a config.

Images are NHWC. Attention runs through `jax.nn.dot_product_attention` (which may dispatch to a
fused kernel), except where the explicit softmax(q k^T / sqrt(dh)) v is needed or pays: where the
probabilities themselves are needed (maps, attention dropout, talking heads); in float64, because
that function always takes its softmax in float32, which would cap a float64 model at float32
accuracy; and when training on the CPU, where the library function is plain XLA whose backward
measured slower (the training step 1.07x faster at cifar-notebook, 1.03x at S/16 with the explicit
form, while the forward pass is faster with the library function; bench/PERFORMANCE.md).

One module past 300 lines: the linen modules nest as big_vision's tree does (block, attention,
MLP, MAP head, model), and this docstring is that tree; split, the names would lose their map.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from backends.flax_vit.convert import from_reference
from backends.flax_vit.layer_norm import LayerNorm
from vitspec.config import ViTConfig
from vitspec.params import init_params, param_shapes
from vitspec.reference import posemb_sincos2d, select_outputs

Dtype = Any

# Parameters get their values from vitspec.init_params (VisionTransformer.init), as the PyTorch
# backend's do, so the two cannot drift from the reference's scheme; inside the modules an
# initializer only gives each parameter its shape and dtype.
shape_only = nn.initializers.zeros


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> LayerNorm:
    return LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


class LayerScale(nn.Module):
    init_value: float
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", shape_only, (x.shape[-1],), self.param_dtype)
        return x * jnp.asarray(scale, self.dtype or jnp.result_type(x, scale))


class MlpBlock(nn.Module):
    mlp_dim: int
    gelu: str
    dropout: float = 0.0
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        dense = {"dtype": self.dtype, "param_dtype": self.param_dtype, "kernel_init": shape_only}
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, **dense)(x)
        # Spelled out: flax's nn.gelu defaults to the tanh approximation.
        x = nn.gelu(x, approximate=self.gelu == "tanh")
        x = nn.Dropout(self.dropout)(x, deterministic)
        return nn.Dense(width, **dense)(x)


def attention_logits(query, key):
    """q k^T / sqrt(dh): [n, tq, heads, dh], [n, t, heads, dh] -> [n, heads, tq, t].

    In at least float32: the softmax is taken there (as jax.nn.dot_product_attention takes it).
    """
    logits_dtype = jnp.promote_types(query.dtype, jnp.float32)
    query = query * jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    return jnp.einsum("nqhd,nkhd->nhqk", query, key, preferred_element_type=logits_dtype)


def fused_attention_pays(training: bool) -> bool:
    """Whether jax.nn.dot_product_attention is the faster choice (decided when the module is traced)."""
    return not training or jax.default_backend() != "cpu"


class MultiHeadDotProductAttention(nn.Module):
    num_heads: int
    qkv_bias: bool = True
    qk_norm: bool = False
    ln_eps: float = 1e-6
    dropout: float = 0.0
    talking_heads: bool = False
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs_q, inputs_kv, *, deterministic: bool = True, return_probs: bool = False):
        """[n, tq, d], [n, t, d] -> ([n, tq, d], probabilities [n, heads, tq, t] or None)."""
        width = inputs_q.shape[-1]
        heads = (self.num_heads, width // self.num_heads)
        project = {"dtype": self.dtype, "param_dtype": self.param_dtype, "kernel_init": shape_only}
        q = nn.DenseGeneral(heads, use_bias=self.qkv_bias, name="query", **project)(inputs_q)
        k = nn.DenseGeneral(heads, use_bias=self.qkv_bias, name="key", **project)(inputs_kv)
        v = nn.DenseGeneral(heads, use_bias=self.qkv_bias, name="value", **project)(inputs_kv)
        if self.qk_norm:
            q = layer_norm(self.ln_eps, self.dtype, self.param_dtype, name="query_ln")(q)
            k = layer_norm(self.ln_eps, self.dtype, self.param_dtype, name="key_ln")(k)
        needs_probs = return_probs or (self.dropout > 0.0 and not deterministic) or self.talking_heads
        # One key: jax 0.10's dot_product_attention in bfloat16 on the CPU does not compile ("Algorithm
        # not supported by the ElementalIrEmitter: ALG_DOT_BF16_BF16_F32"), and its softmax is 1 anyway.
        one_key = k.shape[1] == 1
        if (
            needs_probs or q.dtype == jnp.float64 or one_key or not fused_attention_pays(not deterministic)
        ):  # see the docstring
            probs = self._probabilities(q, k)
            mixed = jnp.einsum("nhqk,nkhd->nqhd", nn.Dropout(self.dropout)(probs, deterministic), v)
        else:
            probs, mixed = None, jax.nn.dot_product_attention(q, k, v)
        y = nn.DenseGeneral(width, axis=(-2, -1), name="out", **project)(mixed)
        return y, (probs if return_probs else None)

    def _probabilities(self, q, k):  # -> [n, heads, tq, t] in k's dtype
        logits = attention_logits(q, k)
        if self.talking_heads:
            logits = self._talk("talk_logits", logits)
        probs = jax.nn.softmax(logits, axis=-1)
        if self.talking_heads:  # after the softmax: the rows need not sum to 1 any more
            probs = self._talk("talk_weights", probs)
        return probs.astype(k.dtype)

    def _talk(self, name: str, s):
        """Talking heads (Shazeer et al. 2020): s[n, h, q, k] -> sum_h s * kernel[h, g] + bias[g], in
        s's dtype (the logits': at least float32)."""
        mix = nn.Dense(
            self.num_heads, dtype=s.dtype, param_dtype=self.param_dtype, kernel_init=shape_only, name=name
        )
        return jnp.moveaxis(mix(jnp.moveaxis(s, 1, -1)), -1, 1)


class Encoder1DBlock(nn.Module):
    """Pre-norm block: x + ls1 * Attn(LN(x)), then x + ls2 * MLP(LN(x)); drop path per sample."""

    config: ViTConfig
    drop_path: float = 0.0
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True, return_probs: bool = False):
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        y = layer_norm(cfg.ln_eps, **kw)(x)
        y, probs = MultiHeadDotProductAttention(
            cfg.num_heads,
            cfg.qkv_bias,
            cfg.qk_norm,
            cfg.ln_eps,
            cfg.attention_dropout,
            cfg.talking_heads,
            **kw,
        )(y, y, deterministic=deterministic, return_probs=return_probs)
        x = x + self._residual_branch(y, deterministic)
        y = layer_norm(cfg.ln_eps, **kw)(x)
        y = MlpBlock(cfg.mlp_dim, cfg.gelu, cfg.dropout, **kw)(y, deterministic)
        x = x + self._residual_branch(y, deterministic)
        return x, probs

    def _residual_branch(self, y, deterministic: bool):
        y = nn.Dropout(self.config.dropout)(y, deterministic)
        if self.config.layer_scale is not None:
            y = LayerScale(self.config.layer_scale, self.dtype, self.param_dtype)(y)
        # Stochastic depth: one keep/drop draw per sample, broadcast over tokens and features.
        return nn.Dropout(self.drop_path, broadcast_dims=(1, 2))(y, deterministic)


class Encoder(nn.Module):
    config: ViTConfig
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True, return_probs: bool = False):
        """[n, t, d] -> (encoded, [output of each block], [attention probabilities of each block])."""
        cfg = self.config
        outputs, probs = [], []
        for i, rate in enumerate(cfg.drop_path_rates):
            block = Encoder1DBlock(cfg, rate, self.dtype, self.param_dtype, name=f"encoderblock_{i}")
            x, p = block(x, deterministic=deterministic, return_probs=return_probs)
            outputs.append(x)
            probs.append(p)
        if not cfg.fc_norm:
            x = layer_norm(cfg.ln_eps, self.dtype, self.param_dtype, name="encoder_norm")(x)
        return x, outputs, probs


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over all tokens, then a residual MLP."""

    config: ViTConfig
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, return_probs: bool = False):
        """[n, t, d] -> ([n, d], probabilities [n, heads, 1, t] or None)."""
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        n, _, d = x.shape
        probe = self.param("probe", shape_only, (1, 1, d), self.param_dtype)
        probe = jnp.broadcast_to(jnp.asarray(probe, x.dtype), (n, 1, d))
        # Always biased and without qk-norm, as big_vision's and timm's pooling heads.
        y, probs = MultiHeadDotProductAttention(cfg.num_heads, ln_eps=cfg.ln_eps, **kw)(
            probe, x, return_probs=return_probs
        )
        y = y + MlpBlock(cfg.mlp_dim, cfg.gelu, **kw)(layer_norm(cfg.ln_eps, **kw)(y))
        return y[:, 0], probs


class VisionTransformer(nn.Module):
    """`module.apply(variables, images)` -> logits; see the module docstring for the tree.

    `dtype` is the computation dtype (None: promote from inputs and parameters, as flax does);
    `param_dtype` is the dtype `init` creates parameters in. `train=True` turns on dropout,
    attention dropout and stochastic depth and needs `rngs={'dropout': key}`.
    With `intermediates` and/or `attention_maps` the call returns a dict with the reference's keys
    (`vitspec.forward`): patch_embed, tokens, block_{i}, encoded, pooled, pre_logits, logits, and
    attn_{i} [n, heads, t, t] (+ map_attn [n, heads, 1, patches] for pool "map").
    """

    config: ViTConfig
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    def init(self, rngs, *args, **kwargs) -> dict:
        """{'params': tree} at `vitspec.init_params(config, seed)` in `param_dtype`: the reference's
        init scheme, the tree the PyTorch backend starts from for the same seed. The seed is the last
        word of the key `rngs` (`jax.random.key(s)` gives seed s). The reference draws on the host
        (a callback), so init runs under jit and eval_shape too; sample images are accepted, not needed."""
        key = rngs["params"] if isinstance(rngs, dict) else rngs
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        cfg, dtype = self.config, jnp.dtype(self.param_dtype)
        shapes = {
            name: np.broadcast_to(np.zeros((), dtype), shape) for name, shape in param_shapes(cfg).items()
        }
        treedef = jax.tree.structure(from_reference(shapes, cfg))
        leaves = [
            jax.ShapeDtypeStruct(np.shape(a), dtype) for a in jax.tree.leaves(from_reference(shapes, cfg))
        ]

        def reference_init(seed):
            tree = from_reference(init_params(cfg, int(seed)), cfg)
            return [np.asarray(a, dtype) for a in jax.tree.leaves(tree)]

        return jax.tree.unflatten(treedef, jax.pure_callback(reference_init, leaves, jnp.ravel(key)[-1]))

    @nn.compact
    def __call__(
        self, images, *, train: bool = False, intermediates: bool = False, attention_maps: bool = False
    ):
        cfg = self.config
        if cfg.class_attention_depth:  # another forward pass: this one would compute a ViT
            raise ValueError(
                "a CaiT config (class_attention_depth > 0): apply it with backends.flax_vit.CaiT"
            )
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        out = {}
        x = out["patch_embed"] = self._embed_patches(images)
        x = self._add_tokens_and_posemb(x)
        x = out["tokens"] = nn.Dropout(cfg.dropout)(x, not train)
        x, blocks, probs = Encoder(cfg, name="Transformer", **kw)(
            x, deterministic=not train, return_probs=attention_maps
        )
        out |= {f"block_{i}": b for i, b in enumerate(blocks)}
        out |= {f"attn_{i}": p for i, p in enumerate(probs)}
        out["encoded"] = x
        if cfg.pool == "map":
            x, out["map_attn"] = MAPHead(cfg, **kw)(
                x[:, cfg.num_prefix_tokens :], return_probs=attention_maps
            )
        else:
            x = pool_tokens(x, cfg)
        if cfg.fc_norm:
            x = layer_norm(cfg.ln_eps, name="fc_norm", **kw)(x)
        out["pooled"] = x
        if cfg.representation_size:
            x = jnp.tanh(
                nn.Dense(cfg.representation_size, name="pre_logits", kernel_init=shape_only, **kw)(x)
            )
        out["pre_logits"] = x
        if cfg.num_classes:
            x = nn.Dense(cfg.num_classes, name="head", kernel_init=shape_only, **kw)(x)
        out["logits"] = x
        return select_outputs(out, intermediates, attention_maps)

    def _embed_patches(self, images):  # [n, h, w, c] -> [n, patches, d]
        cfg = self.config
        x = nn.Conv(
            cfg.width,
            cfg.patch_size,
            strides=cfg.patch_size,
            padding="VALID",
            name="embedding",
            kernel_init=shape_only,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(images)
        n, gh, gw, d = x.shape
        return x.reshape(n, gh * gw, d)

    def _add_tokens_and_posemb(self, x):  # [n, patches, d] -> [n, tokens, d]
        cfg = self.config
        n, _, d = x.shape
        prefix = []
        if cfg.class_token:
            prefix.append(self.param("cls", shape_only, (1, 1, d), self.param_dtype))
        if cfg.num_registers:
            prefix.append(self.param("reg", shape_only, (1, cfg.num_registers, d), self.param_dtype))
        prefix = [jnp.broadcast_to(jnp.asarray(t, x.dtype), (n, t.shape[1], d)) for t in prefix]
        if cfg.posemb == "learned" and cfg.posemb_on_cls:
            return self._add_posemb(jnp.concatenate([*prefix, x], axis=1))
        return jnp.concatenate([*prefix, self._add_posemb(x)], axis=1)

    def _add_posemb(self, x):  # [n, posemb_length, d] -> the same
        cfg = self.config
        if cfg.posemb == "learned":
            posemb = self.param(
                "pos_embedding", shape_only, (1, cfg.posemb_length, x.shape[-1]), self.param_dtype
            )
            return x + jnp.asarray(posemb, x.dtype)
        if cfg.posemb == "sincos2d":
            # A float64 NumPy constant, rounded once to the computation dtype.
            return x + jnp.asarray(posemb_sincos2d(*cfg.grid_size, x.shape[-1]), x.dtype)
        return x


def pool_tokens(x, cfg: ViTConfig):  # [n, t, d] -> [n, d] ([n, t, d] for pool 'none')
    if cfg.pool == "token":
        return x[:, 0]
    if cfg.pool == "gap":
        return jnp.mean(x[:, cfg.num_prefix_tokens :], axis=1)
    if cfg.pool == "none":
        return x
    raise AssertionError(f"pool {cfg.pool!r} is a module: MAPHead")
