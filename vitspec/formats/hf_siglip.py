"""transformers' `SiglipVisionModel`: no class token, the attention-pooling head as our pool 'map'.

Read off transformers 5.23.0's modeling_siglip.py: a biased patch conv, the position embedding over
the patches only (`embeddings.position_embedding.weight`), CLIP's encoder names, `post_layernorm`
over all tokens, then (with `vision_use_head`, the default) `head`, a
SiglipMultiheadAttentionPoolingHead: `probe` [1, 1, width] queries the tokens through
torch's nn.MultiheadAttention, whose `in_proj_weight` [3 x width, width] and `in_proj_bias` stack q,
k and v (our fused layouts) and `out_proj` is the output; then `layernorm`, `mlp` and a residual:
big_vision's MAPHead, our pool 'map', whose output is `pooler_output`. Without the head,
`pooler_output` is None and our output is `last_hidden_state` (pool 'none'). hidden_act is
gelu_pytorch_tanh (our 'tanh') and layer_norm_eps 1e-6 by default. A two-tower `SiglipModel`
(model_type 'siglip') is read as its image tower (`vision_model.`; our output is its
`get_image_features`), the text tower left out with a note; it is written back as SiglipVisionModel.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import require
from vitspec.formats.hf_clip import (
    CONFIG_JSON_FIELDS,
    ENCODER,
    encoder_facts,
    square_checks,
    tower_prefix,
)
from vitspec.formats.hf_family import (
    HIDDEN_ACT,
    Reading,
    family,
    stated,
    text_tower_notes,
    vision_tower_config,
    without_text_tower,
)
from vitspec.formats.hf_parts import dense_rules, encoder_rules, json_fields, norm_rules, shared_checks
from vitspec.formats.inference import Convention, Facts
from vitspec.formats.table import FormatError, Layout, Rule, rule, token_rule

NAME = "hf_siglip"
ARCHITECTURE = "SiglipVisionModel"
REFUSED = {
    "SiglipForImageClassification": "its classifier reads the mean of all tokens and leaves the "
    "attention-pooling head unused",
}
CONVENTION = Convention(
    "Hugging Face SigLIP", gelu="tanh", ln_eps=1e-6, posemb_absent="learned", posemb_on_cls=True
)


def _table(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    p = tower_prefix(native_keys) if native_keys is not None else ""
    table = [
        rule("pos_embed", f"{p}embeddings.position_embedding.weight", Layout.RESHAPE, cfg),
        rule("patch_embed/kernel", f"{p}embeddings.patch_embedding.weight", Layout.CONV, cfg),
        rule("patch_embed/bias", f"{p}embeddings.patch_embedding.bias", Layout.RESHAPE, cfg),
    ]
    table += encoder_rules(cfg, p, ENCODER)
    table += norm_rules("norm", f"{p}post_layernorm", cfg)
    if cfg.pool == "map":
        head, attn = f"{p}head", "map_head/attn"
        qkv = tuple(f"{attn}/{name}" for name in ("query", "key", "value"))
        table += [
            token_rule("map_head/probe", f"{head}.probe", cfg),
            rule(
                tuple(f"{n}/kernel" for n in qkv),
                f"{head}.attention.in_proj_weight",
                Layout.FUSED_TRANSPOSE,
                cfg,
            ),
            rule(tuple(f"{n}/bias" for n in qkv), f"{head}.attention.in_proj_bias", Layout.FUSED, cfg),
        ]
        table += dense_rules(f"{attn}/out", f"{head}.attention.out_proj", cfg)
        table += norm_rules("map_head/norm", f"{head}.layernorm", cfg)
        table += dense_rules("map_head/mlp/fc1", f"{head}.mlp.fc1", cfg)
        table += dense_rules("map_head/mlp/fc2", f"{head}.mlp.fc2", cfg)
    return table


def _cannot_express(cfg: ViTConfig) -> list[str]:
    checks = [
        (
            cfg.pool in ("map", "none"),
            f"pooler_output is the attention-pooling head's, or there is none (config: pool={cfg.pool!r})",
        ),
        (not cfg.num_classes, f"{ARCHITECTURE} has no classifier (config: num_classes={cfg.num_classes})"),
        (not cfg.class_token, "SigLIP has no class token"),
        *shared_checks(cfg, HIDDEN_ACT),
        *square_checks(cfg, "SiglipVisionConfig"),
        (not cfg.distilled, "no distillation token"),
        (cfg.num_registers == 0, f"no register tokens (config has {cfg.num_registers})"),
        (cfg.posemb == "learned", f"the position embedding is always learned (config: {cfg.posemb!r})"),
        (cfg.layer_scale is None, "no LayerScale"),
        (not cfg.pre_norm, "no LayerNorm before the blocks (pre_norm)"),
        (cfg.patch_bias, "the patch embedding always has a bias (patch_bias)"),
        (cfg.final_norm, "post_layernorm is always there (final_norm)"),
        (cfg.qkv_bias, "q, k and v always have biases"),
        (cfg.representation_size is None, "no pre-logits layer (representation_size)"),
    ]
    return [reason for ok, reason in checks if not ok]


def _read(native: Mapping[str, np.ndarray], file_keys: Collection[str] = ()) -> Reading:
    fmt = "hf_siglip (transformers SiglipVisionModel)"
    if "classifier.weight" in native:
        kind = "SiglipForImageClassification"
        raise FormatError(f"a {kind} checkpoint cannot be read: {REFUSED[kind]}")
    p = tower_prefix(native.keys())
    require(native, f"{p}post_layernorm.weight", fmt)
    has_head = f"{p}head.probe" in native
    facts = Facts(
        **encoder_facts(native, p, fmt),
        num_classes=0,
        representation_size=None,
        class_token=False,
        map_head=has_head,
    )
    notes = text_tower_notes(file_keys, "SiglipModel", "get_image_features")
    return Reading(facts, {}, {} if has_head else {"pool": "none"}, notes, CONVENTION)


def transformers_config(cfg: ViTConfig) -> dict:
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "siglip_vision_model",
        **json_fields(cfg, CONFIG_JSON_FIELDS, HIDDEN_ACT),
        "vision_use_head": cfg.pool == "map",
        "attention_dropout": cfg.attention_dropout,
    }


def _stated_by_architecture(config: dict) -> dict:
    head = config.get("vision_use_head", True)  # SiglipVisionConfig's default
    return {"num_classes": 0, "pool": "map" if head else "none"}


def stated_fields(config: dict, where: str) -> dict:
    architectures = {ARCHITECTURE: _stated_by_architecture}
    if isinstance(config, dict) and config.get("model_type") == "siglip":  # SiglipModel: its image tower
        config = vision_tower_config(config, "siglip_vision_model", ARCHITECTURE)
    return stated(config, where, ("siglip_vision_model",), CONFIG_JSON_FIELDS, architectures, REFUSED)


FORMAT = family(
    _read,
    name=NAME,
    description="Hugging Face SiglipVisionModel (attention-pooling head: pool 'map'; SiglipModel read)",
    convention=CONVENTION,
    build_table=_table,
    cannot_express=_cannot_express,
    model_types=("siglip_vision_model", "siglip"),
    canonical=without_text_tower,
    config_json=transformers_config,
    stated_fields=stated_fields,
)
