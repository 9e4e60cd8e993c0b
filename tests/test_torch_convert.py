"""State-dict names and shapes are timm's, and the converter's errors say what is wrong.

The expected names are written out by hand from timm's VisionTransformer (vision_transformer.py,
layers/attention.py, layers/attention_pool.py, layers/mlp.py, layers/layer_scale.py) and DeiT's
VisionTransformerDistilled (deit.py), not derived from the code under test. Width 12, 3 heads
(head_dim 4), MLP 20, depth 1, 3 input channels, patches 2x3 on 4x6 images (a 2x2 grid, 4 patches),
5 classes.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from backends.torch_vit import ConversionError, VisionTransformer, from_reference, to_reference
from parity_tests.strategies import SMALL_FIELDS, random_params
from vitspec.config import ViTConfig
from vitspec.params import init_params

SMALL = SMALL_FIELDS

PATCH_EMBED = {"patch_embed.proj.weight": (12, 3, 2, 3), "patch_embed.proj.bias": (12,)}
BLOCK_0 = {
    "blocks.0.norm1.weight": (12,),
    "blocks.0.norm1.bias": (12,),
    "blocks.0.attn.qkv.weight": (36, 12),
    "blocks.0.attn.qkv.bias": (36,),
    "blocks.0.attn.proj.weight": (12, 12),
    "blocks.0.attn.proj.bias": (12,),
    "blocks.0.norm2.weight": (12,),
    "blocks.0.norm2.bias": (12,),
    "blocks.0.mlp.fc1.weight": (20, 12),
    "blocks.0.mlp.fc1.bias": (20,),
    "blocks.0.mlp.fc2.weight": (12, 20),
    "blocks.0.mlp.fc2.bias": (12,),
}
NORM = {"norm.weight": (12,), "norm.bias": (12,)}
HEAD = {"head.weight": (5, 12), "head.bias": (5,)}
PROJ_BIASES = ("blocks.0.attn.proj.bias", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.bias")

EXPECTED_STATE_DICTS = {
    "plain token ViT": (
        dict(pool="token"),
        {"cls_token": (1, 1, 12), "pos_embed": (1, 5, 12), **PATCH_EMBED, **BLOCK_0, **NORM, **HEAD},
    ),
    "gap + fc_norm, no class token": (
        dict(pool="gap", class_token=False, fc_norm=True),
        {
            "pos_embed": (1, 4, 12),
            **PATCH_EMBED,
            **BLOCK_0,
            "fc_norm.weight": (12,),
            "fc_norm.bias": (12,),
            **HEAD,
        },
    ),
    "map": (
        dict(pool="map", class_token=False),
        {
            "pos_embed": (1, 4, 12),
            **PATCH_EMBED,
            **BLOCK_0,
            **NORM,
            "attn_pool.latent": (1, 1, 12),
            "attn_pool.q.weight": (12, 12),
            "attn_pool.q.bias": (12,),
            "attn_pool.kv.weight": (24, 12),
            "attn_pool.kv.bias": (24,),
            "attn_pool.proj.weight": (12, 12),
            "attn_pool.proj.bias": (12,),
            "attn_pool.norm.weight": (12,),
            "attn_pool.norm.bias": (12,),
            "attn_pool.mlp.fc1.weight": (20, 12),
            "attn_pool.mlp.fc1.bias": (20,),
            "attn_pool.mlp.fc2.weight": (12, 20),
            "attn_pool.mlp.fc2.bias": (12,),
            **HEAD,
        },
    ),
    "registers + layer scale + qk norm (posemb on patches only)": (
        dict(pool="token", num_registers=2, layer_scale=0.1, qk_norm=True, posemb_on_cls=False),
        {
            "cls_token": (1, 1, 12),
            "reg_token": (1, 2, 12),
            "pos_embed": (1, 4, 12),
            **PATCH_EMBED,
            **BLOCK_0,
            "blocks.0.attn.q_norm.weight": (4,),
            "blocks.0.attn.q_norm.bias": (4,),
            "blocks.0.attn.k_norm.weight": (4,),
            "blocks.0.attn.k_norm.bias": (4,),
            "blocks.0.ls1.gamma": (12,),
            "blocks.0.ls2.gamma": (12,),
            **NORM,
            **HEAD,
        },
    ),
    "no qkv bias": (
        dict(pool="token", qkv_bias=False),
        {
            "cls_token": (1, 1, 12),
            "pos_embed": (1, 5, 12),
            **PATCH_EMBED,
            **{k: v for k, v in BLOCK_0.items() if k != "blocks.0.attn.qkv.bias"},
            **NORM,
            **HEAD,
        },
    ),
    "CLIP-style: norm_pre, no patch bias": (
        dict(pool="token", pre_norm=True, patch_bias=False, gelu="quick"),
        {
            "patch_embed.proj.weight": (12, 3, 2, 3),
            "cls_token": (1, 1, 12),
            "pos_embed": (1, 5, 12),
            "norm_pre.weight": (12,),
            "norm_pre.bias": (12,),
            **BLOCK_0,
            **NORM,
            **HEAD,
        },
    ),
    "DeiT distilled: dist_token, head_dist, posemb over [cls, dist, patches]": (
        dict(pool="token", distilled=True),
        {
            "cls_token": (1, 1, 12),
            "dist_token": (1, 1, 12),
            "pos_embed": (1, 6, 12),
            **PATCH_EMBED,
            **BLOCK_0,
            **NORM,
            **HEAD,
            "head_dist.weight": (5, 12),
            "head_dist.bias": (5,),
        },
    ),
    "final_norm=False, proj_bias=False, max pool": (
        dict(pool="max", class_token=False, final_norm=False, proj_bias=False),
        {
            "pos_embed": (1, 4, 12),
            **PATCH_EMBED,
            **{k: v for k, v in BLOCK_0.items() if k not in PROJ_BIASES},
            **HEAD,
        },
    ),
    # Not expressible in timm: vitspec's names in timm's style (see backends/torch_vit/model.py).
    "sincos2d posemb (a buffer, not saved) + pre-logits": (
        dict(pool="gap", class_token=False, posemb="sincos2d", posemb_on_cls=False, representation_size=7),
        {
            **PATCH_EMBED,
            **BLOCK_0,
            **NORM,
            "pre_logits.fc.weight": (7, 12),
            "pre_logits.fc.bias": (7,),
            "head.weight": (5, 7),
            "head.bias": (5,),
        },
    ),
    "attention_dim 18 (3 heads of 6), sinusoidal_1d posemb (a buffer)": (
        dict(pool="token", attention_dim=18, posemb="sinusoidal_1d"),
        {
            "cls_token": (1, 1, 12),
            **PATCH_EMBED,
            **BLOCK_0,
            "blocks.0.attn.qkv.weight": (54, 12),
            "blocks.0.attn.qkv.bias": (54,),
            "blocks.0.attn.proj.weight": (12, 18),
            **NORM,
            **HEAD,
        },
    ),
}


@pytest.mark.parametrize("name", list(EXPECTED_STATE_DICTS))
def test_state_dict_names_and_shapes_are_timms(name):
    overrides, expected = EXPECTED_STATE_DICTS[name]
    cfg = ViTConfig(**SMALL, **overrides)
    assert {k: tuple(v.shape) for k, v in VisionTransformer(cfg).state_dict().items()} == expected
    assert {k: tuple(v.shape) for k, v in from_reference(random_params(cfg, 0), cfg).items()} == expected


def test_qkv_rows_are_query_key_value_transposed():
    cfg = ViTConfig(**SMALL, pool="map", class_token=False)
    params = random_params(cfg, 0)
    state_dict = from_reference(params, cfg)
    for ref, timm in (("blocks/0/attn", "blocks.0.attn.qkv"), ("map_head/attn", None)):
        parts = [params[f"{ref}/{p}/kernel"].T for p in ("query", "key", "value")]
        if timm is None:
            np.testing.assert_array_equal(state_dict["attn_pool.q.weight"].numpy(), parts[0])
            kv = np.concatenate(parts[1:])
            np.testing.assert_array_equal(state_dict["attn_pool.kv.weight"].numpy(), kv)
        else:
            np.testing.assert_array_equal(state_dict[f"{timm}.weight"].numpy(), np.concatenate(parts))
    np.testing.assert_array_equal(
        state_dict["patch_embed.proj.weight"].numpy(), params["patch_embed/kernel"].transpose(3, 2, 0, 1)
    )


def test_model_starts_at_the_reference_init():
    cfg = ViTConfig(**SMALL, pool="map", num_registers=1, qk_norm=True, layer_scale=1e-5)
    got = to_reference(VisionTransformer(cfg, seed=3).state_dict(), cfg)
    for k, v in init_params(cfg, seed=3).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_to_reference_lists_every_missing_and_unexpected_key():
    cfg = ViTConfig(**SMALL)
    state_dict = VisionTransformer(cfg).state_dict()
    del state_dict["head.bias"], state_dict["blocks.0.attn.qkv.weight"]
    state_dict["blocks.0.attn.q_bias"] = torch.zeros(12)
    with pytest.raises(ConversionError) as error:
        to_reference(state_dict, cfg)
    message = str(error.value)
    assert "missing keys (2): ['blocks.0.attn.qkv.weight', 'head.bias']" in message
    assert "unexpected keys (1): ['blocks.0.attn.q_bias']" in message


def test_to_reference_names_the_key_and_both_shapes():
    cfg = ViTConfig(**SMALL)
    state_dict = VisionTransformer(cfg).state_dict()
    state_dict["blocks.0.attn.qkv.weight"] = torch.zeros(24, 12)
    state_dict["pos_embed"] = torch.zeros(1, 4, 12)
    with pytest.raises(ConversionError) as error:
        to_reference(state_dict, cfg)
    message = str(error.value)
    assert "shape mismatches (2)" in message
    assert "blocks.0.attn.qkv.weight: expected (36, 12), got (24, 12)" in message
    assert "pos_embed: expected (1, 5, 12), got (1, 4, 12)" in message


def test_from_reference_lists_every_problem_at_once():
    cfg = ViTConfig(**SMALL)
    params = random_params(cfg, 0)
    del params["blocks/0/attn/key/kernel"]
    params["blocks/0/attn/qkv/kernel"] = np.zeros((12, 36))
    params["head/kernel"] = np.zeros((12, 4))
    with pytest.raises(ConversionError) as error:
        from_reference(params, cfg)
    message = str(error.value)
    assert "missing keys (1): ['blocks/0/attn/key/kernel']" in message
    assert "unexpected keys (1): ['blocks/0/attn/qkv/kernel']" in message
    assert "head/kernel: expected (12, 5), got (12, 4)" in message


def test_load_state_dict_of_another_config_fails_loudly():
    with_bias = VisionTransformer(ViTConfig(**SMALL)).state_dict()
    unexpected_bias = re.escape('Unexpected key(s) in state_dict: "blocks.0.attn.qkv.bias"')
    with pytest.raises(RuntimeError, match=unexpected_bias):
        VisionTransformer(ViTConfig(**SMALL, qkv_bias=False)).load_state_dict(with_bias)


def test_bfloat16_state_dict_converts_to_float32():
    cfg = ViTConfig(**SMALL)
    model = VisionTransformer(cfg).to(torch.bfloat16)
    params = to_reference(model.state_dict(), cfg)
    assert all(v.dtype == np.float32 for v in params.values())
    fc1_bias = model.blocks[0].mlp.fc1.bias.detach().float().numpy()
    np.testing.assert_array_equal(params["blocks/0/mlp/fc1/bias"], fc1_bias)
