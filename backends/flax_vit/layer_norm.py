"""LayerNorm with a two-pass variance and a hand-written backward pass.

The two-pass variance mean((x - mean(x))^2) is the spec's (flax's default E[x^2] - E[x]^2 cancels
catastrophically when |mean| >> std). Its autodiff backward is what costs: with
`nn.LayerNorm(use_fast_variance=False)` a ViT-S/16 training step on CPU took 1.7x as long as with
the fast variance, the gap growing with depth (bench/PERFORMANCE.md). The closed-form
VJP below is the one vitspec/grad.py derives, so the gradient is the same math in fewer passes:

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * scale
    dscale = sum(dy * xhat),  dbias = sum(dy)            (sums over all but the feature axis)

Statistics and the backward run in at least float32 (as flax's), the output in the module's dtype.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any


def layer_norm(x, scale, bias, eps: float):
    """[..., d], [d], [d] -> [..., d] in the promotion of the three dtypes."""
    compute = jnp.promote_types(jnp.result_type(x, scale, bias), jnp.float32)
    y = _normalize(x.astype(compute), scale.astype(compute), bias.astype(compute), eps)
    return y.astype(jnp.result_type(x, scale, bias))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize(x, scale, bias, eps):  # all in one dtype of at least float32
    return _normalize_forward(x, scale, bias, eps)[0]


def _normalize_forward(x, scale, bias, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    # Saved: x itself (alive anyway) and two per-token scalars, not a normalized copy of x.
    return xc * rstd * scale + bias, (x, mean, rstd, scale)


def _normalize_backward(eps, residuals, dy):
    x, mean, rstd, scale = residuals
    xhat = (x - mean) * rstd
    g = dy * scale
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    batch_axes = tuple(range(dy.ndim - 1))
    return dx, jnp.sum(dy * xhat, axis=batch_axes), jnp.sum(dy, axis=batch_axes)


_normalize.defvjp(_normalize_forward, _normalize_backward)


class LayerNorm(nn.Module):
    """flax.linen.LayerNorm's parameters (scale, bias over the last axis) and dtype rules."""

    epsilon: float = 1e-6
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
        y = layer_norm(x, scale, bias, self.epsilon)
        return y.astype(self.dtype) if self.dtype is not None else y
