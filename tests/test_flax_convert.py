"""The Flax converter: big_vision's names, bit-exact round trips, and errors that name the problem."""

from __future__ import annotations

import re
from functools import partial

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from hypothesis import given
from hypothesis import strategies as st

import vitspec
from backends.flax_vit import VisionTransformer, from_checkpoint, from_reference, to_reference
from parity_tests.strategies import configs, random_images, random_params

BLOCK = "Transformer/encoderblock_0"
ATTN = f"{BLOCK}/MultiHeadDotProductAttention_0"

# A big_vision ViT as its checkpoints have it: class token, posemb on the patches only.
BIG_VISION_TOKEN = vitspec.ViTConfig(
    image_size=8,
    patch_size=4,
    in_channels=3,
    width=8,
    depth=1,
    num_heads=2,
    mlp_dim=16,
    num_classes=5,
    pool="token",
    posemb_on_cls=False,
)
BIG_VISION_TOKEN_TREE = {
    "embedding/kernel": (4, 4, 3, 8),
    "embedding/bias": (8,),
    "cls": (1, 1, 8),
    "pos_embedding": (1, 4, 8),
    f"{BLOCK}/LayerNorm_0/scale": (8,),
    f"{BLOCK}/LayerNorm_0/bias": (8,),
    f"{ATTN}/query/kernel": (8, 2, 4),
    f"{ATTN}/query/bias": (2, 4),
    f"{ATTN}/key/kernel": (8, 2, 4),
    f"{ATTN}/key/bias": (2, 4),
    f"{ATTN}/value/kernel": (8, 2, 4),
    f"{ATTN}/value/bias": (2, 4),
    f"{ATTN}/out/kernel": (2, 4, 8),
    f"{ATTN}/out/bias": (8,),
    f"{BLOCK}/LayerNorm_1/scale": (8,),
    f"{BLOCK}/LayerNorm_1/bias": (8,),
    f"{BLOCK}/MlpBlock_0/Dense_0/kernel": (8, 16),
    f"{BLOCK}/MlpBlock_0/Dense_0/bias": (16,),
    f"{BLOCK}/MlpBlock_0/Dense_1/kernel": (16, 8),
    f"{BLOCK}/MlpBlock_0/Dense_1/bias": (8,),
    "Transformer/encoder_norm/scale": (8,),
    "Transformer/encoder_norm/bias": (8,),
    "head/kernel": (8, 5),
    "head/bias": (5,),
}

# Every knob big_vision lacks, on a MAP-pooled model (SigLIP's head).
EVERY_EXTRA = vitspec.ViTConfig(
    image_size=(4, 6),
    patch_size=(2, 3),
    in_channels=1,
    width=12,
    depth=1,
    num_heads=3,
    mlp_dim=8,
    num_classes=2,
    pool="map",
    class_token=True,
    num_registers=2,
    posemb="learned",
    posemb_on_cls=True,
    fc_norm=True,
    representation_size=7,
    qkv_bias=False,
    qk_norm=True,
    layer_scale=0.1,
)
MAP = "MAPHead_0/MultiHeadDotProductAttention_0"
EVERY_EXTRA_TREE = {
    "embedding/kernel": (2, 3, 1, 12),
    "embedding/bias": (12,),
    "cls": (1, 1, 12),
    "reg": (1, 2, 12),
    "pos_embedding": (1, 7, 12),
    f"{BLOCK}/LayerNorm_0/scale": (12,),
    f"{BLOCK}/LayerNorm_0/bias": (12,),
    f"{ATTN}/query/kernel": (12, 3, 4),
    f"{ATTN}/key/kernel": (12, 3, 4),
    f"{ATTN}/value/kernel": (12, 3, 4),
    f"{ATTN}/query_ln/scale": (4,),
    f"{ATTN}/query_ln/bias": (4,),
    f"{ATTN}/key_ln/scale": (4,),
    f"{ATTN}/key_ln/bias": (4,),
    f"{ATTN}/out/kernel": (3, 4, 12),
    f"{ATTN}/out/bias": (12,),
    f"{BLOCK}/LayerScale_0/scale": (12,),
    f"{BLOCK}/LayerNorm_1/scale": (12,),
    f"{BLOCK}/LayerNorm_1/bias": (12,),
    f"{BLOCK}/MlpBlock_0/Dense_0/kernel": (12, 8),
    f"{BLOCK}/MlpBlock_0/Dense_0/bias": (8,),
    f"{BLOCK}/MlpBlock_0/Dense_1/kernel": (8, 12),
    f"{BLOCK}/MlpBlock_0/Dense_1/bias": (12,),
    f"{BLOCK}/LayerScale_1/scale": (12,),
    "MAPHead_0/probe": (1, 1, 12),
    f"{MAP}/query/kernel": (12, 3, 4),
    f"{MAP}/query/bias": (3, 4),
    f"{MAP}/key/kernel": (12, 3, 4),
    f"{MAP}/key/bias": (3, 4),
    f"{MAP}/value/kernel": (12, 3, 4),
    f"{MAP}/value/bias": (3, 4),
    f"{MAP}/out/kernel": (3, 4, 12),
    f"{MAP}/out/bias": (12,),
    "MAPHead_0/LayerNorm_0/scale": (12,),
    "MAPHead_0/LayerNorm_0/bias": (12,),
    "MAPHead_0/MlpBlock_0/Dense_0/kernel": (12, 8),
    "MAPHead_0/MlpBlock_0/Dense_0/bias": (8,),
    "MAPHead_0/MlpBlock_0/Dense_1/kernel": (8, 12),
    "MAPHead_0/MlpBlock_0/Dense_1/bias": (12,),
    "fc_norm/scale": (12,),
    "fc_norm/bias": (12,),
    "pre_logits/kernel": (12, 7),
    "pre_logits/bias": (7,),
    "head/kernel": (7, 2),
    "head/bias": (2,),
}

