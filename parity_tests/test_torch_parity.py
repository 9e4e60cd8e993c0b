"""The PyTorch backend against the NumPy reference, over Hypothesis configs of every knob.

float64: logits, every named intermediate, the attention maps and the gradients of every
parameter and of the images match the reference to the float64 bounds. float32: the backend's
error against the float64 reference stays within k x the reference's own float32 error.
bfloat16 autocast (float32 parameters, as trained): forward and gradients within k x the
reference's own bfloat16 error, float64 math on parameters and images rounded to bfloat16.

`python -m parity_tests.sweep run torch` measures the errors and ratios over many examples
(the numbers behind the low-precision rows of the tolerance table); `--cait` draws CaiT cases.

CaiT (`class_attention_depth > 0`, backends.torch_vit.Cait) runs through the same checks on its
own strategy (`cait_cases`), with a smaller example budget; the ViT families' knobs (quick GELU,
pre-norm, the optional biases and final norm, the token pools, DeiT's distillation token,
attention_dim, Scenic's posembs) through the float64 check on `family_cases`, and the float32 and
bfloat16 checks on the hand-picked `FAMILY_LOWP_CASES` and a few drawn `family_cases`. A max
pool's gradient is compared where its top two tokens keep a margin (cases.max_pool_routes_agree).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import vitspec
from backends.torch_vit import from_reference, model_for, to_reference
from parity_tests.cases import (
    FAMILY_BFLOAT16_FORWARD_ONLY,
    FAMILY_LOWP_CASES,
    LABEL_SMOOTHING,
    Case,
    assert_bfloat16_close,
    assert_float32_close,
    cait_cases,
    cases,
    family_cases,
    top_token_margin,
    uses_cross_entropy,
)
from parity_tests.strategies import SMALL_FIELDS, configs, family_configs, random_params
from parity_tests.tolerances import assert_close_f64
from vitspec.config import ViTConfig

TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}
# CaiT examples per test: on top of the ViT's, a few cover its knobs (~0.1 s each).
CAIT_EXAMPLES = 12
# The families' knobs: one float64 check (~0.3 s of CPU each).
FAMILY_EXAMPLES = 15
# Drawn families' cases per low-precision test, on top of FAMILY_LOWP_CASES.
FAMILY_LOWP_EXAMPLES = 8


def torch_model(cfg, params, dtype) -> torch.nn.Module:
    """The backend's module for `cfg` (VisionTransformer, or Cait for CaiT) in eval mode."""
    model = model_for(cfg).to(TORCH_DTYPES[dtype])
    model.load_state_dict(from_reference(params, cfg))
    return model.eval()


def to_nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)


def to_numpy_tree(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in tensors.items()}


def backend_named(model, images) -> dict[str, np.ndarray]:
    """Intermediates from the fused-attention path, attention maps from the explicit one."""
    with torch.no_grad():
        named = model(to_nchw(images), intermediates=True)
        with_maps = model(to_nchw(images), attention_maps=True)
    return to_numpy_tree(named | with_maps)


def objective(cfg, logits, labels, cotangent):
    """The reference's loss where it has one (cross-entropy), else <cotangent, outputs>."""
    if uses_cross_entropy(cfg):
        return F.cross_entropy(logits, torch.from_numpy(labels), label_smoothing=LABEL_SMOOTHING)
    return (logits * torch.from_numpy(cotangent).to(logits.dtype)).sum()


def backend_grads(cfg, model, images, labels, cotangent) -> dict[str, np.ndarray]:
    model.zero_grad()
    images_nchw = to_nchw(images).clone().requires_grad_(True)
    objective(cfg, model(images_nchw), labels, cotangent).backward()
    grads = to_reference({k: p.grad for k, p in model.named_parameters()}, cfg)
    grads["images"] = images_nchw.grad.permute(0, 2, 3, 1).numpy()
    return {k: v.astype(np.float64) for k, v in grads.items()}


def torch_named_and_grads(case: Case, dtype) -> tuple[dict, dict]:
    params, images = case.at(dtype)
    model = torch_model(case.cfg, params, dtype)
    grads = backend_grads(case.cfg, model, images, case.labels, case.cotangent)
    return backend_named(model, images), grads


