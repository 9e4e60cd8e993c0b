"""The family knobs against the ecosystems' own models, the reference tree mapped to their names here by
hand and both forwards compared in float64: HF's CLIPVisionModel (quick GELU, pre-norm, no patch bias,
the posemb on the class token), and timm where it is installed (tests/test_torch_timm.py says why it
usually is not): CLIP's stem, final_norm and proj_bias off, max/avgmax pools with pool_include_prefix
and registers, DeiT's VisionTransformerDistilled. With timm and a torchvision stand-in on PYTHONPATH,
select `-k timm`: a stand-in without a version breaks transformers' import, so the CLIP test there."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

import vitspec
from tests.test_families_reference import BASE, _relative_error
from vitspec.gradcheck import random_images, random_params

TIMM_KNOBS = {
    "clip_stem": (dict(gelu="quick", pre_norm=True, patch_bias=False), dict(pre_norm=True)),
    "no_final_norm_no_proj_bias": (
        dict(final_norm=False, proj_bias=False),
        dict(final_norm=False, proj_bias=False),
    ),
    "max_with_prefix": (
        dict(pool="max", pool_include_prefix=True, class_token=True),
        dict(global_pool="max"),
    ),
    "avgmax": (
        dict(pool="avgmax", class_token=True, num_registers=1, fc_norm=True),
        dict(global_pool="avgmax", reg_tokens=1),
    ),
    "distilled": (dict(distilled=True), {}),
}


def timm_state_dict(cfg, p) -> dict[str, torch.Tensor]:
    """The reference tree in timm's names and layouts (torch Linear weights are [out, in])."""
    sd = {"patch_embed.proj.weight": p["patch_embed/kernel"].transpose(3, 2, 0, 1)}
    renames = {"patch_embed/bias": "patch_embed.proj.bias", "reg_tokens": "reg_token"}
    for name, value in p.items():
        if name in ("cls_token", "dist_token", "reg_tokens", "pos_embed"):
            sd[renames.get(name, name)] = value.reshape(1, -1, cfg.width)
        elif name.endswith("/kernel") and name != "patch_embed/kernel":
            sd[name[: -len("/kernel")].replace("/", ".") + ".weight"] = value.T
        elif name != "patch_embed/kernel":
            leaf = {"scale": "weight", "bias": "bias"}[name.rsplit("/", 1)[1]]
            sd[renames.get(name, name.rsplit("/", 1)[0].replace("/", ".") + "." + leaf)] = value
    for i in range(cfg.depth):  # timm fuses q, k and v into one [3 * inner, width] Linear
        b = f"blocks.{i}.attn"
        for leaf in ("weight", "bias"):
            sd[f"{b}.qkv.{leaf}"] = np.concatenate(
                [sd.pop(f"{b}.{w}.{leaf}") for w in ("query", "key", "value")]
            )
        for leaf in ("weight", "bias"):
            if f"{b}.out.{leaf}" in sd:
                sd[f"{b}.proj.{leaf}"] = sd.pop(f"{b}.out.{leaf}")
        for j in (1, 2):
            if f"blocks.{i}.ls{j}.weight" in sd:
                sd[f"blocks.{i}.ls{j}.gamma"] = sd.pop(f"blocks.{i}.ls{j}.weight")
    sd = {k.replace("pre_norm.", "norm_pre."): v for k, v in sd.items()}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


@pytest.mark.parametrize("knobs", TIMM_KNOBS.values(), ids=TIMM_KNOBS.keys())
def test_timm_computes_the_same_logits(knobs):
    vision_transformer = pytest.importorskip(
        "timm.models.vision_transformer",
        reason="timm (with a torchvision matching this torch) is not installed",
    )
    from timm.layers import QuickGELU
    from timm.models.deit import VisionTransformerDistilled

    ours, theirs = knobs
    cfg = vitspec.ViTConfig(**BASE, **ours)
    kwargs = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes)
    kwargs |= dict(
        embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.width
    )
    kwargs |= dict(
        class_token=cfg.class_token, fc_norm=cfg.fc_norm, pool_include_prefix=cfg.pool_include_prefix
    )
    kwargs |= theirs
    act = QuickGELU if cfg.gelu == "quick" else torch.nn.GELU
    model_class = VisionTransformerDistilled if cfg.distilled else vision_transformer.VisionTransformer
    model = model_class(**kwargs, act_layer=act, norm_layer=partial(torch.nn.LayerNorm, eps=cfg.ln_eps))
    params, images = random_params(cfg, 0), random_images(cfg, 2, 1)
    model.double().eval().load_state_dict(timm_state_dict(cfg, params), strict=True)
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert _relative_error(vitspec.forward(cfg, params, images), logits) <= 1e-12


def test_hf_clip_vision_model_computes_the_same_pooled_features():
    """CLIP's tower: the pooled output is post_layernorm of the class token, the reference's final norm
    then token pool (a LayerNorm is per token)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = vitspec.ViTConfig(
        image_size=8,
        patch_size=4,
        width=16,
        depth=2,
        num_heads=4,
        mlp_dim=24,
        num_classes=0,
        gelu="quick",
        pre_norm=True,
        patch_bias=False,
        ln_eps=1e-5,
    )
    hf_config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=8,
        patch_size=4,
    )
    assert hf_config.hidden_act == "quick_gelu" and hf_config.layer_norm_eps == cfg.ln_eps
    model = CLIPVisionModel(hf_config).double().eval()
    params, images = random_params(cfg, 0), random_images(cfg, 2, 1)
    model.load_state_dict(clip_state_dict(cfg, params), strict=True)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
    assert _relative_error(vitspec.forward(cfg, params, images), out.pooler_output.numpy()) <= 1e-12


def clip_state_dict(cfg, p) -> dict[str, torch.Tensor]:
    sd = {
        "embeddings.class_embedding": p["cls_token"],
        "embeddings.patch_embedding.weight": p["patch_embed/kernel"].transpose(3, 2, 0, 1),
        "embeddings.position_embedding.weight": p["pos_embed"],
        "pre_layrnorm.weight": p["pre_norm/scale"],
        "pre_layrnorm.bias": p["pre_norm/bias"],
        "post_layernorm.weight": p["norm/scale"],
        "post_layernorm.bias": p["norm/bias"],
    }
    ours_to_hf = {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj"}
    ours_to_hf |= {"out": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    for i in range(cfg.depth):
        b, hf = f"blocks/{i}", f"encoder.layers.{i}"
        for ours, theirs in ours_to_hf.items():
            scope = "mlp" if ours.startswith("fc") else "attn"
            sd[f"{hf}.{theirs}.weight"] = p[f"{b}/{scope}/{ours}/kernel"].T
            sd[f"{hf}.{theirs}.bias"] = p[f"{b}/{scope}/{ours}/bias"]
        for j in (1, 2):
            sd[f"{hf}.layer_norm{j}.weight"] = p[f"{b}/norm{j}/scale"]
            sd[f"{hf}.layer_norm{j}.bias"] = p[f"{b}/norm{j}/bias"]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
