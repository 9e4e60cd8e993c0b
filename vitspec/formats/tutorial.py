"""The from-scratch PyTorch tutorial's `ViTForClassfication` (`tutorial`): the table and the config its
names show.

Names follow tintn/vision-transformer-from-scratch vit.py, saved with
`torch.save(model.state_dict(), ...)`: `embedding.patch_embeddings.projection` (Conv2d),
`embedding.cls_token` [1, 1, D], `embedding.position_embeddings` [1, 1 + patches, D] (added after the
class token is prepended), `encoder.blocks.{i}` with `layernorm_1`, `attention.heads.{h}.{query,key,
value}` (one Linear per head: head h's rows of our kernel's transpose, joined by family.Group) or,
with `use_faster_attention`, one `attention.qkv_projection` (timm's fused layout), then
`attention.output_projection`, `layernorm_2`, `mlp.dense_1`, `mlp.dense_2`; and `classifier`.
Both attentions are read (the names tell which); the per-head one, the tutorial's default, is written.

The math is a pre-norm ViT without a final norm (final_norm=False): the classifier reads the class
token as the last block leaves it. Each head is hidden_size // heads wide (attention_dim is heads x
that). Not in the file: the GELU (the tutorial's NewGELUActivation, the tanh form) and the LayerNorm
epsilon (torch's default 1e-5), both the convention, noted when read; with the fused attention,
the heads (--heads).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import count_blocks, optional_dim, require
from vitspec.formats.family import FamilyFormat, Group, checks
from vitspec.formats.inference import Convention, Facts
from vitspec.formats.table import Layout, Rule, rule, token_rule

NAME = "tutorial"
QKV = ("query", "key", "value")
PATCH = "embedding.patch_embeddings.projection"
FUSED = "qkv_projection"


def _fused(native_keys: Collection[str] | None) -> bool:
    """Whether the file has FasterMultiHeadAttention's fused q/k/v (written files have per-head ones)."""
    return native_keys is not None and "encoder.blocks.0.attention.qkv_projection.weight" in native_keys


def _groups(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Group]:
    if _fused(native_keys):
        return []
    leaves = ("weight", "bias") if cfg.qkv_bias else ("weight",)
    return [
        Group(
            (f"encoder.blocks.{i}.attention.heads.{part}.{leaf}",),
            tuple(f"encoder.blocks.{i}.attention.heads.{h}.{part}.{leaf}" for h in range(cfg.num_heads)),
            axis=0,
        )
        for i in range(cfg.depth)
        for part in QKV
        for leaf in leaves
    ]


