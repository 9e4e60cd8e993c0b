"""Scenic's baseline ViT (`scenic`): the table and the config its names show.

Paths follow scenic/projects/baselines/vit.py: `embedding` (conv HWIO), `cls` [1, 1, D] (classifier
'token' only), `Transformer/posembed_input/pos_embedding` [1, T, D] (added by the encoder after the
class token is prepended, so it has the class token's row), `Transformer/encoderblock_{i}/
{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1}}` (linen's
per-class numbering; flax's attention keeps the head axes, so the heads are visible),
`Transformer/encoder_norm`, `pre_logits` (Dense then tanh, as ours), `output_projection` (the head,
always present). Classifiers 'token', 'gap', 'gmp', 'gsp' are our pools token, gap, max, sum.

The file cannot show a fixed position embedding: without `posembed_input` the model adds Scenic's
'sinusoidal_1d' (over every token, the class token as row 0), 'sinusoidal_2d' (a square grid of
patches, no class token) or none, so reading one needs --posemb. Its GELU is flax's default tanh
form and its LayerNorms flax's epsilon 1e-6 (the convention, noted when read).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import count_blocks, optional_dim, require
from vitspec.formats.big_vision import block_rules, dense_rules, norm_rules
from vitspec.formats.family import FamilyFormat, checks
from vitspec.formats.inference import Convention, Facts
from vitspec.formats.table import Rule, token_rule
from vitspec.formats.vit_jax import POSEMB, embedding_rules

NAME = "scenic"
HEAD = "output_projection"
CLASSIFIERS = {"token": "token", "gap": "gap", "max": "gmp", "sum": "gsp"}  # our pool: Scenic's classifier
ATTENTION = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0"


def _table(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    table = embedding_rules(cfg)
    if cfg.posemb == "learned":
        table.append(token_rule("pos_embed", POSEMB, cfg))
    for i in range(cfg.depth):
        table += block_rules(f"blocks/{i}", f"Transformer/encoderblock_{i}", cfg, False, False)
    table += norm_rules("norm", "Transformer/encoder_norm", cfg)
    if cfg.representation_size:
        table += dense_rules("pre_logits", "pre_logits", cfg)
    return table + dense_rules("head", HEAD, cfg)


def _cannot_express(cfg: ViTConfig) -> list[str]:
    square = cfg.grid_size[0] == cfg.grid_size[1]
    return checks(
        (cfg.pool in CLASSIFIERS, f"classifier is token, gap, gmp or gsp (config: pool {cfg.pool!r})"),
        (cfg.class_token == (cfg.pool == "token"), "a class token exactly with classifier 'token'"),
        (not cfg.pool_include_prefix, "no prefix tokens to pool over (config: pool_include_prefix=True)"),
        (cfg.num_registers == 0, f"no register tokens (config has {cfg.num_registers})"),
        (not cfg.distilled, "no distillation token"),
        (cfg.posemb != "sincos2d", "no sincos2d position embedding (Scenic's 2-D one is sinusoidal_2d)"),
        (
            cfg.posemb not in ("learned", "sinusoidal_1d") or cfg.posemb_on_cls or not cfg.class_token,
            "the position embedding is added after the class token is prepended, so it covers it "
            "(config: posemb_on_cls=False)",
        ),
        (
            cfg.posemb != "sinusoidal_2d" or square,
            f"sinusoidal_2d needs a square patch grid (config: {cfg.grid_size[0]}x{cfg.grid_size[1]})",
        ),
        (cfg.final_norm, "the encoder always ends in encoder_norm (config: final_norm=False)"),
        (not cfg.fc_norm, "no fc_norm (encoder_norm is before pooling)"),
        (not cfg.pre_norm, "no pre-norm"),
        (cfg.patch_bias, "the patch embedding always has a bias (config: patch_bias=False)"),
        (cfg.qkv_bias, "q/k/v always have biases (config: qkv_bias=False)"),
        (cfg.proj_bias, "the attention output and MLP always have biases (config: proj_bias=False)"),
        (
            cfg.attention_dim == cfg.width,
            f"the attention is as wide as the model (config: attention_dim {cfg.attention_dim})",
        ),
        (not cfg.qk_norm, "no qk-norm"),
        (cfg.layer_scale is None, "no LayerScale"),
        (not cfg.talking_heads, "no talking heads"),
        (not cfg.class_attention_depth, "no class-attention blocks (CaiT)"),
        (cfg.num_classes > 0, "output_projection is always there (config: num_classes=0)"),
    )


def _facts(native: Mapping[str, np.ndarray]) -> Facts:
    fmt = "scenic"
    ph, pw, channels, width = require(native, "embedding/kernel", fmt).shape
    _, heads, head_dim = require(native, f"{ATTENTION}/query/kernel", fmt).shape
    mlp = require(native, "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel", fmt)
    return Facts(
        width=int(width),
        depth=count_blocks(native, r"Transformer/encoderblock_(\d+)/LayerNorm_0/scale", fmt),
        mlp_dim=int(mlp.shape[1]),
        patch_size=(int(ph), int(pw)),
        in_channels=int(channels),
        num_classes=optional_dim(native, f"{HEAD}/kernel", 1) or 0,
        representation_size=optional_dim(native, "pre_logits/kernel", 1),
        class_token="cls" in native,
        num_registers=0,
        posemb_rows=optional_dim(native, POSEMB, 1),
        qkv_bias=f"{ATTENTION}/query/bias" in native,
        qk_norm=False,
        layer_scale=False,
        fc_norm=False,
        map_head=False,
        heads=int(heads),
        attention_dim=int(heads * head_dim),
    )


def _told_only(native: Mapping[str, np.ndarray]) -> dict[str, str]:
    if POSEMB in native:
        return {}
    why = "without posembed_input the model adds sinusoidal_1d, sinusoidal_2d or none"
    return {"posemb": why}


FORMAT = FamilyFormat(
    name=NAME,
    description="Scenic baseline ViT params (.npz of '/'-joined paths, .msgpack)",
    # posemb_absent is never used: a file without posembed_input is read only with --posemb.
    convention=Convention("scenic", gelu="tanh", ln_eps=1e-6, posemb_absent="none", posemb_on_cls=True),
    build_table=_table,
    cannot_express=_cannot_express,
    read_facts=_facts,
    suffixes=(".npz", ".msgpack"),
    told_only=_told_only,
)


def scenic_construction(cfg: ViTConfig) -> str:
    """The Scenic `ViT(...)` whose parameters a file of this config is."""
    posemb = {"learned": "learned_1d"}.get(cfg.posemb, cfg.posemb)
    kwargs = dict(
        num_classes=cfg.num_classes,
        mlp_dim=cfg.mlp_dim,
        num_layers=cfg.depth,
        num_heads=cfg.num_heads,
        patches={"size": tuple(cfg.patch_size)},
        hidden_size=cfg.width,
        positional_embedding=posemb,
        representation_size=cfg.representation_size,
        classifier=CLASSIFIERS.get(cfg.pool, cfg.pool),
    )
    return "scenic.projects.baselines.vit.ViT(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
