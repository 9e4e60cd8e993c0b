"""Against timm itself, where it is installed: our state dicts load strictly into timm's
VisionTransformer and both compute the same logits (float64).

timm imports torchvision, which has no build matching the CPU torch this project pins, so on the
project's own machines this module skips; run it where timm and a matching torchvision are
installed. These variants pool the patch tokens only (pool_include_prefix=False, timm's default);
tests/test_timm_families.py covers the families' knobs (DeiT's distillation token, norm_pre, the
optional biases and final norm, max/avgmax pools, pool_include_prefix) against timm's own models.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from backends.torch_vit import VisionTransformer, from_reference
from parity_tests.strategies import SMALL_FIELDS, random_params
from vitspec.config import ViTConfig
from vitspec.formats.timm import timm_kwargs

vision_transformer = pytest.importorskip(
    "timm.models.vision_transformer", reason="timm (with a torchvision matching this torch) is not installed"
)

SMALL = SMALL_FIELDS | dict(depth=2, mlp_dim=24)
VARIANTS = [
    dict(pool="token"),
    dict(pool="gap", class_token=False, fc_norm=True),
    dict(pool="gap", class_token=True, num_registers=1),
    dict(pool="map", class_token=False),
    dict(pool="map", class_token=True, num_registers=2, fc_norm=True, posemb="none"),
    dict(pool="token", num_registers=2, layer_scale=0.1, qk_norm=True, posemb_on_cls=False),
    dict(pool="token", qkv_bias=False),
    dict(pool="none", class_token=False, gelu="tanh", ln_eps=1e-12),
]


def timm_model(cfg: ViTConfig):
    return vision_transformer.VisionTransformer(
        **timm_kwargs(cfg),
        norm_layer=partial(torch.nn.LayerNorm, eps=cfg.ln_eps),
        act_layer=partial(torch.nn.GELU, approximate="none" if cfg.gelu == "exact" else "tanh"),
    )


@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
def test_state_dict_loads_strictly_into_timm_and_computes_the_same(overrides):
    cfg = ViTConfig(**SMALL, **overrides)
    state_dict = from_reference(random_params(cfg, 0), cfg)
    theirs = timm_model(cfg).double().eval()
    theirs.load_state_dict(state_dict, strict=True)
    ours = VisionTransformer(cfg).double().eval()
    ours.load_state_dict(state_dict)
    images = torch.randn(2, cfg.in_channels, *cfg.image_size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), rtol=1e-12, atol=1e-12)


def test_create_model_with_the_printed_keywords_builds_the_same_model():
    """The README's recipe: a timm variant name, then the keywords `vitspec convert --to torch` prints
    (they override the variant's)."""
    timm = pytest.importorskip("timm")
    cfg = ViTConfig(**SMALL, pool="token")
    state_dict = from_reference(random_params(cfg, 0), cfg)
    theirs = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        **timm_kwargs(cfg),
        norm_layer=partial(torch.nn.LayerNorm, eps=cfg.ln_eps),
        act_layer=partial(torch.nn.GELU, approximate="none"),
    )
    theirs.double().eval().load_state_dict(state_dict, strict=True)
    ours = VisionTransformer(cfg).double().eval()
    ours.load_state_dict(state_dict)
    images = torch.randn(2, cfg.in_channels, *cfg.image_size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), rtol=1e-12, atol=1e-12)
