"""The stem of the flax ViT and CaiT: patch embedding, prefix tokens and position embedding.

Functions of the module being applied (as big_vision's `get_posemb(self, ...)`), called from its
compact `__call__`, so the parameters they create sit at the top of its tree: `embedding`, `cls`,
`dist`, `reg`, `pos_embedding` (backends/flax_vit/model.py's docstring has the tree). The module
has `config`, `dtype` and `param_dtype`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from backends.flax_vit.layers import layer_norm, shape_only
from vitspec.fixed_posemb import fixed_posemb


def embed_patches(module: nn.Module, images):  # [n, h, w, c] -> [n, patches, d]
    cfg = module.config
    x = nn.Conv(
        cfg.width,
        cfg.patch_size,
        strides=cfg.patch_size,
        padding="VALID",
        use_bias=cfg.patch_bias,
        name="embedding",
        kernel_init=shape_only,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
    )(images)
    n, gh, gw, d = x.shape
    return x.reshape(n, gh * gw, d)


def add_tokens_and_posemb(module: nn.Module, x):
    # [n, patches, d] -> [n, tokens, d]; tokens are [class, distillation, registers..., patches]
    cfg = module.config
    n, _, d = x.shape
    tokens = (("cls", cfg.class_token), ("dist", cfg.distilled), ("reg", cfg.num_registers))
    prefix = [
        module.param(name, shape_only, (1, int(rows), d), module.param_dtype) for name, rows in tokens if rows
    ]
    prefix = [jnp.broadcast_to(jnp.asarray(t, x.dtype), (n, t.shape[1], d)) for t in prefix]
    if cfg.posemb_on_cls:
        return add_posemb(module, jnp.concatenate([*prefix, x], axis=1))
    return jnp.concatenate([*prefix, add_posemb(module, x)], axis=1)


def add_posemb(module: nn.Module, x):  # [n, posemb_length, d] -> the same
    cfg = module.config
    if cfg.posemb == "learned":
        shape = (1, cfg.posemb_length, x.shape[-1])
        return x + jnp.asarray(module.param("pos_embedding", shape_only, shape, module.param_dtype), x.dtype)
    table = fixed_posemb(cfg)  # the reference's float64 table, rounded once to the computation dtype
    return x if table is None else x + jnp.asarray(table, x.dtype)


def embedded_tokens(module: nn.Module, images, with_posemb, train: bool, out: dict):
    """The sequence into the first block: the patches through `with_posemb` (add_tokens_and_posemb,
    or CaiT's add_posemb), dropout, then pre_norm; out gets patch_embed, embedded and tokens."""
    cfg = module.config
    x = out["patch_embed"] = embed_patches(module, images)
    x = nn.Dropout(cfg.dropout)(with_posemb(module, x), not train)
    if cfg.pre_norm:
        out["embedded"] = x
        x = layer_norm(cfg.ln_eps, module.dtype, module.param_dtype, name="pre_norm")(x)
    out["tokens"] = x
    return x