# Global average pooling, fixed sincos posemb (no parameter), no head, two blocks.
GAP_SINCOS_FEATURES = vitspec.ViTConfig(
    image_size=4,
    patch_size=2,
    in_channels=2,
    width=8,
    depth=2,
    num_heads=1,
    mlp_dim=4,
    num_classes=0,
    pool="gap",
    posemb="sincos2d",
)
GAP_SINCOS_FEATURES_TREE = {
    "embedding/kernel": (2, 2, 2, 8),
    "embedding/bias": (8,),
    **{
        f"Transformer/encoderblock_{i}/{name}": shape
        for i in (0, 1)
        for name, shape in {
            "LayerNorm_0/scale": (8,),
            "LayerNorm_0/bias": (8,),
            "MultiHeadDotProductAttention_0/query/kernel": (8, 1, 8),
            "MultiHeadDotProductAttention_0/query/bias": (1, 8),
            "MultiHeadDotProductAttention_0/key/kernel": (8, 1, 8),
            "MultiHeadDotProductAttention_0/key/bias": (1, 8),
            "MultiHeadDotProductAttention_0/value/kernel": (8, 1, 8),
            "MultiHeadDotProductAttention_0/value/bias": (1, 8),
            "MultiHeadDotProductAttention_0/out/kernel": (1, 8, 8),
            "MultiHeadDotProductAttention_0/out/bias": (8,),
            "LayerNorm_1/scale": (8,),
            "LayerNorm_1/bias": (8,),
            "MlpBlock_0/Dense_0/kernel": (8, 4),
            "MlpBlock_0/Dense_0/bias": (4,),
            "MlpBlock_0/Dense_1/kernel": (4, 8),
            "MlpBlock_0/Dense_1/bias": (8,),
        }.items()
    },
    "Transformer/encoder_norm/scale": (8,),
    "Transformer/encoder_norm/bias": (8,),
}

# The families' knobs: DeiT's distillation token and head, CLIP's pre-norm and bias-free patch
# embedding, timm's proj_bias=False and final_norm=False, attention 6 wide in a 12-wide model.
FAMILIES = vitspec.ViTConfig(
    image_size=(2, 4),
    patch_size=2,
    in_channels=1,
    width=12,
    depth=1,
    num_heads=3,
    mlp_dim=8,
    num_classes=2,
    distilled=True,
    pre_norm=True,
    patch_bias=False,
    final_norm=False,
    proj_bias=False,
    attention_dim=6,
)
FAMILIES_TREE = {
    "embedding/kernel": (2, 2, 1, 12),
    "cls": (1, 1, 12),
    "dist": (1, 1, 12),
    "pos_embedding": (1, 4, 12),
    "pre_norm/scale": (12,),
    "pre_norm/bias": (12,),
    f"{BLOCK}/LayerNorm_0/scale": (12,),
    f"{BLOCK}/LayerNorm_0/bias": (12,),
    **{f"{ATTN}/{name}/kernel": (12, 3, 2) for name in ("query", "key", "value")},
    **{f"{ATTN}/{name}/bias": (3, 2) for name in ("query", "key", "value")},
    f"{ATTN}/out/kernel": (3, 2, 12),
    f"{BLOCK}/LayerNorm_1/scale": (12,),
    f"{BLOCK}/LayerNorm_1/bias": (12,),
    f"{BLOCK}/MlpBlock_0/Dense_0/kernel": (12, 8),
    f"{BLOCK}/MlpBlock_0/Dense_1/kernel": (8, 12),
    "head/kernel": (12, 2),
    "head/bias": (2,),
    "head_dist/kernel": (12, 2),
    "head_dist/bias": (2,),
}

