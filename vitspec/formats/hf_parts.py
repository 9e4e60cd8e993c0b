"""What the transformers vision layouts share: ViT's embedding rows, an encoder layer's names, rows
and facts, the refusals every family has, and config.json's reading and writing
(vitspec.formats.hf and the hf_* families)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import count_blocks, require
from vitspec.formats.table import FormatError, Layout, Rule, rule, token_rule

CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # what from_pretrained reads, unsharded
SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclasses.dataclass(frozen=True)
class Naming:
    """A transformers encoder layer's names, after its prefix and index (shared by the families)."""

    layers: str  # the blocks' prefix, followed by the block index
    query: str
    key: str
    value: str
    out: str
    fc1: str
    fc2: str
    norm1: str = "layernorm_before"
    norm2: str = "layernorm_after"
    ls1: str | None = None  # LayerScale's vector (DINOv2), or no LayerScale
    ls2: str | None = None

    def layer(self, i: int) -> str:
        return f"{self.layers}{i}"


def norm_rules(ref: str, native: str, cfg: ViTConfig) -> list[Rule]:
    return [
        rule(f"{ref}/scale", f"{native}.weight", Layout.RESHAPE, cfg),
        rule(f"{ref}/bias", f"{native}.bias", Layout.RESHAPE, cfg),
    ]


def dense_rules(ref: str, native: str, cfg: ViTConfig, bias: bool = True) -> list[Rule]:
    rules = [rule(f"{ref}/kernel", f"{native}.weight", Layout.TRANSPOSE, cfg)]
    return rules + ([rule(f"{ref}/bias", f"{native}.bias", Layout.RESHAPE, cfg)] if bias else [])


def embedding_rules(cfg: ViTConfig, prefix: str, *tokens: tuple[str, str]) -> list[Rule]:
    """ViT's embeddings under `prefix`: the class token, `tokens` ((reference name, native name)
    pairs, after it in the sequence), the position embedding and the biased patch conv."""
    e = f"{prefix}embeddings"
    return [
        token_rule("cls_token", f"{e}.cls_token", cfg),
        *(token_rule(ref, f"{e}.{native}", cfg) for ref, native in tokens),
        token_rule("pos_embed", f"{e}.position_embeddings", cfg),
        rule("patch_embed/kernel", f"{e}.patch_embeddings.projection.weight", Layout.CONV, cfg),
        rule("patch_embed/bias", f"{e}.patch_embeddings.projection.bias", Layout.RESHAPE, cfg),
    ]


def encoder_rules(cfg: ViTConfig, prefix: str, n: Naming) -> list[Rule]:
    """The blocks' rows: the same pre-norm block under each family's names."""
    table = []
    for i in range(cfg.depth):
        ref, native = f"blocks/{i}", f"{prefix}{n.layer(i)}"
        table += norm_rules(f"{ref}/norm1", f"{native}.{n.norm1}", cfg)
        for name in ("query", "key", "value"):
            table += dense_rules(f"{ref}/attn/{name}", f"{native}.{getattr(n, name)}", cfg, cfg.qkv_bias)
        table += dense_rules(f"{ref}/attn/out", f"{native}.{n.out}", cfg)
        if n.ls1 and cfg.layer_scale is not None:
            table.append(rule(f"{ref}/ls1/scale", f"{native}.{n.ls1}", Layout.RESHAPE, cfg))
        table += norm_rules(f"{ref}/norm2", f"{native}.{n.norm2}", cfg)
        table += dense_rules(f"{ref}/mlp/fc1", f"{native}.{n.fc1}", cfg)
        table += dense_rules(f"{ref}/mlp/fc2", f"{native}.{n.fc2}", cfg)
        if n.ls2 and cfg.layer_scale is not None:
            table.append(rule(f"{ref}/ls2/scale", f"{native}.{n.ls2}", Layout.RESHAPE, cfg))
    return table


