"""A transformers vision family as a layout: a Format whose file may differ from its table by
tensors that are derived, ignored or implied, and whose config.json is the family's own.

The table maps the reference tree to a family's names as everywhere else (vitspec.formats.table),
but a few of a family's tensors are no row of one tensor: DINOv2 with registers adds the class
token's position embedding before inserting the registers (read folded into the class token),
DINOv2 stores a mask token that inference never reads, CLIP's projection has no bias (read as a
head whose bias is zero). `canonical` gives the file's tensors under the table's names, `stored`
the table's tensors as the file holds them; both are lazy (vitspec.formats.lazy), so a conversion
still streams. A family's `read` also gives the config fields its names show beyond `Facts`
(pre_norm, patch_bias, distilled, ...), the values its architecture fixes, and its notes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import Format
from vitspec.formats.flags import Given, Note, Told
from vitspec.formats.hf_parts import SUFFIXES, read_fields
from vitspec.formats.inference import Convention, Facts, config_from_facts
from vitspec.formats.lazy import LazyTensors, Spec, spec_of
from vitspec.formats.strict import absence_notes, settled_by_format
from vitspec.formats.table import FormatError

# hidden_act of the families: each computes its MLP with ACT2FN[hidden_act], which has all three.
HIDDEN_ACT = {"exact": "gelu", "tanh": "gelu_pytorch_tanh", "quick": "quick_gelu"}
# Read: also transformers' older name of the tanh form (NewGELUActivation computes it too).
READ_HIDDEN_ACT = {act: form for form, act in HIDDEN_ACT.items()} | {"gelu_new": "tanh"}


class Reading(NamedTuple):
    """What a family's names and shapes show."""

    facts: Facts
    extras: dict[str, Any]  # ViTConfig fields beyond Facts (pre_norm, patch_bias, distilled, ...)
    implied: dict[str, Any]  # flag values the architecture fixes (SigLIP without its head: pool 'none')
    notes: list[Note]  # on tensors read another way than by a table row
    convention: Convention


def _same(arrays: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    return arrays


@dataclasses.dataclass(frozen=True)
class Family(Format):
    """A Format of a transformers family: `read` replaces `read_facts` (which only names the layout's
    Facts), through `canonical` and `stored` on the way in and out."""

    read: Callable[[Mapping[str, np.ndarray], Collection[str]], Reading]  # canonical tensors, file names
    model_types: tuple[str, ...]  # config.json's model_type values of the family
    config_json: Callable[[ViTConfig], dict]
    stated_fields: Callable[[dict, str], dict[str, Any]]
    canonical: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] = _same
    stored: Callable[[LazyTensors, ViTConfig], LazyTensors] = lambda arrays, _: arrays

    def read_config(
        self, native: Mapping[str, np.ndarray], given: Told, with_notes: bool = True
    ) -> tuple[ViTConfig, list[Note]]:
        file_keys, native = native.keys(), self.canonical(native)
        reading = self.read(native, file_keys)
        implied = {k: Given(v, f"the {self.name} architecture") for k, v in reading.implied.items()}
        # Extras the names show (pre_layrnorm, a dist token, ...) are facts, which a flag must agree with.
        shown = {k: v for k, v in reading.extras.items() if k in Facts._fields}
        facts = reading.facts._replace(**shown)
        cfg, notes = config_from_facts(facts, reading.convention, {**implied, **given})
        try:
            cfg = cfg.replace(**{k: v for k, v in reading.extras.items() if k not in shown})
        except ValueError as e:
            raise FormatError(f"the checkpoint and flags give an invalid config: {e}") from None
        self.refuse_read(cfg, f"it is not a {self.name} checkpoint, or a flag contradicts it")
        if not with_notes:
            return cfg, []
        notes += reading.notes + absence_notes(self, cfg, native.keys(), given)
        return cfg, [settled_by_format(self, cfg, note) for note in notes]

    def reference_view(self, native: Mapping[str, np.ndarray], cfg: ViTConfig) -> LazyTensors:
        return super().reference_view(self.canonical(native), cfg)

    def native_view(self, params: Mapping[str, np.ndarray], cfg: ViTConfig) -> LazyTensors:
        return self.stored(super().native_view(params, cfg), cfg)


