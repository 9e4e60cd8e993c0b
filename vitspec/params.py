"""The canonical parameter tree: flat '/'-joined names, shapes from the config, seeded init.

Layout rules (so the NumPy math reads like the paper and every converter is a table):
- Dense kernels are [in, out] and applied as `x @ kernel + bias`; q/k/v/out of attention are
  separate [width, width] matrices whose columns are head-major (head h owns columns
  h*head_dim:(h+1)*head_dim).
- The patch embedding kernel is [patch_h, patch_w, in_channels, width] (a conv in HWIO) and is
  applied to each patch flattened in (row, column, channel) order.
- LayerNorm has `scale` and `bias`; LayerScale has `scale`; tokens are rows without a batch axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from vitspec.config import ViTConfig


def _layer_norm(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}/scale": (dim,), f"{prefix}/bias": (dim,)}


def _dense(prefix: str, d_in: int, d_out: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}/kernel": (d_in, d_out)}
    if bias:
        shapes[f"{prefix}/bias"] = (d_out,)
    return shapes


def _attention(
    prefix: str,
    cfg: ViTConfig,
    qkv_bias: bool,
    qk_norm: bool,
    talking_heads: bool = False,
    inner: int | None = None,
    out_bias: bool = True,
) -> dict[str, tuple[int, ...]]:
    d, h = cfg.width, cfg.num_heads
    inner = inner or d  # heads x head width
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ("query", "key", "value"):
        shapes |= _dense(f"{prefix}/{name}", d, inner, bias=qkv_bias)
    if qk_norm:
        shapes |= _layer_norm(f"{prefix}/q_norm", inner // h)
        shapes |= _layer_norm(f"{prefix}/k_norm", inner // h)
    if talking_heads:  # [heads in, heads out]: the logits' mix, then the weights'
        shapes |= _dense(f"{prefix}/talk_logits", h, h) | _dense(f"{prefix}/talk_weights", h, h)
    shapes |= _dense(f"{prefix}/out", inner, d, bias=out_bias)
    return shapes


def _mlp(
    prefix: str, cfg: ViTConfig, hidden: int | None = None, bias: bool = True
) -> dict[str, tuple[int, ...]]:
    hidden = hidden or cfg.mlp_dim
    return _dense(f"{prefix}/fc1", cfg.width, hidden, bias) | _dense(f"{prefix}/fc2", hidden, cfg.width, bias)


def param_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in forward order. SPEC.md has the same table in words."""
    shapes = _stem_shapes(cfg)
    for i in range(cfg.depth):
        shapes |= _block_shapes(cfg, i)
    for j in range(cfg.class_attention_depth):
        shapes |= _class_block_shapes(cfg, j)
    return shapes | _tail_shapes(cfg)


def tree_size(cfg: ViTConfig) -> tuple[int, int]:
    """(tensors, values) of `param_shapes(cfg)` without building it, in time independent of depth:
    a stored config is checked against what its file holds before its tree is built."""
    parts = [(_stem_shapes(cfg), 1), (_block_shapes(cfg, 0), cfg.depth), (_tail_shapes(cfg), 1)]
    if cfg.class_attention_depth:
        parts.append((_class_block_shapes(cfg, 0), cfg.class_attention_depth))
    tensors = sum(len(shapes) * n for shapes, n in parts)
    return tensors, sum(math.prod(s) * n for shapes, n in parts for s in shapes.values())


def _stem_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    d = cfg.width
    ph, pw = cfg.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed/kernel": (ph, pw, cfg.in_channels, d),
    }
    if cfg.patch_bias:
        shapes["patch_embed/bias"] = (d,)
    if cfg.class_token:
        shapes["cls_token"] = (d,)
    if cfg.distilled:
        shapes["dist_token"] = (d,)
    if cfg.num_registers:
        shapes["reg_tokens"] = (cfg.num_registers, d)
    if cfg.posemb == "learned":
        shapes["pos_embed"] = (cfg.posemb_length, d)
    if cfg.pre_norm:
        shapes |= _layer_norm("pre_norm", d)
    return shapes