NAMED_TREES = [
    (BIG_VISION_TOKEN, BIG_VISION_TOKEN_TREE),
    (EVERY_EXTRA, EVERY_EXTRA_TREE),
    (GAP_SINCOS_FEATURES, GAP_SINCOS_FEATURES_TREE),
    (FAMILIES, FAMILIES_TREE),
]
TREE_IDS = ["big_vision-token", "every-extra", "gap-sincos", "families"]


def flat_shapes(tree: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def init_shapes(cfg: vitspec.ViTConfig) -> dict[str, tuple[int, ...]]:
    """The tree the module's own parameter declarations create (linen's `Module.init`, which
    `VisionTransformer.init` replaces with the reference init), traced without running."""
    images = np.zeros((1, *cfg.image_size, cfg.in_channels), np.float32)
    variables = jax.eval_shape(partial(nn.Module.init, VisionTransformer(cfg)), jax.random.key(0), images)
    return flat_shapes(variables["params"])


@pytest.mark.parametrize("cfg, expected", NAMED_TREES, ids=TREE_IDS)
def test_module_tree_is_big_vision_names(cfg, expected):
    assert init_shapes(cfg) == expected


@pytest.mark.parametrize("cfg, expected", NAMED_TREES, ids=TREE_IDS)
def test_from_reference_gives_big_vision_names(cfg, expected):
    assert flat_shapes(from_reference(random_params(cfg, 0), cfg)["params"]) == expected


@given(configs())
def test_converted_tree_is_the_tree_init_creates(cfg):
    assert flat_shapes(from_reference(random_params(cfg, 0), cfg)["params"]) == init_shapes(cfg)


@given(configs(), st.integers(0, 2**16), st.sampled_from([np.float32, np.float64]))
def test_round_trip_reference_flax_reference_is_bit_exact(cfg, seed, dtype):
    params = random_params(cfg, seed, dtype)
    back = to_reference(from_reference(params, cfg), cfg)
    assert list(back) == list(params)
    for k in params:
        assert back[k].dtype == params[k].dtype and np.array_equal(back[k], params[k]), k


def test_heads_are_head_major_columns():
    """Head h of the reference's [D, D] query kernel is big_vision's kernel[:, h, :]."""
    cfg = EVERY_EXTRA
    params = random_params(cfg, 0)
    kernel = from_reference(params, cfg)["params"]["Transformer"]["encoderblock_0"][
        "MultiHeadDotProductAttention_0"
    ]["query"]["kernel"]
    dh = cfg.head_dim
    reference_kernel = params["blocks/0/attn/query/kernel"]
    for h in range(cfg.num_heads):
        np.testing.assert_array_equal(kernel[:, h, :], reference_kernel[:, h * dh : (h + 1) * dh])


def big_vision_flat(cfg) -> dict[str, np.ndarray]:
    return traverse_util.flatten_dict(from_reference(random_params(cfg, 0), cfg)["params"], sep="/")


def as_variables(flat: dict[str, np.ndarray]) -> dict:
    return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def test_to_reference_lists_every_problem_at_once():
    flat = big_vision_flat(BIG_VISION_TOKEN)
    del flat["cls"], flat[f"{ATTN}/key/bias"]
    flat["reg"] = np.zeros((1, 1, 8))
    flat["head/kernel"] = np.zeros((8, 6))
    with pytest.raises(vitspec.ParamTreeError) as err:
        to_reference(as_variables(flat), BIG_VISION_TOKEN)
    message = str(err.value)
    assert "missing keys (2)" in message and "'cls'" in message and f"'{ATTN}/key/bias'" in message
    assert "unexpected keys (1)" in message and "'reg'" in message
    assert "head/kernel: expected (8, 5), got (8, 6)" in message


def test_from_reference_names_key_and_both_shapes():
    params = random_params(BIG_VISION_TOKEN, 0)
    params["blocks/0/attn/query/kernel"] = np.zeros((8, 9))
    del params["pos_embed"]
    expected = "blocks/0/attn/query/kernel: expected (8, 8), got (8, 9)"
    with pytest.raises(vitspec.ParamTreeError, match=re.escape(expected)) as err:
        from_reference(params, BIG_VISION_TOKEN)
    assert "missing keys (1): ['pos_embed']" in str(err.value)


def test_from_checkpoint_gives_module_and_variables(tmp_path):
    cfg = EVERY_EXTRA
    params = random_params(cfg, 3, np.float32)
    path = tmp_path / "vit.safetensors"
    vitspec.save(path, cfg, params)
    module, variables = from_checkpoint(path)
    images = random_images(cfg, 2, 4, np.float32)
    logits = jax.jit(module.apply)(variables, images)
    np.testing.assert_allclose(np.asarray(logits), vitspec.forward(cfg, params, images), rtol=1e-4, atol=1e-5)
