"""The nearest config each checkpoint format can express (the knobs it lacks turned off), and a file
suffix each is written with: what the round-trip tests of tests/test_formats.py draw from."""

from __future__ import annotations

from bench.peers import vit_flax
from vitspec.config import ViTConfig

# The knobs of later ViTs that the layouts of the original ViT and its ports lack.
ORIGINAL_VIT = dict(
    num_registers=0, posemb="learned", posemb_on_cls=True, qk_norm=False, layer_scale=None, fc_norm=False
)


def square(cfg: ViTConfig) -> dict:
    """A square image of square patches, for the layouts that state each size as one int."""
    patch = cfg.patch_size[0]
    return dict(image_size=cfg.grid_size[0] * patch, patch_size=patch)


def expressible(fmt: str, cfg: ViTConfig) -> ViTConfig:
    """The nearest config the format can express: the knobs it lacks turned off."""
    if fmt in NEAREST:
        return NEAREST[fmt](cfg)
    if fmt in ("big_vision", "big_vision_scan"):
        return big_vision_expressible(cfg)
    # the transformers families (vitspec.formats.hf_deit, hf_clip, hf_siglip, hf_dinov2)
    if fmt.startswith("hf_"):
        plain = {**square(cfg), **ORIGINAL_VIT, "representation_size": None, "qkv_bias": True}
        family = {
            "hf_deit": dict(pool="token", class_token=True, distilled=True),
            # num_classes 0: a head is written as CLIP's bias-free projection only when its bias is zero
            "hf_clip": dict(
                pool="token",
                class_token=True,
                pre_norm=True,
                patch_bias=False,
                num_classes=0,
            ),
            # no prefix tokens: posemb_on_cls as drawn, moot
            "hf_siglip": dict(
                pool="map" if cfg.pool == "map" else "none",
                class_token=False,
                num_classes=0,
                posemb_on_cls=cfg.posemb_on_cls,
            ),
            "hf_dinov2": dict(
                pool="token",
                class_token=True,
                num_classes=0,
                num_registers=cfg.num_registers,
                posemb_on_cls=not cfg.num_registers,
                layer_scale=cfg.layer_scale or 0.1,
            ),
        }[fmt]
        return cfg.replace(**{**plain, **family})
    if fmt == "vit_jax":
        pool = "token" if cfg.pool == "map" else cfg.pool
        class_token = pool == "token" or (pool == "none" and cfg.class_token)
        return cfg.replace(**ORIGINAL_VIT, pool=pool, class_token=class_token, qkv_bias=True)
    if fmt in ("hf", "hf4"):
        pooler = cfg.representation_size is not None and cfg.num_classes == 0
        return cfg.replace(
            **ORIGINAL_VIT, pool="token", class_token=True, representation_size=cfg.width if pooler else None
        )
    return cfg


def big_vision_expressible(cfg: ViTConfig) -> ViTConfig:
    """The nearest config big_vision's models/vit.py applies: its pools, tanh GELU, eps 1e-6, a class
    token only with pool 'token', the learned posemb over the patches, nothing it lacks."""
    pool = cfg.pool if cfg.pool in ("token", "gap", "map", "none") else "gap"
    class_token = pool == "token"
    posemb = cfg.posemb if cfg.posemb in ("learned", "sincos2d") else "learned"
    return ViTConfig(
        **{
            **cfg.to_dict(),
            "pool": pool,
            "class_token": class_token,
            "posemb": posemb,
            "posemb_on_cls": False,
            "num_registers": 0,
            "qk_norm": False,
            "layer_scale": None,
            "talking_heads": False,
            "class_attention_depth": 0,
            "class_attention_mlp_dim": None,
            "fc_norm": False,
            "qkv_bias": True,
            "pre_norm": False,
            "patch_bias": True,
            "final_norm": True,
            "proj_bias": True,
            "distilled": False,
            "attention_dim": None,
            "pool_include_prefix": False,
            "gelu": "tanh",
            "ln_eps": 1e-6,
            "image_size": tuple(cfg.image_size),
            "patch_size": tuple(cfg.patch_size),
        }
    )


def nearest_scenic(cfg: ViTConfig) -> ViTConfig:
    """The nearest config Scenic's ViT can be: the knobs it lacks turned off (tests/test_formats.py)."""
    pool = cfg.pool if cfg.pool in ("token", "gap", "max", "sum") else "gap"
    return cfg.replace(
        pool=pool,
        class_token=pool == "token",
        num_registers=0,
        posemb="learned" if cfg.posemb == "sincos2d" else cfg.posemb,
        posemb_on_cls=True,
        qkv_bias=True,
        qk_norm=False,
        layer_scale=None,
        fc_norm=False,
        num_classes=max(cfg.num_classes, 1),
    )


def nearest_vit_flax(cfg: ViTConfig) -> ViTConfig:
    pool = "token" if cfg.pool == "token" else "gap"
    return cfg.replace(
        **{**ORIGINAL_VIT, "fc_norm": True},
        pool=pool,
        class_token=True,
        pool_include_prefix=pool == "gap",
        qkv_bias=False,
        representation_size=None,
        attention_dim=vit_flax.ViT.dim_head * cfg.num_heads,
        num_classes=max(cfg.num_classes, 1),
    )


def nearest_tutorial(cfg: ViTConfig) -> ViTConfig:
    return cfg.replace(
        **square(cfg),
        **ORIGINAL_VIT,
        pool="token",
        class_token=True,
        final_norm=False,
        representation_size=None,
        num_classes=max(cfg.num_classes, 1),
    )


NEAREST = {"scenic": nearest_scenic, "vit_flax": nearest_vit_flax, "tutorial": nearest_tutorial}

SUFFIX = {
    "ref": ".npz",
    "torch": ".pt",
    "flax": ".msgpack",
    "vit_jax": ".npz",
    "hf": ".safetensors",
    "hf4": ".safetensors",
    "big_vision": ".npz",
    "big_vision_scan": ".msgpack",
    "hf_deit": ".safetensors",
    "hf_clip": ".safetensors",
    "hf_siglip": ".safetensors",
    "hf_dinov2": ".safetensors",
    "scenic": ".npz",
    "vit_flax": ".msgpack",
    "tutorial": ".pt",
}
