"""What a reading inferred rather than read: notes on parts inferred absent, and --strict.

A checkpoint without `head.weight` reads as num_classes=0, one without q/k/v biases as
qkv_bias=False: the file cannot tell a model without the part from a file that lost it. Each such
value gets a note naming the absent parameters, found by building the format's table with the
part turned on, so the names come from the table both directions use. The absence settles the
value (no note) where the format cannot express the part (HF ViTs have no LayerScale), where no
model of the kind read has it (a CaiT has no registers), or where the part would replace
parameters the file has (timm's fc_norm replaces `norm`). A note's value is
likewise settled where the format can express no other (HF's classifier reads the class token:
pool 'token'). --strict refuses every value nothing settled, naming the flag that settles each.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from vitspec.config import POOLS, ViTConfig
from vitspec.formats.flags import FLAGS, SHOWN_BY_NAMES, Note, Told, config_flag, flag_text
from vitspec.formats.table import FormatError

if TYPE_CHECKING:  # base imports this module
    from vitspec.formats.base import Format

# How many absent names a note lists; the rest (other blocks' copies) are counted.
LISTED_NAMES = 2


class StrictError(FormatError):
    """--strict: the reading inferred values that nothing settled; the message names each one's flag."""


def absence_notes(layout: Format, cfg: ViTConfig, native_keys: Collection[str], given: Told) -> list[Note]:
    """A note on each part `cfg` lacks because the file lacks its parameters."""
    has = {r.native for r in layout.build_table(cfg, native_keys)}
    notes = []
    for keyword in SHOWN_BY_NAMES:
        if config_flag(cfg, keyword):
            continue
        try:
            with_part = _with_part(cfg, keyword)
        except ValueError:  # no model of this kind has the part (a CaiT has no registers, qk-norm, ...)
            continue
        if layout.cannot_express(with_part):
            continue
        names = [r.native for r in layout.build_table(with_part, native_keys)]
        missing = [n for n in names if n not in has]
        if has - set(names) or not missing:  # the part would replace names the file has, or has none
            continue
        flag = FLAGS[keyword]
        reading = f"{flag.field} {getattr(cfg, flag.field)}"
        why = f"the checkpoint has no {_listed(missing)} ({flag.absent})"
        if keyword in given:
            notes.append(Note(keyword, reading, f"{why}, as {given[keyword].source} says"))
        else:
            notes.append(Note(keyword, reading, why, flag_text(keyword, config_flag(cfg, keyword))))
    return notes


def _with_part(cfg: ViTConfig, keyword: str) -> ViTConfig:
    """`cfg` with the part of `keyword` present (at any size: only its names are wanted)."""
    present = {"num_classes": 1, "representation_size": cfg.width, "num_registers": 1, "layer_scale": 1.0}
    return cfg.replace(**{FLAGS[keyword].field: present.get(keyword, True)})


def _listed(names: list[str]) -> str:
    if len(names) <= LISTED_NAMES:
        return ", ".join(names)
    return f"{', '.join(names[:LISTED_NAMES])} and {len(names) - LISTED_NAMES} more"


# The other values a note's field could take without parameters the file would show (an attention
# pool has them): a note is settled when the format expresses none of them for this checkpoint.
_PARAMETER_FREE = {
    "pool": (tuple(p for p in POOLS if p != "map"), "pooling"),
    "pool_include_prefix": ((False, True), "pool_include_prefix"),
}


def settled_by_format(layout: Format, cfg: ViTConfig, note: Note) -> Note:
    """`note`, settled if its value is the only one the format expresses for this checkpoint."""
    if note.keyword not in _PARAMETER_FREE or note.settle is None:
        return note
    value = getattr(cfg, note.keyword)
    others, what = _PARAMETER_FREE[note.keyword]
    for other in others:
        if other == value:
            continue
        try:
            alternative = cfg.replace(**{note.keyword: other})
        except ValueError:  # pool 'token' without a class token, ...
            continue
        if not layout.cannot_express(alternative):
            return note
    return Note(
        note.keyword,
        f"{note.keyword} {value}",
        f"the only {what} a {layout.name} model of these parameters has",
    )


def unsettled(notes: list[Note]) -> list[str]:
    """The flags that would settle what the notes say was inferred."""
    return [note.settle for note in notes if note.settle]


def refuse_unsettled(source: str, notes: list[Note]) -> None:
    """--strict: raise StrictError listing every value that nothing settled."""
    flags = unsettled(notes)
    if flags:
        listed = "; ".join(f"{note.reading}: {note.why} [{note.settle}]" for note in notes if note.settle)
        raise StrictError(
            f"{source}: --strict, and {len(flags)} value(s) are inferred, not read from the file, its "
            f"format, its stored config or a flag: {listed}. If the model has these values, pass "
            f"{' '.join(flags)}; if not, the values it has"
        )
