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
from parity_tests.tolerances import TOLERANCES, assert_close_lowp, tree_rel_errs
from vitspec.config import ViTConfig
from vitspec.reference import pool_inputs, smoothed_targets, softmax

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
# The ViT families' knobs (parity_tests.strategies.family_configs).
family_cases = st.builds(Case, family_configs(), st.integers(0, 2**16), st.integers(1, 3))


def _family(**fields) -> ViTConfig:
    base = dict(image_size=(6, 6), patch_size=(2, 3), in_channels=3, width=16, depth=2, num_heads=4)
    return ViTConfig(**(base | dict(mlp_dim=20, num_classes=5, ln_eps=1e-6) | fields))


# The low-precision family checks: each knob of the ViT families in a few hand-picked models (a
# drawn case costs a compile per dtype in flax), together covering every family parameter's
# relabeling. A max pool's gradient is compared where the float64 tokens keep a margin between
# the top two (max_pool_routes_agree): at least 2 x k x floor of the tokens' scale, 3.8e-6 in
# float32 and 0.125 in bfloat16. The two max pools in six tokens keep float32's (their smallest
# top-two gaps are 3.2e-3 and 1.2e-2 of the scale) but not bfloat16's: their bfloat16 forward
# alone is compared. The two-token max pool keeps bfloat16's (0.26 at seed 4; 44 of the seeds
# 0..299 of that model do).
FAMILY_BFLOAT16_FORWARD_ONLY = ("max-prefix-qknorm-attention-dim", "avgmax-fcnorm-representation")
FAMILY_LOWP_CASES = {
    "quick-prenorm-nobias-sum-nohead-sinusoidal2d": Case(
        _family(
            gelu="quick",
            pre_norm=True,
            patch_bias=False,
            proj_bias=False,
            qkv_bias=False,
            final_norm=False,
            pool="sum",
            num_classes=0,
            posemb="sinusoidal_2d",
        ),
        seed=1,
        batch=2,
    ),
    "distilled-attention-dim-registers-sinusoidal1d": Case(
        _family(
            distilled=True,
            pool="token",
            attention_dim=24,
            num_registers=1,
            posemb="sinusoidal_1d",
            layer_scale=0.1,
        ),
        seed=2,
        batch=2,
    ),
    "distilled-no-head-prenorm": Case(
        _family(distilled=True, pool="token", num_classes=0, pre_norm=True, gelu="tanh"), seed=3, batch=2
    ),
    "max-prefix-qknorm-attention-dim": Case(
        _family(
            pool="max",
            class_token=True,
            pool_include_prefix=True,
            num_registers=1,
            qk_norm=True,
            attention_dim=32,
            pre_norm=True,
        ),
        seed=4,
        batch=2,
    ),
    "avgmax-fcnorm-representation": Case(
        _family(pool="avgmax", fc_norm=True, representation_size=7, proj_bias=False, num_classes=3),
        seed=5,
        batch=2,
    ),
    "map-prefix-attention-dim": Case(
        _family(
            pool="map",
            class_token=True,
            pool_include_prefix=True,
            attention_dim=8,
            num_heads=2,
            patch_bias=False,
        ),
        seed=7,
        batch=2,
    ),
    "max-two-tokens-bfloat16-margin": Case(
        _family(
            image_size=(2, 4),
            patch_size=2,
            width=8,
            num_heads=2,
            mlp_dim=8,
            depth=1,
            pool="max",
            num_classes=3,
            gelu="quick",
        ),
        seed=4,
        batch=1,
    ),
    "cait-attention-dim-prenorm-talking": Case(
        _family(
            class_attention_depth=1,
            pool="token",
            posemb_on_cls=False,
            talking_heads=True,
            attention_dim=24,
            pre_norm=True,
            proj_bias=False,
            gelu="quick",
            depth=1,
        ),
        seed=8,
        batch=2,
    ),
}


