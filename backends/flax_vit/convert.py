"""vitspec's canonical parameters <-> the flax module's (big_vision's) tree, through one table.

`mapping(cfg)` lists every parameter once as (reference name, big_vision path, big_vision shape).
Every layout difference is a row-major reshape, owned by `_relayout`:
- q/k/v kernels [D, D] with head-major columns are exactly [D, H, dh] reshaped, biases [D] <-> [H, dh];
- the attention output kernel [D, D] with head-major rows is [H, dh, D] reshaped;
- tokens and the position embedding gain big_vision's leading batch axes ([D] <-> [1, 1, D]).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from flax import traverse_util

from vitspec.config import ViTConfig
from vitspec.params import ParamTreeError, param_shapes, validate_params


class Entry(NamedTuple):
    reference: str
    big_vision: str
    shape: tuple[int, ...]  # in the big_vision tree


def _layer_norm(ref: str, bv: str, dim: int) -> list[Entry]:
    return [Entry(f"{ref}/{leaf}", f"{bv}/{leaf}", (dim,)) for leaf in ("scale", "bias")]


def _dense(ref: str, bv: str, d_in: int, d_out: int) -> list[Entry]:
    return [Entry(f"{ref}/kernel", f"{bv}/kernel", (d_in, d_out)),
            Entry(f"{ref}/bias", f"{bv}/bias", (d_out,))]


def _attention(ref: str, bv: str, cfg: ViTConfig, qkv_bias: bool, qk_norm: bool) -> list[Entry]:
    d, h, dh = cfg.width, cfg.num_heads, cfg.head_dim
    entries = []
    for name in ("query", "key", "value"):
        entries.append(Entry(f"{ref}/{name}/kernel", f"{bv}/{name}/kernel", (d, h, dh)))
        if qkv_bias:
            entries.append(Entry(f"{ref}/{name}/bias", f"{bv}/{name}/bias", (h, dh)))
    if qk_norm:
        entries += _layer_norm(f"{ref}/q_norm", f"{bv}/query_ln", dh)
        entries += _layer_norm(f"{ref}/k_norm", f"{bv}/key_ln", dh)
    entries.append(Entry(f"{ref}/out/kernel", f"{bv}/out/kernel", (h, dh, d)))
    entries.append(Entry(f"{ref}/out/bias", f"{bv}/out/bias", (d,)))
    return entries


def _mlp(ref: str, bv: str, cfg: ViTConfig) -> list[Entry]:
    return (_dense(f"{ref}/fc1", f"{bv}/Dense_0", cfg.width, cfg.mlp_dim)
            + _dense(f"{ref}/fc2", f"{bv}/Dense_1", cfg.mlp_dim, cfg.width))


def _block(i: int, cfg: ViTConfig) -> list[Entry]:
    ref, bv, d = f"blocks/{i}", f"Transformer/encoderblock_{i}", cfg.width
    entries = _layer_norm(f"{ref}/norm1", f"{bv}/LayerNorm_0", d)
    attention = f"{bv}/MultiHeadDotProductAttention_0"
    entries += _attention(f"{ref}/attn", attention, cfg, cfg.qkv_bias, cfg.qk_norm)
    if cfg.layer_scale is not None:
        entries.append(Entry(f"{ref}/ls1/scale", f"{bv}/LayerScale_0/scale", (d,)))
    entries += _layer_norm(f"{ref}/norm2", f"{bv}/LayerNorm_1", d)
    entries += _mlp(f"{ref}/mlp", f"{bv}/MlpBlock_0", cfg)
    if cfg.layer_scale is not None:
        entries.append(Entry(f"{ref}/ls2/scale", f"{bv}/LayerScale_1/scale", (d,)))
    return entries


def mapping(cfg: ViTConfig) -> list[Entry]:
    """Every parameter of `cfg`: its reference name, big_vision path and big_vision shape."""
    d = cfg.width
    ph, pw = cfg.patch_size
    entries = [
        Entry("patch_embed/kernel", "embedding/kernel", (ph, pw, cfg.in_channels, d)),
        Entry("patch_embed/bias", "embedding/bias", (d,)),
    ]
    if cfg.class_token:
        entries.append(Entry("cls_token", "cls", (1, 1, d)))
    if cfg.num_registers:
        entries.append(Entry("reg_tokens", "reg", (1, cfg.num_registers, d)))
    if cfg.posemb == "learned":
        entries.append(Entry("pos_embed", "pos_embedding", (1, cfg.posemb_length, d)))
    for i in range(cfg.depth):
        entries += _block(i, cfg)
    if not cfg.fc_norm:
        entries += _layer_norm("norm", "Transformer/encoder_norm", d)
    if cfg.pool == "map":
        entries.append(Entry("map_head/probe", "MAPHead_0/probe", (1, 1, d)))
        entries += _attention("map_head/attn", "MAPHead_0/MultiHeadDotProductAttention_0", cfg, True, False)
        entries += _layer_norm("map_head/norm", "MAPHead_0/LayerNorm_0", d)
        entries += _mlp("map_head/mlp", "MAPHead_0/MlpBlock_0", cfg)
    if cfg.fc_norm:
        entries += _layer_norm("fc_norm", "fc_norm", d)
    if cfg.representation_size:
        entries += _dense("pre_logits", "pre_logits", d, cfg.representation_size)
    if cfg.num_classes:
        entries += _dense("head", "head", cfg.feature_dim, cfg.num_classes)
    return entries


def _relayout(value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The one layout change: a row-major reshape (see the module docstring), values untouched."""
    return np.reshape(np.asarray(value), shape)


def _check_big_vision_tree(cfg: ViTConfig, flat: dict[str, Any], source: str) -> None:
    expected = {e.big_vision: e.shape for e in mapping(cfg)}
    missing = [k for k in expected if k not in flat]
    unexpected = sorted(k for k in flat if k not in expected)
    misshaped = [f"{k}: expected {expected[k]}, got {tuple(np.shape(flat[k]))}"
                 for k in expected if k in flat and tuple(np.shape(flat[k])) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if misshaped:
        problems.append(f"shape mismatches ({len(misshaped)}): " + "; ".join(misshaped))
    if problems:
        raise ParamTreeError(f"{source} does not match the config:\n  " + "\n  ".join(problems))


def to_reference(variables: dict, cfg: ViTConfig) -> dict[str, np.ndarray]:
    """Flax variables ({'params': tree}, or the tree itself) -> vitspec's flat NumPy parameters."""
    tree = variables.get("params", variables)
    flat = traverse_util.flatten_dict(dict(tree), sep="/")
    _check_big_vision_tree(cfg, flat, "flax variables")
    ref_shapes = param_shapes(cfg)
    return {e.reference: _relayout(flat[e.big_vision], ref_shapes[e.reference]) for e in mapping(cfg)}


def from_reference(params: dict[str, np.ndarray], cfg: ViTConfig) -> dict[str, dict]:
    """vitspec's flat parameters -> {'params': big_vision tree} of NumPy arrays (dtype kept)."""
    validate_params(cfg, params, source="reference params")
    flat = {e.big_vision: _relayout(params[e.reference], e.shape) for e in mapping(cfg)}
    return {"params": traverse_util.unflatten_dict(flat, sep="/")}
