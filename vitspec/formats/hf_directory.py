"""Transformers directories (config.json beside the weights) of every family, and the families'
file names: which layout a directory or a bare file of transformers names is.

A directory's config.json names its family (`model_type`) and settles what it states; `hf` and
`hf4` (ViT) read `vit`, each family here its own model types.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats import hf, hf_clip, hf_deit, hf_dinov2, hf_siglip
from vitspec.formats.files import open_tensors
from vitspec.formats.hf_family import Family
from vitspec.formats.hf_parts import CONFIG_FILE, read_config_json
from vitspec.formats.table import FormatError

FAMILIES: dict[str, Family] = {
    f.name: f for f in (hf_deit.FORMAT, hf_clip.FORMAT, hf_siglip.FORMAT, hf_dinov2.FORMAT)
}
VIT = (hf.NAME, hf.NAME_4X)
DIRECTORY_FORMATS = (*VIT, *FAMILIES)


def detect(keys: Collection[str]) -> str | None:
    """The family whose names `keys` has, where one has them (before ViT's, which DeiT's and DINOv2's
    names end like)."""
    if hf_deit.MARKER in keys:
        return hf_deit.NAME
    if any(k.endswith(hf_clip.MARKER) for k in keys):
        return hf_clip.NAME
    if any(k.endswith("embeddings.patch_embedding.weight") for k in keys):
        return hf_siglip.NAME
    if hf_dinov2.MASK_TOKEN in keys or any(k.endswith(hf_dinov2.LAYER_SCALE[0]) for k in keys):
        return hf_dinov2.NAME
    return None


def read_directory(path: Path, fmt: str | None) -> tuple[str, Mapping[str, np.ndarray], dict[str, Any]]:
    """(format, weights, the ViTConfig fields config.json states) of a transformers directory; `fmt`,
    when given, must be the family its config.json names."""
    weights, config = read_config_json(path, "transformers model")
    model_type = config.get("model_type")
    where = str(path / CONFIG_FILE)
    if model_type == "vit":
        found, stated = fmt if fmt in VIT else hf.NAME, hf.stated_fields(config, where)
    else:
        family = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
        if family is None:
            known = ["vit", *(t for f in FAMILIES.values() for t in f.model_types)]
            raise FormatError(f"{where}: model_type {model_type!r} is none of {known}")
        found, stated = family.name, family.stated_fields(config, where)
    if fmt is not None and fmt != found:
        raise FormatError(f"{path}: {CONFIG_FILE} names a {model_type!r} model, read as {found}, not {fmt}")
    return found, open_tensors(weights)[0], stated


def config_json(fmt: str, cfg: ViTConfig) -> dict:
    """The config.json that transformers' `from_pretrained` reads beside a `fmt` directory's weights."""
    return hf.transformers_config(cfg) if fmt in VIT else FAMILIES[fmt].config_json(cfg)


def stated_when_written(fmt: str, cfg: ViTConfig) -> dict[str, Any]:
    """What the config.json written for `cfg` states, as read back."""
    if fmt in VIT:
        return hf.stated_fields(hf.transformers_config(cfg), CONFIG_FILE)
    return FAMILIES[fmt].stated_fields(FAMILIES[fmt].config_json(cfg), CONFIG_FILE)