def top_token_margin(cfg: ViTConfig, encoded: np.ndarray) -> float:
    """Smallest gap between the largest and the second-largest of the pooled tokens, over images
    and channels (inf for one token): how far the float64 tokens are from another argmax."""
    tokens = pool_inputs(encoded, cfg)
    if tokens.shape[1] < 2:
        return float("inf")
    top2 = np.sort(tokens, axis=1)[:, -2:]
    return float(np.min(top2[:, 1] - top2[:, 0]))


def max_pool_routes_agree(case: Case, named: dict, ref64: dict, own: list[dict], dtype: str) -> bool:
    """Whether every computation that passes the forward bound routes a max pool's gradient to the
    float64 reference's tokens (True for models without a max pool).

    A max pool's gradient flows to one token per image and channel. Where the top two tokens are
    closer than rounding, which one a rounding picks is chance: an O(1) change in the gradients
    below (the images' gradient moves to another patch), not a rounding error. The reference's
    relabeled roundings face the same near-tie and flip by the same chance, so the k x own-error
    rule fails either way: against roundings that route as float64 does a backend that flips is
    O(1) off (a spurious failure), and a rounding that flips makes the yardstick O(1), which
    bounds nothing (two patches 3e-7 apart: the images' gradient's own error 0.5-1.2). The
    forward stays bounded (a max is 1-Lipschitz). So the gradient is compared only where the
    float64 tokens keep a margin: a computation whose pooled tokens ("encoded", held by the
    forward bound) are within e = k x max(own error, floor) x scale of float64's can swap two
    tokens only if they are closer than 2e, so with a margin above 2e every rounding that passes
    the forward check, the reference's included, routes as float64 does.
    """
    cfg = case.cfg
    if cfg.pool not in ("max", "avgmax"):
        return True
    if "encoded" not in named:
        return False
    reference = ref64["encoded"]
    own_error = max(tree_rel_errs({"encoded": o["encoded"]}, {"encoded": reference})["encoded"] for o in own)
    bound = TOLERANCES[dtype]["forward"]
    reach = bound["k"] * max(own_error, bound["floor"]) * float(np.max(np.abs(reference)))
    return top_token_margin(cfg, reference) > 2 * reach


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
    # A distilled model's logits are the mean of two heads, each on its own token.
    heads = (
        [("pooled", "head"), ("pooled_dist", "head_dist")] if case.cfg.distilled else [("pre_logits", "head")]
    )
    bound = 0.0
    for value, head in heads:
        kernel = case.params[f"{head}/kernel"].astype(np.float64)
        gain = float(np.abs(kernel).sum(axis=0).max())
        reference = ref64[value]
        input_error = max(float(np.max(np.abs(own[value] - reference))) for own in own_named)
        bound += input_error * gain / len(heads)
    scale = float(np.max(np.abs(ref64["logits"])))
    return {"logits": bound / scale} if scale > 0 else {}


def as_float64(tree: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def assert_float32_close(case: Case, named: dict, grads: dict) -> bool:
    """A backend's float32 named values and gradients within k x the reference's own float32 error.
    Returns whether the gradients were compared: not for a max pool without a margin between its
    top two tokens (max_pool_routes_agree), whose forward alone is bounded."""
    ref64_named, ref64_grads = case.reference(np.float64)
    roundings = case.float32_roundings()
    own_named = [r[0] for r in roundings]
    propagated = head_propagated_error(case, ref64_named, own_named)
    assert_close_lowp(as_float64(named), ref64_named, own_named, "forward", propagated=propagated)
    if not max_pool_routes_agree(case, named, ref64_named, own_named, "float32"):
        return False
    assert_close_lowp(as_float64(grads), ref64_grads, [r[1] for r in roundings], "grad")
    return True


def assert_bfloat16_close(case: Case, named: dict, grads: dict) -> bool:
    """A backend's bfloat16 named values (a subset of the reference's) and gradients within k x the
    reference's own bfloat16 error. Returns whether the gradients were compared (as
    assert_float32_close; bfloat16's margin is some 10**4 times float32's)."""
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
    if not max_pool_routes_agree(case, named, ref64_named, [own_named], "bfloat16"):
        return False
    assert_close_lowp(as_float64(grads), ref64_grads, [own_grads], "grad", "bfloat16")
    return True
