"""Checkpoint layouts: the reference tree and timm, big_vision, vision_transformer and HF layouts.

`load_any(path, fmt=None, **flags) -> (cfg, params)` reads any of them into the reference tree;
`save_any(path, fmt, cfg, params)` writes one. Each external layout is one module with one table
(`timm`, `big_vision`, `vit_jax`, `hf`: `hf` and `hf4` for today's and 4.x transformers names;
the transformers families `hf_deit`, `hf_clip`, `hf_siglip`, `hf_dinov2`, vitspec.formats.hf_directory);
`FORMATS` names them for `--from` / `--to`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats import big_vision, hf, hf_directory, scenic, timm, tutorial, vit_flax, vit_jax
from vitspec.formats.base import Format
from vitspec.formats.checkpoint import (
    CONFIG_KEY,
    NPZ_CONFIG_KEY,
    atomic_write,
    nonfinite_names,
    open_reference,
    save,
)
from vitspec.formats.files import TORCH_SUFFIXES, open_tensors, write_tensors
from vitspec.formats.flags import (
    FLAGS,
    READING_FLAGS,
    Note,
    check_flags,
    config_flag,
    flag_form,
    flag_text,
    given_values,
)
from vitspec.formats.flax_trees import IMAGE_TOWER, image_tower, is_scanned
from vitspec.formats.inference import reading_flags
from vitspec.formats.lazy import finite, stand_ins
from vitspec.formats.strict import StrictError, refuse_unsettled
from vitspec.formats.table import FormatError
from vitspec.params import param_shapes, validate_params

REFERENCE = "ref"
EXTERNAL: dict[str, Format] = {
    f.name: f
    for f in (
        timm.FORMAT,
        big_vision.FLAX,
        big_vision.FORMAT,
        big_vision.FORMAT_SCAN,
        vit_jax.FORMAT,
        hf.FORMAT,
        hf.FORMAT_4X,
        *hf_directory.FAMILIES.values(),
        scenic.FORMAT,
        vit_flax.FORMAT,
        tutorial.FORMAT,
    )
}
FORMATS = (REFERENCE, *EXTERNAL)
ALIASES = {"timm": timm.NAME, "reference": REFERENCE}
REFERENCE_SUFFIXES = (".safetensors", ".npz")

__all__ = [
    "FORMATS",
    "FormatError",
    "Loaded",
    "Note",
    "StrictError",
    "detect_format",
    "load_any",
    "load_with_notes",
    "open_with_notes",
    "resolve_format",
    "save_any",
]


class Loaded(NamedTuple):
    fmt: str
    cfg: ViTConfig
    params: dict[str, np.ndarray]
    notes: list[Note]  # each prints as its text


def resolve_format(name: str) -> str:
    fmt = ALIASES.get(name, name)
    if fmt not in FORMATS:
        raise FormatError(
            f"unknown format {name!r}; known formats: {', '.join(FORMATS)} "
            f"(aliases: {', '.join(f'{a}={f}' for a, f in ALIASES.items())})"
        )
    return fmt


def detect_format(path: str | Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """The layout of a file's arrays, from its metadata and key names."""
    keys = set(arrays)
    if CONFIG_KEY in metadata or NPZ_CONFIG_KEY in keys:
        return REFERENCE
    if "patch_embed.proj.weight" in keys:
        return timm.NAME
    if tutorial.PATCH + ".weight" in keys:
        return tutorial.NAME
    if vit_flax.FIRST + "/Dense_0/kernel" in keys:
        return vit_flax.NAME
    if "embedding/kernel" in keys and scenic.HEAD + "/kernel" in keys:
        return scenic.NAME
    family = hf_directory.detect(keys)  # before ViT's names, which DeiT's and DINOv2's end like
    if family is not None:
        return family
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return hf.NAME
    if IMAGE_TOWER + "embedding/kernel" in keys:  # big_vision's two_towers (SigLIP, LiT): its ViT
        return big_vision.SCAN_NAME if is_scanned(keys) else big_vision.BIG_VISION_NAME
    if "embedding/kernel" in keys:
        vit_jax_names = vit_jax.POSEMB in keys or any("MultiHeadDotProductAttention_1" in k for k in keys)
        if vit_jax_names:
            return vit_jax.NAME
        return big_vision.SCAN_NAME if is_scanned(keys) else big_vision.NAME  # only big_vision scans
    raise FormatError(
        f"{path}: cannot tell the checkpoint format from its keys (first: {sorted(keys)[:6]}); "
        f"pass --from, one of {', '.join(FORMATS)}"
    )