def _table(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    def row(ref, native, layout=Layout.RESHAPE):
        return rule(ref, native, layout, cfg)

    def linear(ref, native, bias=True):
        rows = [row(f"{ref}/kernel", f"{native}.weight", Layout.TRANSPOSE)]
        return rows + [row(f"{ref}/bias", f"{native}.bias")] if bias else rows

    def norm(ref, native):
        return [row(f"{ref}/scale", f"{native}.weight"), row(f"{ref}/bias", f"{native}.bias")]

    table = [
        row("patch_embed/kernel", f"{PATCH}.weight", Layout.CONV),
        row("patch_embed/bias", f"{PATCH}.bias"),
        token_rule("cls_token", "embedding.cls_token", cfg),
        token_rule("pos_embed", "embedding.position_embeddings", cfg),
    ]
    for i in range(cfg.depth):
        ref, native = f"blocks/{i}", f"encoder.blocks.{i}"
        table += norm(f"{ref}/norm1", f"{native}.layernorm_1")
        if _fused(native_keys):
            kernels = tuple(f"{ref}/attn/{p}/kernel" for p in QKV)
            table.append(row(kernels, f"{native}.attention.{FUSED}.weight", Layout.FUSED_TRANSPOSE))
            if cfg.qkv_bias:
                biases = tuple(f"{ref}/attn/{p}/bias" for p in QKV)
                table.append(row(biases, f"{native}.attention.{FUSED}.bias", Layout.FUSED))
        else:
            for part in QKV:
                table += linear(f"{ref}/attn/{part}", f"{native}.attention.heads.{part}", cfg.qkv_bias)
        table += linear(f"{ref}/attn/out", f"{native}.attention.output_projection")
        table += norm(f"{ref}/norm2", f"{native}.layernorm_2")
        table += linear(f"{ref}/mlp/fc1", f"{native}.mlp.dense_1")
        table += linear(f"{ref}/mlp/fc2", f"{native}.mlp.dense_2")
    return table + linear("head", "classifier")


def _cannot_express(cfg: ViTConfig) -> list[str]:
    (ih, iw), (ph, pw) = cfg.image_size, cfg.patch_size
    head_size = cfg.width // cfg.num_heads
    return checks(
        (ph == pw and ih == iw, f"square images and patches (config: {ih}x{iw} in {ph}x{pw} patches)"),
        (
            cfg.class_token and cfg.pool == "token",
            f"the classifier reads the class token (config: {cfg.pool!r})",
        ),
        (cfg.posemb == "learned", f"the position embedding is always learned (config: {cfg.posemb!r})"),
        (cfg.posemb_on_cls, "the position embedding covers the class token (config: posemb_on_cls=False)"),
        (cfg.num_registers == 0, f"no register tokens (config has {cfg.num_registers})"),
        (not cfg.distilled, "no distillation token"),
        (not cfg.final_norm, "no LayerNorm after the blocks (config: final_norm=True)"),
        (not cfg.fc_norm, "no fc_norm"),
        (not cfg.pre_norm, "no pre-norm"),
        (cfg.patch_bias, "the patch embedding always has a bias (config: patch_bias=False)"),
        (cfg.proj_bias, "the attention output and MLP always have biases (config: proj_bias=False)"),
        (
            cfg.attention_dim == cfg.num_heads * head_size,
            f"each head is hidden_size // heads = {head_size} wide (config: attention_dim "
            f"{cfg.attention_dim} over {cfg.num_heads} heads)",
        ),
        (not cfg.qk_norm, "no qk-norm"),
        (cfg.layer_scale is None, "no LayerScale"),
        (not cfg.talking_heads, "no talking heads"),
        (not cfg.class_attention_depth, "no class-attention blocks (CaiT)"),
        (cfg.representation_size is None, "no pre-logits layer"),
        (cfg.num_classes > 0, "the classifier is always there (config: num_classes=0)"),
    )


def _facts(native: Mapping[str, np.ndarray]) -> Facts:
    fmt = "tutorial (vision-transformer-from-scratch)"
    width, channels, ph, pw = require(native, f"{PATCH}.weight", fmt).shape
    first = "encoder.blocks.0.attention"
    if _fused(native.keys()):
        heads, qkv_bias = None, f"{first}.{FUSED}.bias" in native
    else:
        heads = count_blocks(native, rf"{first}\.heads\.(\d+)\.query\.weight", fmt)
        qkv_bias = f"{first}.heads.0.query.bias" in native
    return Facts(
        width=int(width),
        depth=count_blocks(native, r"encoder\.blocks\.(\d+)\.layernorm_1\.weight", fmt),
        mlp_dim=int(require(native, "encoder.blocks.0.mlp.dense_1.weight", fmt).shape[0]),
        patch_size=(int(ph), int(pw)),
        in_channels=int(channels),
        num_classes=optional_dim(native, "classifier.weight", 0) or 0,
        representation_size=None,
        class_token="embedding.cls_token" in native,
        num_registers=0,
        posemb_rows=optional_dim(native, "embedding.position_embeddings", 1),
        qkv_bias=qkv_bias,
        qk_norm=False,
        layer_scale=False,
        fc_norm=False,
        map_head=False,
        heads=heads,
        attention_dim=int(require(native, f"{first}.output_projection.weight", fmt).shape[1]),
        final_norm=False,
    )


FORMAT = FamilyFormat(
    name=NAME,
    description="vision-transformer-from-scratch ViTForClassfication state dict (.pt/.pth/.bin/.safetensors)",
    convention=Convention("tutorial", gelu="tanh", ln_eps=1e-5, posemb_absent="learned", posemb_on_cls=True),
    build_table=_table,
    cannot_express=_cannot_express,
    read_facts=_facts,
    suffixes=(".pt", ".pth", ".bin", ".safetensors"),
    groups=_groups,
)


def tutorial_construction(cfg: ViTConfig) -> str:
    """The tutorial's `ViTForClassfication(config)` that a file of this config loads into
    (load_state_dict(strict=True)); the dropout and init entries are ones its constructor reads."""
    return f"vit.ViTForClassfication({_tutorial_config(cfg)!r})"


def _tutorial_config(cfg: ViTConfig) -> dict:
    return {
        "image_size": cfg.image_size[0],
        "patch_size": cfg.patch_size[0],
        "num_channels": cfg.in_channels,
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim,
        "num_classes": cfg.num_classes,
        "qkv_bias": cfg.qkv_bias,
        "use_faster_attention": False,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
    }
