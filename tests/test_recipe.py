"""The recipe's pure functions, checked by hand and against the formulas they name."""

import math

import numpy as np
import pytest

import vitspec
from vitspec.recipe import AdamState, Recipe, adamw_step, clip_scale, decays, global_norm, learning_rate


def test_warmup_then_cosine():
    r = Recipe(base_lr=1.0, warmup_steps=4, total_steps=12)
    assert [learning_rate(s, r) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(4, r) == 1.0  # the cosine starts at the peak
    assert learning_rate(8, r) == pytest.approx(0.5)  # halfway through the 8 decay steps
    assert learning_rate(11, r) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert learning_rate(12, r) == pytest.approx(0.0, abs=1e-16)
    assert learning_rate(0, Recipe(base_lr=2.0, total_steps=3)) == 2.0  # no warmup


def test_clip_is_optax_formula_not_torch():
    assert clip_scale(0.5, 1.0) == 1.0 and clip_scale(1.0, 1.0) == 1.0
    assert clip_scale(4.0, 1.0) == 0.25  # torch would give 1 / (4 + 1e-6)
    assert clip_scale(4.0, None) == 1.0
    assert global_norm({"a": np.array([3.0]), "b": np.array([[4.0]])}) == 5.0


def test_decay_mask_by_reference_names():
    cfg = vitspec.variant(
        "Ti/16",
        depth=1,
        num_registers=2,
        pool="map",
        class_token=True,
        layer_scale=0.1,
        qk_norm=True,
        representation_size=8,
    )
    decayed = {n for n in vitspec.param_shapes(cfg) if decays(n)}
    assert decayed == {n for n in vitspec.param_shapes(cfg) if n.endswith("/kernel")}
    for name in (
        "cls_token",
        "reg_tokens",
        "pos_embed",
        "map_head/probe",
        "blocks/0/ls1/scale",
        "blocks/0/attn/q_norm/scale",
        "blocks/0/norm1/bias",
        "head/bias",
    ):
        assert not decays(name), name


def test_adamw_step_by_hand():
    # One parameter, one step: m_hat = g, v_hat = g^2, so the Adam part is g / (|g| + eps).
    r = Recipe(base_lr=0.1, weight_decay=0.5, total_steps=10, clip_norm=None, eps=0.0)
    params = {"w/kernel": np.array([2.0]), "w/bias": np.array([2.0])}
    grads = {"w/kernel": np.array([-3.0]), "w/bias": np.array([-3.0])}
    new, state = adamw_step(params, grads, AdamState.zeros_like(params), r)
    assert new["w/kernel"][0] == pytest.approx(2.0 - 0.1 * (-1.0 + 0.5 * 2.0))  # decayed
    assert new["w/bias"][0] == pytest.approx(2.0 - 0.1 * -1.0)  # not decayed
    assert state.step == 1 and state.mu["w/bias"][0] == pytest.approx(-0.3)


def test_clipping_scales_the_gradient_before_the_moments():
    r = Recipe(base_lr=0.1, weight_decay=0.0, total_steps=10, clip_norm=1.0)
    params = {"w/kernel": np.zeros(2)}
    _, state = adamw_step(params, {"w/kernel": np.array([3.0, 4.0])}, AdamState.zeros_like(params), r)
    np.testing.assert_allclose(state.mu["w/kernel"], 0.1 * np.array([0.6, 0.8]))


def test_bad_recipe_is_named():
    with pytest.raises(ValueError, match=r"warmup_steps \(5\) <= total_steps \(3\)"):
        Recipe(warmup_steps=5, total_steps=3)
    with pytest.raises(ValueError, match="clip_norm=0"):
        Recipe(clip_norm=0)


def test_adam_state_round_trips_through_its_checkpoint_arrays():
    params = {"a/kernel": np.arange(6.0).reshape(2, 3), "a/bias": np.ones(3)}
    state = AdamState(7, {k: v * 2 for k, v in params.items()}, {k: v * 3 for k, v in params.items()})
    arrays = state.to_arrays()
    assert sorted(arrays) == ["mu/a/bias", "mu/a/kernel", "nu/a/bias", "nu/a/kernel", "step"]
    back = AdamState.from_arrays(arrays)
    assert back.step == 7 and back.mu.keys() == state.mu.keys()
    for k in params:
        np.testing.assert_array_equal(back.mu[k], state.mu[k])
        np.testing.assert_array_equal(back.nu[k], state.nu[k])


def test_clip_scale_on_a_device_scalar_is_the_host_formula():
    import torch

    for norm in (0.5, 1.0, 4.0):
        assert float(clip_scale(torch.tensor(norm, dtype=torch.float64), 1.0, torch.where)) == clip_scale(
            norm, 1.0
        )
