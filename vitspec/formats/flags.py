"""What a reading of a foreign checkpoint is told: the flags, and a format's own stored config.

One table (`READING_FLAGS`) names each config field a reader can be told, its keyword of
`load_any` and its command-line flag; `vitspec convert`'s flags, the notes, the --strict refusal
and the flags printed for reading a written file back are all derived from it. A flag settles what
the file cannot show (heads in torch layouts, GELU form, eps, ...); for a part the file shows by
its parameters (a head, q/k/v biases, ...), the flag confirms what their absence means, and one
that contradicts the file is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from vitspec.config import ViTConfig
from vitspec.formats.table import FormatError


class ReadingFlag(NamedTuple):
    """Something a file may not show, given when reading it."""

    keyword: str  # of load_any
    field: str  # the ViTConfig field it settles (image_size: the source's)
    cli: str
    # For a part the file shows by its parameters: what their absence means. None: not shown by names.
    absent: str | None = None
    switch: bool = False  # a yes/no flag: --x / --no-x


READING_FLAGS = (
    ReadingFlag("heads", "num_heads", "--heads"),
    ReadingFlag("gelu", "gelu", "--gelu"),
    ReadingFlag("ln_eps", "ln_eps", "--ln-eps"),
    ReadingFlag("posemb", "posemb", "--posemb"),
    ReadingFlag("pool", "pool", "--pool"),
    ReadingFlag("pool_include_prefix", "pool_include_prefix", "--pool-include-prefix", switch=True),
    ReadingFlag("image_size", "image_size", "--source-image-size"),
    ReadingFlag("patch_size", "patch_size", "--patch-size"),  # a layout that flattens patches (vit_flax)
    ReadingFlag("num_classes", "num_classes", "--num-classes", "a feature extractor"),
    ReadingFlag("representation_size", "representation_size", "--representation-size", "no pre-logits layer"),
    ReadingFlag("class_token", "class_token", "--class-token", "no class token", switch=True),
    ReadingFlag("num_registers", "num_registers", "--registers", "no register tokens"),
    ReadingFlag("qkv_bias", "qkv_bias", "--qkv-bias", "q, k and v without biases", switch=True),
    ReadingFlag("qk_norm", "qk_norm", "--qk-norm", "no qk-norm", switch=True),
    ReadingFlag("layer_scale", "layer_scale", "--layer-scale", "no LayerScale", switch=True),
    ReadingFlag("fc_norm", "fc_norm", "--fc-norm", "the final LayerNorm before pooling", switch=True),
    ReadingFlag("talking_heads", "talking_heads", "--talking-heads", "no talking heads", switch=True),
    ReadingFlag("pre_norm", "pre_norm", "--pre-norm", "no LayerNorm after the embeddings", switch=True),
    ReadingFlag("patch_bias", "patch_bias", "--patch-bias", "a patch embedding without bias", switch=True),
    ReadingFlag("final_norm", "final_norm", "--final-norm", "no final LayerNorm", switch=True),
    ReadingFlag(
        "proj_bias", "proj_bias", "--proj-bias", "attention output and MLP layers without biases", switch=True
    ),
    ReadingFlag("distilled", "distilled", "--distilled", "no distillation token", switch=True),
)
FLAGS = {flag.keyword: flag for flag in READING_FLAGS}
SHOWN_BY_NAMES = tuple(flag.keyword for flag in READING_FLAGS if flag.absent)


class Given(NamedTuple):
    """A value the reader was told, and who told it: a flag as typed, or the stored config's file."""

    value: Any
    source: str


Told = Mapping[str, Given]


class Note(NamedTuple):
    """A value of a reading that is not read from the file's names and shapes, and where it came from."""

    keyword: str  # of the flag that settles the value
    reading: str  # "num_classes 0"
    why: str  # "the checkpoint has no head.weight, head.bias (a feature extractor)"
    # The flag that would settle a value that nothing settled (not the file's names and shapes, its
    # format, a stored config nor a flag): what --strict refuses. None: settled.
    settle: str | None = None

    def __str__(self) -> str:
        unsettled = f" ({self.settle} settles it)" if self.settle else ""
        return f"{self.reading}: {self.why}{unsettled}"


def check_flags(flags: Mapping[str, Any]) -> None:
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise FormatError(f"unknown config flag(s) {unknown}; known: {list(FLAGS)}")
    for keyword, value in flags.items():
        if FLAGS[keyword].switch and value is not None and not isinstance(value, bool):
            raise FormatError(
                f"{keyword}={value!r}: expected True or False (whether the checkpoint has {keyword})"
            )


def flag_form(keyword: str, value: Any) -> Any:
    """A flag's value in the one form comparisons use: an image size as a pair, no pre-logits layer
    as 0, LayerScale as present or not (its init value is not stored)."""
    if keyword in ("image_size", "patch_size") and value is not None:
        return (value, value) if isinstance(value, int) else tuple(value)
    if keyword == "representation_size":
        return value or 0
    if keyword == "layer_scale":
        return value is not None and value is not False
    return value


def config_flag(cfg: ViTConfig, keyword: str) -> Any:
    """The value of `keyword`'s flag that describes `cfg`."""
    return flag_form(keyword, getattr(cfg, FLAGS[keyword].field))


def flag_text(keyword: str, value: Any) -> str:
    """The command-line flag that gives `value`: `--heads 3`, `--no-qkv-bias`, `--source-image-size 4,6`."""
    flag = FLAGS[keyword]
    if flag.switch:
        return flag.cli if value else f"--no-{flag.cli[2:]}"
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return f"{flag.cli} {text}"


def given_values(
    flags: Mapping[str, Any], stored: Mapping[str, Any] | None = None, stored_in: str = ""
) -> dict[str, Given]:
    """The flags and a stored config's values by keyword; a flag may repeat a stored value, not change it."""
    stored = stored or {}
    given = {k: Given(flag_form(k, v), stored_in) for k, v in stored.items()}
    for keyword, value in flags.items():
        if value is None:
            continue
        value = flag_form(keyword, value)
        if keyword in given and given[keyword].value != value:
            raise FormatError(
                f"inconsistent flags: {flag_text(keyword, value)}, but {stored_in} gives "
                f"{FLAGS[keyword].field} {given[keyword].value!r}"
            )
        given[keyword] = Given(value, flag_text(keyword, value))
    return given


def told_value(keyword: str, given: Told, notes: list[Note]) -> Any:
    """The value the reader was told for `keyword`, noted with who told it; None when nothing was."""
    if keyword not in given:
        return None
    value, source = given[keyword]
    shown = "x".join(map(str, value)) if isinstance(value, tuple) else value
    notes.append(Note(keyword, f"{keyword} {shown}", f"from {source}"))
    return value
