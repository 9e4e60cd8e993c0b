"""big_vision's ViT parameter tree (`flax`): the table and the config its names show.

Paths follow big_vision/models/vit.py: `embedding` (conv HWIO), `cls`, `pos_embedding` (added to
the patches before the class token is prepended), `Transformer/encoderblock_{i}/{LayerNorm_0,
MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}`, `Transformer/encoder_norm`,
`MAPHead_0`, `pre_logits`, `head`. Attention kernels keep flax's head axes: q/k/v [D, H, dh]
(biases [H, dh]), out [H, dh, D], so the heads are visible. Knobs big_vision lacks use the names
the flax backend (backends/flax_vit) gives them: `reg` [1, R, D], `query_ln`/`key_ln`,
`talk_logits`/`talk_weights` [H, H] (talking heads), `LayerScale_0`/`LayerScale_1`, `fc_norm`, and
for CaiT `Transformer/classblock_{j}` (a block's names; backends/flax_vit/cait.py); with those,
every ViTConfig is expressible.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import Format, count_blocks, optional_dim, require
from vitspec.formats.inference import Convention, Facts
from vitspec.formats.table import Layout, Rule, rule, token_rule

NAME = "flax"


def norm_rules(ref: str, native: str, cfg: ViTConfig) -> list[Rule]:
    return [rule(f"{ref}/{leaf}", f"{native}/{leaf}", Layout.RESHAPE, cfg) for leaf in ("scale", "bias")]


def dense_rules(ref: str, native: str, cfg: ViTConfig) -> list[Rule]:
    return [rule(f"{ref}/{leaf}", f"{native}/{leaf}", Layout.RESHAPE, cfg) for leaf in ("kernel", "bias")]


def attention_rules(
    ref: str, native: str, cfg: ViTConfig, qkv_bias: bool, qk_norm: bool, talking_heads: bool = False
) -> list[Rule]:
    """flax MultiHeadDotProductAttention: head-major columns of [D, D] are [D, H, dh] row-major."""
    d, h, dh = cfg.width, cfg.num_heads, cfg.head_dim
    rules = []
    for name in ("query", "key", "value"):
        rules.append(rule(f"{ref}/{name}/kernel", f"{native}/{name}/kernel", Layout.RESHAPE, cfg, (d, h, dh)))
        if qkv_bias:
            rules.append(rule(f"{ref}/{name}/bias", f"{native}/{name}/bias", Layout.RESHAPE, cfg, (h, dh)))
    if qk_norm:
        rules += norm_rules(f"{ref}/q_norm", f"{native}/query_ln", cfg)
        rules += norm_rules(f"{ref}/k_norm", f"{native}/key_ln", cfg)
    if talking_heads:
        rules += dense_rules(f"{ref}/talk_logits", f"{native}/talk_logits", cfg)
        rules += dense_rules(f"{ref}/talk_weights", f"{native}/talk_weights", cfg)
    rules.append(rule(f"{ref}/out/kernel", f"{native}/out/kernel", Layout.RESHAPE, cfg, (h, dh, d)))
    rules.append(rule(f"{ref}/out/bias", f"{native}/out/bias", Layout.RESHAPE, cfg))
    return rules


def mlp_rules(ref: str, native: str, cfg: ViTConfig) -> list[Rule]:
    return dense_rules(f"{ref}/fc1", f"{native}/Dense_0", cfg) + dense_rules(
        f"{ref}/fc2", f"{native}/Dense_1", cfg
    )


def block_rules(ref: str, native: str, cfg: ViTConfig, qk_norm: bool, talking_heads: bool) -> list[Rule]:
    """A pre-norm block: a ViT's `encoderblock_{i}`, CaiT's `encoderblock_{i}` and `classblock_{j}`."""
    rules = norm_rules(f"{ref}/norm1", f"{native}/LayerNorm_0", cfg)
    rules += attention_rules(
        f"{ref}/attn", f"{native}/MultiHeadDotProductAttention_0", cfg, cfg.qkv_bias, qk_norm, talking_heads
    )
    if cfg.layer_scale is not None:
        rules.append(rule(f"{ref}/ls1/scale", f"{native}/LayerScale_0/scale", Layout.RESHAPE, cfg))
    rules += norm_rules(f"{ref}/norm2", f"{native}/LayerNorm_1", cfg)
    rules += mlp_rules(f"{ref}/mlp", f"{native}/MlpBlock_0", cfg)
    if cfg.layer_scale is not None:
        rules.append(rule(f"{ref}/ls2/scale", f"{native}/LayerScale_1/scale", Layout.RESHAPE, cfg))
    return rules


def _table(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    table = [
        rule("patch_embed/kernel", "embedding/kernel", Layout.RESHAPE, cfg),
        rule("patch_embed/bias", "embedding/bias", Layout.RESHAPE, cfg),
    ]
    if cfg.class_token:
        table.append(token_rule("cls_token", "cls", cfg))
    if cfg.num_registers:
        table.append(token_rule("reg_tokens", "reg", cfg))
    if cfg.posemb == "learned":
        table.append(token_rule("pos_embed", "pos_embedding", cfg))
    for i in range(cfg.depth):
        table += block_rules(
            f"blocks/{i}", f"Transformer/encoderblock_{i}", cfg, cfg.qk_norm, cfg.talking_heads
        )
    for j in range(cfg.class_attention_depth):
        table += block_rules(f"class_blocks/{j}", f"Transformer/classblock_{j}", cfg, False, False)
    if not cfg.fc_norm:
        table += norm_rules("norm", "Transformer/encoder_norm", cfg)
    if cfg.pool == "map":
        table.append(token_rule("map_head/probe", "MAPHead_0/probe", cfg))
        table += attention_rules(
            "map_head/attn", "MAPHead_0/MultiHeadDotProductAttention_0", cfg, qkv_bias=True, qk_norm=False
        )
        table += norm_rules("map_head/norm", "MAPHead_0/LayerNorm_0", cfg)
        table += mlp_rules("map_head/mlp", "MAPHead_0/MlpBlock_0", cfg)
    if cfg.fc_norm:
        table += norm_rules("fc_norm", "fc_norm", cfg)
    if cfg.representation_size:
        table += dense_rules("pre_logits", "pre_logits", cfg)
    if cfg.num_classes:
        table += dense_rules("head", "head", cfg)
    return table


def _cannot_express(cfg: ViTConfig) -> list[str]:
    return []


def flax_facts(
    native: Mapping[str, np.ndarray], fmt: str, attention: str, mlp: str, posemb_key: str
) -> Facts:
    """Facts of a flax ViT tree; big_vision and vision_transformer differ only in these names."""
    ph, pw, channels, width = require(native, "embedding/kernel", fmt).shape
    first = "Transformer/encoderblock_0"
    _, heads, _ = require(native, f"{first}/{attention}/query/kernel", fmt).shape
    class_block = r"Transformer/classblock_(\d+)/LayerNorm_0/scale"
    class_depth = (
        count_blocks(native, class_block, fmt) if any(re.fullmatch(class_block, k) for k in native) else 0
    )
    return Facts(
        width=int(width),
        depth=count_blocks(native, r"Transformer/encoderblock_(\d+)/LayerNorm_0/scale", fmt),
        mlp_dim=int(require(native, f"{first}/{mlp}/Dense_0/kernel", fmt).shape[1]),
        patch_size=(int(ph), int(pw)),
        in_channels=int(channels),
        num_classes=optional_dim(native, "head/kernel", 1) or 0,
        representation_size=optional_dim(native, "pre_logits/kernel", 1),
        class_token="cls" in native,
        num_registers=optional_dim(native, "reg", 1) or 0,
        posemb_rows=optional_dim(native, posemb_key, 1),
        qkv_bias=f"{first}/{attention}/query/bias" in native,
        qk_norm=f"{first}/{attention}/query_ln/scale" in native,
        layer_scale=f"{first}/LayerScale_0/scale" in native,
        fc_norm="fc_norm/scale" in native,
        map_head="MAPHead_0/probe" in native,
        heads=int(heads),
        talking_heads=f"{first}/{attention}/talk_logits/kernel" in native,
        class_attention_depth=class_depth,
        class_attention_mlp_dim=optional_dim(native, "Transformer/classblock_0/MlpBlock_0/Dense_0/kernel", 1),
    )


def _facts(native: Mapping[str, np.ndarray]) -> Facts:
    return flax_facts(
        native, "flax (big_vision)", "MultiHeadDotProductAttention_0", "MlpBlock_0", "pos_embedding"
    )


FORMAT = Format(
    name=NAME,
    description="big_vision / flax ViT params (.npz of '/'-joined paths, .msgpack)",
    convention=Convention(
        "big_vision", gelu="tanh", ln_eps=1e-6, posemb_absent="sincos2d", posemb_on_cls=False
    ),
    build_table=_table,
    cannot_express=_cannot_express,
    read_facts=_facts,
    suffixes=(".npz", ".msgpack"),
)


BIG_VISION_POOL = {"token": "tok", "gap": "gap", "map": "map", "none": "none"}
BIG_VISION_POSEMB = {"learned": "learn", "sincos2d": "sincos2d"}


def big_vision_construction(cfg: ViTConfig) -> str:
    """The big_vision `vit.Model` a file of this config applies in, then what its published code
    computes otherwise (each needs a change there, or the flax backend, which has every knob)."""
    if cfg.class_attention_depth:
        return (
            "no big_vision model: big_vision has no CaiT (class-attention blocks"
            + (", talking heads" if cfg.talking_heads else "")
            + "); backends.flax_vit.CaiT applies this tree"
        )
    kwargs = dict(
        num_classes=cfg.num_classes,
        patch_size=tuple(cfg.patch_size),
        width=cfg.width,
        depth=cfg.depth,
        mlp_dim=cfg.mlp_dim,
        num_heads=cfg.num_heads,
        posemb=BIG_VISION_POSEMB.get(cfg.posemb, cfg.posemb),
        rep_size=cfg.representation_size or False,
        pool_type=BIG_VISION_POOL[cfg.pool],
    )
    model = "big_vision.models.vit.Model(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    differences = []
    if cfg.gelu == "exact":
        differences.append(
            "exact GELU: its MlpBlock calls nn.gelu, the tanh form; use nn.gelu(x, approximate=False)"
        )
    if cfg.ln_eps != 1e-6:
        differences.append(f"LayerNorm eps {cfg.ln_eps:g}: its LayerNorms use 1e-6")
    if cfg.posemb == "learned" and cfg.posemb_on_cls and cfg.class_token:
        differences.append("pos_embedding has a class-token row: add pos_embedding[:, :1] to cls and drop it")
    if cfg.posemb == "none":
        differences.append("no position embedding: big_vision always adds one")
    if cfg.class_token and cfg.pool != "token":
        differences.append(
            f"a class token with pool {cfg.pool!r}: big_vision has a class token only with 'tok'"
        )
    unsupported = [
        name
        for name, present in (
            ("registers", cfg.num_registers),
            ("qk-norm", cfg.qk_norm),
            ("LayerScale", cfg.layer_scale),
            ("talking heads", cfg.talking_heads),
            ("fc_norm", cfg.fc_norm),
            ("q/k/v without biases", not cfg.qkv_bias),
        )
        if present
    ]
    if unsupported:
        differences.append(f"{', '.join(unsupported)}: not in big_vision's code (backends.flax_vit has them)")
    return model + "".join(f"; {d}" for d in differences)
