"""A checkpoint's config from its names and shapes, the flags, and the source ecosystem's convention.

A checkpoint shows most of the config in its names and shapes (`Facts`); the rest (heads in
torch layouts, GELU form, LayerNorm epsilon, a posemb that is not a parameter, the image size)
comes from flags (or a stored config, vitspec.formats.flags) or else from the source ecosystem's
convention (`Convention`). Every value not read from the file is reported in a note that names the
flag that would settle it; where nothing settles a field, the reading is refused naming the flag.
Notes on parts inferred absent, and --strict, are vitspec.formats.strict's. SPEC.md section 8
states the rules.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from vitspec.config import ViTConfig
from vitspec.formats.flags import (
    FLAGS,
    READING_FLAGS,
    SHOWN_BY_NAMES,
    Note,
    Told,
    config_flag,
    flag_form,
    flag_text,
    told_value,
)
from vitspec.formats.grid import source_grid
from vitspec.formats.table import FormatError
from vitspec.variants import VIT_SIZES

# LayerScale's init value is not stored; any value computes the same function from the stored gammas.
LAYER_SCALE_PLACEHOLDER = 1.0


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
    # CaiT (shown by names: talking-heads maps and class-attention blocks); a ViT's defaults.
    talking_heads: bool = False
    class_attention_depth: int = 0
    class_attention_mlp_dim: int | None = None  # None: no class-attention blocks
    # The ViT families' parts (timm's norm_pre, CLIP's bias-free patch embedding, DeiT's distillation
    # token and head, ...), where a layout's names show them; a plain ViT's defaults.
    pre_norm: bool = False
    patch_bias: bool = True
    final_norm: bool = True
    proj_bias: bool = True
    distilled: bool = False
    attention_dim: int | None = None  # None: the width


class Convention(NamedTuple):
    """What an ecosystem's checkpoints mean where the file is silent."""

    ecosystem: str
    gelu: str
    ln_eps: float
    posemb_absent: str  # posemb of a checkpoint without a position-embedding parameter
    posemb_on_cls: bool  # where the shapes cannot tell (no prefix tokens, or ambiguous lengths)


def _check_shown_by_names(facts: Facts, given: Told) -> None:
    """A flag for a part the file shows by its parameters must agree with them."""
    for keyword in SHOWN_BY_NAMES:
        if keyword not in given:
            continue
        shown = flag_form(keyword, getattr(facts, keyword))
        if given[keyword].value != shown:
            raise FormatError(
                f"inconsistent flags: {given[keyword].source} gives {FLAGS[keyword].field} "
                f"{given[keyword].value!r}, but the checkpoint's parameters show {shown!r}"
            )


def standard_heads(width: int) -> int | None:
    """Heads of the standard ViT size (vitspec.variants.VIT_SIZES) of this width, if there is one."""
    return next((dims["num_heads"] for dims in VIT_SIZES.values() if dims["width"] == width), None)


def _heads(facts: Facts, given: Told, fmt: str, notes: list[Note]) -> int:
    if facts.heads is not None:
        if "heads" in given and given["heads"].value != facts.heads:
            raise FormatError(
                f"inconsistent flags: {given['heads'].source}, but the {fmt} attention kernels have "
                f"{facts.heads} heads"
            )
        return facts.heads
    heads = told_value("heads", given, notes)
    if heads is not None:
        return heads
    # The standard sizes are ViTs': a CaiT without talking heads (whose maps show them) gets no guess.
    standard = None if facts.class_attention_depth else standard_heads(facts.width)
    if standard is not None:
        notes.append(
            Note(
                "heads",
                f"heads {standard}",
                f"not stored in a {fmt} checkpoint; the standard ViT of width {facts.width} has {standard}",
                flag_text("heads", standard),
            )
        )
        return standard
    if facts.class_attention_depth:
        raise FormatError(
            f"a {fmt} CaiT without talking heads does not store its number of heads: pass --heads N"
        )
    standard = ", ".join(f"{size}={dims['width']}" for size, dims in VIT_SIZES.items())
    raise FormatError(
        f"a {fmt} checkpoint does not store the number of heads, and width {facts.width} is no "
        f"standard ViT width ({standard}): pass --heads N"
    )


def _posemb(facts: Facts, conv: Convention, given: Told, notes: list[Note]) -> str:
    told = given.get("posemb")
    if facts.posemb_rows is not None:
        if told is not None and told.value != "learned":
            raise FormatError(
                f"inconsistent flags: {told.source}, but the checkpoint has a learned "
                f"position embedding ({facts.posemb_rows} rows)"
            )
        return "learned"
    if told is not None and told.value == "learned":
        raise FormatError(f"inconsistent flags: {told.source}, but the checkpoint has no position embedding")
    if told is not None:
        return told_value("posemb", given, notes)
    notes.append(
        Note(
            "posemb",
            f"posemb {conv.posemb_absent}",
            f"no position-embedding parameter; {conv.ecosystem}'s convention",
            flag_text("posemb", conv.posemb_absent),
        )
    )
    return conv.posemb_absent


