"""Properties of the reference forward that can fail: a case worked by hand, batch independence,
permutation invariance, the sincos table, intermediates, dtypes and input errors."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vitspec
from parity_tests.strategies import configs, random_images, random_params
from vitspec import reference as ref


def test_one_token_model_worked_by_hand():
    # 1x1 image of one channel, pixel 1 -> one token; width 2, one head, MLP width 1, exact GELU.
    eps = 1e-6
    cfg = vitspec.ViTConfig(
        image_size=1,
        patch_size=1,
        in_channels=1,
        width=2,
        depth=1,
        num_heads=1,
        mlp_dim=1,
        num_classes=2,
        pool="gap",
        qkv_bias=False,
        posemb="none",
        ln_eps=eps,
    )
    p = {k: np.zeros(s) for k, s in vitspec.param_shapes(cfg).items()}
    p["patch_embed/kernel"][...] = np.array([1.0, 3.0]).reshape(1, 1, 1, 2)
    for ln in ("blocks/0/norm1", "blocks/0/norm2", "norm"):
        p[f"{ln}/scale"][...] = 1.0
    p["blocks/0/attn/value/kernel"][...] = np.eye(2)
    p["blocks/0/attn/out/kernel"][...] = np.diag([2.0, 1.0])
    p["blocks/0/attn/out/bias"][...] = [1.0, 0.0]
    p["blocks/0/mlp/fc1/kernel"][...] = [[0.0], [1.0]]
    p["blocks/0/mlp/fc1/bias"][...] = [0.5]
    p["blocks/0/mlp/fc2/kernel"][...] = [[1.0, -1.0]]
    p["head/kernel"][...] = np.diag([1.0, 2.0])
    p["head/bias"][...] = [0.0, 1.0]

    # token [1, 3]; LN1 -> [-e, e]; one token attends to itself with probability 1, so the
    # attention is v @ W_out + b_out = [1 - 2e, e]; residual -> [2 - 2e, 3 + e].
    e = 1 / math.sqrt(1 + eps)
    half_gap = (1 + 3 * e) / 2  # LN2 of [2 - 2e, 3 + e] is [-w, w]
    w = half_gap / math.sqrt(half_gap**2 + eps)
    z = w + 0.5  # fc1 reads the second entry, adds 0.5
    gelu = 0.5 * z * (1 + math.erf(z / math.sqrt(2)))  # exact GELU
    x2 = (2 - 2 * e + gelu, 3 + e - gelu)  # fc2 writes [gelu, -gelu]
    d = (x2[0] - x2[1]) / 2
    n = d / math.sqrt(d * d + eps)  # final LN -> [n, -n]; gap of one token
    expected = np.array([[n, -2 * n + 1]])

    out = vitspec.forward(cfg, p, np.ones((1, 1, 1, 1)), intermediates=True, attention_maps=True)
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-13)
    np.testing.assert_allclose(out["block_0"][0, 0], x2, rtol=1e-13)
    assert out["attn_0"].shape == (1, 1, 1, 1) and out["attn_0"][0, 0, 0, 0] == 1.0


def test_two_token_attention_worked_by_hand():
    # Tokens e1, e2; identity projections, one head of width 2: scores x_i . x_j / sqrt(2).
    x = np.eye(2)[None]
    identity = {"kernel": np.eye(2)}
    out, probs = ref.attention(x, x, identity, identity, identity, identity, num_heads=1, eps=1e-6)
    sigma = 1 / (1 + math.exp(-1 / math.sqrt(2)))
    np.testing.assert_allclose(probs[0, 0], [[sigma, 1 - sigma], [1 - sigma, sigma]], rtol=1e-15)
    np.testing.assert_allclose(out[0], [[sigma, 1 - sigma], [1 - sigma, sigma]], rtol=1e-15)


def test_sincos2d_is_big_vision_formula():
    # Grid 1 x 2, width 8: omega = 1 / 10000 ** [0, 1] = [1, 1e-4]; rows are [sin x, cos x, sin y, cos y].
    table = ref.posemb_sincos2d(1, 2, 8)
    np.testing.assert_array_equal(table[0], [0, 0, 1, 1, 0, 0, 1, 1])
    np.testing.assert_allclose(
        table[1], [math.sin(1), math.sin(1e-4), math.cos(1), math.cos(1e-4), 0, 0, 1, 1], rtol=1e-15
    )
    # Row-major: position (y=1, x=0) of a 2 x 3 grid is row 3.
    np.testing.assert_allclose(
        ref.posemb_sincos2d(2, 3, 8)[3, 4:6], [math.sin(1), math.sin(1e-4)], rtol=1e-15
    )


@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_each_image_of_a_batch_is_computed_alone(cfg, seed):
    params = random_params(cfg, seed)
    images = random_images(cfg, 3, seed)
    batched = vitspec.forward(cfg, params, images)
    for i in range(3):
        np.testing.assert_allclose(
            batched[i], vitspec.forward(cfg, params, images[i : i + 1])[0], rtol=1e-12, atol=1e-14
        )


def _permute_patches(images, cfg, order):
    n, h, w, c = images.shape
    (ph, pw), (gh, gw) = cfg.patch_size, cfg.grid_size
    patches = images.reshape(n, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * gw, ph, pw, c)
    patches = patches[:, order]
    return patches.reshape(n, gh, gw, ph, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)


@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_without_posemb_gap_is_invariant_to_patch_order(cfg, seed):
    cfg = cfg.replace(posemb="none", pool="gap")
    params = random_params(cfg, seed)
    images = random_images(cfg, 2, seed)
    order = np.random.default_rng(seed).permutation(cfg.num_patches)
    np.testing.assert_allclose(
        vitspec.forward(cfg, params, _permute_patches(images, cfg, order)),
        vitspec.forward(cfg, params, images),
        rtol=1e-12,
        atol=1e-13,
    )


def test_with_posemb_patch_order_matters():
    cfg = vitspec.ViTConfig(
        image_size=4,
        patch_size=2,
        width=8,
        depth=1,
        num_heads=2,
        mlp_dim=8,
        num_classes=3,
        pool="gap",
        posemb="sincos2d",
        posemb_on_cls=False,
    )
    params = random_params(cfg, 0)
    images = random_images(cfg, 1, 0)
    permuted = _permute_patches(images, cfg, np.array([1, 0, 2, 3]))
    assert np.abs(vitspec.forward(cfg, params, permuted) - vitspec.forward(cfg, params, images)).max() > 1e-3


@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_intermediates_are_named_and_consistent(cfg, seed):
    params = random_params(cfg, seed)
    images = random_images(cfg, 2, seed)
    out = vitspec.forward(cfg, params, images, intermediates=True, attention_maps=True)
    n, t, d = 2, cfg.num_tokens, cfg.width
    blocks = [f"block_{i}" for i in range(cfg.depth)]
    maps = [f"attn_{i}" for i in range(cfg.depth)] + (["map_attn"] if cfg.pool == "map" else [])
    assert set(out) == {"patch_embed", "tokens", *blocks, "encoded", "pooled", "pre_logits", "logits", *maps}
    assert out["patch_embed"].shape == (n, cfg.num_patches, d)
    assert out["tokens"].shape == out["encoded"].shape == (n, t, d)
    for name in maps:
        assert np.allclose(out[name].sum(-1), 1.0) and (out[name] >= 0).all()
    np.testing.assert_array_equal(out["logits"], vitspec.forward(cfg, params, images))
    if cfg.fc_norm:
        np.testing.assert_array_equal(out["encoded"], out[blocks[-1]])
    if cfg.posemb == "none" and cfg.class_token:
        np.testing.assert_array_equal(out["tokens"][:, 0], np.broadcast_to(params["cls_token"], (n, d)))
    assert set(vitspec.forward(cfg, params, images, attention_maps=True)) == set(maps)


def test_posemb_meets_the_class_token_where_the_config_says():
    base = dict(image_size=4, patch_size=2, width=8, depth=1, num_heads=2, mlp_dim=8, num_classes=3)
    for on_cls in (True, False):
        cfg = vitspec.ViTConfig(**base, posemb_on_cls=on_cls, num_registers=1)
        params = random_params(cfg, 0)
        tokens = vitspec.forward(cfg, params, random_images(cfg, 1, 0), intermediates=True)["tokens"][0]
        pos = params["pos_embed"]
        expected_cls = params["cls_token"] + (pos[0] if on_cls else 0)
        expected_reg = params["reg_tokens"][0] + (pos[1] if on_cls else 0)
        np.testing.assert_allclose(tokens[0], expected_cls, rtol=1e-15)
        np.testing.assert_allclose(tokens[1], expected_reg, rtol=1e-15)
        assert pos.shape[0] == (6 if on_cls else 4)


@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_float32_follows_the_inputs_and_stays_near_float64(cfg, seed):
    params = random_params(cfg, seed)
    images = random_images(cfg, 2, seed)
    out64 = vitspec.forward(cfg, params, images)
    out32 = vitspec.forward(cfg, params, images.astype(np.float32))
    assert out32.dtype == np.float32
    scale = np.abs(out64).max()
    assert np.abs(out32 - out64).max() <= 1e-4 * max(scale, 1.0)


def test_gelu_kinds_differ_and_are_each_exact():
    x = np.linspace(-4, 4, 81)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    approx = np.array([0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))) for v in x])
    # 1 + erf(x) cancels for negative x: the two formulas agree to a few ulps of 1, absolutely.
    np.testing.assert_allclose(ref.gelu(x, "exact"), exact, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(ref.gelu(x, "tanh"), approx, rtol=1e-15, atol=1e-15)
    assert np.abs(exact - approx).max() > 1e-4  # the trap: they are different functions


def test_images_are_checked():
    cfg = vitspec.variant("Ti/16", image_size=32, depth=1)
    params = vitspec.init_params(cfg)
    with pytest.raises(
        ValueError, match=r"images have shape \(1, 3, 32, 32\); the config expects \[N, 32, 32, 3\]"
    ):
        vitspec.forward(cfg, params, np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="images have dtype uint8"):
        vitspec.forward(cfg, params, np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(vitspec.ParamTreeError, match="missing keys"):
        vitspec.forward(cfg, {}, np.zeros((1, 32, 32, 3), np.float32))


def test_cross_entropy_with_label_smoothing_by_hand():
    logits = np.array([[0.0, math.log(3.0)]])  # softmax [1/4, 3/4]
    expected = -(0.9 * math.log(0.75) + 0.05 * math.log(0.25) + 0.05 * math.log(0.75))
    assert vitspec.cross_entropy(logits, np.array([1]), 0.1) == pytest.approx(expected, rel=1e-15)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        vitspec.cross_entropy(logits, np.array([2]))
