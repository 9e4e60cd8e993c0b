"""What every backend's parity test shares: the drawn case, the reference side, the measurement report.

A case is a drawn config with float64 parameters, images, labels and a cotangent on the outputs.
Its objective is the reference's loss where it has one (cross-entropy with label smoothing on
per-image logits of two or more classes), else <cotangent, outputs>: so every config, `pool='none'`
and `num_classes=0` included, has gradients to compare.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import vitspec
from parity_tests.strategies import configs, random_images, random_params
from parity_tests.tolerances import TOLERANCES, assert_close_lowp, tree_rel_errs

LABEL_SMOOTHING = 0.1


def uses_cross_entropy(cfg: vitspec.ViTConfig) -> bool:
    """Per-image logits of two or more classes (with one class the loss is constant)."""
    return cfg.pool != "none" and cfg.num_classes > 1


class Case:
    def __init__(self, cfg: vitspec.ViTConfig, seed: int, batch: int):
        self.cfg = cfg
        self.params = random_params(cfg, seed)
        self.images = random_images(cfg, batch, seed + 1)
        rng = np.random.default_rng(seed + 2)
        self.labels = rng.integers(0, max(cfg.num_classes, 1), size=batch)
        self.cotangent = rng.standard_normal(vitspec.forward(cfg, self.params, self.images).shape)

    def __repr__(self) -> str:
        return f"Case({self.cfg!r}, batch={len(self.images)})"

    def at(self, dtype) -> tuple[dict[str, np.ndarray], np.ndarray]:
        return {k: v.astype(dtype) for k, v in self.params.items()}, self.images.astype(dtype)

    def reference(self, dtype, round_inputs_to_bfloat16: bool = False
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(named intermediates with attention maps, gradients with "images") in `dtype`.

        With `round_inputs_to_bfloat16`, the parameters and images are first rounded to bfloat16's
        values: the reference's own error at bfloat16 is what storing this model and batch in
        bfloat16 does to exact (float64) math, the yardstick a bfloat16 computation is held to.
        """
        params, images = self.at(dtype)
        if round_inputs_to_bfloat16:
            params = {k: round_to_bfloat16(v).astype(dtype) for k, v in params.items()}
            images = round_to_bfloat16(images).astype(dtype)
        named = vitspec.forward(self.cfg, params, images, intermediates=True, attention_maps=True)
        if uses_cross_entropy(self.cfg):
            grads = vitspec.loss_and_grad(self.cfg, params, images, self.labels, LABEL_SMOOTHING)[1]
        else:
            grads = vitspec.vjp(self.cfg, params, images, self.cotangent.astype(dtype))
        return named, grads


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32; finite inputs."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


cases = st.builds(Case, configs(), st.integers(0, 2**16), st.integers(1, 3))


def as_float64(tree: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def assert_float32_close(case: Case, named: dict, grads: dict) -> None:
    """A backend's float32 named values and gradients within k x the reference's own float32 error."""
    ref64_named, ref64_grads = case.reference(np.float64)
    ref32_named, ref32_grads = case.reference(np.float32)
    assert_close_lowp(as_float64(named), ref64_named, ref32_named, "forward")
    assert_close_lowp(as_float64(grads), ref64_grads, ref32_grads, "grad")


def assert_bfloat16_close(case: Case, named: dict, grads: dict) -> None:
    """A backend's bfloat16 named values (a subset of the reference's) and gradients within k x the
    reference's own bfloat16 error."""
    ref64_named, ref64_grads = case.reference(np.float64)
    own_named, own_grads = case.reference(np.float64, round_inputs_to_bfloat16=True)
    assert_close_lowp(as_float64(named), {k: ref64_named[k] for k in named}, {k: own_named[k] for k in named},
                      "forward", "bfloat16")
    assert_close_lowp(as_float64(grads), ref64_grads, own_grads, "grad", "bfloat16")


class Report:
    """Worst errors and float32 ratios over many cases: the numbers behind the tolerance table."""

    def __init__(self) -> None:
        self.worst: dict[str, tuple[float, str]] = {}
        self.example_ratios: dict[str, list[float]] = {}

    def record(self, label: str, errors: dict[str, float]) -> None:
        key, value = max(errors.items(), key=lambda kv: kv[1])
        if value >= self.worst.get(label, (-1.0, ""))[0]:
            self.worst[label] = (value, key)

    def float64(self, named, ref_named, grads, ref_grads) -> None:
        self.record("float64 forward error", tree_rel_errs(named, ref_named))
        self.record("float64 grad error", tree_rel_errs(grads, ref_grads, "grad"))

    def low_precision(self, dtype: str, kind: str, got, ref64, ref_lowp) -> None:
        errors, own = tree_rel_errs(got, ref64, kind), tree_rel_errs(ref_lowp, ref64, kind)
        floor = TOLERANCES[dtype][kind]["floor"]
        ratios = {k: e / max(own[k], floor) for k, e in errors.items()}
        self.record(f"{dtype} {kind} error", errors)
        self.record(f"{dtype} {kind} reference's own error", own)
        self.record(f"{dtype} {kind} ratio", ratios)
        self.example_ratios.setdefault((dtype, kind), []).append(max(ratios.values()))

    def print(self) -> None:
        for label, (value, key) in sorted(self.worst.items()):
            print(f"{label:45s} {value:.3e}  ({key})")
        for (dtype, kind), values in self.example_ratios.items():
            k = TOLERANCES[dtype][kind]["k"]
            print(f"{dtype} {kind} worst ratio per example: median {np.median(values):.2f}, 99th percentile "
                  f"{np.percentile(values, 99):.2f}, max {max(values):.2f}, above k={k:g} in "
                  f"{sum(v > k for v in values)} of {len(values)}")


def measure(examples: int, named_and_grads: Callable, bf16_named_and_grads: Callable) -> None:
    """Print a backend's worst errors and low-precision ratios over `examples` drawn cases.

    `named_and_grads(case, dtype) -> (named, grads)`, `bf16_named_and_grads(case) -> (named, grads)`.
    """
    report = Report()

    @settings(max_examples=examples, database=None, deadline=None)
    @given(cases)
    def measure_one(case):
        (ref64_named, ref64_grads), (ref32_named, ref32_grads) = case.reference(np.float64), case.reference(np.float32)
        named64, grads64 = named_and_grads(case, np.float64)
        named32, grads32 = (as_float64(t) for t in named_and_grads(case, np.float32))
        report.float64(named64, ref64_named, grads64, ref64_grads)
        report.low_precision("float32", "forward", named32, ref64_named, ref32_named)
        report.low_precision("float32", "grad", grads32, ref64_grads, ref32_grads)
        own_named, own_grads = case.reference(np.float64, round_inputs_to_bfloat16=True)
        bf16_named, bf16_grads = bf16_named_and_grads(case)
        report.low_precision("bfloat16", "forward", bf16_named, {k: ref64_named[k] for k in bf16_named},
                             {k: own_named[k] for k in bf16_named})
        report.low_precision("bfloat16", "grad", bf16_grads, ref64_grads, own_grads)

    measure_one()
    report.print()
