"""The named models: the ViT paper sizes, the released CaiTs, and small presets for 32x32 and 28x28."""

from __future__ import annotations

import re
from typing import Any

from vitspec.config import ViTConfig

# Table 1 of Dosovitskiy et al. 2020 (arXiv:2010.11929) for B, L, H; Ti and S from Touvron et al.
# 2021 (DeiT, arXiv:2012.12877) and Steiner et al. 2021 (arXiv:2106.10270), as big_vision lists them.
VIT_SIZES: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
}

# Small models for 32x32 (CIFAR) and 28x28 (Fashion-MNIST) images, trained from scratch.
PRESETS: dict[str, dict[str, Any]] = {
    # The CIFAR-10 notebook model this project grew from: 6 layers, width 128, 8 heads, MLP 256.
    "cifar-notebook": dict(
        image_size=32,
        patch_size=4,
        width=128,
        depth=6,
        num_heads=8,
        mlp_dim=256,
        num_classes=10,
        pool="token",
    ),
    "cifar-s": dict(
        image_size=32,
        patch_size=4,
        width=192,
        depth=9,
        num_heads=3,
        mlp_dim=384,
        num_classes=10,
        pool="token",
    ),
    "fmnist-tiny": dict(
        image_size=28,
        patch_size=4,
        in_channels=1,
        width=64,
        depth=4,
        num_heads=4,
        mlp_dim=128,
        num_classes=10,
        pool="token",
    ),
    "fmnist-s": dict(
        image_size=28,
        patch_size=4,
        in_channels=1,
        width=128,
        depth=6,
        num_heads=8,
        mlp_dim=256,
        num_classes=10,
        pool="token",
    ),
    # The main job's model (a few minutes on 2 CPU cores): patch 7 gives 16 tokens, ~3x cheaper
    # per image than patch 4's 49, so more epochs fit the time; GAP and the fixed sincos2d posemb
    # (Beyer et al. 2022, arXiv:2205.01580) learn faster than a class token and a learned posemb
    # (Fashion-MNIST test top-1 after 1 epoch: 72.8% vs 67.0%).
    "fmnist-fast": dict(
        image_size=28,
        patch_size=7,
        in_channels=1,
        width=128,
        depth=4,
        num_heads=4,
        mlp_dim=256,
        num_classes=10,
        pool="gap",
        posemb="sincos2d",
    ),
}

# CaiT, Table 1 of Touvron et al. 2021 (arXiv:2103.17239), as timm's cait.py builds the released
# weights (`cait_xxs24_224` ...): patch 16, 2 class-attention blocks, MLP ratio 4 in both stages,
# talking heads, LayerScale init 1e-5 (1e-6 for S-36, M-36, M-48), constant stochastic depth.
CAIT_VARIANTS: dict[str, dict[str, Any]] = {
    f"cait-{size}-{image}": dict(
        image_size=image,
        patch_size=16,
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=4 * width,
        layer_scale=init,
        talking_heads=True,
        class_attention_depth=2,
        posemb_on_cls=False,
        drop_path_schedule="constant",
    )
    for size, width, depth, heads, init, images in (
        ("xxs24", 192, 24, 4, 1e-5, (224, 384)),
        ("xxs36", 192, 36, 4, 1e-5, (224, 384)),
        ("xs24", 288, 24, 6, 1e-5, (384,)),
        ("s24", 384, 24, 8, 1e-5, (224, 384)),
        ("s36", 384, 36, 8, 1e-6, (384,)),
        ("m36", 768, 36, 16, 1e-6, (384,)),
        ("m48", 768, 48, 16, 1e-6, (448,)),
    )
    for image in images
}
_CAIT_SMALL = dict(
    patch_size=4,
    talking_heads=True,
    class_attention_depth=2,
    posemb_on_cls=False,
    layer_scale=1e-5,
    drop_path_schedule="constant",
    num_classes=10,
)
PRESETS["cait-cifar"] = dict(_CAIT_SMALL, image_size=32, width=192, depth=12, num_heads=4, mlp_dim=768)
PRESETS["cait-fmnist"] = dict(
    _CAIT_SMALL, image_size=28, in_channels=1, width=64, depth=6, num_heads=4, mlp_dim=256
)

_VARIANT_RE = re.compile(r"^(Ti|S|B|L|H)/(\d+)$")


def variant_names() -> list[str]:
    return [f"{s}/{{patch}}" for s in VIT_SIZES] + list(CAIT_VARIANTS) + list(PRESETS)


def variant(name: str, **overrides: Any) -> ViTConfig:
    """A named model: a paper size with a patch size ("B/16", "Ti/4") or a preset ("cifar-notebook").

    Overrides replace any field, e.g. `variant("B/16", num_classes=10, image_size=384)`.
    """
    m = _VARIANT_RE.match(name)
    if m:
        fields: dict[str, Any] = dict(VIT_SIZES[m.group(1)], patch_size=int(m.group(2)))
    elif name in CAIT_VARIANTS:
        fields = dict(CAIT_VARIANTS[name])
    elif name in PRESETS:
        fields = dict(PRESETS[name])
    else:
        raise ValueError(
            f"unknown variant {name!r}: expected SIZE/PATCH with SIZE in {list(VIT_SIZES)} "
            f"(e.g. 'B/16'), a CaiT in {list(CAIT_VARIANTS)} or a preset in {list(PRESETS)}"
        )
    return ViTConfig(**{**fields, **overrides})
