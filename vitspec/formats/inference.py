"""A checkpoint's config from its names and shapes, the flags, and the source ecosystem's convention.

A checkpoint shows most of the config in its names and shapes (`Facts`); the rest (heads in
torch layouts, GELU form, LayerNorm epsilon, a posemb that is not a parameter, the image size)
comes from flags or else from the source ecosystem's convention (`Convention`). Every value not
read from the file is reported in the notes; where neither settles a field, the reading is
refused naming the flag. SPEC.md section 8 states the rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from vitspec.config import VIT_SIZES, ViTConfig
from vitspec.formats.table import FormatError


class ReadingFlag(NamedTuple):
    """Something a file may not show, given when reading it: keyword, config field, command-line flag."""

    keyword: str  # of load_any / infer_config
    field: str  # the ViTConfig field it settles (image_size: the source's)
    cli: str


READING_FLAGS = (
    ReadingFlag("heads", "num_heads", "--heads"),
    ReadingFlag("gelu", "gelu", "--gelu"),
    ReadingFlag("ln_eps", "ln_eps", "--ln-eps"),
    ReadingFlag("posemb", "posemb", "--posemb"),
    ReadingFlag("pool", "pool", "--pool"),
    ReadingFlag("image_size", "image_size", "--source-image-size"),
)
CONFIG_FIELDS = {flag.keyword: flag.field for flag in READING_FLAGS}
# LayerScale's init value is not stored; any value computes the same function from the stored gammas.
LAYER_SCALE_PLACEHOLDER = 1.0
# The image size every ecosystem's ViT defaults to, for checkpoints without a position embedding.
DEFAULT_IMAGE_SIZE = 224


class Facts(NamedTuple):
    """The config as far as a checkpoint's names and shapes show it."""

    width: int
    depth: int
    mlp_dim: int
    patch_size: tuple[int, int]
    in_channels: int
    num_classes: int
    representation_size: int | None
    class_token: bool
    num_registers: int
    posemb_rows: int | None  # rows of a learned position embedding; None when there is none
    qkv_bias: bool
    qk_norm: bool
    layer_scale: bool
    fc_norm: bool
    map_head: bool
    heads: int | None  # None where the layout does not show it


class Convention(NamedTuple):
    """What an ecosystem's checkpoints mean where the file is silent."""

    ecosystem: str
    gelu: str
    ln_eps: float
    posemb_absent: str  # posemb of a checkpoint without a position-embedding parameter
    posemb_on_cls: bool  # where the shapes cannot tell (no prefix tokens, or ambiguous lengths)


def check_flags(flags: Mapping[str, Any]) -> None:
    unknown = sorted(set(flags) - set(CONFIG_FIELDS))
    if unknown:
        raise FormatError(f"unknown config flag(s) {unknown}; known: {list(CONFIG_FIELDS)}")


def standard_heads(width: int) -> int | None:
    """Heads of the standard ViT size (vitspec.config.VIT_SIZES) of this width, if there is one."""
    return next((dims["num_heads"] for dims in VIT_SIZES.values() if dims["width"] == width), None)


def _heads(facts: Facts, flags: Mapping[str, Any], fmt: str, notes: list[str]) -> int:
    flag = flags.get("heads")
    if facts.heads is not None:
        if flag is not None and flag != facts.heads:
            raise FormatError(
                f"inconsistent flags: --heads {flag}, but the {fmt} attention kernels have "
                f"{facts.heads} heads"
            )
        return facts.heads
    if flag is not None:
        notes.append(f"heads {flag}: from --heads")
        return flag
    standard = standard_heads(facts.width)
    if standard is not None:
        notes.append(
            f"heads {standard}: not stored in a {fmt} checkpoint; the standard ViT of width "
            f"{facts.width} has {standard} (pass --heads to override)"
        )
        return standard
    standard = ", ".join(f"{size}={dims['width']}" for size, dims in VIT_SIZES.items())
    raise FormatError(
        f"a {fmt} checkpoint does not store the number of heads, and width {facts.width} is no "
        f"standard ViT width ({standard}): pass --heads N"
    )


