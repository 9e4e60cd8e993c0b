"""The machinery every layout shares: a table of rules, one layout helper, and the checks.

A format module builds ONE table per config: `Rule(reference names, native name, layout,
native shape)`. Both directions are derived from it, so a name or a layout cannot disagree
between reading and writing. `Layout` is the only place array layouts change (like timm's
`_n2p`); every layout is lossless, so reference -> native -> reference is bit-exact. A native
view fed a reference view of another [out, in] file (timm <-> HF) takes its kernels' rows as that
file stores them (kernel_rows) rather than transposing them there and back.

    reshape          row-major reshape: batch axes on tokens ([D] <-> [1, 1, D]), heads split
                     out of q/k/v/out ([D, D] <-> [D, H, dh] / [H, dh, D]), or a plain copy
    transpose        dense kernel [in, out] <-> torch Linear weight [out, in]
    conv             patch kernel HWIO [ph, pw, C, D] <-> torch Conv2d weight OIHW [D, C, ph, pw]
    fused_transpose  q, k, v (or k, v) kernels <-> one Linear weight, their transposes stacked
    fused            q, k, v (or k, v) biases <-> one vector, concatenated
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.lazy import LazyTensors, spec_of, stand_ins
from vitspec.params import ParamTreeError, tree_problems
from vitspec.params import param_shapes as _param_shapes

Shape = tuple[int, ...]


class FormatError(ValueError):
    """A file, tree or config that a format cannot read or express; the message says why."""


class TreeMismatchError(FormatError, ParamTreeError):
    """A native or reference tree whose names or shapes do not match the config.

    Also a ParamTreeError: it is one, and backends that report their own trees' mismatches as
    ParamTreeError keep doing so when they delegate here.
    """


class Layout(enum.Enum):
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    CONV = "conv"
    FUSED_TRANSPOSE = "fused_transpose"
    FUSED = "fused"


class Rule(NamedTuple):
    reference: tuple[str, ...]
    native: str
    layout: Layout
    native_shape: Shape


def native_shape(layout: Layout, reference_shapes: list[Shape], reshape_to: Shape | None = None) -> Shape:
    """The native shape of `reference_shapes` under `layout` (`reshape_to` for RESHAPE)."""
    first = reference_shapes[0]
    if layout is Layout.RESHAPE:
        return first if reshape_to is None else reshape_to
    if layout is Layout.TRANSPOSE:
        return first[::-1]
    if layout is Layout.CONV:
        return (first[3], first[2], first[0], first[1])
    if layout is Layout.FUSED_TRANSPOSE:
        return (sum(s[1] for s in reference_shapes), first[0])
    return (sum(s[0] for s in reference_shapes),)


def to_native(layout: Layout, arrays: list[np.ndarray], shape: Shape) -> np.ndarray:
    """The native tensor of a row that does not transpose (kernel_rows makes the others)."""
    if layout is Layout.RESHAPE:
        out = arrays[0].reshape(shape)
    elif layout is Layout.CONV:
        out = arrays[0].transpose(3, 2, 0, 1)
    else:
        out = np.concatenate(arrays, axis=0)
    return np.ascontiguousarray(out)


TRANSPOSING = (Layout.TRANSPOSE, Layout.FUSED_TRANSPOSE)


def kernel_rows(params: Mapping[str, np.ndarray], names: tuple[str, ...], shape: Shape, dtype) -> np.ndarray:
    """The kernels `names` ([in, out] each) transposed and stacked: a Linear weight [out, in].

    Where `params` is a reference view of a file that stores them transposed too (timm's and HF's
    Linear weights), the file's rows are taken as they are: converting between two such layouts
    then transposes no kernel, where going through the reference transposed each twice. Both ways
    give the same bits (a transpose moves values, it does not round them)."""
    stored = [params.transposed(n) if isinstance(params, LazyTensors) else None for n in names]
    if len(names) == 1 and stored[0] is not None:
        return np.ascontiguousarray(stored[0])
    out = np.empty(shape, dtype)
    row = 0
    for name, rows in zip(names, stored, strict=True):
        part = out[row : row + spec_of(params, name)[0][1]]
        if rows is None:
            transposed(np.asarray(params[name]), part)
        else:
            part[...] = rows
        row += len(part)
    return out


def transposed(array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """array.T of a matrix, contiguous (into `out` if given), copied a block of rows at a time: each
    output row gets a whole 64-byte cache line of float32 from 16 source rows that stay in cache
    (8 rows for a matrix taller than wide, whose output rows are farther apart). On a ViT's kernels
    that is 1.3-3x faster than blocks of 64 rows, and 1.6-4x than np.ascontiguousarray(array.T),
    which strides through memory. Other ranks: the plain transpose."""
    if out is None:
        out = np.empty(array.shape[::-1], array.dtype)
    if array.ndim != 2:
        out[...] = array.T
        return out
    rows = 8 if array.shape[0] > array.shape[1] else 16
    for i in range(0, array.shape[0], rows):
        out[:, i : i + rows] = array[i : i + rows].T
    return out


def to_reference(layout: Layout, array: np.ndarray, shapes: list[Shape]) -> list[np.ndarray]:
    if layout is Layout.RESHAPE:
        parts = [array.reshape(shapes[0])]
    elif layout is Layout.TRANSPOSE:
        parts = [transposed(array)]
    elif layout is Layout.CONV:
        parts = [array.transpose(2, 3, 1, 0)]
    elif layout is Layout.FUSED_TRANSPOSE:
        parts = [transposed(p) for p in np.split(array, len(shapes), axis=0)]
    else:
        parts = np.split(array, len(shapes), axis=0)
    return [np.ascontiguousarray(p) for p in parts]


@functools.lru_cache(maxsize=8)
def param_shapes(cfg: ViTConfig) -> dict[str, Shape]:
    """vitspec.params.param_shapes, remembered for the last few configs (not to be changed): a
    table's every row asks for it, and building the tree each time made a ViT-H table cost seconds."""
    return _param_shapes(cfg)


