"""Hugging Face transformers' ViT state dict: the table and the config its names show.

Two namings of the same weights (`ViTModel`, `ViTForImageClassification`), both read by either
format name and told apart by their keys:
- `hf` writes today's (transformers >= 5, read off 5.23.0's modeling_vit.py):
  `layers.{i}.{layernorm_before, attention.{q,k,v,o}_proj, layernorm_after, mlp.fc1, mlp.fc2}`;
- `hf4` writes transformers 4.x's: `encoder.layer.{i}.{layernorm_before,
  attention.attention.{query,key,value}, attention.output.dense, layernorm_after,
  intermediate.dense, output.dense}`.
Both share `embeddings.{cls_token, position_embeddings, patch_embeddings.projection}`,
`layernorm`, `pooler.dense` (tanh on the class token: our pre-logits of width D) and
`classifier`. Under ViTForImageClassification everything but `classifier` sits under `vit.`; a
bare ViTModel has no prefix. Written files use `vit.` exactly when there is a classifier.

ViTModel is one architecture: class token, learned position embedding on every token, pre-norm
blocks without LayerScale or qk-norm, encoder norm before pooling, classifier on token 0.
hidden_act is gelu or gelu_pytorch_tanh (gelu_new read as the latter). The families around it
(DeiT with teacher, CLIP, SigLIP, DINOv2) are their own layouts (hf_deit, hf_clip, hf_siglip,
hf_dinov2), sharing vitspec.formats.hf_parts.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import Format, optional_dim
from vitspec.formats.files import open_tensors
from vitspec.formats.hf_parts import (
    CONFIG_FILE,
    SUFFIXES,
    Naming,
    dense_rules,
    embedding_rules,
    encoder_facts,
    encoder_rules,
    json_fields,
    labels_json,
    norm_rules,
    num_labels,
    read_config_json,
    read_fields,
    shared_checks,
)
from vitspec.formats.inference import Convention, Facts
from vitspec.formats.table import FormatError, Rule

NAME = "hf"
NAME_4X = "hf4"
CLASSIFIER_PREFIX = "vit."
PATCH = "embeddings.patch_embeddings.projection"


TRANSFORMERS_5 = Naming(
    "layers.",
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.o_proj",
    "mlp.fc1",
    "mlp.fc2",
)
TRANSFORMERS_4 = Naming(
    "encoder.layer.",
    "attention.attention.query",
    "attention.attention.key",
    "attention.attention.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def naming_of(native_keys: Collection[str]) -> Naming:
    is_4x = any(re.search(r"(^|\.)encoder\.layer\.\d", k) for k in native_keys)
    return TRANSFORMERS_4 if is_4x else TRANSFORMERS_5


def prefix_of(native_keys: Collection[str]) -> str:
    return CLASSIFIER_PREFIX if any(k.startswith(CLASSIFIER_PREFIX) for k in native_keys) else ""


def _table(writes: Naming, cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    """The table for reading `native_keys` (either naming), or for writing with `writes` when None."""
    p = prefix_of(native_keys) if native_keys is not None else (CLASSIFIER_PREFIX if cfg.num_classes else "")
    n = naming_of(native_keys) if native_keys is not None else writes

    table = embedding_rules(cfg, p) + encoder_rules(cfg, p, n)
    table += norm_rules("norm", f"{p}layernorm", cfg)
    if cfg.representation_size:
        table += dense_rules("pre_logits", f"{p}pooler.dense", cfg)
    if cfg.num_classes:
        table += dense_rules("head", "classifier", cfg)
    return table


def _cannot_express(cfg: ViTConfig) -> list[str]:
    all_tokens_out = cfg.pool == "none" and not cfg.num_classes and not cfg.representation_size
    pooled = cfg.pool == "token" or all_tokens_out  # ViTModel's last_hidden_state is pool 'none'
    checks = [
        (pooled, f"the classifier and pooler read the class token (config: pool={cfg.pool!r})"),
        (cfg.num_registers == 0, f"no register tokens (config has {cfg.num_registers})"),
        (cfg.posemb == "learned", f"the position embedding is always learned (config: {cfg.posemb!r})"),
        (cfg.posemb_on_cls, "the position embedding always covers the class token"),
        (cfg.layer_scale is None, "no LayerScale"),
        *shared_checks(cfg, HIDDEN_ACT),
        (cfg.class_token, "ViTModel always has a class token"),
        (not cfg.distilled, "no distillation token (DeiT: the hf_deit layout)"),
        (not cfg.pre_norm, "no LayerNorm before the blocks (pre_norm)"),
        (cfg.patch_bias, "the patch embedding always has a bias (patch_bias)"),
        (cfg.final_norm, "the encoder's final LayerNorm is always there (final_norm)"),
        (
            cfg.representation_size in (None, cfg.width),
            f"the pooler is width x width (config: representation_size={cfg.representation_size})",
        ),
        (
            not (cfg.representation_size and cfg.num_classes),
            "ViTForImageClassification has no pooler: a pre-logits layer needs num_classes=0 (ViTModel)",
        ),
    ]
    return [reason for ok, reason in checks if not ok]


# config.json's keys for the ViTConfig fields it states: `transformers_config` writes them, and a
# transformers directory is read with them as settled (the GELU form spelled as in HIDDEN_ACT).
CONFIG_JSON_FIELDS = (
    ("hidden_size", "width"),
    ("num_hidden_layers", "depth"),
    ("num_attention_heads", "num_heads"),
    ("intermediate_size", "mlp_dim"),
    ("hidden_act", "gelu"),
    ("layer_norm_eps", "ln_eps"),
    ("image_size", "image_size"),
    ("patch_size", "patch_size"),
    ("num_channels", "in_channels"),
    ("qkv_bias", "qkv_bias"),
)
HIDDEN_ACT = {"exact": "gelu", "tanh": "gelu_pytorch_tanh"}
# What is read: also transformers' older name of the same tanh form (NewGELUActivation computes
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as gelu_pytorch_tanh does).
READ_HIDDEN_ACT = {act: form for form, act in HIDDEN_ACT.items()} | {"gelu_new": "tanh"}
CLASSIFIER, BARE = "ViTForImageClassification", "ViTModel"


def transformers_config(cfg: ViTConfig) -> dict:
    """The config.json that `ViTForImageClassification` (with a head) or `ViTModel` (without)
    `.from_pretrained(dir)` reads beside the weights: sizes, GELU form, eps, labels."""
    return {
        "architectures": [CLASSIFIER if cfg.num_classes else BARE],
        "model_type": "vit",
        **json_fields(cfg, CONFIG_JSON_FIELDS, HIDDEN_ACT),
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "pooler_output_size": cfg.width,
        "pooler_act": "tanh",
        **labels_json(cfg.num_classes),
    }


def read_directory(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The weights of a transformers ViT directory, and the ViTConfig fields its config.json states."""
    weights, config = read_config_json(path, "transformers ViT")
    return open_tensors(weights)[0], stated_fields(config, path / CONFIG_FILE)


