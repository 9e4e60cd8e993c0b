"""The flax backend's leaf layers: LayerScale, the MLP and multi-head attention, in big_vision's names.

`MultiHeadDotProductAttention` keeps flax's parameter names and head axes (q/k/v kernels
[D, H, dh], out [H, dh, D]); with `attention_dim` set, H x dh is that width instead of the
model's. Attention runs through `jax.nn.dot_product_attention` (which may dispatch to a fused
kernel), except where the explicit softmax(q k^T / sqrt(dh)) v is needed or pays: where the
probabilities themselves are needed (maps, attention dropout, talking heads); in float64, because
that function always takes its softmax in float32, which would cap a float64 model at float32
accuracy; and when training on the CPU, where the library function is plain XLA whose backward
measured slower (the training step 1.07x faster at cifar-notebook, 1.03x at S/16 with the explicit
form, while the forward pass is faster with the library function; bench/PERFORMANCE.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from backends.flax_vit.layer_norm import LayerNorm

Dtype = Any

# Parameters get their values from vitspec.init_params (VisionTransformer.init), as the PyTorch
# backend's do, so the two cannot drift from the reference's scheme; inside the modules an
# initializer only gives each parameter its shape and dtype.
shape_only = nn.initializers.zeros

# OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x).
QUICK_GELU_COEFF = 1.702


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> LayerNorm:
    return LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


def gelu(x, form: str):
    """The config's GELU: "exact" (erf), "tanh" (what flax's nn.gelu computes by default), "quick"."""
    if form == "quick":
        return x * jax.nn.sigmoid(jnp.asarray(QUICK_GELU_COEFF, x.dtype) * x)
    return nn.gelu(x, approximate=form == "tanh")


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
    use_bias: bool = True
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        dense = {
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
            "kernel_init": shape_only,
            "use_bias": self.use_bias,
        }
        width = x.shape[-1]
        x = gelu(nn.Dense(self.mlp_dim, **dense)(x), self.gelu)
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
    """flax's attention: [n, tq, d], [n, t, d] -> [n, tq, d]; `attention_dim` (default: d) is heads x
    head width; `out_bias=False` drops the output projection's bias."""

    num_heads: int
    qkv_bias: bool = True
    qk_norm: bool = False
    ln_eps: float = 1e-6
    dropout: float = 0.0
    talking_heads: bool = False
    attention_dim: int | None = None
    out_bias: bool = True
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs_q, inputs_kv, *, deterministic: bool = True, return_probs: bool = False):
        """[n, tq, d], [n, t, d] -> ([n, tq, d], probabilities [n, heads, tq, t] or None)."""
        width = inputs_q.shape[-1]
        heads = (self.num_heads, (self.attention_dim or width) // self.num_heads)
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
        ):  # see the module docstring
            probs = self._probabilities(q, k)
            mixed = jnp.einsum("nhqk,nkhd->nqhd", nn.Dropout(self.dropout)(probs, deterministic), v)
        else:
            probs, mixed = None, jax.nn.dot_product_attention(q, k, v)
        out = nn.DenseGeneral(width, axis=(-2, -1), use_bias=self.out_bias, name="out", **project)
        return out(mixed), (probs if return_probs else None)

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
