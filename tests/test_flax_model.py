"""The Flax module's knobs against the reference, its training-mode randomness, its jitted
loss-and-gradient step, and its outputs.

Expectation bounds: an inverted-dropout value is x * m / (1 - p) with m ~ Bernoulli(1 - p), so its
standard deviation is |x| sqrt(p / (1 - p)); the mean of K independent draws is within
SIGMAS standard errors, |x| sqrt(p / (1 - p) / K) * SIGMAS, of x (keys are fixed: deterministic).
"""

from __future__ import annotations

from functools import partial
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitspec
from backends.flax_vit import (
    VisionTransformer,
    from_reference,
    layers,
    make_loss_and_grad,
    module_for,
    to_reference,
)
from backends.flax_vit.layers import MultiHeadDotProductAttention
from parity_tests.strategies import random_images, random_params
from parity_tests.tolerances import tree_rel_errs

DRAWS = 2000
SIGMAS = 5.0

BASE = vitspec.ViTConfig(
    image_size=(4, 6),
    patch_size=2,
    in_channels=2,
    width=12,
    depth=2,
    num_heads=3,
    mlp_dim=8,
    num_classes=3,
    pool="token",
    num_registers=1,
    layer_scale=0.5,
    qkv_bias=False,
)
RATES = {"dropout": 0.1, "attention_dropout": 0.1, "stochastic_depth": 0.2}

# The ViT families' knobs, one at a time on a plain ViT, and together on a CaiT.
PLAIN = vitspec.ViTConfig(
    image_size=(4, 6), patch_size=2, in_channels=2, width=12, depth=2, num_heads=3, mlp_dim=8, num_classes=3
)
KNOBS = {
    "quick-gelu": dict(gelu="quick"),
    "pre-norm": dict(pre_norm=True),
    "no-patch-bias": dict(patch_bias=False),
    "no-final-norm": dict(final_norm=False),
    "no-proj-bias": dict(proj_bias=False),
    "max": dict(pool="max", class_token=True),
    "avgmax": dict(pool="avgmax"),
    "sum-with-prefix": dict(pool="sum", pool_include_prefix=True, num_registers=1),
    "map-with-prefix": dict(pool="map", pool_include_prefix=True, class_token=True),
    "distilled": dict(distilled=True),
    "distilled-no-head": dict(distilled=True, num_classes=0),
    "attention-dim": dict(attention_dim=6),
    "sinusoidal-1d": dict(posemb="sinusoidal_1d"),
    "sinusoidal-2d": dict(posemb="sinusoidal_2d", posemb_on_cls=False),
    "cait": dict(
        class_attention_depth=1,
        posemb_on_cls=False,
        layer_scale=0.1,
        pre_norm=True,
        patch_bias=False,
        final_norm=False,
        proj_bias=False,
        attention_dim=6,
    ),
}
# float64, relative to each tensor's largest value (zero gradients: to the tree's, as the parity
# suite): measured <= 1.1e-15 forward and <= 3e-15 gradients over these configs.
KNOB_BOUND = 1e-13


def setup(cfg, batch=2):
    params = random_params(cfg, 0, np.float32)
    return VisionTransformer(cfg), from_reference(params, cfg), random_images(cfg, batch, 1, np.float32)


def train_apply(module, variables, images, key, **kw):
    return module.apply(variables, images, train=True, rngs={"dropout": key}, **kw)


def expectation_bound(x: np.ndarray, rate: float) -> np.ndarray:
    return SIGMAS * np.abs(x) * np.sqrt(rate / (1 - rate) / DRAWS) + 1e-6


def test_train_mode_with_zero_rates_equals_eval():
    module, variables, images = setup(BASE)
    # Training on the CPU takes the explicit attention, eval the library's: two computations. With
    # the explicit path forced in both, and dropout at rate 0 returning its input untouched, both
    # jitted functions trace to the same operations, so XLA compiles the same code and bit
    # equality is the claim. (Eager and jitted float32 differ in the last bit: XLA fuses differently.)
    with mock.patch.object(layers, "fused_attention_pays", return_value=False) as pays:
        evaluated = jax.jit(module.apply)(variables, images)
        trained = jax.jit(lambda v, x, k: train_apply(module, v, x, k))(variables, images, jax.random.key(0))
    assert pays.called
    np.testing.assert_array_equal(np.asarray(trained), np.asarray(evaluated))


def test_rates_do_not_change_eval_mode():
    module, variables, images = setup(BASE)
    with_rates = VisionTransformer(BASE.replace(**RATES))
    evaluated = [np.asarray(jax.jit(m.apply)(variables, images)) for m in (with_rates, module)]
    np.testing.assert_array_equal(*evaluated)


