"""What every external layout shares: the Format record (table, refusals, config reading) and the
helpers its fact readers use."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.flags import Note, Told
from vitspec.formats.inference import Convention, Facts, config_from_facts
from vitspec.formats.lazy import LazyTensors
from vitspec.formats.strict import absence_notes, settled_by_format
from vitspec.formats.table import FormatError, Rule, native_view, reference_view, refuse


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
        return dict(self.reference_view(native, cfg))

    def from_reference(self, params: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
        return dict(self.native_view(params, cfg))

    def reference_view(self, native: Mapping[str, np.ndarray], cfg: ViTConfig) -> LazyTensors:
        """to_reference, each tensor computed when asked for (vitspec.formats.lazy)."""
        return reference_view(self.table(cfg, native.keys()), native, cfg, self.name)

    def native_view(self, params: Mapping[str, np.ndarray], cfg: ViTConfig) -> LazyTensors:
        """from_reference, each tensor computed when asked for (vitspec.formats.lazy)."""
        return native_view(self.table(cfg), params, cfg)

    def read_config(
        self, native: Mapping[str, np.ndarray], given: Told, with_notes: bool = True
    ) -> tuple[ViTConfig, list[Note]]:
        """The config and the notes on it, from the names and shapes and what the reader was `given`
        (vitspec.formats.flags.given_values). `with_notes=False` skips the notes (none is returned): they
        build a table per part the file could have, which a caller wanting the config alone need not pay."""
        cfg, notes = config_from_facts(self.read_facts(native), self.convention, given)
        self.refuse_read(cfg)
        if not with_notes:
            return cfg, []
        notes += absence_notes(self, cfg, native.keys(), given)
        return cfg, [settled_by_format(self, cfg, note) for note in notes]

    def refuse_file(self, cfg: ViTConfig) -> None:
        """Refuses to write a file of `cfg` that would read back as another model: a fixed 1-D posemb
        over other tokens than its ecosystem's code adds it to. The table is no parameter, so the file
        cannot show which tokens it covers, and a reader takes the ecosystem's (vitspec.formats.grid).
        A model in memory (a backend's tree) is not refused: its config goes with it."""
        conv = self.convention
        if (
            cfg.posemb == "sinusoidal_1d"
            and cfg.num_prefix_tokens
            and cfg.posemb_on_cls != conv.posemb_on_cls
        ):
            covers = "every token" if conv.posemb_on_cls else "the patches only"
            reason = (
                f"posemb='sinusoidal_1d' with posemb_on_cls={cfg.posemb_on_cls} beside class/distillation/"
                f"register tokens: no parameter shows it, and a {conv.ecosystem} file reads as rows on "
                f"{covers}"
            )
            refuse(self.name, [reason])

    def refuse_read(self, cfg: ViTConfig, hint: str | None = None) -> None:
        """Refuses the config read from a file that this layout cannot express; `hint` says what that
        means (by default: the format's models always have what this file lacks, HF a class token)."""
        reasons = self.cannot_express(cfg)
        if reasons:
            hint = hint or (
                f"a part its models always have is missing, or it is not a {self.name} checkpoint (--from)"
            )
            raise FormatError(
                f"the checkpoint reads as a config the {self.name} layout cannot express "
                f"({'; '.join(reasons)}): {hint}"
            )


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