def bf16_autocast_named_and_grads(case: Case) -> tuple[dict, dict]:
    """Mixed precision as trained: float32 parameters, bfloat16 autocast, the loss in float32."""
    params, images = case.at(np.float32)
    model = torch_model(case.cfg, params, np.float32)
    images_nchw = to_nchw(images).clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        named = model(images_nchw, intermediates=True)
    objective(case.cfg, named["logits"].float(), case.labels, case.cotangent).backward()
    grads = to_reference({k: p.grad for k, p in model.named_parameters()}, case.cfg)
    grads["images"] = images_nchw.grad.permute(0, 2, 3, 1).numpy()
    return to_numpy_tree(named), {k: v.astype(np.float64) for k, v in grads.items()}


def check_float64(case: Case) -> None:
    ref_named, ref_grads = case.reference(np.float64)
    named, grads = torch_named_and_grads(case, np.float64)
    params, images = case.at(np.float64)
    with torch.no_grad():
        maps = torch_model(case.cfg, params, np.float64)(to_nchw(images), attention_maps=True)
    assert maps.keys() == vitspec.forward(case.cfg, params, images, attention_maps=True).keys()
    assert_close_f64(named, ref_named, "forward")
    assert_close_f64(grads, ref_grads, "grad")


def check_float32(case: Case) -> bool:
    """Returns whether the gradients were compared (cases.assert_float32_close)."""
    named, grads = torch_named_and_grads(case, np.float32)
    return assert_float32_close(case, named, grads)


def check_bfloat16(case: Case) -> bool:
    named, grads = bf16_autocast_named_and_grads(case)
    return assert_bfloat16_close(case, named, grads)


@given(cases)
def test_float64_matches_reference(case):
    check_float64(case)


@pytest.mark.low_precision
@given(cases)
def test_float32_error_within_k_of_reference_own(case):
    check_float32(case)


@pytest.mark.low_precision
@given(cases)
def test_bfloat16_autocast_error_within_k_of_reference_own(case):
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
@settings(max_examples=CAIT_EXAMPLES)
@given(cait_cases)
def test_cait_bfloat16_autocast_error_within_k_of_reference_own(case):
    check_bfloat16(case)


@settings(max_examples=FAMILY_EXAMPLES)
@given(family_cases)
def test_families_float64_matches_reference(case):
    check_float64(case)


@pytest.mark.low_precision
@pytest.mark.parametrize("name", FAMILY_LOWP_CASES)
def test_families_float32_error_within_k_of_reference_own(name):
    assert check_float32(FAMILY_LOWP_CASES[name]), "the max pool's margin is chosen to compare gradients"


@pytest.mark.low_precision
@pytest.mark.parametrize("name", FAMILY_LOWP_CASES)
def test_families_bfloat16_autocast_error_within_k_of_reference_own(name):
    assert check_bfloat16(FAMILY_LOWP_CASES[name]) or name in FAMILY_BFLOAT16_FORWARD_ONLY


@pytest.mark.low_precision
def test_max_pool_near_tie_is_compared_forward_only():
    # Two patches 3e-7 apart and no posemb: the pooled tokens are closer than float32 rounding, so
    # each rounding routes the max pool's gradient to either, the reference's relabeled ones too
    # (their own error on the images' gradient is O(1), a yardstick that bounds nothing). The
    # gradients are not compared; the forward is, a max being 1-Lipschitz.
    cfg = ViTConfig(**SMALL_FIELDS | dict(image_size=(2, 4), patch_size=2, pool="max", posemb="none"))
    case = Case(cfg, seed=0, batch=2)
    noise = np.random.default_rng(0).standard_normal(case.images[:, :, :2].shape)
    case.images[:, :, 2:] = case.images[:, :, :2] + 3e-7 * noise
    assert top_token_margin(cfg, case.reference(np.float64)[0]["encoded"]) < 1e-6
    assert not check_float32(case)


@pytest.mark.low_precision
@settings(max_examples=FAMILY_LOWP_EXAMPLES)
@given(family_cases)
def test_drawn_families_float32_error_within_k_of_reference_own(case):
    check_float32(case)


@pytest.mark.low_precision
@settings(max_examples=FAMILY_LOWP_EXAMPLES)
@given(family_cases)
def test_drawn_families_bfloat16_autocast_error_within_k_of_reference_own(case):
    check_bfloat16(case)


@given(
    st.one_of(configs(), family_configs()), st.integers(0, 2**16), st.sampled_from([np.float32, np.float64])
)
def test_round_trip_reference_torch_reference_is_bit_exact(cfg, seed, dtype):
    params = random_params(cfg, seed, dtype)
    back = to_reference(from_reference(params, cfg), cfg)
    assert list(back) == list(params)
    for k in params:
        assert back[k].dtype == params[k].dtype and np.array_equal(back[k], params[k]), k
