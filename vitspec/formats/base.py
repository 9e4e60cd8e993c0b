"""What every external layout shares: the Format record (table, refusals, config reading) and the
helpers its fact readers use."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.inference import Convention, Facts, check_flags, config_from_facts
from vitspec.formats.table import FormatError, Rule, native_from_reference, reference_from_native, refuse


@dataclasses.dataclass(frozen=True)
class Format:
    """One external layout: its table, what it cannot express, and how to read its config."""

    name: str
    description: str
    convention: Convention
    build_table: Callable[[ViTConfig, Collection[str] | None], list[Rule]]
    cannot_express: Callable[[ViTConfig], list[str]]
    read_facts: Callable[[Mapping[str, np.ndarray]], Facts]
    suffixes: tuple[str, ...]

    def table(self, cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
        refuse(self.name, self.cannot_express(cfg))
        return self.build_table(cfg, native_keys)

    def to_reference(self, native: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
        return reference_from_native(self.table(cfg, native.keys()), native, cfg, self.name)

    def from_reference(self, params: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
        return native_from_reference(self.table(cfg), params, cfg)

    def infer_config(self, native: Mapping[str, np.ndarray], **flags: Any) -> ViTConfig:
        return self.infer_config_with_notes(native, **flags)[0]

    def infer_config_with_notes(
        self, native: Mapping[str, np.ndarray], **flags: Any
    ) -> tuple[ViTConfig, list[str]]:
        check_flags(flags)
        return config_from_facts(self.read_facts(native), self.convention, flags)


def require(native: Mapping[str, np.ndarray], key: str, fmt: str) -> np.ndarray:
    if key not in native:
        sample = sorted(native)[:8]
        raise FormatError(f"not a {fmt} checkpoint: it has no {key!r} (its first keys: {sample})")
    return np.asarray(native[key])


def count_blocks(native: Mapping[str, np.ndarray], pattern: str, fmt: str) -> int:
    """Number of blocks, from the indices that `pattern` (a regex with one group) finds."""
    indices = {int(m.group(1)) for k in native if (m := re.fullmatch(pattern, k))}
    if not indices:
        raise FormatError(f"not a {fmt} checkpoint: no transformer blocks (no key matches {pattern!r})")
    if indices != set(range(len(indices))):
        raise FormatError(f"{fmt} checkpoint: block indices {sorted(indices)} are not 0..{len(indices) - 1}")
    return len(indices)


def optional_dim(native: Mapping[str, np.ndarray], key: str, axis: int) -> int | None:
    return int(np.shape(native[key])[axis]) if key in native else None
