"""The Flax backend against the NumPy reference, over Hypothesis configs of every knob.

float64 (x64 enabled only inside these tests): logits, every named intermediate, the attention
maps and the gradients of every parameter (mapped through to_reference) and of the images match
the reference to the float64 bounds. float32: the error against the float64 reference stays
within k x the reference's own float32 error. bfloat16 computation with float32 parameters (as
trained): forward and gradients within k x the reference's own bfloat16 error, float64 math on
parameters and images rounded to bfloat16.

Every example compiles one jitted function (forward, attention maps and gradients together):
compiling (about a second on 2 CPU cores) is most of the cost, so each test compiles once per example.

`python -m parity_tests.sweep run flax` measures the errors and ratios over many examples (the
numbers behind the low-precision rows of the tolerance table); `--cait` draws CaiT cases.

CaiT (`class_attention_depth > 0`, backends.flax_vit.CaiT) runs through the same checks on its own
strategy (`cait_cases`), a few examples each: its compiles cost as much as the ViT's. The ViT
families' knobs run through the float32 check on seven of the hand-picked `FAMILY_LOWP_CASES`
(cases.py), which together cover every family parameter, and the bfloat16 check on four; a max
pool's gradient is compared where its top two tokens keep a margin (cases.max_pool_routes_agree).
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from backends.flax_vit import (
    VisionTransformer,
    cross_entropy,
    from_reference,
    layers,
    module_for,
    to_reference,
)
from parity_tests.cases import (
    FAMILY_BFLOAT16_FORWARD_ONLY,
    FAMILY_LOWP_CASES,
    LABEL_SMOOTHING,
    Case,
    as_float64,
    assert_bfloat16_close,
    assert_float32_close,
    cait_cases,
    cases,
    uses_cross_entropy,
)
from parity_tests.tolerances import assert_close_f64

# CaiT examples per test: each compiles one or two XLA programs (~2.5 s on 2 cores).
CAIT_EXAMPLES = 3
# The families' float32 check (~3 s a compile) on every cases.FAMILY_LOWP_CASES model but the
# distilled one without heads (its pooled mean and pre-norm are on other models here and in torch).
FAMILY_FLOAT32_CASES = tuple(name for name in FAMILY_LOWP_CASES if name != "distilled-no-head-prenorm")
# The families' bfloat16 check (~4 s a compile) on the cases.FAMILY_LOWP_CASES whose knobs change
# the bfloat16 computation most: the sum pool and the biasless blocks, DeiT's two heads,
# attention_dim, the MAP head, a max pool whose gradient bfloat16 can bound.
FAMILY_BFLOAT16_CASES = (
    "quick-prenorm-nobias-sum-nohead-sinusoidal2d",
    "distilled-attention-dim-registers-sinusoidal1d",
    "map-prefix-attention-dim",
    "max-two-tokens-bfloat16-margin",
)


def flax_named_and_grads(case: Case, dtype) -> tuple[dict, dict]:
    """Named values and reference-named gradients from one jitted Flax computation in `dtype`."""
    params, images = case.at(dtype)
    module = module_for(case.cfg, dtype=dtype, param_dtype=dtype)
    with jax.enable_x64(dtype == np.float64):
        named, grads, image_grads = jax.jit(_named_and_grads(case, module))(
            from_reference(params, case.cfg)["params"], images
        )
        grads = to_reference(grads, case.cfg) | {"images": np.asarray(image_grads)}
        named = {k: np.asarray(v) for k, v in named.items()}
    return named, grads


def _named_and_grads(case: Case, module: VisionTransformer, attention_maps: bool = True):
    cfg, labels, cotangent = case.cfg, case.labels, case.cotangent

    def objective(tree, images):
        named = module.apply({"params": tree}, images, intermediates=True)
        logits = named["logits"].astype(
            jnp.promote_types(named["logits"].dtype, jnp.float32)
        )  # loss as trained
        if uses_cross_entropy(cfg):
            return cross_entropy(logits, labels, LABEL_SMOOTHING), named
        return jnp.sum(logits * jnp.asarray(cotangent, logits.dtype)), named

    def named_and_grads(tree, images):
        # Intermediates from the fused-attention path; maps need the explicit one.
        value_and_grad = jax.value_and_grad(objective, (0, 1), has_aux=True)
        (_, named), (grads, image_grads) = value_and_grad(tree, images)
        if attention_maps:
            named = named | module.apply({"params": tree}, images, attention_maps=True)
        return named, grads, image_grads

    return named_and_grads


def check_float64(case: Case) -> None:
    ref_named, ref_grads = case.reference(np.float64)
    named, grads = flax_named_and_grads(case, np.float64)
    assert all(v.dtype == np.float64 for v in named.values())
    assert_close_f64(named, ref_named, "forward")
    assert_close_f64(grads, ref_grads, "grad")


def check_float32(case: Case) -> bool:
    """Returns whether the gradients were compared (cases.assert_float32_close)."""
    named, grads = flax_named_and_grads(case, np.float32)
    assert all(v.dtype == np.float32 for v in named.values())
    return assert_float32_close(case, named, grads)


def check_explicit_attention_float32(case: Case) -> None:
    # These tests run in eval mode, which takes jax.nn.dot_product_attention in float32; training on
    # the CPU takes the explicit attention instead, held to the same bound here.
    with mock.patch.object(layers, "fused_attention_pays", return_value=False) as pays:
        named, grads = flax_named_and_grads(case, np.float32)
    assert pays.called
    assert_float32_close(case, named, grads)


def check_bfloat16(case: Case) -> bool:
    named, grads = bfloat16_named_and_grads(case)
    return assert_bfloat16_close(case, named, grads)


@given(cases)
def test_float64_matches_reference(case):
    check_float64(case)


@pytest.mark.low_precision
@given(cases)
def test_float32_error_within_k_of_reference_own(case):
    check_float32(case)


@pytest.mark.low_precision
@settings(max_examples=10)
@given(cases)
def test_explicit_attention_path_float32_error_within_k_of_reference_own(case):
    check_explicit_attention_float32(case)


@pytest.mark.low_precision
@given(cases)
def test_bfloat16_error_within_k_of_reference_own(case):
    check_bfloat16(case)


@settings(max_examples=CAIT_EXAMPLES)
@given(cait_cases)
def test_cait_float64_matches_reference(case):
    check_float64(case)


@pytest.mark.low_precision
@settings(max_examples=CAIT_EXAMPLES)
@given(cait_cases)
def test_cait_float32_error_within_k_of_reference_own(case):
    check_float32(case)


@pytest.mark.low_precision
@settings(max_examples=2)
@given(cait_cases)
def test_cait_explicit_attention_path_float32_error_within_k_of_reference_own(case):
    # Talking heads always take the explicit path; the class blocks' attention and plain
    # self-attention take the fused one in eval mode, the explicit one in training on the CPU.
    check_explicit_attention_float32(case)


@pytest.mark.low_precision
@settings(max_examples=CAIT_EXAMPLES)
@given(cait_cases)
def test_cait_bfloat16_error_within_k_of_reference_own(case):
    check_bfloat16(case)


@pytest.mark.low_precision
@pytest.mark.parametrize("name", FAMILY_FLOAT32_CASES)
def test_families_float32_error_within_k_of_reference_own(name):
    assert check_float32(FAMILY_LOWP_CASES[name]), "the max pool's margin is chosen to compare gradients"


@pytest.mark.low_precision
def test_families_explicit_attention_path_float32_error_within_k_of_reference_own():
    # attention_dim != width (heads 6 wide at width 16) through the explicit attention as well.
    check_explicit_attention_float32(FAMILY_LOWP_CASES["distilled-attention-dim-registers-sinusoidal1d"])


@pytest.mark.low_precision
@pytest.mark.parametrize("name", FAMILY_BFLOAT16_CASES)
def test_families_bfloat16_error_within_k_of_reference_own(name):
    assert check_bfloat16(FAMILY_LOWP_CASES[name]) or name in FAMILY_BFLOAT16_FORWARD_ONLY


def bfloat16_named_and_grads(case: Case) -> tuple[dict, dict]:
    """Mixed precision as trained: float32 parameters, bfloat16 computation, the loss in float32."""
    params, images = case.at(np.float32)
    module = module_for(case.cfg, dtype=jnp.bfloat16)
    named, grads, image_grads = jax.jit(_named_and_grads(case, module, attention_maps=False))(
        from_reference(params, case.cfg)["params"], images
    )
    grads = to_reference(grads, case.cfg) | {"images": np.asarray(image_grads)}
    return as_float64(named), as_float64(grads)