def test_masks_depend_on_the_key_only():
    module, variables, images = setup(BASE.replace(**RATES))
    apply = jax.jit(lambda k: train_apply(module, variables, images, k))
    first, again, other = (np.asarray(apply(jax.random.key(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_train_mode_needs_a_dropout_key():
    module, variables, images = setup(BASE.replace(dropout=0.1))
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(partial(module.apply, train=True), variables, images)


def test_token_dropout_preserves_expectation():
    rate = 0.3
    module, variables, images = setup(BASE.replace(dropout=rate))

    def tokens(key):
        return train_apply(module, variables, images, key, intermediates=True)["tokens"]

    draws = np.asarray(jax.jit(jax.vmap(tokens))(jax.random.split(jax.random.key(0), DRAWS)))
    expected = np.asarray(jax.jit(partial(module.apply, intermediates=True))(variables, images)["tokens"])
    dropped = np.mean(draws == 0.0)
    assert abs(dropped - rate) < SIGMAS * np.sqrt(rate * (1 - rate) / draws.size)
    assert np.all(np.abs(draws.mean(0) - expected) <= expectation_bound(expected, rate))


def test_attention_dropout_preserves_expectation():
    rate = 0.3
    attention = MultiHeadDotProductAttention(num_heads=2, dropout=rate)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    # Random weights: the module's own initializers only give shapes (values come from the reference).
    shapes = jax.eval_shape(attention.init, jax.random.key(0), x, x)
    weights = np.random.default_rng(1)
    variables = jax.tree.map(lambda s: (0.5 * weights.standard_normal(s.shape)).astype(np.float32), shapes)

    def attend(key):
        return attention.apply(variables, x, x, deterministic=False, rngs={"dropout": key})[0]

    draws = np.asarray(jax.jit(jax.vmap(attend))(jax.random.split(jax.random.key(1), DRAWS)))
    expected, probs = jax.jit(partial(attention.apply, return_probs=True))(variables, x, x)
    assert not np.allclose(draws[0], expected)
    # Output i of query q is sum over heads h and keys k of m_hqk / (1 - rate) * p_hqk * c_hki, with
    # c_hki key k's value projected through head h's slice of the output kernel: independent masks,
    # so its variance is rate / (1 - rate) * sum_hk (p_hqk * c_hki)^2.
    params = variables["params"]
    values = np.einsum("nkd,dhe->nkhe", x, params["value"]["kernel"]) + params["value"]["bias"]
    contributions = np.einsum("nkhe,hei->nhki", values, params["out"]["kernel"])
    terms = np.asarray(probs)[..., None] * contributions[:, :, None]  # [n, heads, q, k, out]
    std = np.sqrt(rate / (1 - rate) * np.sum(terms**2, axis=(1, 3)))  # [n, q, out]
    assert np.all(np.abs(draws.mean(0) - expected) <= SIGMAS * std / np.sqrt(DRAWS) + 1e-6)


def test_stochastic_depth_drops_whole_samples_linearly_over_depth():
    cfg = BASE.replace(depth=3, stochastic_depth=0.4, layer_scale=None)
    assert cfg.drop_path_rates == pytest.approx([0.0, 0.2, 0.4])
    assert cfg.replace(depth=1).drop_path_rates == (0.0,)
    rate = 0.2  # block 1's
    # Zero block 1's MLP output so its update is the attention branch alone: kept (and scaled by
    # 1 / (1 - rate)) or dropped, per sample.
    params = random_params(cfg, 0, np.float32)
    params["blocks/1/mlp/fc2/kernel"][:] = 0.0
    params["blocks/1/mlp/fc2/bias"][:] = 0.0
    module, variables = VisionTransformer(cfg), from_reference(params, cfg)
    images = random_images(cfg, 3, 1, np.float32)

    def named(key):
        return train_apply(module, variables, images, key, intermediates=True)

    draws = jax.jit(jax.vmap(named))(jax.random.split(jax.random.key(0), DRAWS))
    evaluated = jax.jit(partial(module.apply, intermediates=True))(variables, images)
    block_in = np.asarray(draws["block_0"])  # rate 0: every draw the same
    assert np.all(block_in == block_in[:1])
    updates = np.asarray(draws["block_1"]) - block_in
    eval_update = np.asarray(evaluated["block_1"] - evaluated["block_0"])
    dropped = np.all(updates == 0.0, axis=(2, 3))  # [draws, samples]
    kept = np.all(np.isclose(updates, eval_update / (1 - rate), rtol=1e-4, atol=1e-6), axis=(2, 3))
    assert np.all(dropped ^ kept), "each sample's update is all dropped or all kept"
    assert abs(dropped.mean() - rate) < SIGMAS * np.sqrt(rate * (1 - rate) / dropped.size)
    assert np.all(np.abs(updates.mean(0) - eval_update) <= expectation_bound(eval_update, rate))


def test_jitted_loss_and_grad_in_train_mode_flows_to_every_parameter():
    module, variables, images = setup(BASE.replace(**RATES), batch=3)
    step = make_loss_and_grad(module, label_smoothing=0.1)
    loss, grads = step(variables["params"], images, np.array([0, 1, 2]), jax.random.key(0))
    assert np.isfinite(loss)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    assert all(np.isfinite(g).all() for _, g in flat)
    zero = [jax.tree_util.keystr(p) for p, g in flat if not np.any(g)]
    assert not zero, f"no gradient reaches {zero}"


def test_jitted_loss_and_grad_matches_reference_in_eval_mode():
    module, variables, images = setup(BASE, batch=3)
    labels = np.array([2, 0, 1])
    step = make_loss_and_grad(module, label_smoothing=0.1, wrt_images=True)
    loss, (grads, image_grads) = step(variables["params"], images, labels)
    params = {k: v.astype(np.float64) for k, v in random_params(BASE, 0, np.float32).items()}
    ref_loss, ref_grads = vitspec.loss_and_grad(BASE, params, images.astype(np.float64), labels, 0.1)
    # float32 against float64: a smoke test of the step; the parity suite bounds the errors.
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    grads = to_reference(grads, BASE) | {"images": np.asarray(image_grads)}
    for name, ref in ref_grads.items():
        np.testing.assert_allclose(grads[name], ref, rtol=1e-3, atol=1e-5 * np.abs(ref).max(), err_msg=name)


def test_intermediates_and_attention_maps_have_the_reference_keys():
    cfg = BASE.replace(pool="map", class_token=True, fc_norm=True)
    module, variables, images = setup(cfg)
    params = random_params(cfg, 0, np.float32)
    for intermediates, attention_maps in ((True, False), (False, True), (True, True)):
        flags = {"intermediates": intermediates, "attention_maps": attention_maps}
        named = jax.eval_shape(partial(module.apply, **flags), variables, images)
        ref = vitspec.forward(cfg, params, images, **flags)
        assert {k: v.shape for k, v in named.items()} == {k: v.shape for k, v in ref.items()}


def test_bfloat16_computation_keeps_float32_parameters():
    module = VisionTransformer(BASE, dtype=jnp.bfloat16)
    images = random_images(BASE, 2, 0, np.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), images)
    assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    named = jax.eval_shape(partial(module.apply, intermediates=True), variables, images)
    assert {v.dtype for v in named.values()} == {jnp.dtype(jnp.bfloat16)}


def test_init_is_the_reference_init():
    # The module's values come from vitspec.init_params, as the PyTorch backend's: no second scheme.
    cfg = BASE.replace(pool="map", class_token=False, num_registers=2, qk_norm=True, representation_size=5)
    images = np.zeros((1, *cfg.image_size, cfg.in_channels), np.float32)
    variables = VisionTransformer(cfg).init(jax.random.key(7), images)
    reference = vitspec.init_params(cfg, 7)
    got = to_reference(variables, cfg)
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    jitted = to_reference(jax.jit(VisionTransformer(cfg).init)(jax.random.key(7), images), cfg)
    for name, value in reference.items():
        np.testing.assert_array_equal(jitted[name], value.astype(np.float32), err_msg=name)


@pytest.mark.parametrize("pool", ["gap", "map"])
def test_a_single_key_attention_runs_in_bfloat16(pool):
    # Found by the error sweep: jax.nn.dot_product_attention over one key fails to compile in
    # bfloat16 on the CPU; the module takes the explicit path there.
    cfg = vitspec.ViTConfig(
        image_size=1,
        patch_size=1,
        in_channels=1,
        width=8,
        depth=1,
        num_heads=1,
        mlp_dim=4,
        num_classes=2,
        pool=pool,
        class_token=False,
    )
    params = random_params(cfg, 0, np.float32)
    images = random_images(cfg, 1, 1, np.float32)
    logits = jax.jit(VisionTransformer(cfg, dtype=jnp.bfloat16).apply)(from_reference(params, cfg), images)
    np.testing.assert_allclose(
        np.asarray(logits, np.float32), vitspec.forward(cfg, params, images), atol=0.05
    )


@pytest.mark.parametrize("overrides", KNOBS.values(), ids=KNOBS.keys())
def test_each_knob_matches_the_reference_in_float64(overrides):
    cfg = PLAIN.replace(**overrides)
    params, images = random_params(cfg, 0), random_images(cfg, 2, 1)
    cotangent = np.random.default_rng(2).standard_normal(vitspec.forward(cfg, params, images).shape)
    module = module_for(cfg, dtype=jnp.float64, param_dtype=jnp.float64)

    def named_and_grads(tree, images):
        def objective(tree, images):
            return jnp.sum(module.apply({"params": tree}, images) * cotangent)

        named = module.apply({"params": tree}, images, intermediates=True, attention_maps=True)
        return named, jax.grad(objective, (0, 1))(tree, images)

    with jax.enable_x64(True):
        named, (grads, image_grads) = jax.jit(named_and_grads)(from_reference(params, cfg)["params"], images)
        grads = to_reference(grads, cfg) | {"images": np.asarray(image_grads)}
    ref_named = vitspec.forward(cfg, params, images, intermediates=True, attention_maps=True)
    forward_errors = tree_rel_errs({k: np.asarray(v) for k, v in named.items()}, ref_named)
    grad_errors = tree_rel_errs(grads, vitspec.vjp(cfg, params, images, cotangent), "grad")
    assert max(forward_errors.values()) <= KNOB_BOUND, forward_errors
    assert max(grad_errors.values()) <= KNOB_BOUND, grad_errors
