"""What every backend's parity test shares: the drawn case, the reference side, the measurement report.

A case is a drawn config with float64 parameters, images, labels and a cotangent on the outputs.
Its objective is the reference's loss where it has one (cross-entropy with label smoothing on
per-image logits of two or more classes), else <cotangent, outputs>: so every config, `pool='none'`
and `num_classes=0` included, has gradients to compare.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import vitspec
from parity_tests.relabel import (
    random_relabeling,
    relabel_params,
    relabel_values,
    restore_params,
    restore_values,
)
from parity_tests.strategies import cait_configs, configs, family_configs, random_images, random_params
from parity_tests.tolerances import assert_close_lowp
from vitspec.reference import smoothed_targets, softmax

LABEL_SMOOTHING = 0.1
# How many roundings of the float32 reference the float32 yardstick takes the largest error of.
FLOAT32_ROUNDINGS = 4


def uses_cross_entropy(cfg: vitspec.ViTConfig) -> bool:
    """Per-image logits of two or more classes (with one class the loss is constant)."""
    return cfg.pool != "none" and cfg.num_classes > 1


class Case:
    def __init__(self, cfg: vitspec.ViTConfig, seed: int, batch: int):
        self.cfg = cfg
        self.seed = seed
        self.params = random_params(cfg, seed)
        self.images = random_images(cfg, batch, seed + 1)
        rng = np.random.default_rng(seed + 2)
        self.labels = rng.integers(0, max(cfg.num_classes, 1), size=batch)
        self.cotangent = rng.standard_normal(vitspec.forward(cfg, self.params, self.images).shape)

    def __repr__(self) -> str:
        return f"Case({self.cfg!r}, batch={len(self.images)})"

    def at(self, dtype) -> tuple[dict[str, np.ndarray], np.ndarray]:
        return {k: v.astype(dtype) for k, v in self.params.items()}, self.images.astype(dtype)

    def reference(
        self, dtype, round_inputs_to_bfloat16: bool = False, relabeling: dict | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(named intermediates with attention maps, gradients with "images") in `dtype`.

        With `round_inputs_to_bfloat16`, the parameters, the images and the gradient that starts the
        backward pass (the loss's, or the cotangent, at the logits) are rounded to bfloat16's values:
        the reference's own error at bfloat16 is what those roundings, which every bfloat16
        computation makes, do to exact (float64) math, the yardstick a bfloat16 computation is held to.
        With a `relabeling` (parity_tests.relabel), the model's hidden units are permuted before
        and the results put back after: the same values in exact math, another rounding.
        """
        cfg = self.cfg
        params, images = self.at(dtype)
        if round_inputs_to_bfloat16:
            params = {k: round_to_bfloat16(v).astype(dtype) for k, v in params.items()}
            images = round_to_bfloat16(images).astype(dtype)
        cotangent = self.cotangent.astype(dtype)
        if relabeling is not None:
            params = relabel_params(cfg, params, relabeling)
            cotangent = relabel_values(cfg, {"logits": cotangent}, relabeling)["logits"]
        named = vitspec.forward(cfg, params, images, intermediates=True, attention_maps=True)
        if round_inputs_to_bfloat16:
            # The backward of a bfloat16 head starts from the loss's gradient rounded to bfloat16.
            if uses_cross_entropy(cfg):
                cotangent = loss_gradient(named["logits"], self.labels)
            grads = vitspec.vjp(cfg, params, images, round_to_bfloat16(cotangent).astype(dtype))
        elif uses_cross_entropy(cfg):
            grads = vitspec.loss_and_grad(cfg, params, images, self.labels, LABEL_SMOOTHING)[1]
        else:
            grads = vitspec.vjp(cfg, params, images, cotangent)
        if relabeling is not None:
            image_grads = grads.pop("images")
            named = restore_values(cfg, named, relabeling)
            grads = restore_params(cfg, grads, relabeling) | {"images": image_grads}
        return named, grads

    def float32_roundings(self) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """The float32 reference as written, then under FLOAT32_ROUNDINGS - 1 random relabelings."""
        rng = np.random.default_rng(self.seed + 3)
        return [self.reference(np.float32)] + [
            self.reference(np.float32, relabeling=random_relabeling(self.cfg, rng))
            for _ in range(FLOAT32_ROUNDINGS - 1)
        ]


def loss_gradient(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """d(mean smoothed cross-entropy) / d logits: (softmax - targets) / batch."""
    targets = smoothed_targets(labels, logits.shape[-1], LABEL_SMOOTHING, logits.dtype)
    return (softmax(logits) - targets) / len(logits)


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32; finite inputs."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


cases = st.builds(Case, configs(), st.integers(0, 2**16), st.integers(1, 3))
cait_cases = st.builds(Case, cait_configs(), st.integers(0, 2**16), st.integers(1, 3))
# The ViT families' knobs (parity_tests.strategies.family_configs); float64 only: the float32
# yardstick's relabelings (parity_tests.relabel) do not permute their parameters.
family_cases = st.builds(Case, family_configs(), st.integers(0, 2**16), st.integers(1, 3))


def head_propagated_error(case: Case, ref64: dict, own_named: list[dict]) -> dict[str, float]:
    """{'logits': the relative error the reference's own error on the head's input can make in the
    logits}, for models with a head.

    The logits are x @ W + b: an input error dx moves logit j by sum_i dx_i W_ij, at most
    max|dx| * sum_i |W_ij|. How much of it a given rounding shows depends on how dx happens to
    point against W, so one rounding of the reference can land far below what its own input error
    allows (a one-class logit that cancels), while a backend's equally good input error lands
    near the top. The yardstick for the logits is therefore at least this bound, from the
    reference's largest own error on the input.
    """
    if not case.cfg.num_classes:
        return {}
    kernel = case.params["head/kernel"].astype(np.float64)
    gain = float(np.abs(kernel).sum(axis=0).max())
    reference = ref64["pre_logits"]
    input_error = max(float(np.max(np.abs(own["pre_logits"] - reference))) for own in own_named)
    scale = float(np.max(np.abs(ref64["logits"])))
    return {"logits": input_error * gain / scale} if scale > 0 else {}


def as_float64(tree: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def assert_float32_close(case: Case, named: dict, grads: dict) -> None:
    """A backend's float32 named values and gradients within k x the reference's own float32 error."""
    ref64_named, ref64_grads = case.reference(np.float64)
    roundings = case.float32_roundings()
    own_named = [r[0] for r in roundings]
    propagated = head_propagated_error(case, ref64_named, own_named)
    assert_close_lowp(as_float64(named), ref64_named, own_named, "forward", propagated=propagated)
    assert_close_lowp(as_float64(grads), ref64_grads, [r[1] for r in roundings], "grad")


def assert_bfloat16_close(case: Case, named: dict, grads: dict) -> None:
    """A backend's bfloat16 named values (a subset of the reference's) and gradients within k x the
    reference's own bfloat16 error."""
    ref64_named, ref64_grads = case.reference(np.float64)
    own_named, own_grads = case.reference(np.float64, round_inputs_to_bfloat16=True)
    propagated = head_propagated_error(case, ref64_named, [own_named])
    assert_close_lowp(
        as_float64(named),
        {k: ref64_named[k] for k in named},
        [{k: own_named[k] for k in named}],
        "forward",
        "bfloat16",
        propagated,
    )
    assert_close_lowp(as_float64(grads), ref64_grads, [own_grads], "grad", "bfloat16")
