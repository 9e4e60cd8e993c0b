"""Training's dropout and stochastic-depth masks in JAX, from `vitspec.masks`' counter hash.

`counter_masks(step_key)` is a flax method interceptor (`nn.intercept_methods`): while it is
active, every `nn.Dropout` applied in training (dropout, attention dropout, and stochastic depth,
which is a Dropout broadcast over tokens and features) takes its keep-mask from the hash of
(step key, site, global example, element) instead of flax's PRNG. The step key is a traced uint32
scalar, so one compiled step serves every step; sites are numbered as the forward pass is traced.
Under a data-sharded jit the batch axis is the global batch, so example i is global example i on
whichever device holds it. Unsigned 32-bit arithmetic, which wraps as vitspec.masks' masked
products do; flax's own `select(mask, x / keep, 0)` follows.
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from vitspec import masks


def mix(x):
    """vitspec.masks.mix on uint32 words."""
    x = x ^ (x >> masks.SHIFTS[0])
    x = x * jnp.uint32(masks.MULTIPLIERS[0])
    x = x ^ (x >> masks.SHIFTS[1])
    x = x * jnp.uint32(masks.MULTIPLIERS[1])
    return x ^ (x >> masks.SHIFTS[2])


def keep_mask(step_key, site: int, shape: tuple[int, ...], keep: float):
    """bool `shape` ([examples, ...]): draw `site`'s mask for the global batch at `step_key`."""
    key = mix(step_key ^ jnp.uint32(masks.mix(site ^ masks.SITE)))
    n, size = shape[0], math.prod(shape[1:])
    example = mix(key ^ mix(lax.iota(jnp.uint32, n) ^ jnp.uint32(masks.EXAMPLE)))
    element = mix(lax.iota(jnp.uint32, size) ^ jnp.uint32(masks.ELEMENT))
    hashed = mix(example[:, None] ^ element[None, :])
    return (hashed < jnp.uint32(masks.keep_threshold(keep))).reshape(shape)


def counter_masks(step_key):
    """A context manager: flax Dropout calls inside draw vitspec.masks' masks at `step_key`."""
    sites = itertools.count()

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nn.Dropout) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        inputs, deterministic = _dropout_arguments(module, *args, **kwargs)
        if module.rate == 0.0 or deterministic:
            return inputs
        keep = 1.0 - module.rate
        broadcast = {dim % inputs.ndim for dim in module.broadcast_dims}
        shape = [1 if dim in broadcast else size for dim, size in enumerate(inputs.shape)]
        mask = jnp.broadcast_to(keep_mask(step_key, next(sites), tuple(shape), keep), inputs.shape)
        return lax.select(mask, inputs / keep, jnp.zeros_like(inputs))

    return nn.intercept_methods(intercept)


def _dropout_arguments(module: nn.Dropout, inputs, deterministic=None, rng=None):
    return inputs, nn.merge_param("deterministic", module.deterministic, deterministic)
