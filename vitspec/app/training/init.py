"""Fine-tuning's start: a checkpoint of any format `vitspec convert` reads, fitted to the training model.

The file is read with the training model's values for what a file may not show (heads, GELU
form, LayerNorm eps, position embedding kind, pooling): a file that does show them and disagrees
is refused by the reader, naming the value. The rest of its architecture must be the model's too:
every field that differs is listed and the run refused, as big_vision's `merge_params` refuses
missing and unexpected keys. Two differences are what fine-tuning is for and are bridged: another
class count (the head starts at zero, as big_vision's fine-tuning does) and another image size
(the learned position embedding is resampled as the source format's ecosystem resamples it:
vitspec.app.resampling). Where the model's GELU form or eps differs from the source format's
convention, a warning says so.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from vitspec.app.resampling import CHOICES as RESAMPLE_CHOICES
from vitspec.app.resampling import SOURCE_METHOD, resample_method
from vitspec.config import ViTConfig
from vitspec.formats import EXTERNAL, load_with_notes
from vitspec.posemb import resample_model

# Fields that fix the computation, compared between the file and the model (image size and class
# count are bridged; the rates are training randomness; LayerScale's init value is not stored).
# What fine-tuning may change: the resolution (the posemb is resampled), the classes (the heads are
# re-initialized), the training randomness, LayerScale's init value (stored in no file). Every other
# field is the architecture, which must be the file's.
FINE_TUNING_CHANGES = (
    "image_size", "num_classes", "dropout", "attention_dropout", "stochastic_depth", "drop_path_schedule",
    "layer_scale",
)  # fmt: skip
ARCHITECTURE = tuple(f.name for f in dataclasses.fields(ViTConfig) if f.name not in FINE_TUNING_CHANGES)
HEADS = ("head/", "head_dist/")


def fine_tuning_start(
    cfg: ViTConfig, path: str | Path, resample: str | None = None
) -> tuple[dict[str, np.ndarray], list[str]]:
    """(float32 reference params for `cfg`, notes on what was loaded, resampled and re-initialized).
    `resample` (vitspec.posemb's methods) overrides the source format's own resampling."""
    # What a file may not show, as the model has it (a file that shows otherwise is refused).
    model_values = dict(
        heads=cfg.num_heads,
        gelu=cfg.gelu,
        ln_eps=cfg.ln_eps,
        posemb=cfg.posemb,
        pool=cfg.pool,
        pool_include_prefix=cfg.pool_include_prefix,
        patch_size=cfg.patch_size,
    )
    try:
        loaded = load_with_notes(path, **model_values)
    except ValueError as e:
        raise ValueError(f"--init {path}: {e}") from None
    source, params = loaded.cfg, loaded.params
    differ = [
        f"{field}: file {getattr(source, field)!r}, model {getattr(cfg, field)!r}"
        for field in ARCHITECTURE
        if getattr(source, field) != getattr(cfg, field)
    ]
    if (source.layer_scale is None) != (cfg.layer_scale is None):
        differ.append(f"layer_scale: file {source.layer_scale!r}, model {cfg.layer_scale!r}")
    if differ:
        raise ValueError(
            f"--init {path} is not this model ({len(differ)} difference(s)): " + "; ".join(differ)
        )
    notes = [f"--init {path} ({loaded.fmt}): {len(params)} tensors loaded"]
    if loaded.fmt in EXTERNAL:
        convention = EXTERNAL[loaded.fmt].convention
        for field in ("gelu", "ln_eps"):
            if getattr(convention, field) != getattr(cfg, field):
                notes.append(
                    f"WARNING: {field} {getattr(cfg, field)!r} as the model has it; {convention.ecosystem}'s "
                    f"convention is {getattr(convention, field)!r} (--model-overrides to follow it)"
                )
    if source.image_size != cfg.image_size:
        source, params, note = _resampled(source, params, cfg.image_size, loaded.fmt, resample, path)
        notes.append(note)
    if source.num_classes != cfg.num_classes:
        params = {k: v for k, v in params.items() if not k.startswith(HEADS)}
        for head in HEADS[: 1 + cfg.distilled] if cfg.num_classes else ():
            params[f"{head}kernel"] = np.zeros((cfg.feature_dim, cfg.num_classes))
            params[f"{head}bias"] = np.zeros((cfg.num_classes,))
        notes.append(f"head re-initialized at zero: {source.num_classes} -> {cfg.num_classes} classes")
    return {k: np.asarray(v, np.float32) for k, v in params.items()}, notes


def _resampled(
    source: ViTConfig, params: dict, image_size: tuple[int, int], fmt: str, resample: str | None, path
) -> tuple[ViTConfig, dict, str]:
    old = source.grid_size
    if source.posemb != "learned":
        source, params = resample_model(source, params, image_size)
        return source, params, f"image size {image_size}: no learned position embedding to resample"
    if resample is None and fmt not in SOURCE_METHOD:
        raise ValueError(
            f"--init {path}: a {fmt} checkpoint's ecosystem has no position-embedding resampling to follow; "
            f"choose one with --resample {'|'.join(RESAMPLE_CHOICES)}"
        )
    method, how = resample_method(fmt, resample)
    source, params = resample_model(source, params, image_size, method)
    new = source.grid_size
    return (
        source,
        params,
        f"position embedding resampled {old[0]}x{old[1]} -> {new[0]}x{new[1]} patches "
        f"({image_size[0]}x{image_size[1]} images) {how}",
    )
