"""The one tolerance table. Every number has its measured reason in SPEC.md ("Tolerances").

Errors are relative to the tensor's scale: max|x - ref| / max|ref| (max-norm), so one number
serves logits, intermediates and gradients of any size. Gradients that are zero in exact math are
pure rounding in every implementation (the key bias and k_norm bias shift a whole softmax row by a
constant; q and k do nothing when there is one token); a relative error of rounding against rounding
means nothing, so a gradient whose float64 reference is at most ZERO_GRAD x the tree's largest is
measured against the tree's largest instead. Measured: such exact zeros are <= 3.1e-16 of the
tree's largest, every other gradient >= 6e-4 of it (1,000 drawn configs).

- float64 is where the math is proven: a backend must match the float64 reference to `rel`.
- float32 and bfloat16 are judged against the reference's own error at that precision, as
  flash-attention does: err(backend_lowp vs ref64) <= k * max(err(ref_lowp vs ref64), floor).
  `floor` keeps k meaningful where the reference happens to be exact (e.g. a zero tensor). The
  reference's own error is the largest of several roundings of it and, for the logits, at least
  what its own error on the head's input allows through the head (parity_tests.cases).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

TOLERANCES: dict[str, dict[str, dict[str, float]]] = {
    "float64": {"forward": {"rel": 1e-11}, "grad": {"rel": 1e-10}},
    # floor: 4 float32 ulps (2**-21). A backend that orders its sums differently is a few ulps off;
    # the reference landing closer than that on some tensor is luck, not a bar to hold others to.
    # k: worst ratios measured over 5,270 cases on two ISAs: 2.63 (forward) and 7.37 (gradients).
    "float32": {"forward": {"k": 4.0, "floor": 2.0**-21}, "grad": {"k": 16.0, "floor": 2.0**-21}},
    # bfloat16 computation with float32 parameters (torch autocast, flax dtype=bfloat16). The reference's
    # own bfloat16 error: float64 math on parameters, images and the backward's starting gradient rounded
    # to bfloat16. floor: bfloat16's unit roundoff. k: worst ratios measured over 5,270 cases, 6.36
    # (forward) and 37.9 (gradients: an MLP kernel behind a 1e-5 LayerScale; rounding the inputs misses
    # what rounding every activation does to gradients through sums that cancel inside).
    "bfloat16": {"forward": {"k": 16.0, "floor": 2.0**-8}, "grad": {"k": 64.0, "floor": 2.0**-8}},
}


ZERO_GRAD = 1e-12


def _max_abs(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.max(np.abs(x))) if x.size else 0.0


def rel_err(x: np.ndarray, ref: np.ndarray, scale: float | None = None) -> float:
    """max|x - ref| / scale, the scale being max|ref| unless given."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if x.shape != ref.shape:
        raise AssertionError(f"shape {x.shape} != reference shape {ref.shape}")
    scale = _max_abs(ref) if scale is None else scale
    diff = _max_abs(x - ref)
    return diff / scale if scale > 0 else diff


def tree_rel_errs(
    tree: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], kind: str = "forward"
) -> dict[str, float]:
    missing = sorted(set(ref) - set(tree))
    extra = sorted(set(tree) - set(ref))
    if missing or extra:
        raise AssertionError(f"key sets differ: missing {missing}, unexpected {extra}")
    tree_scale = max(map(_max_abs, ref.values()), default=0.0)

    def scale(k: str) -> float | None:
        return tree_scale if kind == "grad" and _max_abs(ref[k]) <= ZERO_GRAD * tree_scale else None

    return {k: rel_err(tree[k], ref[k], scale(k)) for k in ref}


def assert_close_f64(tree, ref, kind: str) -> dict[str, float]:
    """Every entry within the float64 bound for `kind` ('forward' or 'grad'); returns the errors."""
    bound = TOLERANCES["float64"][kind]["rel"]
    errs = tree_rel_errs(tree, ref, kind)
    bad = {k: e for k, e in errs.items() if not e <= bound}
    if bad:
        raise AssertionError(f"float64 {kind} relative error above {bound:g}: {bad}")
    return errs


def lowp_ratios(
    tree,
    ref64,
    own_roundings: Sequence[Mapping],
    kind: str,
    dtype: str,
    propagated: Mapping[str, float] | None = None,
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(errors, the reference's own errors, ratios) per entry: the error of `tree` against float64,
    the reference's own error at `dtype` (the largest of its roundings, or where larger the error
    its own error upstream makes through the last layer, `propagated`), and their ratio with the floor."""
    floor = TOLERANCES[dtype][kind]["floor"]
    propagated = propagated or {}
    errs = tree_rel_errs(tree, ref64, kind)
    owns = [tree_rel_errs(own, ref64, kind) for own in own_roundings]
    own = {k: max([o[k] for o in owns] + [propagated.get(k, 0.0)]) for k in errs}
    return errs, own, {k: errs[k] / max(own[k], floor) for k in errs}


def assert_close_lowp(
    tree,
    ref64,
    own_roundings: Sequence[Mapping],
    kind: str,
    dtype: str = "float32",
    propagated: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Every entry's error vs float64 within k x the reference's own error at `dtype`.

    The reference's own error is the largest over `own_roundings`, each a tree of the reference
    computed at `dtype` in another equally valid way (parity_tests.relabel), or where larger
    `propagated` (cases.head_propagated_error). Returns the ratios err(tree) / max(own error,
    floor), the numbers SPEC.md reports.
    """
    k = TOLERANCES[dtype][kind]["k"]
    errs, own, ratios = lowp_ratios(tree, ref64, own_roundings, kind, dtype, propagated)
    bad = {name: (errs[name], own[name]) for name, r in ratios.items() if not r <= k}
    if bad:
        detail = "; ".join(
            f"{name}: backend {e:.3g} vs reference's own {o:.3g}" for name, (e, o) in bad.items()
        )
        raise AssertionError(f"{dtype} {kind} error above {k:g} x the reference's own: {detail}")
    return ratios