def load_with_notes(
    path: str | Path, fmt: str | None = None, *, strict: bool = False, **flags: Any
) -> Loaded:
    """Read any supported checkpoint into (format, config, reference params, notes on the config).

    `path` is a file, or a transformers directory (config.json beside model.safetensors), whose
    config.json settles what it states. `strict`: refuse (StrictError) if any value is inferred
    rather than read from the file, its format, its stored config or a flag."""
    loaded = open_with_notes(path, fmt, strict=strict, **flags)
    return loaded._replace(params=dict(loaded.params))


def open_with_notes(
    path: str | Path, fmt: str | None = None, *, strict: bool = False, **flags: Any
) -> Loaded:
    """As load_with_notes, but its params are a LazyTensors: each reference tensor is read from the
    file and converted when asked for, not kept (a conversion streams them). The config, names,
    shapes and dtypes are read and checked now; a NaN or infinity is refused when its tensor is
    read, with every bad tensor named."""
    check_flags(flags)
    path = Path(path)
    if path.is_dir():
        fmt, arrays, stated = hf_directory.read_directory(path, resolve_format(fmt) if fmt else None)
        tower: list[Note] = []
    else:
        arrays, metadata = open_tensors(path)
        fmt = resolve_format(fmt) if fmt else detect_format(path, arrays, metadata)
        arrays, tower = image_tower(arrays)  # a two-tower (SigLIP) file: its image ViT, noted
        stated = {}
    if fmt == REFERENCE:
        cfg, params = open_reference(path)
        _check_flags_agree(cfg, flags, path)
        return Loaded(fmt, cfg, params, [Note("config", "config", f"stored in {path.name}")])
    layout = EXTERNAL[fmt]
    cfg, notes = layout.read_config(stand_ins(arrays), given_values(flags, _as_flags(stated), hf.CONFIG_FILE))
    wrong = [f"{field} {value!r}" for field, value in stated.items() if getattr(cfg, field) != value]
    if wrong:
        raise FormatError(f"{path}: {hf.CONFIG_FILE} gives {', '.join(wrong)}, which the weights are not")
    notes += tower
    if strict:
        refuse_unsettled(str(path), notes)
    params = layout.reference_view(arrays, cfg)
    validate_params(
        cfg, stand_ins(params), source=str(path)
    )  # names and shapes match by now; this refuses non-floats

    def refuse_nonfinite(name: str, value: np.ndarray) -> None:
        if not finite(value):
            bad = nonfinite_names(params)
            raise FormatError(f"{path}: NaN or infinite values in {len(bad)} tensor(s): {', '.join(bad[:5])}")

    return Loaded(fmt, cfg, params.checked(refuse_nonfinite, refuses_nonfinite=True), notes)


def load_any(
    path: str | Path, fmt: str | None = None, *, strict: bool = False, **flags: Any
) -> tuple[ViTConfig, dict[str, np.ndarray]]:
    """(config, reference params) of a checkpoint in any supported format.

    `fmt` is detected from the file when None. `flags` (vitspec.formats.flags.READING_FLAGS: heads,
    gelu, ln_eps, posemb, pool, image_size, and num_classes, qkv_bias, ... confirming what absent
    parameters mean) supply what a foreign file does not store; `strict` refuses a reading that
    needed more; see `vitspec.convert`.
    """
    loaded = load_with_notes(path, fmt, strict=strict, **flags)
    return loaded.cfg, loaded.params


