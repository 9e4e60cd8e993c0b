"""Hugging Face transformers' ViT state dict (`hf`): the table and the config its names show.

Names are transformers 4.x modeling_vit.py's (`ViTModel`, `ViTForImageClassification`):
`embeddings.{cls_token, position_embeddings, patch_embeddings.projection}`,
`encoder.layer.{i}.{layernorm_before, attention.attention.{query,key,value},
attention.output.dense, layernorm_after, intermediate.dense, output.dense}`, `layernorm`,
`pooler.dense` (tanh on the class token: our pre-logits of width D), and `classifier`. Under
ViTForImageClassification everything but `classifier` sits under `vit.`; a bare ViTModel has
no prefix. Written files use `vit.` exactly when there is a classifier.

ViTModel is one architecture: class token, learned position embedding on every token, pre-norm
blocks without LayerScale or qk-norm, encoder norm before pooling, classifier on token 0.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import Convention, Facts, Format, count_blocks, optional_dim, require
from vitspec.formats.table import Layout, Rule, rule, token_rule

NAME = "hf"
CLASSIFIER_PREFIX = "vit."


def prefix_of(native_keys: Collection[str]) -> str:
    return CLASSIFIER_PREFIX if any(k.startswith(CLASSIFIER_PREFIX) for k in native_keys) else ""


def _table(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    p = prefix_of(native_keys) if native_keys is not None else (CLASSIFIER_PREFIX if cfg.num_classes else "")

    def norm(ref, native):
        return [rule(f"{ref}/scale", f"{native}.weight", Layout.RESHAPE, cfg),
                rule(f"{ref}/bias", f"{native}.bias", Layout.RESHAPE, cfg)]

    def dense(ref, native, bias=True):
        rules = [rule(f"{ref}/kernel", f"{native}.weight", Layout.TRANSPOSE, cfg)]
        return rules + ([rule(f"{ref}/bias", f"{native}.bias", Layout.RESHAPE, cfg)] if bias else [])

    table = [token_rule("cls_token", f"{p}embeddings.cls_token", cfg),
             token_rule("pos_embed", f"{p}embeddings.position_embeddings", cfg),
             rule("patch_embed/kernel", f"{p}embeddings.patch_embeddings.projection.weight", Layout.CONV,
                  cfg),
             rule("patch_embed/bias", f"{p}embeddings.patch_embeddings.projection.bias", Layout.RESHAPE,
                  cfg)]
    for i in range(cfg.depth):
        ref, native = f"blocks/{i}", f"{p}encoder.layer.{i}"
        table += norm(f"{ref}/norm1", f"{native}.layernorm_before")
        for name in ("query", "key", "value"):
            table += dense(f"{ref}/attn/{name}", f"{native}.attention.attention.{name}", bias=cfg.qkv_bias)
        table += dense(f"{ref}/attn/out", f"{native}.attention.output.dense")
        table += norm(f"{ref}/norm2", f"{native}.layernorm_after")
        table += dense(f"{ref}/mlp/fc1", f"{native}.intermediate.dense")
        table += dense(f"{ref}/mlp/fc2", f"{native}.output.dense")
    table += norm("norm", f"{p}layernorm")
    if cfg.representation_size:
        table += dense("pre_logits", f"{p}pooler.dense")
    if cfg.num_classes:
        table += dense("head", "classifier")
    return table


def _cannot_express(cfg: ViTConfig) -> list[str]:
    all_tokens_out = cfg.pool == "none" and not cfg.num_classes and not cfg.representation_size
    pooled = cfg.pool == "token" or all_tokens_out  # ViTModel's last_hidden_state is pool 'none'
    checks = [
        (pooled, f"the classifier and pooler read the class token (config: pool={cfg.pool!r})"),
        (cfg.class_token, "ViTModel always has a class token"),
        (cfg.num_registers == 0, f"no register tokens (config has {cfg.num_registers})"),
        (cfg.posemb == "learned", f"the position embedding is always learned (config: {cfg.posemb!r})"),
        (cfg.posemb_on_cls, "the position embedding always covers the class token"),
        (not cfg.qk_norm, "no qk-norm"),
        (cfg.layer_scale is None, "no LayerScale"),
        (not cfg.fc_norm, "no fc_norm (the encoder norm is before pooling)"),
        (cfg.representation_size in (None, cfg.width),
         f"the pooler is width x width (config: representation_size={cfg.representation_size})"),
        (not (cfg.representation_size and cfg.num_classes),
         "ViTForImageClassification has no pooler: a pre-logits layer needs num_classes=0 (ViTModel)"),
    ]
    return [reason for ok, reason in checks if not ok]


def _facts(native: Mapping[str, np.ndarray]) -> Facts:
    p = prefix_of(native.keys())
    fmt = "hf (transformers ViT)"
    width, channels, ph, pw = require(native, f"{p}embeddings.patch_embeddings.projection.weight", fmt).shape
    return Facts(
        width=int(width),
        depth=count_blocks(native, re.escape(p) + r"encoder\.layer\.(\d+)\.layernorm_before\.weight", fmt),
        mlp_dim=int(require(native, f"{p}encoder.layer.0.intermediate.dense.weight", fmt).shape[0]),
        patch_size=(int(ph), int(pw)), in_channels=int(channels),
        num_classes=optional_dim(native, "classifier.weight", 0) or 0,
        representation_size=optional_dim(native, f"{p}pooler.dense.weight", 0),
        class_token=f"{p}embeddings.cls_token" in native, num_registers=0,
        posemb_rows=optional_dim(native, f"{p}embeddings.position_embeddings", 1),
        qkv_bias=f"{p}encoder.layer.0.attention.attention.query.bias" in native,
        qk_norm=False, layer_scale=False, fc_norm=False, map_head=False, heads=None)


FORMAT = Format(
    name=NAME, description="Hugging Face ViTModel / ViTForImageClassification state dict (4.x names)",
    convention=Convention("Hugging Face", gelu="exact", ln_eps=1e-12, posemb_absent="learned",
                          posemb_on_cls=True),
    build_table=_table, cannot_express=_cannot_express, read_facts=_facts,
    suffixes=(".safetensors", ".bin", ".pt", ".pth"))

table = FORMAT.table
to_reference = FORMAT.to_reference
from_reference = FORMAT.from_reference
infer_config = FORMAT.infer_config