def stated_fields(config: Any, where: Path | str) -> dict[str, Any]:
    """The ViTConfig fields a transformers ViT config.json states."""
    if not isinstance(config, dict) or config.get("model_type") != "vit":
        kind = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise FormatError(f"{where}: model_type {kind!r}, not a transformers ViT ('vit')")
    fields = read_fields(config, where, CONFIG_JSON_FIELDS, READ_HIDDEN_ACT)
    architectures = config.get("architectures") or []
    if BARE in architectures:
        fields["num_classes"] = 0
    elif CLASSIFIER in architectures:
        fields["num_classes"] = num_labels(config)
    return fields


def _facts(native: Mapping[str, np.ndarray]) -> Facts:
    p = prefix_of(native.keys())
    n = naming_of(native.keys())
    return Facts(
        **encoder_facts(native, p, n, PATCH, "hf (transformers ViT)"),
        num_classes=optional_dim(native, "classifier.weight", 0) or 0,
        representation_size=optional_dim(native, f"{p}pooler.dense.weight", 0),
        class_token=f"{p}embeddings.cls_token" in native,
        num_registers=0,
        posemb_rows=optional_dim(native, f"{p}embeddings.position_embeddings", 1),
        layer_scale=False,
        map_head=False,
    )


def _format(name: str, writes: Naming, description: str) -> Format:
    return Format(
        name=name,
        description=description,
        convention=Convention(
            "Hugging Face", gelu="exact", ln_eps=1e-12, posemb_absent="learned", posemb_on_cls=True
        ),
        build_table=functools.partial(_table, writes),
        cannot_express=_cannot_express,
        read_facts=_facts,
        suffixes=SUFFIXES,
    )


FORMAT = _format(
    NAME, TRANSFORMERS_5, "Hugging Face ViTModel / ViTForImageClassification (transformers >= 5 names)"
)
FORMAT_4X = _format(
    NAME_4X, TRANSFORMERS_4, "Hugging Face ViTModel / ViTForImageClassification (transformers 4.x names)"
)
