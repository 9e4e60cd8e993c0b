"""The vitspec Vision Transformer as a flax.linen module whose parameter tree is big_vision's ViT.

Module and parameter names follow google-research/big_vision `models/vit.py`, so its checkpoints
load by name. Knobs big_vision lacks get names in the same style (marked *):

    embedding/{kernel [ph, pw, C, D], bias [D]}             patch embedding (a strided conv; no
                                                            bias without patch_bias)
    cls [1, 1, D]                                           class token
    dist [1, 1, D]                                          * distillation token (DeiT)
    reg [1, R, D]                                           * register tokens
    pos_embedding [1, L, D]                                 learned posemb; L = patches, or
                                                            tokens when posemb_on_cls
    pre_norm/{scale, bias}                                  * LayerNorm over all tokens before the
                                                            blocks (timm norm_pre, CLIP's)
    Transformer/encoderblock_{i}/
        LayerNorm_0, LayerNorm_1/{scale, bias}              pre-attention, pre-MLP norms
        MultiHeadDotProductAttention_0/
            {query, key, value}/{kernel [D, H, dh], bias [H, dh]}   (no bias if not qkv_bias;
                                                            H x dh = attention_dim)
            {query_ln, key_ln}/{scale, bias} [dh]           * qk_norm; flax's own MHDPA names,
                                                            with a bias flax's version lacks
            {talk_logits, talk_weights}/{kernel [H, H],     * talking heads (CaiT): mixes of the
                bias [H]}                                   head axis, [heads in, out]
            out/{kernel [H, dh, D], bias [D]}               (no bias without proj_bias)
        LayerScale_0, LayerScale_1/scale [D]                * layer scale
        MlpBlock_0/{Dense_0, Dense_1}/{kernel, bias}        (no biases without proj_bias)
    Transformer/encoder_norm/{scale, bias}                  final norm (absent with fc_norm or
                                                            without final_norm)
    MAPHead_0/{probe [1, 1, D], MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}
    fc_norm/{scale, bias}                                   * norm after pooling
    pre_logits/{kernel, bias}, head/{kernel, bias}
    head_dist/{kernel, bias}                                * the distillation token's head

CaiT configs (class_attention_depth > 0) are applied by backends/flax_vit/cait.py's `CaiT`, a
subclass on the same stem and blocks; `module_for(cfg)` picks the module for a config. The leaf
layers (attention, MLP, LayerScale) are backends/flax_vit/layers.py's.

Images are NHWC. A distilled model (DeiT) returns the mean of its two heads' logits, as DeiT at
inference (with num_classes=0, the mean of the class and distillation tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from backends.flax_vit.convert import from_reference
from backends.flax_vit.embedding import add_tokens_and_posemb, embedded_tokens
from backends.flax_vit.layers import (
    Dtype,
    LayerScale,
    MlpBlock,
    MultiHeadDotProductAttention,
    layer_norm,
    shape_only,
)
from vitspec.config import ViTConfig
from vitspec.params import init_params, param_shapes
from vitspec.reference import select_outputs


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
            cfg.attention_dim,
            cfg.proj_bias,
            **kw,
        )(y, y, deterministic=deterministic, return_probs=return_probs)
        x = x + self._residual_branch(y, deterministic)
        y = layer_norm(cfg.ln_eps, **kw)(x)
        y = MlpBlock(cfg.mlp_dim, cfg.gelu, cfg.dropout, cfg.proj_bias, **kw)(y, deterministic)
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
        if cfg.final_norm and not cfg.fc_norm:
            x = layer_norm(cfg.ln_eps, self.dtype, self.param_dtype, name="encoder_norm")(x)
        return x, outputs, probs


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens, then a residual MLP."""

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
    (`vitspec.forward`): patch_embed, embedded (with pre_norm), tokens, block_{i}, encoded, pooled
    (+ pooled_dist when distilled), pre_logits, logits, and attn_{i} [n, heads, t, t] (+ map_attn
    [n, heads, 1, tokens pooled over] for pool "map"). In training, token dropout comes before the
    pre-norm (timm's pos_drop, then norm_pre).
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
        x = embedded_tokens(self, images, add_tokens_and_posemb, train, out)
        x, blocks, probs = Encoder(cfg, name="Transformer", **kw)(
            x, deterministic=not train, return_probs=attention_maps
        )
        out |= {f"block_{i}": b for i, b in enumerate(blocks)}
        out |= {f"attn_{i}": p for i, p in enumerate(probs)}
        out["encoded"] = x
        if cfg.distilled:
            out |= self._distilled_heads(x)
            return select_outputs(out, intermediates, attention_maps)
        if cfg.pool == "map":
            x, out["map_attn"] = MAPHead(cfg, **kw)(pool_inputs(x, cfg), return_probs=attention_maps)
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

    def _distilled_heads(self, x) -> dict:
        """DeiT at inference: the mean of the class token's head and the distillation token's."""
        cfg = self.config
        cls, dist = x[:, 0], x[:, 1]
        out = {"pooled": cls, "pooled_dist": dist, "pre_logits": (cls + dist) / 2}
        if not cfg.num_classes:
            return out | {"logits": out["pre_logits"]}
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "kernel_init": shape_only}
        head, head_dist = (nn.Dense(cfg.num_classes, name=name, **kw) for name in ("head", "head_dist"))
        return out | {"logits": (head(cls) + head_dist(dist)) / 2}


def pool_inputs(x, cfg: ViTConfig):  # [n, t, d] -> [n, tokens pooled over, d]
    return x if cfg.pool_include_prefix else x[:, cfg.num_prefix_tokens :]


def pool_tokens(x, cfg: ViTConfig):  # [n, t, d] -> [n, d] ([n, t, d] for pool 'none')
    if cfg.pool == "token":
        return x[:, 0]
    if cfg.pool == "none":
        return x
    x = pool_inputs(x, cfg)
    if cfg.pool == "gap":
        return jnp.mean(x, axis=1)
    if cfg.pool == "max":
        return max_over_tokens(x)
    if cfg.pool == "avgmax":  # timm's: the mean of the two pools
        return (jnp.mean(x, axis=1) + max_over_tokens(x)) / 2
    if cfg.pool == "sum":
        return jnp.sum(x, axis=1)
    raise AssertionError(f"pool {cfg.pool!r} is a module: MAPHead")


def max_over_tokens(x):  # [n, t, d] -> [n, d]
    """max over axis 1, as the token at the (first) argmax, whose gradient goes to that token.

    Not jnp.max: its gradient finds the maxima by comparing its input with the result, and under jit
    XLA recomputed that input in another fusion, rounded otherwise, so the comparison missed (measured:
    a LayerNorm before the pool, its bias's gradient 45% off, with or without an optimization
    barrier). Tied maxima, which jnp.max, torch's amax and the reference share the gradient among,
    need exactly equal tokens; the first of them takes it all here."""
    first = jnp.argmax(x, axis=1)[:, None]
    return jnp.take_along_axis(x, first, axis=1)[:, 0]