def family(read: Callable[[Mapping[str, np.ndarray], Collection[str]], Reading], **fields: Any) -> Family:
    """A Family read by `read`, whose Facts are also its `read_facts`, in the files transformers saves."""
    return Family(read=read, read_facts=lambda native: read(native).facts, suffixes=SUFFIXES, **fields)


def rebuilt(
    arrays: Mapping[str, np.ndarray],
    dropped: Collection[str] = (),
    computed: Mapping[str, tuple[Spec, Callable[[], np.ndarray]]] | None = None,
) -> LazyTensors:
    """`arrays` without `dropped`, with `computed` tensors ({name: (spec, make)}) added or replacing
    theirs; each value produced when asked for."""
    computed = computed or {}
    specs = {k: spec_of(arrays, k) for k in arrays if k not in dropped} | {
        k: s for k, (s, _) in computed.items()
    }

    def get(name: str) -> np.ndarray:
        return computed[name][1]() if name in computed else arrays[name]

    return LazyTensors(specs, get)


def zeros_like_spec(spec: Spec) -> Callable[[], np.ndarray]:
    return lambda: np.zeros(*spec)


def require_zero(name: str, value: np.ndarray, why: str) -> None:
    """A tensor the family cannot store must be zero to be dropped exactly."""
    value = np.asarray(value)
    if np.any(value != 0):
        raise FormatError(f"{name} is not zero (max |value| {float(np.max(np.abs(value))):.3g}): {why}")


def stated(
    config: Any,
    where: str,
    model_types: Collection[str],
    fields: tuple[tuple[str, str], ...],
    architectures: Mapping[str, Callable[[dict], dict[str, Any]]],
    refused: Mapping[str, str],
) -> dict[str, Any]:
    """The ViTConfig fields a family's config.json states: `fields` by key, and what the architecture
    fixes (`architectures`: name -> the fields it states); an architecture in `refused` is refused
    with its reason."""
    if not isinstance(config, dict) or config.get("model_type") not in model_types:
        kind = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise FormatError(f"{where}: model_type {kind!r}, not one of {list(model_types)}")
    result = read_fields(config, where, fields, READ_HIDDEN_ACT)
    named = config.get("architectures") or []
    for name in named:
        if name in refused:
            raise FormatError(f"{where}: {name} cannot be read: {refused[name]}")
    known = [name for name in named if name in architectures]
    if named and not known:
        raise FormatError(f"{where}: architectures {named}: none of {list(architectures)}")
    for name in known:
        result |= architectures[name](config)
    return result


# What a two-tower CLIPModel / SiglipModel file holds beside its image tower.
TEXT_TOWER = ("text_model.", "text_projection.", "logit_scale", "logit_bias")


def without_text_tower(native: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    text = [k for k in native if k.startswith(TEXT_TOWER)]
    return rebuilt(native, dropped=text) if text else native


def text_tower_notes(file_keys: Collection[str], model: str, output: str) -> list[Note]:
    """The note on a two-tower file: its image tower read, the rest left out."""
    left = sorted(k for k in file_keys if k.startswith(TEXT_TOWER))
    if not left:
        return []
    parts = sorted({k.split(".", 1)[0] for k in left})
    why = (
        f"a two-tower {model} checkpoint: its image tower is read (our output is its {output}); left out: "
        f"{len(left)} tensor(s) under {', '.join(parts)} (the text tower and the contrastive scale)"
    )
    return [Note("tower", "image tower vision_model.", why)]


def vision_tower_config(config: Any, model_type: str, architecture: str, **extra: Any) -> Any:
    """A two-tower config.json as its image tower's: `vision_config` under the tower's own model_type
    and architecture; any other config as it is."""
    if not isinstance(config, dict) or "vision_config" not in config:
        return config
    vision = config["vision_config"] if isinstance(config["vision_config"], dict) else {}
    return {**vision, "model_type": model_type, "architectures": [architecture], **extra}
