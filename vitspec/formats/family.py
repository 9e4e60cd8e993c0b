"""What the layouts of the other ViT codebases (scenic, vit_flax, tutorial) need beyond `Format`.

Groups: a file may split a tensor that one table row holds whole (the tutorial's one q/k/v Linear
per head) or join tensors that rows hold apart (vit-flax's single bias-free Dense for q, k and v,
concatenated along its output axis, which no Layout of vitspec.formats.table writes). A `Group`
says which file tensors are equal parts of which table tensors along one axis: the table is written
over the table's names, and the file's tensors are regrouped to and from them, lazily, one group at
a time, so both directions still come from the one table.

Readings: some files never show a value the generic reading would otherwise infer (vit-flax's 'cls'
and 'mean' pools have the same parameters): `told_only` names the flags such a file must be read
with. And some values follow from the format once the rest is read (vit-flax's mean includes the
class token): `settle` sets them before the config is checked against the format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import NamedTuple

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import Format
from vitspec.formats.flags import FLAGS, Note, Told
from vitspec.formats.inference import Facts, config_from_facts
from vitspec.formats.lazy import LazyTensors, spec_of
from vitspec.formats.strict import absence_notes, settled_by_format
from vitspec.formats.table import FormatError, Rule, TreeMismatchError


class Group(NamedTuple):
    """The `table` tensors, concatenated along `axis`, are the `file` tensors concatenated along it;
    one side has a single name, whose tensor the other side's names hold in equal parts, in order."""

    table: tuple[str, ...]
    file: tuple[str, ...]
    axis: int


def regroup(tree: Mapping[str, np.ndarray], groups: list[Group], to_file: bool) -> LazyTensors:
    """`tree` (table names, or with `to_file=False` the file's) under the other side's names, each
    group's new names where its first old one was; a name in no group passes through. Shapes and
    dtypes are known now; values are computed when asked for."""
    sides = [(g, *((g.table, g.file) if to_file else (g.file, g.table))) for g in groups]
    first = {sources[0]: (group, sources, targets) for group, sources, targets in sides}
    grouped = {name for _, sources, _ in sides for name in sources}
    specs, made = {}, {}
    for name in tree:
        if name in first:
            group, sources, targets = first[name]
            part = _part_spec([spec_of(tree, s) for s in sources], len(targets), group.axis, targets[0])
            for index, target in enumerate(targets):
                specs[target], made[target] = part, (group.axis, sources, len(targets), index)
        elif name not in grouped:
            specs[name] = spec_of(tree, name)

    def get(name: str) -> np.ndarray:
        if name not in made:
            return np.asarray(tree[name])
        axis, sources, parts, index = made[name]
        whole = np.concatenate([np.asarray(tree[s]) for s in sources], axis=axis)
        return np.ascontiguousarray(np.split(whole, parts, axis=axis)[index])

    return LazyTensors(specs, get)


def _part_spec(sources: list, parts: int, axis: int, name: str):
    shapes = [shape for shape, _ in sources]
    rank = len(shapes[0])
    if any(len(s) != rank or _without(s, axis % rank) != _without(shapes[0], axis % rank) for s in shapes):
        raise TreeMismatchError(f"the tensors that make {name!r} do not fit together: shapes {shapes}")
    total = sum(s[axis] for s in shapes)
    if total % parts:
        raise TreeMismatchError(f"{name!r} is one of {parts} equal parts of a length-{total} axis")
    shape = list(shapes[0])
    shape[axis] = total // parts
    return tuple(shape), np.result_type(*(dtype for _, dtype in sources))


def _without(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1 :]


def _no_groups(cfg: ViTConfig, native_keys: Collection[str] | None) -> list[Group]:
    return []


def _nothing_told_only(native: Mapping[str, np.ndarray]) -> dict[str, str]:
    return {}


def _as_read(cfg: ViTConfig) -> ViTConfig:
    return cfg


def _facts_as_read(native: Mapping[str, np.ndarray], facts: Facts, given: Told) -> tuple[Facts, list[Note]]:
    return facts, []


@dataclasses.dataclass(frozen=True)
class FamilyFormat(Format):
    """A Format with groups, flags its files never show, and values the format settles."""

    groups: Callable[[ViTConfig, Collection[str] | None], list[Group]] = _no_groups
    told_only: Callable[[Mapping[str, np.ndarray]], dict[str, str]] = _nothing_told_only  # keyword: why
    settle: Callable[[ViTConfig], ViTConfig] = _as_read
    # Facts the names leave open, from the flags that told_only made sure of (vit-flax's patch size).
    told_facts: Callable[[Mapping[str, np.ndarray], Facts, Told], tuple[Facts, list[Note]]] = _facts_as_read

    def reference_view(self, native: Mapping[str, np.ndarray], cfg: ViTConfig) -> LazyTensors:
        groups = self.groups(cfg, native.keys())
        missing = [name for group in groups for name in group.file if name not in native]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise TreeMismatchError(
                f"{self.name} checkpoint does not match the config:\n  missing keys ({len(missing)}): {shown}"
            )
        return super().reference_view(regroup(native, groups, to_file=False), cfg)

    def native_view(self, params: Mapping[str, np.ndarray], cfg: ViTConfig) -> LazyTensors:
        return regroup(super().native_view(params, cfg), self.groups(cfg, None), to_file=True)

    def read_config(
        self, native: Mapping[str, np.ndarray], given: Told, with_notes: bool = True
    ) -> tuple[ViTConfig, list[Note]]:
        """As Format.read_config, with the flags the file cannot do without and the settled values."""
        unshown = [f"{FLAGS[k].cli} ({why})" for k, why in self.told_only(native).items() if k not in given]
        if unshown:
            raise FormatError(f"a {self.name} checkpoint does not show this: pass {'; '.join(unshown)}")
        facts, told = self.told_facts(native, self.read_facts(native), given)
        cfg, notes = config_from_facts(facts, self.convention, given)
        notes = told + notes
        try:
            cfg = self.settle(cfg)
        except ValueError as e:
            raise FormatError(f"the checkpoint and flags give an invalid config: {e}") from None
        self.refuse_read(cfg)
        if not with_notes:
            return cfg, []
        named_as_filed = dataclasses.replace(self, build_table=self.file_named_table)
        notes += absence_notes(named_as_filed, cfg, native.keys(), given)
        return cfg, [settled_by_format(self, cfg, note) for note in notes]

    def file_named_table(self, cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
        """The table with each grouped row under the file's names (a row per name), for the notes
        that name what a file lacks: tensors of these rows are not computed from it."""
        file_names = {}
        for group in self.groups(cfg, native_keys):
            for name in group.table:
                file_names[name] = group.file
        rows = {}
        for row in self.build_table(cfg, native_keys):
            for name in file_names.get(row.native, (row.native,)):
                rows.setdefault(name, row._replace(native=name))
        return list(rows.values())


def heads_of(total: int, per_head: int, what: str) -> int:
    """Heads of an attention `total` wide whose format fixes the head width."""
    if total % per_head:
        raise FormatError(f"{what} is {total} wide, not a whole number of {per_head}-wide heads")
    return total // per_head


def checks(*pairs: tuple[bool, str]) -> list[str]:
    """The reasons whose condition fails: a `_cannot_express` written as (holds, reason) pairs."""
    return [reason for ok, reason in pairs if not ok]
