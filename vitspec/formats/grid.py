"""The source image size of a checkpoint: from the flag, else the position embedding's rows.

The rows are patches, plus one per class/register token where the model gives them rows; without
the flag they are read by the source ecosystem's convention only, as a square grid (SPEC.md
section 8).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from vitspec.formats.flags import Note, Told, flag_text, told_value
from vitspec.formats.table import FormatError

if TYPE_CHECKING:  # inference imports this module
    from vitspec.formats.inference import Convention, Facts

# The image size every ecosystem's ViT defaults to, for checkpoints without a position embedding.
DEFAULT_IMAGE_SIZE = 224


def source_grid(
    facts: Facts, conv: Convention, given: Told, notes: list[Note]
) -> tuple[tuple[int, int], bool]:
    """The source patch grid and whether the prefix tokens have position-embedding rows."""
    # CaiT's class token enters after the position embedding: it never has a row.
    cait = facts.class_attention_depth > 0
    prefix = 0 if cait else int(facts.class_token) + int(facts.distilled) + facts.num_registers
    unseen = False if prefix or cait else conv.posemb_on_cls  # without prefix tokens it changes nothing
    image = told_value("image_size", given, notes)
    grid = _grid_of_flag(image, facts.patch_size)
    rows = facts.posemb_rows
    if rows is None:  # a fixed table, or none: the ecosystem's code decides which tokens it covers
        return grid or _grid_without_posemb(facts.patch_size, notes), conv.posemb_on_cls and not cait
    if grid is not None:
        patches = grid[0] * grid[1]
        if prefix and rows == patches + prefix:
            return grid, True
        if rows == patches:
            return grid, unseen
        raise FormatError(
            f"inconsistent flags: source image size {image} gives {patches} "
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
    size = (grid[0] * facts.patch_size[0], grid[1] * facts.patch_size[1])
    why = (
        f"the square grid that the {rows}-row position embedding holds"
        f"{' with its prefix rows' if on_cls and prefix else ''}"
    )
    notes.append(Note("image_size", f"patch grid {grid[0]}x{grid[1]}", why, flag_text("image_size", size)))
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


def _grid_of_flag(image: tuple[int, int] | None, patch: tuple[int, int]) -> tuple[int, int] | None:
    if image is None:
        return None
    if image[0] % patch[0] or image[1] % patch[1]:
        raise FormatError(
            f"inconsistent flags: source image size {image} is not divisible by the "
            f"checkpoint's patch size {patch}"
        )
    return (image[0] // patch[0], image[1] // patch[1])


def _grid_without_posemb(patch: tuple[int, int], notes: list[Note]) -> tuple[int, int]:
    if DEFAULT_IMAGE_SIZE % patch[0] or DEFAULT_IMAGE_SIZE % patch[1]:
        raise FormatError(
            "the checkpoint has no position embedding to read the image size from, and "
            f"{DEFAULT_IMAGE_SIZE} is not divisible by patch {patch}: pass --source-image-size"
        )
    notes.append(
        Note(
            "image_size",
            f"image size {DEFAULT_IMAGE_SIZE}",
            "no position embedding to read it from",
            flag_text("image_size", (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)),
        )
    )
    return (DEFAULT_IMAGE_SIZE // patch[0], DEFAULT_IMAGE_SIZE // patch[1])


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def _square(n: int) -> tuple[int, int]:
    return (math.isqrt(n), math.isqrt(n))
