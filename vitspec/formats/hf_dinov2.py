"""transformers' `Dinov2Model` and `Dinov2WithRegistersModel`.

Read off transformers 5.23.0's modeling_dinov2.py and modeling_dinov2_with_registers.py: a biased
patch conv, the class token, the position embedding over [class, patches], pre-norm blocks
`encoder.layer.{i}.{norm1, attention.{q,k,v,o}_proj, layer_scale1.lambda1, norm2, mlp.fc1, mlp.fc2,
layer_scale2.lambda1}` (4.x files: `attention.attention.{query,key,value}`, `attention.output.dense`;
both read, today's written), `layernorm` over all tokens; `pooler_output` is the normed class token
(our pool 'token', num_classes 0). The MLP width is int(hidden_size x mlp_ratio).

`embeddings.mask_token` replaces masked patches in masked-image training only (`bool_masked_pos`):
inference never reads it, so it is ignored (with a note) and written as zeros.

With registers, the position embedding is added to [class, patches] and the registers are inserted
after it: the class token has a position row, the registers none. Our config has one switch for the
prefix tokens' rows (`posemb_on_cls`), so such a file is read with posemb_on_cls=False and the class
row folded into the class token (cls_token + row 0). That is exact at any image size: the class row
is never resampled, by DINOv2's interpolate_pos_encoding or by ours; it is written back as the class
token with a zero class row. DINOv2 without registers keeps its class row (posemb_on_cls=True).

DINOv2's giant has a SwiGLU feed-forward (use_swiglu_ffn): refused, our MLP is fc1, GELU, fc2.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats import hf
from vitspec.formats.base import optional_dim
from vitspec.formats.flags import Note
from vitspec.formats.hf_family import HIDDEN_ACT, Reading, family, rebuilt, stated, zeros_like_spec
from vitspec.formats.hf_parts import (
    Naming,
    embedding_rules,
    encoder_facts,
    encoder_rules,
    json_fields,
    norm_rules,
    shared_checks,
)
from vitspec.formats.inference import Convention, Facts
from vitspec.formats.lazy import LazyTensors, spec_of
from vitspec.formats.table import FormatError, Rule, token_rule

NAME = "hf_dinov2"
BARE, REGISTERS = "Dinov2Model", "Dinov2WithRegistersModel"
MODEL_TYPES = {BARE: "dinov2", REGISTERS: "dinov2_with_registers"}
CLS, POSEMB, REG = "embeddings.cls_token", "embeddings.position_embeddings", "embeddings.register_tokens"
MASK_TOKEN = "embeddings.mask_token"
LAYER_SCALE = ("layer_scale1.lambda1", "layer_scale2.lambda1")
TODAY = Naming(
    "encoder.layer.",
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.o_proj",
    "mlp.fc1",
    "mlp.fc2",
    "norm1",
    "norm2",
    *LAYER_SCALE,
)
OLD = Naming(
    "encoder.layer.",
    "attention.attention.query",
    "attention.attention.key",
    "attention.attention.value",
    "attention.output.dense",
    "mlp.fc1",
    "mlp.fc2",
    "norm1",
    "norm2",
    *LAYER_SCALE,
)
SWIGLU = re.compile(r"\.mlp\.(weights_in|gate_proj|up_proj)\.")
# ViT's keys but intermediate_size: Dinov2Config states the MLP width by mlp_ratio.
CONFIG_JSON_FIELDS = tuple(entry for entry in hf.CONFIG_JSON_FIELDS if entry[0] != "intermediate_size")
NOT_POOLED = (
    "its classifier reads [class token, mean of the patch tokens] (2 x width), which no pool here gives"
)
REFUSED = {
    "Dinov2ForImageClassification": NOT_POOLED,
    "Dinov2WithRegistersForImageClassification": NOT_POOLED,
    "Dinov2Backbone": "a backbone of feature maps, not a pooled model",
    "Dinov2WithRegistersBackbone": "a backbone of feature maps, not a pooled model",
}
SWIGLU_REASON = "a SwiGLU feed-forward (use_swiglu_ffn, DINOv2's giant): vitspec's MLP is fc1, GELU, fc2"


def _convention(registers: bool) -> Convention:
    return Convention(
        "Hugging Face DINOv2", "exact", 1e-6, posemb_absent="learned", posemb_on_cls=not registers
    )


def _naming(native_keys: Collection[str]) -> Naming:
    return OLD if any(OLD.query in k for k in native_keys) else TODAY


def _table(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    table = embedding_rules(cfg, "")
    if cfg.num_registers:
        table.append(token_rule("reg_tokens", REG, cfg))
    table += encoder_rules(cfg, "", _naming(native_keys) if native_keys is not None else TODAY)
    return table + norm_rules("norm", "layernorm", cfg)


def mlp_ratio(cfg: ViTConfig) -> float | int:
    return cfg.mlp_dim // cfg.width if cfg.mlp_dim % cfg.width == 0 else cfg.mlp_dim / cfg.width


def _cannot_express(cfg: ViTConfig) -> list[str]:
    registers = cfg.num_registers > 0
    checks = [
        (cfg.pool == "token", f"pooler_output is the class token (config: pool={cfg.pool!r})"),
        (cfg.class_token, "DINOv2 always has a class token"),
        (
            not cfg.num_classes,
            f"{BARE} has no classifier (config: num_classes={cfg.num_classes}); " + NOT_POOLED,
        ),
        *shared_checks(cfg, HIDDEN_ACT),
        (not cfg.distilled, "no distillation token"),
        (cfg.posemb == "learned", f"the position embedding is always learned (config: {cfg.posemb!r})"),
        (
            cfg.posemb_on_cls != registers,
            f"{REGISTERS}'s registers have no position rows (posemb_on_cls=False, the class row folded into "
            f"the class token)"
            if registers
            else f"{BARE}'s position embedding covers the class token (posemb_on_cls=True)",
        ),
        (cfg.layer_scale is not None, "the blocks always have LayerScale"),
        (not cfg.pre_norm, "no LayerNorm before the blocks (pre_norm)"),
        (cfg.patch_bias, "the patch embedding always has a bias (patch_bias)"),
        (cfg.final_norm, "the final layernorm is always there (final_norm)"),
        (cfg.representation_size is None, "no pre-logits layer (representation_size)"),
        (
            cfg.image_size[0] == cfg.image_size[1],
            f"the image is square (interpolate_pos_encoding resamples any other; config: {cfg.image_size})",
        ),
        (
            int(cfg.width * mlp_ratio(cfg)) == cfg.mlp_dim,
            f"the MLP width is int(hidden_size x mlp_ratio), and none gives {cfg.mlp_dim} from {cfg.width}",
        ),
    ]
    return [reason for ok, reason in checks if not ok]


def _canonical(native: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """Without the mask token; with registers, the class row folded into the class token."""
    foldable = REG in native and CLS in native and POSEMB in native and len(spec_of(native, POSEMB)[0]) == 3
    if not foldable:  # no registers, or parts amiss (which the table's check then names)
        return rebuilt(native, dropped=(MASK_TOKEN,))
    (one, rows, width), dtype = spec_of(native, POSEMB)
    folded = {
        CLS: (spec_of(native, CLS), lambda: np.asarray(native[CLS]) + np.asarray(native[POSEMB])[:, :1]),
        POSEMB: (
            ((one, rows - 1, width), dtype),
            lambda: np.ascontiguousarray(np.asarray(native[POSEMB])[:, 1:]),
        ),
    }
    return rebuilt(native, dropped=(MASK_TOKEN,), computed=folded)


def _stored(native: LazyTensors, cfg: ViTConfig) -> LazyTensors:
    dtype = native.spec(CLS)[1]
    computed = {MASK_TOKEN: (((1, cfg.width), dtype), zeros_like_spec(((1, cfg.width), dtype)))}
    if cfg.num_registers:
        (one, rows, width), _ = native.spec(POSEMB)

        def with_class_row() -> np.ndarray:
            patches = np.asarray(native[POSEMB])
            return np.concatenate([np.zeros((1, 1, width), patches.dtype), patches], axis=1)

        computed[POSEMB] = (((one, rows + 1, width), dtype), with_class_row)
    return rebuilt(native, computed=computed)


def _read(native: Mapping[str, np.ndarray], file_keys: Collection[str] = ()) -> Reading:
    fmt = "hf_dinov2 (transformers Dinov2Model)"
    if any(SWIGLU.search(k) for k in native):
        raise FormatError(f"a DINOv2 with {SWIGLU_REASON}")
    n = _naming(native.keys())
    registers = optional_dim(native, REG, 1) or 0
    facts = Facts(
        **encoder_facts(native, "", n, hf.PATCH, fmt),
        num_classes=0,
        representation_size=None,
        class_token=CLS in native,
        num_registers=registers,
        posemb_rows=optional_dim(native, POSEMB, 1),
        layer_scale=f"{n.layer(0)}.{n.ls1}" in native,
        map_head=False,
    )
    notes = []
    if MASK_TOKEN in file_keys:
        notes.append(
            Note(
                "mask_token",
                f"{MASK_TOKEN} ignored",
                "it replaces masked patches in masked-image training only (bool_masked_pos); inference "
                "never reads it (written back as zeros)",
            )
        )
    if registers:
        notes.append(
            Note(
                "posemb_on_cls",
                "posemb_on_cls False, the class token's position row folded into cls_token",
                f"{REGISTERS} adds the position embedding before inserting the registers, which have no "
                "rows; the class row is never resampled, so the fold is exact at any image size",
            )
        )
    return Reading(facts, {}, {}, notes, _convention(registers > 0))


def transformers_config(cfg: ViTConfig) -> dict:
    architecture = REGISTERS if cfg.num_registers else BARE
    registers = {"num_register_tokens": cfg.num_registers} if cfg.num_registers else {}
    return {
        "architectures": [architecture],
        "model_type": MODEL_TYPES[architecture],
        **json_fields(cfg, CONFIG_JSON_FIELDS, HIDDEN_ACT),
        "mlp_ratio": mlp_ratio(cfg),
        "layerscale_value": cfg.layer_scale,
        "use_swiglu_ffn": False,
        **registers,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
    }


def stated_fields(config: dict, where: str) -> dict:
    architectures = {name: lambda c: {"num_classes": 0} for name in MODEL_TYPES}
    fields = stated(config, where, tuple(MODEL_TYPES.values()), CONFIG_JSON_FIELDS, architectures, REFUSED)
    if config.get("use_swiglu_ffn"):
        raise FormatError(f"{where}: use_swiglu_ffn is true: {SWIGLU_REASON}")
    if "width" in fields:
        fields["mlp_dim"] = int(fields["width"] * config.get("mlp_ratio", 4))  # Dinov2Config's default
    # Dinov2WithRegistersConfig's default is 4 registers
    with_registers = config["model_type"] == MODEL_TYPES[REGISTERS]
    fields["num_registers"] = config.get("num_register_tokens", 4) if with_registers else 0
    return fields


FORMAT = family(
    _read,
    name=NAME,
    description="Hugging Face Dinov2Model / Dinov2WithRegistersModel",
    convention=_convention(False),
    build_table=_table,
    cannot_express=_cannot_express,
    model_types=tuple(MODEL_TYPES.values()),
    config_json=transformers_config,
    stated_fields=stated_fields,
    canonical=_canonical,
    stored=_stored,
)