def _posemb(facts: Facts, conv: Convention, flags: Mapping[str, Any], notes: list[str]) -> str:
    flag = flags.get("posemb")
    if facts.posemb_rows is not None:
        if flag not in (None, "learned"):
            raise FormatError(
                f"inconsistent flags: --posemb {flag}, but the checkpoint has a learned "
                f"position embedding ({facts.posemb_rows} rows)"
            )
        return "learned"
    if flag == "learned":
        raise FormatError(
            "inconsistent flags: --posemb learned, but the checkpoint has no position embedding"
        )
    if flag is not None:
        notes.append(f"posemb {flag}: from --posemb")
        return flag
    notes.append(
        f"posemb {conv.posemb_absent}: no position-embedding parameter; {conv.ecosystem}'s "
        "convention (pass --posemb to override)"
    )
    return conv.posemb_absent


def _pool(facts: Facts, flags: Mapping[str, Any], notes: list[str]) -> str:
    if flags.get("pool") is not None:
        notes.append(f"pool {flags['pool']}: from --pool")
        return flags["pool"]
    if facts.map_head:
        return "map"
    if facts.fc_norm:
        notes.append("pool gap: the checkpoint has fc_norm and no attention pool (timm's avg-pool models)")
        return "gap"
    pool = "token" if facts.class_token else "gap"
    notes.append(
        f"pool {pool}: {'a' if facts.class_token else 'no'} class token and no attention pool "
        "(pass --pool to override)"
    )
    return pool


def _grid_and_on_cls(
    facts: Facts, conv: Convention, flags: Mapping[str, Any], notes: list[str]
) -> tuple[tuple[int, int], bool]:
    """The source patch grid and whether the prefix tokens have position-embedding rows."""
    prefix = int(facts.class_token) + facts.num_registers
    unseen = False if prefix else conv.posemb_on_cls  # without prefix tokens the choice changes nothing
    grid = _grid_of_flag(flags.get("image_size"), facts.patch_size)
    rows = facts.posemb_rows
    if rows is None:
        return grid or _grid_without_posemb(facts.patch_size, notes), unseen
    if grid is not None:
        patches = grid[0] * grid[1]
        if prefix and rows == patches + prefix:
            return grid, True
        if rows == patches:
            return grid, unseen
        raise FormatError(
            f"inconsistent flags: source image size {flags['image_size']} gives {patches} "
            f"patches (+{prefix} prefix tokens), but the position embedding has {rows} rows"
        )
    # Without the image size, the rows are read by the ecosystem's convention alone: a reading that
    # only fits against the convention (timm rows that make a square grid only without a class
    # row) is a different model, not a fallback, so it is refused with the flag that settles it.
    with_prefix = prefix and rows > prefix and _is_square(rows - prefix)
    if prefix and conv.posemb_on_cls and with_prefix:
        grid, on_cls = _square(rows - prefix), True
    elif (not prefix or not conv.posemb_on_cls) and _is_square(rows):
        grid, on_cls = _square(rows), unseen
    else:
        raise FormatError(_unreadable_grid(rows, prefix, conv))
    notes.append(
        f"patch grid {grid[0]}x{grid[1]}: the square grid that the {rows}-row position embedding "
        f"holds{' with its prefix rows' if on_cls and prefix else ''} (pass --source-image-size "
        "for another)"
    )
    return grid, on_cls


def _unreadable_grid(rows: int, prefix: int, conv: Convention) -> str:
    if not prefix:
        reading = f"{rows} patch rows"
    elif conv.posemb_on_cls:
        reading = (
            f"{prefix} class/register row(s) + {rows - prefix} patch rows, as {conv.ecosystem}'s "
            "convention has it"
        )
    else:
        reading = (
            f"{rows} patch rows and none for the {prefix} class/register token(s), as "
            f"{conv.ecosystem}'s convention has it"
        )
    others = []
    if prefix and conv.posemb_on_cls and _is_square(rows):
        others.append(
            f"{rows} patch rows and no class/register rows would be a square grid (timm's "
            "no_embed_class models)"
        )
    if prefix and not conv.posemb_on_cls and rows > prefix and _is_square(rows - prefix):
        others.append(f"{prefix} class/register row(s) + {rows - prefix} patch rows would be a square grid")
    alternative = f"; {others[0]}" if others else ""
    return (
        f"the position embedding has {rows} rows: {reading} is not a square patch grid, so the image "
        f"size cannot be read from it{alternative}. Pass --source-image-size H,W (the resolution the "
        "checkpoint was trained at), which settles both the grid and whether the prefix tokens have rows"
    )