def _pool(facts: Facts, given: Told, notes: list[Note]) -> str:
    told = given.get("pool")
    if told is not None and facts.map_head != (told.value == "map"):
        raise FormatError(
            f"inconsistent flags: {told.source}, but the checkpoint has "
            f"{'an' if facts.map_head else 'no'} attention pool"
        )
    if facts.map_head:
        return "map"
    if told is not None:
        return told_value("pool", given, notes)
    if facts.fc_norm:
        pool, why = "gap", "the checkpoint has fc_norm and no attention pool (timm's avg-pool models)"
    else:
        pool = "token" if facts.class_token else "gap"
        why = f"{'a' if facts.class_token else 'no'} class token and no attention pool"
    notes.append(Note("pool", f"pool {pool}", why, flag_text("pool", pool)))
    return pool


def _pool_include_prefix(facts: Facts, pool: str, given: Told, notes: list[Note]) -> bool:
    """Whether the pool reduces the prefix tokens too: no file shows it; only a pool over tokens
    beside prefix tokens makes it matter."""
    told = told_value("pool_include_prefix", given, notes)
    if told is not None:
        return told
    prefix = int(facts.class_token) + int(facts.distilled) + facts.num_registers
    if pool in ("gap", "max", "avgmax", "sum", "map") and prefix and not facts.class_attention_depth:
        why = "not stored; the pool reads the patch tokens only unless told (timm's default)"
        settle = flag_text("pool_include_prefix", False)
        notes.append(Note("pool_include_prefix", "pool_include_prefix False", why, settle))
    return False


def config_from_facts(facts: Facts, conv: Convention, given: Told) -> tuple[ViTConfig, list[Note]]:
    """The config, and a note on every value not read from the names and shapes.

    `given`: the flags and stored config by keyword (vitspec.formats.flags.given_values)."""
    _check_shown_by_names(facts, given)
    if "patch_size" in given and given["patch_size"].value != tuple(facts.patch_size):
        raise FormatError(
            f"inconsistent flags: {given['patch_size'].source}, but the checkpoint's patch embedding "
            f"has {facts.patch_size[0]}x{facts.patch_size[1]} patches"
        )
    notes: list[Note] = []
    heads = _heads(facts, given, conv.ecosystem, notes)
    posemb = _posemb(facts, conv, given, notes)
    pool = _pool(facts, given, notes)
    include_prefix = _pool_include_prefix(facts, pool, given, notes)
    grid, on_cls = source_grid(facts, conv, given, notes)
    numerics = {}
    for field in ("gelu", "ln_eps"):
        numerics[field] = told_value(field, given, notes)
        if numerics[field] is None:
            numerics[field] = getattr(conv, field)
            notes.append(
                Note(
                    field,
                    f"{field} {numerics[field]}",
                    f"not stored; {conv.ecosystem}'s convention",
                    flag_text(field, numerics[field]),
                )
            )
    if facts.layer_scale:  # computes the same function whatever the value: nothing to settle
        notes.append(
            Note(
                "layer_scale",
                "layer_scale",
                f"present; its init value is not stored, recorded as {LAYER_SCALE_PLACEHOLDER}",
            )
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
            # the 2-D tables are defined on the patch grid only
            posemb_on_cls=on_cls and posemb not in ("sincos2d", "sinusoidal_2d"),
            fc_norm=facts.fc_norm,
            representation_size=facts.representation_size,
            qkv_bias=facts.qkv_bias,
            qk_norm=facts.qk_norm,
            layer_scale=LAYER_SCALE_PLACEHOLDER if facts.layer_scale else None,
            num_registers=facts.num_registers,
            talking_heads=facts.talking_heads,
            class_attention_depth=facts.class_attention_depth,
            class_attention_mlp_dim=facts.class_attention_mlp_dim,
            pre_norm=facts.pre_norm,
            patch_bias=facts.patch_bias,
            final_norm=facts.final_norm,
            proj_bias=facts.proj_bias,
            distilled=facts.distilled,
            pool_include_prefix=include_prefix,
            attention_dim=facts.attention_dim,
            **numerics,
        )
    except ValueError as e:
        raise FormatError(f"the checkpoint and flags give an invalid config: {e}") from None
    return cfg, notes


def reading_flags(cfg: ViTConfig) -> dict[str, Any]:
    """Flags that make reading a written file back give exactly `cfg`."""
    return {flag.keyword: config_flag(cfg, flag.keyword) for flag in READING_FLAGS}
