"""transformers' `DeiTForImageClassificationWithTeacher`: our `distilled=True`.

Read off transformers 5.23.0's modeling_deit.py: a ViT whose tokens are [class, distillation,
patches], the position embedding over all of them, and two classifiers, `cls_classifier` on the
class token and `distillation_classifier` on the distillation token; `logits` is their mean, and
with `num_labels=0` both are identities, so the output is the mean of the two tokens. All under
`deit.` but the classifiers; the encoder's names are ViT's (`hf` for today's, `hf4` for 4.x's, both
read; today's written).

Not read: `DeiTForImageClassification` (one classifier on the class token beside the distillation
token) and `DeiTModel` (its pooler is a tanh layer on the class token alone): vitspec's distilled
model averages both tokens' heads.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import optional_dim, require
from vitspec.formats.hf import CONFIG_JSON_FIELDS, PATCH, TRANSFORMERS_5, naming_of
from vitspec.formats.hf_family import HIDDEN_ACT, Reading, family, stated
from vitspec.formats.hf_parts import (
    dense_rules,
    embedding_rules,
    encoder_facts,
    encoder_rules,
    json_fields,
    labels_json,
    norm_rules,
    num_labels,
    shared_checks,
)
from vitspec.formats.inference import Convention, Facts
from vitspec.formats.table import FormatError, Rule

NAME = "hf_deit"
PREFIX = "deit."
ARCHITECTURE = "DeiTForImageClassificationWithTeacher"
MARKER = f"{PREFIX}embeddings.distillation_token"  # what tells a DeiT-with-teacher file by its names
REFUSED = {
    "DeiTForImageClassification": "one classifier on the class token beside a distillation token; "
    "vitspec's distilled model averages the heads of both tokens (DeiTForImageClassificationWithTeacher)",
    "DeiTModel": "its pooler is a tanh layer on the class token alone; vitspec's distilled model reads "
    "both tokens (DeiTForImageClassificationWithTeacher)",
    "DeiTForMaskedImageModeling": "a masked-image-modeling decoder, not a classifier",
}
CONVENTION = Convention(
    "Hugging Face DeiT", gelu="exact", ln_eps=1e-12, posemb_absent="learned", posemb_on_cls=True
)


def _table(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    n = naming_of(native_keys) if native_keys is not None else TRANSFORMERS_5
    p = PREFIX
    table = embedding_rules(cfg, p, ("dist_token", "distillation_token")) + encoder_rules(cfg, p, n)
    table += norm_rules("norm", f"{p}layernorm", cfg)
    if cfg.num_classes:
        table += dense_rules("head", "cls_classifier", cfg) + dense_rules(
            "head_dist", "distillation_classifier", cfg
        )
    return table


def _cannot_express(cfg: ViTConfig) -> list[str]:
    checks = [
        (cfg.distilled, f"{ARCHITECTURE} always has the distillation token and its head (distilled=True)"),
        *shared_checks(cfg, HIDDEN_ACT),
        (cfg.num_registers == 0, f"no register tokens (config has {cfg.num_registers})"),
        (cfg.posemb == "learned", f"the position embedding is always learned (config: {cfg.posemb!r})"),
        (cfg.posemb_on_cls, "the position embedding always covers the class and distillation tokens"),
        (cfg.layer_scale is None, "no LayerScale"),
        (not cfg.pre_norm, "no LayerNorm before the blocks (pre_norm)"),
        (cfg.patch_bias, "the patch embedding always has a bias (patch_bias)"),
        (cfg.final_norm, "the encoder's final LayerNorm is always there (final_norm)"),
        (cfg.representation_size is None, "no pre-logits layer (representation_size)"),
    ]
    return [reason for ok, reason in checks if not ok]


def _read(native: Mapping[str, np.ndarray], file_keys: Collection[str] = ()) -> Reading:
    fmt = "hf_deit (transformers DeiTForImageClassificationWithTeacher)"
    if "classifier.weight" in native or f"{PREFIX}pooler.dense.weight" in native:
        kind = "DeiTForImageClassification" if "classifier.weight" in native else "DeiTModel"
        raise FormatError(f"a {kind} checkpoint cannot be read: {REFUSED[kind]}")
    n, p = naming_of(native.keys()), PREFIX
    require(native, MARKER, fmt)
    facts = Facts(
        **encoder_facts(native, p, n, PATCH, fmt),
        num_classes=optional_dim(native, "cls_classifier.weight", 0) or 0,
        representation_size=None,
        class_token=f"{p}embeddings.cls_token" in native,
        num_registers=0,
        distilled=True,
        posemb_rows=int(require(native, f"{p}embeddings.position_embeddings", fmt).shape[1]),
        layer_scale=False,
        map_head=False,
    )
    return Reading(facts, {}, {}, [], CONVENTION)


def transformers_config(cfg: ViTConfig) -> dict:
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "deit",
        **json_fields(cfg, CONFIG_JSON_FIELDS, HIDDEN_ACT),
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        **labels_json(cfg.num_classes),
    }


def stated_fields(config: dict, where: str) -> dict:
    architectures = {ARCHITECTURE: lambda c: {"num_classes": num_labels(c)}}
    return stated(config, where, ("deit",), CONFIG_JSON_FIELDS, architectures, REFUSED)


FORMAT = family(
    _read,
    name=NAME,
    description="Hugging Face DeiTForImageClassificationWithTeacher (distilled DeiT)",
    convention=CONVENTION,
    build_table=_table,
    cannot_express=_cannot_express,
    model_types=("deit",),
    config_json=transformers_config,
    stated_fields=stated_fields,
)
