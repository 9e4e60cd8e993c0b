"""The PyTorch CaiT (backends.torch_vit.cait) and timm's Cait layout (vitspec.formats.timm).

float64: logits, every named intermediate, the attention maps and the gradients of every
parameter and of the images match the NumPy reference to the float64 bounds
(parity_tests.tolerances). The state dict round-trips bit-exactly and is read back as the same
config. Where timm is importable, timm's own Cait loads our state dicts strictly and computes the
same logits; a timm-built file converts to the reference and back.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vitspec
from backends.torch_vit import Cait, from_reference, model_for, to_reference
from backends.torch_vit.model import DropPath
from parity_tests.cases import LABEL_SMOOTHING, Case, uses_cross_entropy
from parity_tests.strategies import SMALL_FIELDS, cait_configs, random_images, random_params
from parity_tests.tolerances import assert_close_f64
from tests.test_training import write_fashion_mnist
from vitspec.app.convert import convert
from vitspec.app.training import TrainConfig, train_and_evaluate
from vitspec.config import ViTConfig
from vitspec.formats import FormatError, StrictError, load_any, load_with_notes, save_any
from vitspec.formats.strict import unsettled
from vitspec.formats.timm import timm_construction, timm_kwargs

CAIT = dict(SMALL_FIELDS, depth=2, mlp_dim=24, class_attention_depth=2, posemb_on_cls=False)
EXPLICIT = [  # the knobs one at a time, on a 2x2 (non-square in pixels) and a 1x3 grid
    dict(talking_heads=True, layer_scale=0.1),
    dict(talking_heads=False, layer_scale=None, class_attention_depth=1),
    dict(talking_heads=True, qkv_bias=False, layer_scale=1e-5, class_attention_mlp_dim=36),
    dict(talking_heads=True, image_size=(2, 9), gelu="tanh", ln_eps=1e-12, posemb="sincos2d"),
    dict(talking_heads=False, num_classes=0, posemb="none"),
    dict(talking_heads=False, layer_scale=0.1, qkv_bias=False, class_attention_depth=1),
]
# What timm's Cait builds: it always has LayerScale and a learned posemb.
TIMM_EXPRESSIBLE = [o for o in EXPLICIT if o.get("layer_scale") and o.get("posemb", "learned") == "learned"]
RATES = dict(dropout=0.2, attention_dropout=0.3, stochastic_depth=0.4)


def cait(**overrides) -> ViTConfig:
    return ViTConfig(**(CAIT | overrides))


def loaded(cfg: ViTConfig, params: dict) -> nn.Module:
    model = model_for(cfg).double()
    model.load_state_dict(from_reference(params, cfg))
    return model.eval()


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def named_and_grads(case: Case) -> tuple[dict, dict]:
    """Our float64 intermediates and attention maps, and gradients of the reference's objective."""
    model = loaded(case.cfg, case.params)
    images = nchw(case.images).clone().requires_grad_(True)
    named = model(images, intermediates=True, attention_maps=True)
    if uses_cross_entropy(case.cfg):
        objective = F.cross_entropy(
            named["logits"], torch.from_numpy(case.labels), label_smoothing=LABEL_SMOOTHING
        )
    else:
        objective = (named["logits"] * torch.from_numpy(case.cotangent)).sum()
    objective.backward()
    grads = to_reference({k: p.grad for k, p in model.named_parameters()}, case.cfg)
    grads["images"] = images.grad.permute(0, 2, 3, 1).numpy()
    return {k: v.detach().numpy() for k, v in named.items()}, grads


def assert_matches_reference(case: Case) -> None:
    ref_named, ref_grads = case.reference(np.float64)
    named, grads = named_and_grads(case)
    with torch.no_grad():
        maps = loaded(case.cfg, case.params)(nchw(case.images), attention_maps=True)
    assert maps.keys() == vitspec.forward(case.cfg, case.params, case.images, attention_maps=True).keys()
    assert_close_f64(named, ref_named, "forward")  # also refuses a differing set of names
    assert_close_f64(grads, ref_grads, "grad")


@pytest.mark.parametrize("overrides", EXPLICIT, ids=str)
def test_float64_matches_reference_explicit(overrides):
    assert_matches_reference(Case(cait(**overrides), seed=3, batch=2))


@settings(max_examples=30, deadline=None)
@given(st.builds(Case, cait_configs(), st.integers(0, 2**16), st.integers(1, 3)))
def test_float64_matches_reference(case):
    assert_matches_reference(case)


