"""big_vision's ViT parameter tree: the flax backend's layout (`flax`) and big_vision's own (`big_vision`).

Paths follow big_vision/models/vit.py: `embedding` (conv HWIO), `cls`, `pos_embedding` (added to
the patches before the class token is prepended), `Transformer/encoderblock_{i}/{LayerNorm_0,
MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}`, `Transformer/encoder_norm`,
`MAPHead_0`, `pre_logits`, `head`. Attention kernels keep flax's head axes: q/k/v [D, H, dh]
(biases [H, dh]), out [H, dh, D], so the heads are visible.

Three formats share the one table:
- `flax`: the flax backend's tree (backends/flax_vit), every ViTConfig. Knobs big_vision lacks use
  the backend's names: `dist` [1, 1, D], `reg` [1, R, D], `pre_norm`, `query_ln`/`key_ln`,
  `talk_logits`/`talk_weights` [H, H], `LayerScale_0`/`LayerScale_1`, `fc_norm`, `head_dist`, and
  for CaiT `Transformer/classblock_{j}`; a missing `embedding/bias`, `encoder_norm` or
  `out/bias` + MLP biases is patch_bias, final_norm or proj_bias False.
- `big_vision`: what big_vision's `models/vit.py` can apply, and nothing else: a config with a knob
  its code lacks is refused naming each one (`cannot_express`).
- `big_vision_scan`: `big_vision` written as `vit.Model(scan=True)` stores it: the blocks stacked
  under `Transformer/encoderblock/...` with a leading depth axis (vitspec.formats.flax_trees).
All three read both block layouts; a two-tower checkpoint's image tower (`img/`) is taken out of
the file before (vitspec.formats.flax_trees.image_tower).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import Format, count_blocks, optional_dim, require
from vitspec.formats.big_vision_code import big_vision_construction, big_vision_lacks
from vitspec.formats.flags import Note, Told
from vitspec.formats.flax_trees import is_scanned, scan_note, stacked, unstacked
from vitspec.formats.inference import Convention, Facts
from vitspec.formats.lazy import LazyTensors
from vitspec.formats.table import Layout, Rule, rule, token_rule

NAME = "flax"
BIG_VISION_NAME = "big_vision"
SCAN_NAME = "big_vision_scan"

__all__ = ["FLAX", "FORMAT", "FORMAT_SCAN", "big_vision_construction", "flax_facts"]


def norm_rules(ref: str, native: str, cfg: ViTConfig) -> list[Rule]:
    return [rule(f"{ref}/{leaf}", f"{native}/{leaf}", Layout.RESHAPE, cfg) for leaf in ("scale", "bias")]


def dense_rules(ref: str, native: str, cfg: ViTConfig, bias: bool = True) -> list[Rule]:
    leaves = ("kernel", "bias") if bias else ("kernel",)
    return [rule(f"{ref}/{leaf}", f"{native}/{leaf}", Layout.RESHAPE, cfg) for leaf in leaves]


def attention_rules(
    ref: str,
    native: str,
    cfg: ViTConfig,
    qkv_bias: bool,
    qk_norm: bool,
    talking_heads: bool = False,
    inner: int | None = None,
    out_bias: bool = True,
) -> list[Rule]:
    """flax MultiHeadDotProductAttention: head-major columns of [D, inner] are [D, H, dh] row-major,
    inner = H x dh (default: the config's attention_dim)."""
    d, h = cfg.width, cfg.num_heads
    dh = (inner or cfg.attention_dim) // h
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
    if out_bias:
        rules.append(rule(f"{ref}/out/bias", f"{native}/out/bias", Layout.RESHAPE, cfg))
    return rules


def mlp_rules(ref: str, native: str, cfg: ViTConfig, bias: bool = True) -> list[Rule]:
    return dense_rules(f"{ref}/fc1", f"{native}/Dense_0", cfg, bias) + dense_rules(
        f"{ref}/fc2", f"{native}/Dense_1", cfg, bias
    )


def block_rules(ref: str, native: str, cfg: ViTConfig, qk_norm: bool, talking_heads: bool) -> list[Rule]:
    """A pre-norm block: a ViT's `encoderblock_{i}`, CaiT's `encoderblock_{i}` and `classblock_{j}`."""
    rules = norm_rules(f"{ref}/norm1", f"{native}/LayerNorm_0", cfg)
    rules += attention_rules(
        f"{ref}/attn",
        f"{native}/MultiHeadDotProductAttention_0",
        cfg,
        cfg.qkv_bias,
        qk_norm,
        talking_heads,
        out_bias=cfg.proj_bias,
    )
    if cfg.layer_scale is not None:
        rules.append(rule(f"{ref}/ls1/scale", f"{native}/LayerScale_0/scale", Layout.RESHAPE, cfg))
    rules += norm_rules(f"{ref}/norm2", f"{native}/LayerNorm_1", cfg)
    rules += mlp_rules(f"{ref}/mlp", f"{native}/MlpBlock_0", cfg, cfg.proj_bias)
    if cfg.layer_scale is not None:
        rules.append(rule(f"{ref}/ls2/scale", f"{native}/LayerScale_1/scale", Layout.RESHAPE, cfg))
    return rules


def _table(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    table = [rule("patch_embed/kernel", "embedding/kernel", Layout.RESHAPE, cfg)]
    if cfg.patch_bias:
        table.append(rule("patch_embed/bias", "embedding/bias", Layout.RESHAPE, cfg))
    for ref, native, present in (
        ("cls_token", "cls", cfg.class_token),
        ("dist_token", "dist", cfg.distilled),
        ("reg_tokens", "reg", cfg.num_registers),
        ("pos_embed", "pos_embedding", cfg.posemb == "learned"),
    ):
        if present:
            table.append(token_rule(ref, native, cfg))
    if cfg.pre_norm:
        table += norm_rules("pre_norm", "pre_norm", cfg)
    for i in range(cfg.depth):
        table += block_rules(
            f"blocks/{i}", f"Transformer/encoderblock_{i}", cfg, cfg.qk_norm, cfg.talking_heads
        )
    for j in range(cfg.class_attention_depth):
        table += block_rules(f"class_blocks/{j}", f"Transformer/classblock_{j}", cfg, False, False)
    if cfg.final_norm and not cfg.fc_norm:
        table += norm_rules("norm", "Transformer/encoder_norm", cfg)
    if cfg.pool == "map":  # always biased, over the model's width
        table.append(token_rule("map_head/probe", "MAPHead_0/probe", cfg))
        table += attention_rules(
            "map_head/attn", "MAPHead_0/MultiHeadDotProductAttention_0", cfg, True, False, inner=cfg.width
        )
        table += norm_rules("map_head/norm", "MAPHead_0/LayerNorm_0", cfg)
        table += mlp_rules("map_head/mlp", "MAPHead_0/MlpBlock_0", cfg)
    if cfg.fc_norm:
        table += norm_rules("fc_norm", "fc_norm", cfg)
    if cfg.representation_size:
        table += dense_rules("pre_logits", "pre_logits", cfg)
    if cfg.num_classes:
        table += dense_rules("head", "head", cfg)
        if cfg.distilled:
            table += dense_rules("head_dist", "head_dist", cfg)
    return table


def flax_facts(
    native: Mapping[str, np.ndarray], fmt: str, attention: str, mlp: str, posemb_key: str
) -> Facts:
    """Facts of a flax ViT tree; big_vision and vision_transformer differ only in these names."""
    ph, pw, channels, width = require(native, "embedding/kernel", fmt).shape
    first = "Transformer/encoderblock_0"
    _, heads, head_dim = require(native, f"{first}/{attention}/query/kernel", fmt).shape
    class_block = r"Transformer/classblock_(\d+)/LayerNorm_0/scale"
    class_depth = (
        count_blocks(native, class_block, fmt) if any(re.fullmatch(class_block, k) for k in native) else 0
    )
    fc_norm = "fc_norm/scale" in native
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
        fc_norm=fc_norm,
        map_head="MAPHead_0/probe" in native,
        heads=int(heads),
        talking_heads=f"{first}/{attention}/talk_logits/kernel" in native,
        class_attention_depth=class_depth,
        class_attention_mlp_dim=optional_dim(native, "Transformer/classblock_0/MlpBlock_0/Dense_0/kernel", 1),
        pre_norm="pre_norm/scale" in native,
        patch_bias="embedding/bias" in native,
        final_norm=fc_norm or "Transformer/encoder_norm/scale" in native,
        proj_bias=f"{first}/{attention}/out/bias" in native,
        distilled="dist" in native,
        attention_dim=int(heads) * int(head_dim),
    )


def _facts(native: Mapping[str, np.ndarray]) -> Facts:
    return flax_facts(
        native, "flax (big_vision)", "MultiHeadDotProductAttention_0", "MlpBlock_0", "pos_embedding"
    )


@dataclasses.dataclass(frozen=True)
class FlaxFormat(Format):
    """A big_vision-style format: reads plain and scanned block layouts alike; `scan` writes the
    blocks stacked (big_vision's `scan=True`)."""

    scan: bool = False

    def reference_view(self, native: Mapping[str, np.ndarray], cfg: ViTConfig) -> LazyTensors:
        return super().reference_view(unstacked(native, self.name), cfg)

    def native_view(self, params: Mapping[str, np.ndarray], cfg: ViTConfig) -> LazyTensors:
        view = super().native_view(params, cfg)
        return stacked(view, self.name) if self.scan else view

    def read_config(
        self, native: Mapping[str, np.ndarray], given: Told, with_notes: bool = True
    ) -> tuple[ViTConfig, list[Note]]:
        cfg, notes = super().read_config(unstacked(native, self.name), given, with_notes)
        return cfg, notes + ([scan_note(native)] if with_notes and is_scanned(native) else [])


def _flax_format(name: str, description: str, cannot_express, scan: bool = False) -> FlaxFormat:
    return FlaxFormat(
        name=name,
        description=description,
        convention=Convention(
            "big_vision", gelu="tanh", ln_eps=1e-6, posemb_absent="sincos2d", posemb_on_cls=False
        ),
        build_table=_table,
        cannot_express=cannot_express,
        read_facts=_facts,
        suffixes=(".npz", ".msgpack"),
        scan=scan,
    )


FLAX = _flax_format(
    NAME, "the flax backend's big_vision-style tree, every knob (.npz, .msgpack)", lambda cfg: []
)
FORMAT = _flax_format(
    BIG_VISION_NAME, "big_vision models/vit.py params (.npz of '/'-joined paths, .msgpack)", big_vision_lacks
)
FORMAT_SCAN = _flax_format(
    SCAN_NAME,
    "big_vision params with the blocks stacked, as vit.Model(scan=True)",
    big_vision_lacks,
    scan=True,
)