def rule(
    reference: str | tuple[str, ...],
    native: str,
    layout: Layout,
    cfg: ViTConfig,
    reshape_to: Shape | None = None,
) -> Rule:
    """One row of a table; the native shape follows from the reference shapes and the layout."""
    names = (reference,) if isinstance(reference, str) else reference
    shapes = param_shapes(cfg)
    return Rule(names, native, layout, native_shape(layout, [shapes[n] for n in names], reshape_to))


def token_rule(reference: str, native: str, cfg: ViTConfig) -> Rule:
    """Token rows ([D] or [rows, D]) stored with a leading batch axis: [1, rows, D]."""
    shape = param_shapes(cfg)[reference]
    return rule(reference, native, Layout.RESHAPE, cfg, (1, math.prod(shape[:-1]), shape[-1]))


def check_names_and_shapes(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, Shape], what: str
) -> None:
    """Raise TreeMismatchError listing every missing, unexpected and mis-shaped key at once."""
    problems = tree_problems(expected, arrays, require_float=False)
    if problems:
        raise TreeMismatchError(f"{what} does not match the config:\n  " + "\n  ".join(problems))


def native_from_reference(
    table: list[Rule], params: Mapping[str, np.ndarray], cfg: ViTConfig
) -> dict[str, np.ndarray]:
    return dict(native_view(table, params, cfg))


def reference_from_native(
    table: list[Rule], native: Mapping[str, np.ndarray], cfg: ViTConfig, fmt: str
) -> dict[str, np.ndarray]:
    return dict(reference_view(table, native, cfg, fmt))


def native_view(table: list[Rule], params: Mapping[str, np.ndarray], cfg: ViTConfig) -> LazyTensors:
    """The native tree of `params` (arrays or a LazyTensors), each tensor computed by its table row
    when asked for: names and shapes are checked now, no values are read."""
    check_names_and_shapes(stand_ins(params), param_shapes(cfg), "reference params")
    specs = {
        r.native: (r.native_shape, np.result_type(*(spec_of(params, n)[1] for n in r.reference)))
        for r in table
    }
    rows = {r.native: r for r in table}

    def get(name: str) -> np.ndarray:
        r = rows[name]
        if r.layout in TRANSPOSING:
            return kernel_rows(params, r.reference, r.native_shape, specs[name][1])
        return to_native(r.layout, [np.asarray(params[n]) for n in r.reference], r.native_shape)

    return LazyTensors(specs, get)


def reference_view(
    table: list[Rule], native: Mapping[str, np.ndarray], cfg: ViTConfig, fmt: str
) -> LazyTensors:
    """The reference tree of a native one (arrays or a LazyTensors), each tensor computed when asked
    for; the parts of a fused row are computed together and the others kept until first asked
    for, so reading q, k and v reads their fused tensor once. Its `transposed(name)` hands out a
    kernel's rows as the file stores them (for kernel_rows), the same way."""
    check_names_and_shapes(stand_ins(native), {r.native: r.native_shape for r in table}, f"{fmt} checkpoint")
    shapes = param_shapes(cfg)
    rows = {n: r for r in table for n in r.reference}

    def once(split, pending: dict[str, np.ndarray]):
        """name -> its part of its row's native tensor, by `split(row, tensor)`: the row's other
        parts are kept in `pending` until asked for, so the tensor is read once for them all."""

        def part(name: str) -> np.ndarray:
            if name in pending:
                return pending.pop(name)
            r = rows[name]
            parts = dict(zip(r.reference, split(r, np.asarray(native[r.native])), strict=True))
            value = parts.pop(name)
            pending.update(parts)
            return value

        return part

    get = once(lambda r, tensor: to_reference(r.layout, tensor, [shapes[n] for n in r.reference]), {})
    stored_rows = once(lambda r, tensor: np.split(tensor, len(r.reference)), {})

    def get_transposed(name: str) -> np.ndarray | None:
        return stored_rows(name) if rows[name].layout in TRANSPOSING else None

    specs = {n: (shapes[n], spec_of(native, rows[n].native)[1]) for n in shapes}
    return LazyTensors(specs, get, get_transposed=get_transposed)


def refuse(fmt: str, reasons: list[str]) -> None:
    """Raise FormatError if the format cannot express the config, with every reason."""
    if reasons:
        raise FormatError(f"the {fmt} layout cannot express this config: " + "; ".join(reasons))