def _block_shapes(cfg: ViTConfig, i: int) -> dict[str, tuple[int, ...]]:
    d, b = cfg.width, f"blocks/{i}"
    shapes = _layer_norm(f"{b}/norm1", d)
    shapes |= _attention(
        f"{b}/attn", cfg, cfg.qkv_bias, cfg.qk_norm, cfg.talking_heads, cfg.attention_dim, cfg.proj_bias
    )
    if cfg.layer_scale is not None:
        shapes[f"{b}/ls1/scale"] = (d,)
    shapes |= _layer_norm(f"{b}/norm2", d)
    shapes |= _mlp(f"{b}/mlp", cfg, bias=cfg.proj_bias)
    if cfg.layer_scale is not None:
        shapes[f"{b}/ls2/scale"] = (d,)
    return shapes


def _class_block_shapes(cfg: ViTConfig, j: int) -> dict[str, tuple[int, ...]]:
    """CaiT's class-attention block: a block's parameters, its own MLP width, plain attention."""
    d, b = cfg.width, f"class_blocks/{j}"
    shapes = _layer_norm(f"{b}/norm1", d)
    shapes |= _attention(
        f"{b}/attn", cfg, cfg.qkv_bias, False, inner=cfg.attention_dim, out_bias=cfg.proj_bias
    )
    if cfg.layer_scale is not None:
        shapes[f"{b}/ls1/scale"] = (d,)
    shapes |= _layer_norm(f"{b}/norm2", d)
    shapes |= _mlp(f"{b}/mlp", cfg, cfg.class_attention_mlp_dim, cfg.proj_bias)
    if cfg.layer_scale is not None:
        shapes[f"{b}/ls2/scale"] = (d,)
    return shapes


def _tail_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    d = cfg.width
    shapes: dict[str, tuple[int, ...]] = {}
    if cfg.final_norm and not cfg.fc_norm:
        shapes |= _layer_norm("norm", d)
    if cfg.pool == "map":
        # big_vision's MAPHead / timm's AttentionPoolLatent: always biased, no qk-norm.
        shapes["map_head/probe"] = (d,)
        shapes |= _attention("map_head/attn", cfg, qkv_bias=True, qk_norm=False)
        shapes |= _layer_norm("map_head/norm", d)
        shapes |= _mlp("map_head/mlp", cfg)
    if cfg.fc_norm:
        shapes |= _layer_norm("fc_norm", d)
    if cfg.representation_size:
        shapes |= _dense("pre_logits", d, cfg.representation_size)
    if cfg.num_classes:
        shapes |= _dense("head", cfg.feature_dim, cfg.num_classes)
        if cfg.distilled:
            shapes |= _dense("head_dist", cfg.feature_dim, cfg.num_classes)
    return shapes


def num_params(cfg: ViTConfig) -> int:
    return tree_size(cfg)[1]


# --- init ---------------------------------------------------------------------------------------
# big_vision / vision_transformer scheme; see SPEC.md "Initialization".


def _xavier_uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    fan_in, fan_out = shape[0], shape[-1]
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


def _lecun_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    # jax's lecun_normal: a normal truncated to +-2 std, rescaled so the variance is 1/fan_in.
    # 0.8796... is the std of a unit normal truncated to [-2, 2].
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    out = rng.standard_normal(size=shape)
    bad = np.abs(out) > 2.0
    while bad.any():
        out[bad] = rng.standard_normal(size=int(bad.sum()))
        bad = np.abs(out) > 2.0
    return out * std


def _init_one(rng: np.random.Generator, name: str, shape: tuple[int, ...], cfg: ViTConfig) -> np.ndarray:
    leaf = name.rsplit("/", 1)[-1]
    if name == "patch_embed/kernel":
        return _lecun_normal(rng, shape, fan_in=shape[0] * shape[1] * shape[2])
    if name == "pre_logits/kernel":
        return _lecun_normal(rng, shape, fan_in=shape[0])
    if name.startswith(("head/", "head_dist/")) or name in ("cls_token", "dist_token"):
        return np.zeros(shape)
    if name == "pos_embed":
        return rng.normal(0.0, 0.02, size=shape)
    if name == "reg_tokens":
        return rng.normal(0.0, 0.02, size=shape)
    if name == "map_head/probe":
        # big_vision: xavier_uniform on a (1, 1, width) tensor, i.e. fan_in 1, fan_out width.
        return _xavier_uniform(rng, (1, shape[0]))[0]
    if name.endswith(("talk_logits/kernel", "talk_weights/kernel")):
        # CaiT's own (timm's trunc_normal_(std=.02), whose +-2 cut is ~100 std away): big_vision has
        # no talking heads to follow.
        return rng.normal(0.0, 0.02, size=shape)
    if leaf == "kernel":
        return _xavier_uniform(rng, shape)
    if "/mlp/" in name and leaf == "bias":
        return rng.normal(0.0, 1e-6, size=shape)
    if name.endswith(("ls1/scale", "ls2/scale")):
        return np.full(shape, cfg.layer_scale)
    if leaf == "scale":
        return np.ones(shape)
    if leaf == "bias":
        return np.zeros(shape)
    raise AssertionError(f"no init rule for parameter {name!r}")


