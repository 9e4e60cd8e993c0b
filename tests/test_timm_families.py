"""timm's ViT families: the torch (timm) format's refusals, readings and printed construction, and,
where timm is importable, timm's own models through `vitspec convert`: DeiT with its distillation
token, a CLIP-style and a DINOv2-style ViT, and VisionTransformer's final_norm, proj_bias,
max/avgmax pools and pool_include_prefix.

Each timm model is timm's own class at a tiny size, its parameters drawn at random in float64; its state
dict is saved as .safetensors and read back with the converter's library function
(`vitspec.formats.load_with_notes`, what `vitspec convert` calls) and the flags a timm file needs
(heads, the GELU form, eps, pool). The reference forward and the torch backend on the converted
parameters, the flax backend on them, and timm's model built from the printed `timm_construction`
on the file written back, give timm's logits within 1e-12 of their largest magnitude (measured with
timm 1.0.31: at most 8e-16). pool_include_prefix is not shown by a timm file's names: that case
reads with its flag.

timm imports torchvision, which has no build matching the CPU torch this project pins, so on the
project's own machines those tests skip. To run them: `pip install --no-deps --target DIR timm`,
and put DIR and a directory holding a stand-in `torchvision` package (timm imports it but these
models never call it) on PYTHONPATH.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backends.torch_vit import from_reference, model_for
from parity_tests.strategies import SMALL_FIELDS, random_params
from tests.backend_outputs import three_outputs
from vitspec.config import ViTConfig
from vitspec.formats import FormatError, load_any, load_with_notes, save_any
from vitspec.formats.inference import reading_flags
from vitspec.formats.timm import timm_construction

SIZE = dict(img_size=(8, 12), patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=1.5, num_classes=5)
READ = dict(heads=2, image_size=(8, 12))  # timm files store neither
BOUND = 1e-12


class Family(NamedTuple):
    cls: str  # in timm.models
    kwargs: dict  # beyond SIZE
    flags: dict  # beyond READ
    expected: dict  # config fields the reading must give


CLIP_LN = functools.partial(torch.nn.LayerNorm, eps=1e-5)
FAMILIES = {
    "deit-distilled": Family("deit.VisionTransformerDistilled", {}, {}, dict(distilled=True, pool="token")),
    "deit-distilled-features": Family(
        "deit.VisionTransformerDistilled", dict(num_classes=0), {}, dict(distilled=True, num_classes=0)
    ),
    "clip": Family(
        "vision_transformer.VisionTransformer",
        dict(pre_norm=True, act_layer="quick_gelu", norm_layer=CLIP_LN),
        dict(gelu="quick", ln_eps=1e-5),
        dict(pre_norm=True, patch_bias=False, gelu="quick", ln_eps=1e-5),
    ),
    "dinov2-registers": Family(
        "vision_transformer.VisionTransformer",
        dict(reg_tokens=4, no_embed_class=True, init_values=1e-5),
        {},
        dict(num_registers=4, posemb_on_cls=False, layer_scale=1.0),
    ),
    "no-final-norm": Family(
        "vision_transformer.VisionTransformer",
        dict(final_norm=False, global_pool="avg"),
        dict(pool="gap"),
        dict(final_norm=False, fc_norm=False, pool="gap"),
    ),
    "no-proj-bias": Family(
        "vision_transformer.VisionTransformer", dict(proj_bias=False), {}, dict(proj_bias=False)
    ),
    "max-pool": Family(
        "vision_transformer.VisionTransformer",
        dict(global_pool="max", class_token=False),
        dict(pool="max"),
        dict(pool="max", fc_norm=True, class_token=False),
    ),
    "avgmax-pool": Family(
        "vision_transformer.VisionTransformer",
        dict(global_pool="avgmax", reg_tokens=1),
        dict(pool="avgmax"),
        dict(pool="avgmax", fc_norm=True, num_registers=1),
    ),
    "pool-include-prefix": Family(
        "vision_transformer.VisionTransformer",
        dict(global_pool="avg", reg_tokens=2, pool_include_prefix=True),
        dict(pool="gap", pool_include_prefix=True),
        dict(pool="gap", fc_norm=True, pool_include_prefix=True),
    ),
}


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip(
        "timm", reason="timm (with a torchvision matching this torch) is not installed"
    )


def timm_model(timm, family: Family) -> torch.nn.Module:
    module, name = family.cls.split(".")
    model = getattr(getattr(timm.models, module), name)(**(SIZE | family.kwargs)).double().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # timm's init leaves heads and biases at zero: draw every value instead
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=torch.float64))
    return model


def relative_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("name", FAMILIES)
def test_converted_model_computes_timms_logits(timm, tmp_path, name):
    family = FAMILIES[name]
    theirs = timm_model(timm, family)
    path = tmp_path / "timm.safetensors"
    save_file(theirs.state_dict(), path)
    loaded = load_with_notes(path, **READ, **family.flags)
    assert loaded.fmt == "torch"
    cfg = loaded.cfg
    assert {field: getattr(cfg, field) for field in family.expected} == family.expected
    images = np.random.default_rng(1).standard_normal((3, *cfg.image_size, cfg.in_channels))
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = theirs(nchw).numpy()
    for who, got in three_outputs(cfg, loaded.params, images).items():
        assert relative_error(got, expected) <= BOUND, who

    # Back to a timm file: the printed construction loads it strictly and computes the same.
    save_any(tmp_path / "back.safetensors", "torch", cfg, loaded.params)
    rebuilt = eval(timm_construction(cfg), {"timm": timm, "torch": torch, "functools": functools})
    rebuilt.double().eval().load_state_dict(load_file(tmp_path / "back.safetensors"), strict=True)
    with torch.no_grad():
        assert relative_error(rebuilt(nchw), expected) <= BOUND


# --- the format, without timm ---------------------------------------------------------------------

REFUSED = {
    "attention_dim": (dict(attention_dim=18), ["attention_dim=18 != width=12"]),
    "patch bias without norm_pre, and pool sum": (
        dict(pool="sum", patch_bias=False),
        ["patch_bias=False with pre_norm=False", "pool='sum'"],
    ),
    "norm_pre with a patch bias": (dict(pre_norm=True), ["patch_bias=True with pre_norm=True"]),
    "distilled with registers, posemb none": (
        dict(distilled=True, num_registers=1, posemb="none"),
        ["distilled with num_registers=1", "distilled with posemb='none'"],
    ),
    "CaiT with the families' parts": (
        dict(class_attention_depth=1, posemb_on_cls=False, pre_norm=True, final_norm=False, proj_bias=False),
        ["pre_norm=True: timm's Cait", "final_norm=False: timm's Cait", "proj_bias=False: timm's Cait"],
    ),
}


@pytest.mark.parametrize("name", REFUSED)
def test_format_refuses_what_timms_classes_cannot_build_and_the_backend_runs_it(tmp_path, name):
    overrides, reasons = REFUSED[name]
    cfg = ViTConfig(**SMALL_FIELDS, **overrides)
    with pytest.raises(FormatError) as error:
        save_any(tmp_path / "m.pth", "torch", cfg, random_params(cfg, 0))
    assert all(reason in str(error.value) for reason in reasons), str(error.value)
    model = model_for(cfg).double().eval()
    model.load_state_dict(from_reference(random_params(cfg, 0), cfg))


READ_BACK = {
    "clip": dict(pre_norm=True, patch_bias=False, gelu="quick", ln_eps=1e-5),
    "deit-distilled": dict(distilled=True),
    "no final norm, no proj biases, avgmax": dict(
        pool="avgmax", class_token=False, final_norm=False, proj_bias=False
    ),
    "max pool with registers": dict(pool="max", num_registers=2, fc_norm=True),
    "sinusoidal_2d": dict(pool="gap", class_token=False, posemb="sinusoidal_2d", posemb_on_cls=False),
}


@pytest.mark.parametrize("name", READ_BACK)
def test_written_file_reads_back_as_its_config(tmp_path, name):
    """The names show distilled, pre_norm, patch_bias, final_norm and proj_bias; the flags the rest."""
    cfg = ViTConfig(**SMALL_FIELDS, **READ_BACK[name])
    params = random_params(cfg, 0)
    save_any(tmp_path / "m.safetensors", "torch", cfg, params)
    back_cfg, back = load_any(tmp_path / "m.safetensors", strict=True, **reading_flags(cfg))
    assert back_cfg == cfg
    assert all(np.array_equal(back[k], params[k]) for k in params)


def test_construction_names_the_family_keywords():
    clip = timm_construction(ViTConfig(**SMALL_FIELDS, pre_norm=True, patch_bias=False, gelu="quick"))
    assert clip.startswith("timm.models.vision_transformer.VisionTransformer(")
    assert "pre_norm=True" in clip and "act_layer='quick_gelu'" in clip
    tanh_pooled = timm_construction(
        ViTConfig(**SMALL_FIELDS, gelu="tanh", pool="avgmax", pool_include_prefix=True, final_norm=False)
    )
    assert "act_layer='gelu_tanh'" in tanh_pooled and "global_pool='avgmax'" in tanh_pooled
    assert "pool_include_prefix=True" in tanh_pooled and "final_norm=False" in tanh_pooled
    deit = timm_construction(ViTConfig(**SMALL_FIELDS, distilled=True, proj_bias=False))
    assert deit.startswith("timm.models.deit.VisionTransformerDistilled(") and "proj_bias=False" in deit
