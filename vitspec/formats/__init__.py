"""Checkpoint layouts: the reference tree and timm, big_vision, vision_transformer and HF layouts.

`load_any(path, fmt=None, **flags) -> (cfg, params)` reads any of them into the reference tree;
`save_any(path, fmt, cfg, params)` writes one. Each external layout is one module with one table
(`timm`, `big_vision`, `vit_jax`, `hf`: `hf` and `hf4` for today's and 4.x transformers names);
`FORMATS` names them for `--from` / `--to`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats import big_vision, hf, timm, vit_jax
from vitspec.formats.base import Format
from vitspec.formats.checkpoint import CONFIG_KEY, NPZ_CONFIG_KEY, atomic_write, load, nonfinite_names, save
from vitspec.formats.files import TORCH_SUFFIXES, read_tensors, write_tensors
from vitspec.formats.inference import CONFIG_FIELDS, READING_FLAGS, check_flags, reading_flags
from vitspec.formats.table import FormatError
from vitspec.params import validate_params

REFERENCE = "ref"
EXTERNAL: dict[str, Format] = {
    f.name: f for f in (timm.FORMAT, big_vision.FORMAT, vit_jax.FORMAT, hf.FORMAT, hf.FORMAT_4X)
}
FORMATS = (REFERENCE, *EXTERNAL)
ALIASES = {"timm": timm.NAME, "big_vision": big_vision.NAME, "reference": REFERENCE}
REFERENCE_SUFFIXES = (".safetensors", ".npz")

__all__ = [
    "FORMATS",
    "FormatError",
    "Loaded",
    "detect_format",
    "load_any",
    "load_with_notes",
    "resolve_format",
    "save_any",
]


class Loaded(NamedTuple):
    fmt: str
    cfg: ViTConfig
    params: dict[str, np.ndarray]
    notes: list[str]


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
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return hf.NAME
    if "embedding/kernel" in keys:
        vit_jax_names = vit_jax.POSEMB in keys or any("MultiHeadDotProductAttention_1" in k for k in keys)
        return vit_jax.NAME if vit_jax_names else big_vision.NAME
    raise FormatError(
        f"{path}: cannot tell the checkpoint format from its keys (first: {sorted(keys)[:6]}); "
        f"pass --from, one of {', '.join(FORMATS)}"
    )


def load_with_notes(path: str | Path, fmt: str | None = None, **flags: Any) -> Loaded:
    """Read any supported checkpoint into (format, config, reference params, notes on the config)."""
    check_flags(flags)
    arrays, metadata = read_tensors(path)
    fmt = resolve_format(fmt) if fmt else detect_format(path, arrays, metadata)
    if fmt == REFERENCE:
        cfg, params = load(path)
        _check_flags_agree(cfg, flags, path)
        return Loaded(fmt, cfg, params, [f"config: stored in {Path(path).name}"])
    layout = EXTERNAL[fmt]
    cfg, notes = layout.infer_config_with_notes(arrays, **flags)
    params = layout.to_reference(arrays, cfg)
    validate_params(cfg, params, source=str(path))  # names and shapes match by now; this refuses non-floats
    bad = nonfinite_names(params)
    if bad:
        raise FormatError(f"{path}: NaN or infinite values in {len(bad)} tensor(s): {', '.join(bad[:5])}")
    return Loaded(fmt, cfg, params, notes)


def load_any(
    path: str | Path, fmt: str | None = None, **flags: Any
) -> tuple[ViTConfig, dict[str, np.ndarray]]:
    """(config, reference params) of a checkpoint in any supported format.

    `fmt` is detected from the file when None. `flags` (heads, gelu, ln_eps, posemb, pool,
    image_size) supply what a foreign file does not store; see `vitspec.convert`.
    """
    loaded = load_with_notes(path, fmt, **flags)
    return loaded.cfg, loaded.params


def save_any(path: str | Path, fmt: str, cfg: ViTConfig, params: dict[str, np.ndarray]) -> None:
    """Write `params` in layout `fmt` to `path`, atomically; the suffix must suit the format.

    `hf` and `hf4` also write a directory (a path without a suffix): model.safetensors and the
    config.json transformers' `from_pretrained(path)` reads."""
    fmt = resolve_format(fmt)
    path = Path(path)
    if fmt in (hf.NAME, hf.NAME_4X) and not path.suffix:
        EXTERNAL[fmt].table(cfg)  # refuses what transformers' ViT cannot express, before writing anything
        path.mkdir(parents=True, exist_ok=True)
        write_tensors(path / "model.safetensors", EXTERNAL[fmt].from_reference(params, cfg))
        text = json.dumps(hf.transformers_config(cfg), indent=2) + "\n"
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
        write_tensors(path, EXTERNAL[fmt].from_reference(params, cfg))


def format_of_suffix(path: str | Path) -> str | None:
    """The format a destination's suffix implies, where it implies one."""
    suffix = Path(path).suffix
    if suffix in TORCH_SUFFIXES:
        return timm.NAME
    if suffix == ".msgpack":
        return big_vision.NAME
    return REFERENCE if suffix in REFERENCE_SUFFIXES else None


def _check_flags_agree(cfg: ViTConfig, flags: dict[str, Any], path) -> None:
    disagree = []
    for flag, value in flags.items():
        if value is None:
            continue
        stored = getattr(cfg, CONFIG_FIELDS[flag])
        wanted = (value, value) if flag == "image_size" and isinstance(value, int) else value
        if (tuple(wanted) if flag == "image_size" else wanted) != stored:
            disagree.append(f"{flag}={value!r} but the stored config has {CONFIG_FIELDS[flag]}={stored!r}")
    if disagree:
        raise FormatError(f"inconsistent flags for {path}: " + "; ".join(disagree))


def flags_needed_to_read_back(fmt: str, cfg: ViTConfig) -> dict[str, str]:
    """{CLI flag: value} without which reading a `fmt` file of `cfg` would give another config.

    Each flag is dropped in turn from the full set: if inference then fails or disagrees with
    `cfg`, the file cannot show that field. Only names and shapes matter, so the arrays are
    zero-memory stand-ins.
    """
    layout = EXTERNAL[fmt]
    shapes = {r.native: np.broadcast_to(np.float32(0), r.native_shape) for r in layout.table(cfg)}
    full = reading_flags(cfg)
    needed = {}
    for flag in READING_FLAGS:
        try:
            inferred = layout.infer_config(shapes, **{k: v for k, v in full.items() if k != flag.keyword})
            same = getattr(inferred, flag.field) == getattr(cfg, flag.field)
        except FormatError:
            same = False
        if not same:
            value = full[flag.keyword]
            needed[flag.cli] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return needed