def init_params(cfg: ViTConfig, seed: int = 0, dtype: np.dtype | type = np.float32) -> dict[str, np.ndarray]:
    """Seeded init: the same seed gives the same tree on every machine and in every backend.

    Each parameter draws from its own generator, seeded by (seed, name), so adding a knob that
    adds a parameter does not change the others.
    """
    params = {}
    for name, shape in param_shapes(cfg).items():
        name_key = int.from_bytes(name.encode(), "little") % (2**63)
        rng = np.random.default_rng([seed, name_key])
        params[name] = _init_one(rng, name, shape, cfg).astype(dtype)
    return params


class ParamTreeError(ValueError):
    """A parameter tree that does not match its config; the message names every kind of problem."""


# Tensors beyond twice the tree's own that a config may imply and still have its keys listed: a
# small tree against a small config (none at all against a one-block model) is worth the list.
_ALLOWANCE = 64


def tree_problems(
    expected: Mapping[str, tuple[int, ...]], arrays: Mapping[str, object], require_float: bool = True
) -> list[str]:
    """Every kind of problem (missing, unexpected, mis-shaped, non-float keys), one line per kind with
    its count and the first few keys: a tree of the wrong depth has millions."""
    missing = [k for k in expected if k not in arrays]
    unexpected = sorted(k for k in arrays if k not in expected)
    present = [k for k in expected if k in arrays]
    misshaped = [
        f"{k}: expected {tuple(expected[k])}, got {tuple(np.shape(arrays[k]))}"
        for k in present
        if tuple(np.shape(arrays[k])) != tuple(expected[k])
    ]
    not_float = [
        f"{k}: dtype {np.asarray(arrays[k]).dtype}"
        for k in present
        if require_float and not np.issubdtype(np.asarray(arrays[k]).dtype, np.floating)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_first(unexpected)}")
    if misshaped:
        problems.append(f"shape mismatches ({len(misshaped)}): {_first(misshaped, '; ')}")
    if not_float:
        problems.append(f"non-float parameters ({len(not_float)}): {_first(not_float, '; ')}")
    return problems


def size_text(n: int) -> str:
    """`n`, or its order of magnitude where a forged config makes it absurd (past 4300 digits,
    Python refuses to print it at all)."""
    return str(n) if n < 10**15 else f"~10**{int(math.log10(n))}"


def _first(items: list[str], sep: str | None = None, shown: int = 5) -> str:
    text = repr(items[:shown]) if sep is None else sep.join(items[:shown])
    return text + (f" and {len(items) - shown} more" if len(items) > shown else "")


def validate_params(cfg: ViTConfig, params: dict[str, np.ndarray], source: str = "params") -> None:
    """Raise ParamTreeError listing every kind of missing, unexpected and mis-shaped key at once.

    A config whose tree has over twice the tensors given (depth 10**6 against a small file) is
    refused by the counts alone, before its tree is built: it cannot be a near miss worth listing
    key by key, and the tree would cost time and memory in proportion to the config."""
    tensors, values = tree_size(cfg)
    if tensors > 2 * len(params) + _ALLOWANCE:
        raise ParamTreeError(
            f"{source} does not match the config: the config has {size_text(tensors)} tensors "
            f"({size_text(values)} values, depth {size_text(cfg.depth)}); the tree has {len(params)}"
        )
    problems = tree_problems(param_shapes(cfg), params)
    if problems:
        raise ParamTreeError(f"{source} does not match the config:\n  " + "\n  ".join(problems))