def save_any(path: str | Path, fmt: str, cfg: ViTConfig, params: Mapping[str, np.ndarray]) -> None:
    """Write `params` in layout `fmt` to `path`, atomically; the suffix must suit the format.

    `params` may be a LazyTensors (open_with_notes): each tensor is then converted and written in
    turn, so memory holds a few tensors, not the tree twice (torch files too:
    vitspec.formats.torch_file).

    `hf`, `hf4` and the `hf_*` families also write a directory (a path without a suffix):
    model.safetensors and the config.json transformers' `from_pretrained(path)` reads."""
    fmt = resolve_format(fmt)
    path = Path(path)
    if fmt != REFERENCE:
        EXTERNAL[fmt].refuse_file(cfg)
    if fmt in hf_directory.DIRECTORY_FORMATS and not path.suffix:
        EXTERNAL[fmt].table(cfg)  # refuses what the transformers class cannot express, before writing
        path.mkdir(parents=True, exist_ok=True)
        write_tensors(path / "model.safetensors", EXTERNAL[fmt].native_view(params, cfg))
        text = json.dumps(hf_directory.config_json(fmt, cfg), indent=2) + "\n"
        atomic_write(path / "config.json", lambda f: f.write(text.encode()))
        return
    suffixes = REFERENCE_SUFFIXES if fmt == REFERENCE else EXTERNAL[fmt].suffixes
    if path.suffix not in suffixes:
        raise FormatError(
            f"{path}: a {fmt} checkpoint is written as one of {list(suffixes)}, "
            f"not {path.suffix or 'no suffix'!r}"
        )
    if fmt == REFERENCE:
        save(path, cfg, params)
    else:
        write_tensors(path, EXTERNAL[fmt].native_view(params, cfg))


def format_of_suffix(path: str | Path) -> str | None:
    """The format a destination's suffix implies, where it implies one."""
    suffix = Path(path).suffix
    if suffix in TORCH_SUFFIXES:
        return timm.NAME
    if suffix == ".msgpack":
        return big_vision.NAME
    return REFERENCE if suffix in REFERENCE_SUFFIXES else None


def _check_flags_agree(cfg: ViTConfig, flags: dict[str, Any], path) -> None:
    disagree = [
        f"{flag}={value!r} but the stored config has {FLAGS[flag].field}={getattr(cfg, FLAGS[flag].field)!r}"
        for flag, value in flags.items()
        if value is not None and flag_form(flag, value) != config_flag(cfg, flag)
    ]
    if disagree:
        raise FormatError(f"inconsistent flags for {path}: " + "; ".join(disagree))


def _as_flags(stated: dict[str, Any]) -> dict[str, Any]:
    """The values of a stored config's fields that are flags, by keyword."""
    return {flag.keyword: stated[flag.field] for flag in READING_FLAGS if flag.field in stated}


def flags_needed_to_read_back(fmt: str, cfg: ViTConfig, directory: bool = False) -> list[str]:
    """The command-line flags without which reading a `fmt` file of `cfg` would give another config.

    Each flag is dropped in turn from the full set: if inference then fails or disagrees with
    `cfg`, the file cannot show that field. Only names and shapes matter, so the arrays are
    zero-memory stand-ins. `directory`: an hf directory, whose config.json settles what it states.
    """
    layout = EXTERNAL[fmt]
    zeros = {name: np.broadcast_to(np.float32(0), shape) for name, shape in param_shapes(cfg).items()}
    shapes = stand_ins(layout.native_view(zeros, cfg))  # the file's names (a family's derived ones too)
    stored = _as_flags(hf_directory.stated_when_written(fmt, cfg)) if directory else {}
    full = reading_flags(cfg)
    needed = []
    for flag in READING_FLAGS:
        flags = {k: v for k, v in full.items() if k != flag.keyword}
        try:
            told = given_values(flags, stored, hf.CONFIG_FILE)
            inferred, _ = layout.read_config(shapes, told, with_notes=False)
            same = config_flag(inferred, flag.keyword) == full[flag.keyword]
        except FormatError:
            same = False
        if not same:
            needed.append(flag_text(flag.keyword, full[flag.keyword]))
    return needed
