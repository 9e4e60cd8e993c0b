"""transformers' `CLIPVisionModel` and `CLIPVisionModelWithProjection`.

Read off transformers 5.23.0's modeling_clip.py: the patch embedding is a conv without bias
(`embeddings.patch_embedding`), the class token `embeddings.class_embedding` a [width] vector, the
position embedding an nn.Embedding over [class, patches] (`embeddings.position_embedding.weight`),
then `pre_layrnorm` over all tokens (our `pre_norm`), pre-norm blocks `encoder.layers.{i}.{layer_norm1,
self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}` and `post_layernorm` on the class token:
`pooler_output`. LayerNorm is per token, so normalizing only the pooled class token is our final norm
before pooling 'token', exactly. hidden_act is the config's (OpenAI's checkpoints: quick_gelu, our
gelu 'quick'), layer_norm_eps 1e-5 by default.

`CLIPVisionModelWithProjection` puts the tower under `vision_model.` and adds `visual_projection`, a
Linear without bias to `projection_dim`: read as our head with a zero bias (num_classes =
projection_dim), so our output is its `image_embeds`; a head whose bias is not zero is refused when
written. Without it (CLIPVisionModel) num_classes is 0 and our output is `pooler_output`. A
two-tower `CLIPModel` (model_type 'clip') is read as its image tower with its projection (our output
is its `get_image_features`), the text tower left out with a note; it is written back as
CLIPVisionModelWithProjection.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats import hf, hf_parts
from vitspec.formats.base import optional_dim
from vitspec.formats.hf_family import (
    HIDDEN_ACT,
    Reading,
    family,
    rebuilt,
    require_zero,
    stated,
    text_tower_notes,
    vision_tower_config,
    without_text_tower,
    zeros_like_spec,
)
from vitspec.formats.hf_parts import (
    Naming,
    dense_rules,
    encoder_rules,
    json_fields,
    norm_rules,
    shared_checks,
)
from vitspec.formats.inference import Convention, Facts
from vitspec.formats.lazy import LazyTensors, spec_of
from vitspec.formats.table import Layout, Rule, rule

NAME = "hf_clip"
TOWER_PREFIX = "vision_model."
BARE, PROJECTED = "CLIPVisionModel", "CLIPVisionModelWithProjection"
PROJECTION = "visual_projection"
MARKER = "embeddings.class_embedding"  # what tells a CLIP vision file by its names (after its prefix)
# CLIP and SigLIP name their encoder layers alike.
ENCODER = Naming(
    "encoder.layers.",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
    norm1="layer_norm1",
    norm2="layer_norm2",
)
# config.json's keys for the fields it states (CLIPVisionConfig and SiglipVisionConfig alike): ViT's
# but qkv_bias, since their q, k and v always have biases.
CONFIG_JSON_FIELDS = tuple(entry for entry in hf.CONFIG_JSON_FIELDS if entry[0] != "qkv_bias")
REFUSED = {
    "CLIPForImageClassification": "its classifier reads the mean of the patch tokens before "
    "post_layernorm, which then goes unused: vitspec's final norm is before pooling",
}
CONVENTION = Convention(
    "Hugging Face CLIP", gelu="quick", ln_eps=1e-5, posemb_absent="learned", posemb_on_cls=True
)


def tower_prefix(native_keys: Collection[str]) -> str:
    return TOWER_PREFIX if any(k.startswith(TOWER_PREFIX) for k in native_keys) else ""


def square_checks(cfg: ViTConfig, config_class: str) -> list[tuple[bool, str]]:
    return [
        (
            cfg.image_size[0] == cfg.image_size[1],
            f"{config_class}.image_size is one int (config: {cfg.image_size})",
        ),
        (
            cfg.patch_size[0] == cfg.patch_size[1],
            f"{config_class}.patch_size is one int (config: {cfg.patch_size})",
        ),
    ]


def encoder_facts(native: Mapping[str, np.ndarray], p: str, fmt: str) -> dict:
    """The Facts fields a CLIP-style encoder shows, after the tower's prefix `p`."""
    return dict(
        **hf_parts.encoder_facts(native, p, ENCODER, "embeddings.patch_embedding", fmt),
        num_registers=0,
        posemb_rows=optional_dim(native, f"{p}embeddings.position_embedding.weight", 0),
        layer_scale=False,
    )