def _grid_of_flag(image: Any, patch: tuple[int, int]) -> tuple[int, int] | None:
    if image is None:
        return None
    image = (image, image) if isinstance(image, int) else tuple(image)
    if image[0] % patch[0] or image[1] % patch[1]:
        raise FormatError(
            f"inconsistent flags: source image size {image} is not divisible by the "
            f"checkpoint's patch size {patch}"
        )
    return (image[0] // patch[0], image[1] // patch[1])


def _grid_without_posemb(patch: tuple[int, int], notes: list[str]) -> tuple[int, int]:
    if DEFAULT_IMAGE_SIZE % patch[0] or DEFAULT_IMAGE_SIZE % patch[1]:
        raise FormatError(
            "the checkpoint has no position embedding to read the image size from, and "
            f"{DEFAULT_IMAGE_SIZE} is not divisible by patch {patch}: pass --source-image-size"
        )
    notes.append(
        f"image size {DEFAULT_IMAGE_SIZE}: no position embedding to read it from (pass --source-image-size)"
    )
    return (DEFAULT_IMAGE_SIZE // patch[0], DEFAULT_IMAGE_SIZE // patch[1])


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def _square(n: int) -> tuple[int, int]:
    return (math.isqrt(n), math.isqrt(n))


def config_from_facts(
    facts: Facts, conv: Convention, flags: Mapping[str, Any]
) -> tuple[ViTConfig, list[str]]:
    notes: list[str] = []
    heads = _heads(facts, flags, conv.ecosystem, notes)
    posemb = _posemb(facts, conv, flags, notes)
    pool = _pool(facts, flags, notes)
    grid, on_cls = _grid_and_on_cls(facts, conv, flags, notes)
    numerics = {}
    for field, flag in (("gelu", "--gelu"), ("ln_eps", "--ln-eps")):
        if flags.get(field) is not None:
            numerics[field] = flags[field]
            notes.append(f"{field} {flags[field]}: from {flag}")
        else:
            numerics[field] = getattr(conv, field)
            notes.append(
                f"{field} {numerics[field]}: not stored; {conv.ecosystem}'s convention (pass {flag})"
            )
    if facts.layer_scale:
        notes.append(
            f"layer_scale: present; its init value is not stored, recorded as {LAYER_SCALE_PLACEHOLDER}"
        )
    try:
        cfg = ViTConfig(
            image_size=(grid[0] * facts.patch_size[0], grid[1] * facts.patch_size[1]),
            patch_size=facts.patch_size,
            in_channels=facts.in_channels,
            width=facts.width,
            depth=facts.depth,
            num_heads=heads,
            mlp_dim=facts.mlp_dim,
            num_classes=facts.num_classes,
            pool=pool,
            class_token=facts.class_token,
            posemb=posemb,
            posemb_on_cls=on_cls and posemb != "sincos2d",  # sincos2d is defined on the patch grid only
            fc_norm=facts.fc_norm,
            representation_size=facts.representation_size,
            qkv_bias=facts.qkv_bias,
            qk_norm=facts.qk_norm,
            layer_scale=LAYER_SCALE_PLACEHOLDER if facts.layer_scale else None,
            num_registers=facts.num_registers,
            **numerics,
        )
    except ValueError as e:
        raise FormatError(f"the checkpoint and flags give an invalid config: {e}") from None
    return cfg, notes


def reading_flags(cfg: ViTConfig) -> dict[str, Any]:
    """Flags that make reading a written file back give exactly `cfg`."""
    return {flag.keyword: getattr(cfg, flag.field) for flag in READING_FLAGS}