@given(cait_configs(), st.integers(0, 2**16), st.sampled_from([np.float32, np.float64]))
def test_round_trip_reference_torch_reference_is_bit_exact(cfg, seed, dtype):
    params = random_params(cfg, seed, dtype)
    state_dict = from_reference(params, cfg)
    assert state_dict.keys() == Cait(cfg).state_dict().keys()
    back = to_reference(state_dict, cfg)
    assert list(back) == list(params)
    for k in params:
        assert back[k].dtype == params[k].dtype and np.array_equal(back[k], params[k]), k


@pytest.mark.parametrize("overrides", EXPLICIT, ids=str)
def test_a_written_torch_file_reads_back_as_the_config(tmp_path, overrides):
    cfg = cait(**overrides)
    path = tmp_path / "cait.pth"
    save_any(path, "torch", cfg, random_params(cfg, 0))
    flags = dict(gelu=cfg.gelu, ln_eps=cfg.ln_eps, posemb=cfg.posemb, image_size=cfg.image_size)
    if not cfg.talking_heads:  # otherwise proj_l's shape shows the heads
        with pytest.raises(FormatError, match="CaiT without talking heads .* pass --heads N"):
            load_any(path, **flags)
        flags["heads"] = cfg.num_heads
    loaded_cfg, params = load_any(path, **flags)
    assert loaded_cfg == cfg.replace(layer_scale=cfg.layer_scale and 1.0)  # the init value is not stored
    assert all(np.array_equal(params[k], v) for k, v in random_params(cfg, 0).items())


def test_reading_without_talking_heads_notes_the_flag_that_settles_it(tmp_path):
    cfg = cait(talking_heads=False, layer_scale=None, qkv_bias=False)
    path = tmp_path / "cait.pth"
    save_any(path, "torch", cfg, random_params(cfg, 0))
    told = dict(heads=3, image_size=cfg.image_size, gelu="exact", ln_eps=1e-6)
    flags = unsettled(load_with_notes(path, **told).notes)
    assert sorted(flags) == [
        "--no-layer-scale",
        "--no-qkv-bias",
        "--no-talking-heads",
    ]  # nothing a CaiT lacks
    with pytest.raises(StrictError, match=r"talking_heads False: the checkpoint has no blocks.0.attn.proj_l"):
        load_any(path, strict=True, **told)
    settled = load_any(path, strict=True, **told, talking_heads=False, layer_scale=False, qkv_bias=False)
    assert settled[0] == cfg


@pytest.mark.parametrize("fmt", ["hf", "vit_jax"])
def test_formats_without_cait_refuse_it_by_name(tmp_path, fmt):
    cfg = cait(talking_heads=True, layer_scale=0.1)
    both = r"cannot express(?=.*no class-attention blocks)(?=.*no talking heads)"  # in either order
    with pytest.raises(FormatError, match=both):
        save_any(
            tmp_path / "m.safetensors" if fmt == "hf" else tmp_path / "m.npz", fmt, cfg, random_params(cfg, 0)
        )


def test_timm_vit_layout_refuses_talking_heads_outside_cait(tmp_path):
    cfg = ViTConfig(**SMALL_FIELDS, talking_heads=True)
    with pytest.raises(FormatError, match="talking heads outside CaiT"):
        save_any(tmp_path / "m.pth", "torch", cfg, random_params(cfg, 0))


def test_timm_construction_names_caits_arguments():
    cfg = vitspec.variant("cait-xxs24-224", num_classes=1000)
    assert timm_kwargs(cfg) == dict(
        img_size=(224, 224), patch_size=(16, 16), in_chans=3, num_classes=1000, embed_dim=192, depth=24,
        num_heads=4, mlp_ratio=4.0, qkv_bias=True, init_values=1e-5, depth_token_only=2,
        mlp_ratio_token_only=4.0,
    )  # fmt: skip
    text = timm_construction(cfg)
    assert text.startswith("timm.models.cait.Cait(img_size=(224, 224)") and "eps=1e-06" in text
    assert "attn_block" not in text and "strict loading fails" not in text
    plain = timm_construction(cait(talking_heads=False, layer_scale=None))
    assert "attn_block=timm.layers.Attention" in plain and "always has LayerScale" in plain