def _table(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    p = tower_prefix(native_keys) if native_keys is not None else (TOWER_PREFIX if cfg.num_classes else "")
    table = [
        rule("cls_token", f"{p}{MARKER}", Layout.RESHAPE, cfg),
        rule("pos_embed", f"{p}embeddings.position_embedding.weight", Layout.RESHAPE, cfg),
        rule("patch_embed/kernel", f"{p}embeddings.patch_embedding.weight", Layout.CONV, cfg),
    ]
    table += norm_rules("pre_norm", f"{p}pre_layrnorm", cfg)
    table += encoder_rules(cfg, p, ENCODER)
    table += norm_rules("norm", f"{p}post_layernorm", cfg)
    if cfg.num_classes:
        table += dense_rules("head", PROJECTION, cfg)  # its bias only in the canonical tree
    return table


def _cannot_express(cfg: ViTConfig) -> list[str]:
    checks = [
        (cfg.pool == "token", f"pooler_output is the class token (config: pool={cfg.pool!r})"),
        (cfg.class_token, "CLIP always has a class token"),
        *shared_checks(cfg, HIDDEN_ACT),
        *square_checks(cfg, "CLIPVisionConfig"),
        (not cfg.distilled, "no distillation token"),
        (cfg.num_registers == 0, f"no register tokens (config has {cfg.num_registers})"),
        (cfg.posemb == "learned", f"the position embedding is always learned (config: {cfg.posemb!r})"),
        (cfg.posemb_on_cls, "the position embedding always covers the class token"),
        (cfg.layer_scale is None, "no LayerScale"),
        (cfg.pre_norm, "pre_layrnorm is always there (pre_norm=True)"),
        (not cfg.patch_bias, "the patch embedding has no bias (patch_bias=False)"),
        (cfg.final_norm, "post_layernorm is always there (final_norm)"),
        (cfg.qkv_bias, "q, k and v always have biases"),
        (cfg.representation_size is None, "no pre-logits layer (representation_size)"),
    ]
    return [reason for ok, reason in checks if not ok]


def _canonical(native: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    native = without_text_tower(native)
    weight = f"{PROJECTION}.weight"
    if weight not in native:
        return native
    (rows, _), dtype = spec_of(native, weight)
    spec = ((rows,), dtype)
    return rebuilt(native, computed={f"{PROJECTION}.bias": (spec, zeros_like_spec(spec))})


def _stored(native: LazyTensors, cfg: ViTConfig) -> LazyTensors:
    """Without the projection's bias, which must be zero: checked now (a vector), before any tensor
    is written."""
    bias = f"{PROJECTION}.bias"
    if not cfg.num_classes:
        return native
    why = f"{PROJECTED}'s {PROJECTION} has no bias; a head with one is not written as it"
    require_zero("head/bias", native[bias], why)
    return rebuilt(native, dropped=(bias,))


def _read(native: Mapping[str, np.ndarray], file_keys: Collection[str] = ()) -> Reading:
    fmt = "hf_clip (transformers CLIPVisionModel)"
    p = tower_prefix(native.keys())
    facts = Facts(
        **encoder_facts(native, p, fmt),
        num_classes=optional_dim(native, f"{PROJECTION}.weight", 0) or 0,
        representation_size=None,
        class_token=f"{p}{MARKER}" in native,
        map_head=False,
    )
    notes = text_tower_notes(file_keys, "CLIPModel", "get_image_features")
    return Reading(facts, {"pre_norm": True, "patch_bias": False}, {}, notes, CONVENTION)


def transformers_config(cfg: ViTConfig) -> dict:
    projection = {"projection_dim": cfg.num_classes} if cfg.num_classes else {}
    return {
        "architectures": [PROJECTED if cfg.num_classes else BARE],
        "model_type": "clip_vision_model",
        **json_fields(cfg, CONFIG_JSON_FIELDS, HIDDEN_ACT),
        **projection,
        "attention_dropout": cfg.attention_dropout,
    }


def stated_fields(config: dict, where: str) -> dict:
    architectures = {
        BARE: lambda c: {"num_classes": 0},
        PROJECTED: lambda c: {"num_classes": c.get("projection_dim", 512)},  # CLIPVisionConfig's default
    }
    if isinstance(config, dict) and config.get("model_type") == "clip":  # CLIPModel: its image tower
        projection = config.get("projection_dim", 512)  # CLIPConfig's default
        config = vision_tower_config(config, "clip_vision_model", PROJECTED, projection_dim=projection)
    return stated(config, where, ("clip_vision_model",), CONFIG_JSON_FIELDS, architectures, REFUSED)


FORMAT = family(
    _read,
    name=NAME,
    description="Hugging Face CLIPVisionModel / CLIPVisionModelWithProjection (CLIPModel read)",
    convention=CONVENTION,
    build_table=_table,
    cannot_express=_cannot_express,
    model_types=("clip_vision_model", "clip"),
    config_json=transformers_config,
    stated_fields=stated_fields,
    canonical=_canonical,
    stored=_stored,
)