def encoder_facts(native: Mapping[str, np.ndarray], prefix: str, n: Naming, patch: str, fmt: str) -> dict:
    """The Facts fields that the patch conv `patch` (after `prefix`) and the blocks show alike in every
    family."""
    width, channels, ph, pw = require(native, f"{prefix}{patch}.weight", fmt).shape
    first = f"{prefix}{n.layer(0)}"
    return dict(
        width=int(width),
        depth=count_blocks(
            native, re.escape(prefix + n.layers) + rf"(\d+)\.{re.escape(n.norm1)}\.weight", fmt
        ),
        mlp_dim=int(require(native, f"{first}.{n.fc1}.weight", fmt).shape[0]),
        patch_size=(int(ph), int(pw)),
        in_channels=int(channels),
        qkv_bias=f"{first}.{n.query}.bias" in native,
        qk_norm=False,
        fc_norm=False,
        heads=None,
    )


def shared_checks(cfg: ViTConfig, hidden_act: Mapping[str, str]) -> list[tuple[bool, str]]:
    """(holds, reason) for what no transformers vision family here has: its blocks are plain
    pre-norm blocks of width x width attention with biased projections, the norm before pooling."""
    return [
        (cfg.gelu in hidden_act, f"hidden_act names no {cfg.gelu!r} GELU here (it has {list(hidden_act)})"),
        (not cfg.qk_norm, "no qk-norm"),
        (not cfg.talking_heads, "no talking heads"),
        (
            not cfg.class_attention_depth,
            f"no class-attention blocks (CaiT; config: class_attention_depth={cfg.class_attention_depth})",
        ),
        (cfg.proj_bias, "the attention output and MLP layers always have biases (proj_bias)"),
        (
            cfg.attention_dim == cfg.width,
            f"the attention is as wide as the model (config: attention_dim={cfg.attention_dim}, "
            f"width={cfg.width})",
        ),
        (not cfg.fc_norm, "no fc_norm (the encoder norm is before pooling)"),
        (not cfg.pool_include_prefix, "no pool_include_prefix"),
    ]


def json_fields(cfg: ViTConfig, fields: tuple[tuple[str, str], ...], hidden_act: Mapping[str, str]) -> dict:
    """config.json's entries for `fields` ((key, ViTConfig field) pairs), spelled as transformers does."""

    def json_value(field):
        value = getattr(cfg, field)
        if field == "gelu":
            return hidden_act[value]
        if isinstance(value, tuple):
            return value[0] if value[0] == value[1] else list(value)
        return value

    return {key: json_value(field) for key, field in fields}


def labels_json(num_classes: int) -> dict:
    labels = {str(i): f"LABEL_{i}" for i in range(num_classes)}
    return {"id2label": labels, "label2id": {name: int(i) for i, name in labels.items()}}


def num_labels(config: Mapping[str, Any]) -> int:
    return len(config["id2label"]) if "id2label" in config else config.get("num_labels", 2)


def read_config_json(path: Path, what: str) -> tuple[Path, dict]:
    """A transformers directory's weights file and its parsed config.json."""
    if not (path / CONFIG_FILE).is_file():
        raise FormatError(f"{path}: a directory is read as a {what}, but it has no {CONFIG_FILE}")
    weights = next((path / name for name in WEIGHTS_FILES if (path / name).is_file()), None)
    if weights is None:
        raise FormatError(f"{path}: a {what} directory without {' or '.join(WEIGHTS_FILES)}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path / CONFIG_FILE}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path / CONFIG_FILE}: a JSON {type(config).__name__}, not an object")
    return weights, config


def read_fields(
    config: Mapping[str, Any], where: Path | str, fields: tuple[tuple[str, str], ...], read_act: Mapping
) -> dict[str, Any]:
    """The ViTConfig fields that config.json's keys in `fields` state (hidden_act read by `read_act`)."""
    stated = {field: config[key] for key, field in fields if key in config}
    if "gelu" in stated:
        form = read_act.get(stated["gelu"])
        if form is None:
            raise FormatError(f"{where}: hidden_act {stated['gelu']!r} is none of {list(read_act)}")
        stated["gelu"] = form
    for field in ("image_size", "patch_size"):
        if field in stated:
            value = stated[field]
            stated[field] = (value, value) if isinstance(value, int) else tuple(value)
    return stated
