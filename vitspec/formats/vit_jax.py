"""google-research/vision_transformer's `.npz` (`vit_jax`): the table and the config its names show.

Paths follow vit_jax/models_vit.py (as timm's `_load_weights` reads them): `embedding`, `cls`,
`Transformer/posembed_input/pos_embedding` [1, T, D] (added after the class token is prepended,
so it has a row for it), `Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1,
LayerNorm_2, MlpBlock_3}`, `Transformer/encoder_norm`, `pre_logits`, `head`. Attention kernels
keep flax's head axes, so the heads are visible.

The model has classifier 'token' / 'token_unpooled' (class token) and 'gap' / 'unpooled' (none),
a learned position embedding, biased q/k/v and nothing else: no registers, MAP pooling, qk-norm,
LayerScale or fc_norm.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import Format
from vitspec.formats.big_vision import attention_rules, dense_rules, flax_facts, mlp_rules, norm_rules
from vitspec.formats.inference import Convention, Facts
from vitspec.formats.table import Layout, Rule, rule, token_rule

NAME = "vit_jax"
POSEMB = "Transformer/posembed_input/pos_embedding"


def embedding_rules(cfg: ViTConfig) -> list[Rule]:
    """The patch embedding and the class token, which Scenic's ViT names alike."""
    table = [
        rule("patch_embed/kernel", "embedding/kernel", Layout.RESHAPE, cfg),
        rule("patch_embed/bias", "embedding/bias", Layout.RESHAPE, cfg),
    ]
    return table + ([token_rule("cls_token", "cls", cfg)] if cfg.class_token else [])


def _table(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    table = embedding_rules(cfg) + [token_rule("pos_embed", POSEMB, cfg)]
    for i in range(cfg.depth):
        ref, native = f"blocks/{i}", f"Transformer/encoderblock_{i}"
        table += norm_rules(f"{ref}/norm1", f"{native}/LayerNorm_0", cfg)
        table += attention_rules(f"{ref}/attn", f"{native}/MultiHeadDotProductAttention_1", cfg, True, False)
        table += norm_rules(f"{ref}/norm2", f"{native}/LayerNorm_2", cfg)
        table += mlp_rules(f"{ref}/mlp", f"{native}/MlpBlock_3", cfg)
    table += norm_rules("norm", "Transformer/encoder_norm", cfg)
    if cfg.representation_size:
        table += dense_rules("pre_logits", "pre_logits", cfg)
    if cfg.num_classes:
        table += dense_rules("head", "head", cfg)
    return table


def _cannot_express(cfg: ViTConfig) -> list[str]:
    checks = [
        (cfg.num_registers == 0, f"no register tokens (config has {cfg.num_registers})"),
        (cfg.pool != "map", "no MAP pooling (classifier is token, gap or unpooled)"),
        (cfg.pool != "gap" or not cfg.class_token, "'gap' models have no class token"),
        (cfg.posemb == "learned", f"the position embedding is always learned (config: {cfg.posemb!r})"),
        (
            not cfg.class_token or cfg.posemb_on_cls,
            "the position embedding always covers the class token (config: posemb_on_cls=False)",
        ),
        (cfg.qkv_bias, "q/k/v always have biases (config: qkv_bias=False)"),
        (not cfg.qk_norm, "no qk-norm"),
        (cfg.layer_scale is None, "no LayerScale"),
        (not cfg.fc_norm, "no fc_norm (the encoder norm is before pooling)"),
        (
            not cfg.class_attention_depth,
            f"no class-attention blocks (CaiT; config: class_attention_depth={cfg.class_attention_depth})",
        ),
        (not cfg.talking_heads, "no talking heads"),
        (not cfg.pre_norm, "no LayerNorm before the blocks (config: pre_norm=True)"),
        (cfg.patch_bias, "the patch embedding always has a bias (config: patch_bias=False)"),
        (cfg.final_norm, "always an encoder_norm (config: final_norm=False)"),
        (cfg.proj_bias, "attention output and MLP layers always have biases (config: proj_bias=False)"),
        (not cfg.distilled, "no distillation token (config: distilled=True)"),
        (
            cfg.attention_dim == cfg.width,
            f"attention as wide as the model (config: attention_dim={cfg.attention_dim})",
        ),
        (cfg.pool not in ("max", "avgmax", "sum"), f"classifier token or gap (config: pool={cfg.pool!r})"),
        (
            not (cfg.pool_include_prefix and cfg.num_prefix_tokens),
            "gap pools the patches only (config: pool_include_prefix=True)",
        ),
    ]
    return [reason for ok, reason in checks if not ok]


def _facts(native: Mapping[str, np.ndarray]) -> Facts:
    return flax_facts(
        native, "vit_jax (vision_transformer)", "MultiHeadDotProductAttention_1", "MlpBlock_3", POSEMB
    )


FORMAT = Format(
    name=NAME,
    description="google-research/vision_transformer .npz",
    convention=Convention(
        "vision_transformer", gelu="tanh", ln_eps=1e-6, posemb_absent="learned", posemb_on_cls=True
    ),
    build_table=_table,
    cannot_express=_cannot_express,
    read_facts=_facts,
    suffixes=(".npz",),
)
