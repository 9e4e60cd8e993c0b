"""Containers around a big_vision ViT tree: scanned blocks, and the image tower of a two-tower file.

Scan: big_vision's `Encoder(scan=True)` applies one `encoderblock` under `nn.scan` with
`variable_axes={"params": 0}`, so its checkpoint stores every block parameter once, stacked over
depth: `Transformer/encoderblock/LayerNorm_0/scale` [depth, D] is `Transformer/encoderblock_{i}/
LayerNorm_0/scale` [D] for each i. `unstacked` and `stacked` turn one into the other, lazily and
losslessly; the table only ever sees the per-block names. Reading block i's slice reads the
stacked tensor whole, kept until each block's slice is handed out: a scanned file converts with
about the tree in memory, not one tensor at a time.

Two towers: big_vision's `proj.image_text.two_towers.Model` (SigLIP, LiT) nests the image model
under `img/` beside the text model `txt/` and the scalars `t` (temperature) and `b` (bias), and
its .npz files keep them under `params/` (stripped by vitspec.formats.files). The image tower is a
`vit.Model`; `image_tower` reads it and says, in a note, what else was left.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import numpy as np

from vitspec.formats.flags import Note
from vitspec.formats.lazy import LazyTensors, spec_of
from vitspec.formats.table import FormatError

SCANNED = "Transformer/encoderblock/"
SCANNED_IN_TOWER = re.compile(r"(?:img/)?Transformer/encoderblock/")
BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/(.+)")
IMAGE_TOWER = "img/"


def is_scanned(keys: Collection[str]) -> bool:
    """Whether a tree (or a two-tower tree's image tower) has scanned blocks."""
    return any(SCANNED_IN_TOWER.match(k) for k in keys)


def scan_note(native: Mapping[str, np.ndarray]) -> Note:
    depth = _depth(native, [k for k in native if k.startswith(SCANNED)], "")
    return Note(
        "scan",
        "scanned blocks",
        f"{SCANNED}* stacked over a leading axis of {depth} blocks (big_vision's scan=True), read per block",
    )


def _depth(native: Mapping[str, np.ndarray], stacked_names: list[str], fmt: str) -> int:
    depths = {name: spec_of(native, name)[0][:1] for name in stacked_names}
    values = set(depths.values())
    if len(values) != 1 or () in values or (0,) in values:
        shown = ", ".join(f"{k}: {spec_of(native, k)[0]}" for k in stacked_names[:6])
        raise FormatError(
            f"{fmt} checkpoint: the scanned blocks' tensors must share one leading depth axis >= 1; "
            f"got {shown}"
        )
    return int(values.pop()[0])


def unstacked(native: Mapping[str, np.ndarray], fmt: str) -> Mapping[str, np.ndarray]:
    """A scanned tree with per-block names (`Transformer/encoderblock_{i}/...`); any other as it is."""
    stacked_names = [k for k in native if k.startswith(SCANNED)]
    if not stacked_names:
        return native
    per_block = sorted(k for k in native if BLOCK.fullmatch(k))
    if per_block:
        raise FormatError(
            f"{fmt} checkpoint: both scanned blocks ({stacked_names[0]}, ...) and numbered ones "
            f"({per_block[0]}, ...); a tree has one or the other"
        )
    depth = _depth(native, stacked_names, fmt)
    origin = {
        f"Transformer/encoderblock_{i}/{name[len(SCANNED) :]}": (name, i)
        for name in stacked_names
        for i in range(depth)
    }
    specs = {k: spec_of(native, k) for k in native if k not in stacked_names}
    for name, (stacked_name, _) in origin.items():
        shape, dtype = spec_of(native, stacked_name)
        specs[name] = (shape[1:], dtype)
    held: dict[str, tuple[np.ndarray, set[int]]] = {}  # stacked tensor, blocks not yet handed out

    def get(name: str) -> np.ndarray:
        if name not in origin:
            return native[name]
        stacked_name, i = origin[name]
        if stacked_name not in held:
            held[stacked_name] = (np.asarray(native[stacked_name]), set(range(depth)))
        value, waiting = held[stacked_name]
        waiting.discard(i)
        if not waiting:
            del held[stacked_name]
        return np.array(value[i])

    return LazyTensors(specs, get)


def stacked(tree: LazyTensors, fmt: str) -> LazyTensors:
    """A per-block tree with its blocks stacked under `Transformer/encoderblock/...` (big_vision's
    scan=True layout); the other tensors as they are."""
    parts: dict[str, dict[int, str]] = {}
    for name in tree:
        if m := BLOCK.fullmatch(name):
            parts.setdefault(SCANNED + m.group(2), {})[int(m.group(1))] = name
    if not parts:
        raise FormatError(f"{fmt}: the tree has no numbered blocks to stack")
    specs = {k: tree.spec(k) for k in tree if not BLOCK.fullmatch(k)}
    blocks = {}
    for name, by_index in parts.items():
        blocks[name] = [by_index[i] for i in range(len(by_index))]
        shape, dtype = tree.spec(blocks[name][0])
        specs[name] = ((len(by_index), *shape), dtype)
    return LazyTensors(specs, lambda k: np.stack([tree[n] for n in blocks[k]]) if k in blocks else tree[k])


def image_tower(arrays: LazyTensors) -> tuple[LazyTensors, list[Note]]:
    """The `img/` tower of a two-tower checkpoint (its image ViT) and a note naming what is left out;
    any other tree as it is, with no note."""
    if IMAGE_TOWER + "embedding/kernel" not in arrays:
        return arrays, []
    left = sorted(k for k in arrays if not k.startswith(IMAGE_TOWER))
    towers = sorted({k.split("/", 1)[0] + ("/" if "/" in k else "") for k in left})
    specs = {k[len(IMAGE_TOWER) :]: arrays.spec(k) for k in arrays if k.startswith(IMAGE_TOWER)}
    note = Note(
        "tower",
        "image tower img/",
        "a two-tower checkpoint (big_vision two_towers: SigLIP, LiT): its image tower `img/` is read "
        "(the output is the tower's, before two_towers L2-normalizes it); left out: "
        f"{len(left)} tensor(s) under {', '.join(towers) or 'nothing else'} (the text tower and the "
        "contrastive temperature and bias)",
    )
    return LazyTensors(specs, lambda k: arrays[IMAGE_TOWER + k]), [note]