def test_train_mode_draws_in_the_patch_blocks_only():
    model = loaded(cait(**RATES, drop_path_schedule="constant"), random_params(cait(), 0))
    assert [(b.drop_path1.rate, b.drop_path2.rate) for b in model.blocks] == [(0.4, 0.4)] * 2
    for module in model.blocks_token_only.modules():
        assert not isinstance(module, DropPath) and getattr(module, "p", 0.0) == 0.0, module
    images = nchw(random_images(model.cfg, 3, 1))
    with torch.no_grad():
        first, second = model.train()(images), model(images)
        torch.manual_seed(7)
        replay_a = model(images)
        torch.manual_seed(7)
        replay_b = model(images)
    assert not torch.equal(first, second) and torch.equal(replay_a, replay_b)


def test_train_mode_without_rates_equals_eval_mode_exactly():
    model = loaded(cait(talking_heads=True), random_params(cait(talking_heads=True), 0))
    images = nchw(random_images(model.cfg, 2, 1))
    with torch.no_grad():
        train, evaluated = model.train()(images, intermediates=True), model.eval()(images, intermediates=True)
    assert all(torch.equal(train[k], evaluated[k]) for k in evaluated)


def test_one_training_step_with_the_torch_backend(tmp_path):
    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", train=40, test=8)
    settings_ = dict(dataset="fashion-mnist", model="cait-fmnist", data_dir=tmp_path / "data")
    tiny = {"depth": 1, "width": 16, "num_heads": 2, "mlp_dim": 32}
    run = TrainConfig(
        **settings_, model_overrides=tiny, validation_size=8, batch_size=8, epochs=1, max_steps=1
    )
    summary = train_and_evaluate(run, tmp_path / "run", "torch")
    assert summary["steps_done"] == 1
    cfg, params = vitspec.load(summary["checkpoint"])
    assert cfg.class_attention_depth == 2 and "class_blocks/1/mlp/fc2/kernel" in params


# timm itself, where it is importable (see tests/test_torch_timm.py).


@pytest.fixture
def timm():
    return pytest.importorskip(
        "timm", reason="timm (with a torchvision matching this torch) is not installed"
    )


def timm_cait(timm, cfg: ViTConfig):
    gelu = "none" if cfg.gelu == "exact" else "tanh"
    attention = {} if cfg.talking_heads else {"attn_block": timm.layers.Attention}
    return timm.models.cait.Cait(
        **timm_kwargs(cfg),
        norm_layer=functools.partial(nn.LayerNorm, eps=cfg.ln_eps),
        act_layer=functools.partial(nn.GELU, approximate=gelu),
        **attention,
    )


@pytest.mark.parametrize("overrides", TIMM_EXPRESSIBLE, ids=str)
def test_timm_loads_our_state_dict_strictly_and_computes_the_same(timm, overrides):
    cfg = cait(**overrides)
    state_dict = from_reference(random_params(cfg, 0), cfg)
    theirs = timm_cait(timm, cfg).double().eval()
    theirs.load_state_dict(state_dict, strict=True)
    images = torch.randn(2, cfg.in_channels, *cfg.image_size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(cfg, random_params(cfg, 0))(images), theirs(images), rtol=1e-12, atol=1e-12
        )


def test_timm_cait_xxs24_is_the_named_variant(timm):
    theirs = timm.create_model("cait_xxs24_224", pretrained=False)
    cfg = vitspec.variant("cait-xxs24-224", num_classes=1000)
    assert sum(p.numel() for p in theirs.parameters()) == vitspec.num_params(cfg) == 11_956_264
    theirs.load_state_dict(from_reference(vitspec.init_params(cfg, 0), cfg), strict=True)


def test_a_timm_built_file_converts_to_the_reference_and_back(timm, tmp_path):
    cfg = cait(talking_heads=True, layer_scale=1e-5, image_size=(8, 9), num_classes=7)
    theirs = timm_cait(timm, cfg).double().eval()
    for p in theirs.parameters():  # timm's init has zero biases and unit gammas: draw them all
        nn.init.normal_(p, std=0.3)
    torch.save(theirs.state_dict(), tmp_path / "timm.pth")
    told = dict(source_image_size=cfg.image_size, gelu="exact", ln_eps=1e-6, out=io.StringIO())
    convert(tmp_path / "timm.pth", tmp_path / "ref.safetensors", strict=True, **told)
    convert(tmp_path / "ref.safetensors", tmp_path / "back.pth", out=io.StringIO())
    cfg_ref, params = vitspec.load(tmp_path / "ref.safetensors")
    images = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = theirs(images).numpy()
        theirs.load_state_dict(torch.load(tmp_path / "back.pth"), strict=True)
        np.testing.assert_allclose(theirs(images).numpy(), expected, rtol=0, atol=0)
    got = vitspec.forward(cfg_ref, params, images.permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
