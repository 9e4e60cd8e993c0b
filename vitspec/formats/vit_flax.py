"""conceptofmind/vit-flax's `ViT` (`vit_flax`): the table and the config its names show.

Paths follow vit_flax/vit.py as linen names them: `Dense_0` (the patch projection, a Dense over
patches flattened in (row, column, channel) order: our patch kernel, reshaped), `cls` [1, 1, D],
`pos_embedding` [1, 1 + patches, D] (added after the class token is prepended), `Transformer_0` with,
per block i, `PreNorm_{2i}/LayerNorm_0`, `Attention_i/Dense_0` (q, k and v in one bias-free kernel
[D, 3 x heads x dim_head], split in three along its output axis: family.Group), `Attention_i/Dense_1`
(the output projection), `PreNorm_{2i+1}/LayerNorm_0`, `FeedForward_i/{Dense_0, Dense_1}`; then the
top-level `LayerNorm_0` and `Dense_1`, the head. The wrappers are built inside `Transformer`'s
compact call, which is why linen numbers PreNorm over both kinds of sub-block.

The math is our pre-norm ViT with fc_norm: no norm after the blocks, the pool ('cls': the class
token, our 'token'; 'mean': every token, the class token included, our 'gap' with
pool_include_prefix), then LayerNorm and Dense. `ViT` fixes dim_head = 64 (a class attribute), so
the heads are the attention width / 64 and `attention_dim` is 64 x heads, whatever the model width.
What the file cannot show: the patch size (the Dense sees ph x pw x C inputs: --patch-size, the
channels follow) and the pool ('cls' and 'mean' have the same parameters: --pool token or gap).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import count_blocks, optional_dim, require
from vitspec.formats.big_vision import dense_rules, norm_rules
from vitspec.formats.family import FamilyFormat, Group, checks, heads_of
from vitspec.formats.flags import Note, Told, told_value
from vitspec.formats.inference import Convention, Facts
from vitspec.formats.table import FormatError, Layout, Rule, rule, token_rule

NAME = "vit_flax"
DIM_HEAD = 64  # vit_flax.vit.ViT.dim_head: a class attribute, not a constructor argument
QKV = ("query", "key", "value")
FIRST = "Transformer_0/Attention_0"


def _qkv(i: int) -> str:
    return f"Transformer_0/Attention_{i}/Dense_0/kernel"


def _groups(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Group]:
    return [Group(tuple(f"{_qkv(i)}:{part}" for part in QKV), (_qkv(i),), axis=1) for i in range(cfg.depth)]


def _table(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    ph, pw = cfg.patch_size
    table = [
        rule(
            "patch_embed/kernel",
            "Dense_0/kernel",
            Layout.RESHAPE,
            cfg,
            (ph * pw * cfg.in_channels, cfg.width),
        ),
        rule("patch_embed/bias", "Dense_0/bias", Layout.RESHAPE, cfg),
        token_rule("cls_token", "cls", cfg),
        token_rule("pos_embed", "pos_embedding", cfg),
    ]
    for i in range(cfg.depth):
        ref, t = f"blocks/{i}", "Transformer_0"
        table += norm_rules(f"{ref}/norm1", f"{t}/PreNorm_{2 * i}/LayerNorm_0", cfg)
        table += [rule(f"{ref}/attn/{p}/kernel", f"{_qkv(i)}:{p}", Layout.RESHAPE, cfg) for p in QKV]
        table += dense_rules(f"{ref}/attn/out", f"{t}/Attention_{i}/Dense_1", cfg)
        table += norm_rules(f"{ref}/norm2", f"{t}/PreNorm_{2 * i + 1}/LayerNorm_0", cfg)
        table += dense_rules(f"{ref}/mlp/fc1", f"{t}/FeedForward_{i}/Dense_0", cfg)
        table += dense_rules(f"{ref}/mlp/fc2", f"{t}/FeedForward_{i}/Dense_1", cfg)
    return table + norm_rules("fc_norm", "LayerNorm_0", cfg) + dense_rules("head", "Dense_1", cfg)


def _cannot_express(cfg: ViTConfig) -> list[str]:
    return checks(
        (cfg.class_token, "a class token always (config: class_token=False)"),
        (cfg.pool in ("token", "gap"), f"pool is 'cls' (token) or 'mean' (gap) (config: {cfg.pool!r})"),
        (
            cfg.pool != "gap" or cfg.pool_include_prefix,
            "its mean pools every token, the class token included (config: pool_include_prefix=False)",
        ),
        (cfg.posemb == "learned", f"the position embedding is always learned (config: {cfg.posemb!r})"),
        (cfg.posemb_on_cls, "the position embedding covers the class token (config: posemb_on_cls=False)"),
        (cfg.num_registers == 0, f"no register tokens (config has {cfg.num_registers})"),
        (not cfg.distilled, "no distillation token"),
        (cfg.fc_norm, "LayerNorm after the pool, none before it: fc_norm (config: fc_norm=False)"),
        (not cfg.pre_norm, "no pre-norm"),
        (cfg.patch_bias, "the patch projection always has a bias (config: patch_bias=False)"),
        (not cfg.qkv_bias, "q/k/v are one Dense without bias (config: qkv_bias=True)"),
        (cfg.proj_bias, "the attention output and MLP always have biases (config: proj_bias=False)"),
        (
            cfg.head_dim == DIM_HEAD,
            f"ViT fixes dim_head = {DIM_HEAD} (config: attention_dim {cfg.attention_dim} over "
            f"{cfg.num_heads} heads is {cfg.head_dim} per head)",
        ),
        (
            cfg.num_heads != 1 or cfg.head_dim != cfg.width,
            "one head as wide as the model: vit-flax then skips the output projection",
        ),
        (not cfg.qk_norm, "no qk-norm"),
        (cfg.layer_scale is None, "no LayerScale"),
        (not cfg.talking_heads, "no talking heads"),
        (not cfg.class_attention_depth, "no class-attention blocks (CaiT)"),
        (cfg.representation_size is None, "no pre-logits layer"),
        (cfg.num_classes > 0, "the head Dense_1 is always there (config: num_classes=0)"),
    )


def _facts(native: Mapping[str, np.ndarray]) -> Facts:
    fmt = "vit_flax (vit-flax)"
    _, width = require(native, "Dense_0/kernel", fmt).shape
    inner = int(require(native, _qkv(0), fmt).shape[1]) // 3
    if f"{FIRST}/Dense_1/kernel" not in native:
        raise FormatError(
            f"a {fmt} checkpoint without {FIRST}/Dense_1: vit-flax skips the attention's output "
            "projection when heads == 1 and dim_head == dim, an attention vitspec does not express"
        )
    return Facts(
        width=int(width),
        depth=count_blocks(native, r"Transformer_0/Attention_(\d+)/Dense_0/kernel", fmt),
        mlp_dim=int(require(native, "Transformer_0/FeedForward_0/Dense_0/kernel", fmt).shape[1]),
        patch_size=None,  # the Dense shows ph x pw x C only: _told_patch
        in_channels=None,
        num_classes=optional_dim(native, "Dense_1/kernel", 1) or 0,
        representation_size=None,
        class_token="cls" in native,
        num_registers=0,
        posemb_rows=optional_dim(native, "pos_embedding", 1),
        qkv_bias=False,
        qk_norm=False,
        layer_scale=False,
        fc_norm="LayerNorm_0/scale" in native,
        map_head=False,
        heads=heads_of(inner, DIM_HEAD, f"the {fmt} attention ({_qkv(0)} / 3)"),
        attention_dim=inner,
    )


def _told_only(native: Mapping[str, np.ndarray]) -> dict[str, str]:
    return {
        "patch_size": "its patch projection is a Dense over ph x pw x C inputs",
        "pool": "'cls' (token) and 'mean' (gap) have the same parameters",
    }


def _told_patch(native: Mapping[str, np.ndarray], facts: Facts, given: Told) -> tuple[Facts, list[Note]]:
    """The patch size told, and the channels that the Dense's inputs then hold."""
    notes: list[Note] = []
    ph, pw = told_value("patch_size", given, notes)
    inputs = int(np.shape(native["Dense_0/kernel"])[0])
    if inputs % (ph * pw):
        raise FormatError(
            f"inconsistent flags: {given['patch_size'].source}, but the patch projection Dense_0 has "
            f"{inputs} inputs, not a multiple of {ph} x {pw} pixels"
        )
    return facts._replace(patch_size=(ph, pw), in_channels=inputs // (ph * pw)), notes


def _settle(cfg: ViTConfig) -> ViTConfig:
    """vit-flax's mean is over every token, the class token included."""
    return cfg.replace(pool_include_prefix=True) if cfg.pool == "gap" else cfg


FORMAT = FamilyFormat(
    name=NAME,
    description="conceptofmind/vit-flax ViT params (.msgpack, .npz of '/'-joined paths)",
    convention=Convention("vit-flax", gelu="tanh", ln_eps=1e-6, posemb_absent="learned", posemb_on_cls=True),
    build_table=_table,
    cannot_express=_cannot_express,
    read_facts=_facts,
    suffixes=(".msgpack", ".npz"),
    groups=_groups,
    told_only=_told_only,
    settle=_settle,
    told_facts=_told_patch,
)


def vit_flax_construction(cfg: ViTConfig) -> str:
    """The vit-flax `ViT(...)` whose parameters a file of this config is."""
    kwargs = dict(
        image_size=tuple(cfg.image_size),
        patch_size=tuple(cfg.patch_size),
        num_classes=cfg.num_classes,
        dim=cfg.width,
        depth=cfg.depth,
        heads=cfg.num_heads,
        mlp_dim=cfg.mlp_dim,
        pool="cls" if cfg.pool == "token" else "mean",
    )
    return "vit_flax.vit.ViT(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
