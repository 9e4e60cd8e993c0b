"""The analytic backward against finite differences, in float64, over configs covering every knob."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vitspec
from parity_tests.strategies import configs, family_configs, random_images, random_params
from vitspec.config import ViTConfig
from vitspec.gradcheck import REL_BOUND, fd_errors


def assert_gradients_match(loss_of, params, images, grads, seed: int) -> None:
    """`grads` of `loss_of(params, images)` within REL_BOUND of finite differences, tensor by tensor."""
    errors = fd_errors(loss_of, params, images, grads, np.random.default_rng(seed))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= REL_BOUND, f"{worst}: relative error {errors[worst]:.3g}"


def assert_vjp_matches_finite_differences(cfg: ViTConfig, seed: int, batch: int) -> None:
    """The VJP of a random cotangent on the output against finite differences of <output, cotangent>."""
    params = random_params(cfg, seed)
    images = random_images(cfg, batch, seed + 1)
    out_shape = vitspec.forward(cfg, params, images).shape
    cotangent = np.random.default_rng(seed + 2).standard_normal(out_shape)
    grads = vitspec.vjp(cfg, params, images, cotangent)

    def loss_of(p, x):
        return float(np.sum(vitspec.forward(cfg, p, x) * cotangent))

    assert_gradients_match(loss_of, params, images, grads, seed)


@given(
    cfg=configs(allow_none_pool=False),
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 3),
    label_smoothing=st.sampled_from([0.0, 0.1]),
)
def test_loss_gradients_match_finite_differences(cfg, seed, batch, label_smoothing):
    if not cfg.num_classes:
        cfg = cfg.replace(num_classes=3)
    params = random_params(cfg, seed)
    images = random_images(cfg, batch, seed + 1)
    labels = np.random.default_rng(seed).integers(0, cfg.num_classes, size=batch)
    _, grads = vitspec.loss_and_grad(cfg, params, images, labels, label_smoothing=label_smoothing)

    def loss_of(p, x):
        return vitspec.cross_entropy(vitspec.forward(cfg, p, x), labels, label_smoothing)

    assert_gradients_match(loss_of, params, images, grads, seed)


@given(cfg=configs(), seed=st.integers(0, 2**16), batch=st.integers(1, 2))
def test_vjp_of_any_cotangent_matches_finite_differences(cfg, seed, batch):
    assert_vjp_matches_finite_differences(cfg, seed, batch)


@settings(max_examples=30)
@given(
    cfg=family_configs(with_cait=False, allow_none_pool=False),
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 2),
)
def test_family_knobs_gradients_match_finite_differences(cfg, seed, batch):
    assert_vjp_matches_finite_differences(cfg, seed, batch)


@settings(max_examples=10)
@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_gradient_tree_has_every_parameter_and_the_images(cfg, seed):
    params = random_params(cfg, seed)
    images = random_images(cfg, 2, seed)
    cotangent = np.ones(vitspec.forward(cfg, params, images).shape)
    grads = vitspec.vjp(cfg, params, images, cotangent)
    assert list(grads) == [*vitspec.param_shapes(cfg), "images"]
    for name, g in grads.items():
        expected = images.shape if name == "images" else params[name].shape
        assert g.shape == expected, name
        assert g.dtype == np.float64, name


def test_float32_inputs_give_float32_gradients():
    cfg = vitspec.variant("Ti/4", image_size=8, depth=1, num_classes=3)
    params = random_params(cfg, 0, dtype=np.float32)
    images = random_images(cfg, 2, 0, dtype=np.float32)
    loss, grads = vitspec.loss_and_grad(cfg, params, images, np.array([0, 2]))
    assert loss.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())


def test_loss_needs_per_image_logits():
    cfg = vitspec.variant("Ti/4", image_size=8, depth=1, num_classes=3, pool="none")
    params = random_params(cfg, 0)
    with pytest.raises(ValueError, match="pool='none'"):
        vitspec.loss_and_grad(cfg, params, random_images(cfg, 1, 0), np.array([0]))


def test_cotangent_shape_is_checked():
    cfg = vitspec.variant("Ti/4", image_size=8, depth=1, num_classes=3)
    params = random_params(cfg, 0)
    with pytest.raises(ValueError, match=r"cotangent has shape \(2, 4\); the logits have shape \(2, 3\)"):
        vitspec.vjp(cfg, params, random_images(cfg, 2, 0), np.zeros((2, 4)))
