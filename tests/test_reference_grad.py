"""The analytic backward against finite differences, in float64, over configs covering every knob."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vitspec
from parity_tests.strategies import configs, random_images, random_params
from vitspec.config import ViTConfig
from vitspec.gradcheck import REL_BOUND, fd_errors


@st.composite
def family_configs(draw: st.DrawFn) -> ViTConfig:
    """`configs()` with the family knobs drawn on top (quick GELU, pre-norm, biases, final norm, the
    token pools and pool_include_prefix, DeiT's distillation token, attention_dim, Scenic's posembs)."""
    cfg = draw(configs(allow_none_pool=False))
    distilled = draw(st.booleans())
    pool = "token" if distilled else draw(st.sampled_from(["token", "gap", "max", "avgmax", "sum", "map"]))
    class_token = cfg.class_token or pool == "token"
    posemb = draw(st.sampled_from(["learned", "sincos2d", "sinusoidal_1d", "sinusoidal_2d", "none"]))
    prefix = class_token or distilled or cfg.num_registers
    head_dim = draw(st.sampled_from([4, 6])) if cfg.qk_norm else draw(st.sampled_from([2, 4, 6]))
    fc_norm = cfg.fc_norm and not distilled
    return cfg.replace(
        gelu=draw(st.sampled_from(["exact", "tanh", "quick"])),
        pre_norm=draw(st.booleans()),
        patch_bias=draw(st.booleans()),
        proj_bias=draw(st.booleans()),
        fc_norm=fc_norm,
        final_norm=fc_norm or draw(st.booleans()),
        pool=pool,
        class_token=class_token,
        pool_include_prefix=pool != "token" and draw(st.booleans()),
        distilled=distilled,
        representation_size=None if distilled else cfg.representation_size,
        attention_dim=head_dim * cfg.num_heads,
        posemb=posemb,
        posemb_on_cls=cfg.posemb_on_cls and not (prefix and posemb in ("sincos2d", "sinusoidal_2d")),
    )


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

    errors = fd_errors(loss_of, params, images, grads, np.random.default_rng(seed))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= REL_BOUND, f"{worst}: relative error {errors[worst]:.3g}"


@given(cfg=configs(), seed=st.integers(0, 2**16), batch=st.integers(1, 2))
def test_vjp_of_any_cotangent_matches_finite_differences(cfg, seed, batch):
    params = random_params(cfg, seed)
    images = random_images(cfg, batch, seed + 1)
    out_shape = vitspec.forward(cfg, params, images).shape
    cotangent = np.random.default_rng(seed + 2).standard_normal(out_shape)
    grads = vitspec.vjp(cfg, params, images, cotangent)

    def loss_of(p, x):
        return float(np.sum(vitspec.forward(cfg, p, x) * cotangent))

    errors = fd_errors(loss_of, params, images, grads, np.random.default_rng(seed))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= REL_BOUND, f"{worst}: relative error {errors[worst]:.3g}"


@settings(max_examples=30)
@given(cfg=family_configs(), seed=st.integers(0, 2**16), batch=st.integers(1, 2))
def test_family_knobs_gradients_match_finite_differences(cfg, seed, batch):
    params = random_params(cfg, seed)
    images = random_images(cfg, batch, seed + 1)
    cotangent = np.random.default_rng(seed + 2).standard_normal(vitspec.forward(cfg, params, images).shape)
    grads = vitspec.vjp(cfg, params, images, cotangent)

    def loss_of(p, x):
        return float(np.sum(vitspec.forward(cfg, p, x) * cotangent))

    errors = fd_errors(loss_of, params, images, grads, np.random.default_rng(seed))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= REL_BOUND, f"{worst}: relative error {errors[worst]:.3g}"


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
