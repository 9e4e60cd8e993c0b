"""The PyTorch model on its own: each family knob against the reference, train-mode randomness,
torch.compile, checkpoints, input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vitspec
from backends.torch_vit import VisionTransformer, from_checkpoint, from_reference, model_for, to_reference
from backends.torch_vit.layers import Attention, Mlp
from backends.torch_vit.model import DropPath
from parity_tests.strategies import SMALL_FIELDS, configs, random_images, random_params
from parity_tests.tolerances import assert_close_f64
from vitspec.config import ViTConfig

SMALL = SMALL_FIELDS | dict(depth=2)
RATES = dict(dropout=0.2, attention_dropout=0.3, stochastic_depth=0.4)
NO_RATES = dict(dropout=0.0, attention_dropout=0.0, stochastic_depth=0.0)
# Sample means of a dropout path must land within this many standard errors of the eval value.
# Every element is one z-test; at 5 sigma a fair element fails with probability 6e-7.
Z_BOUND = 5.0


def loaded_model(cfg: ViTConfig, seed: int = 0) -> VisionTransformer:
    model = VisionTransformer(cfg).double()
    model.load_state_dict(from_reference(random_params(cfg, seed), cfg))
    return model


def nchw_images(cfg: ViTConfig, batch: int, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(random_images(cfg, batch, seed)).permute(0, 3, 1, 2)


def seeded_randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# One knob of the ViT families each (SMALL: width 12, 3 heads, 2x2 patches of 2x3, depth 2).
KNOBS = {
    "quick GELU": dict(gelu="quick"),
    "pre_norm, no patch bias (CLIP)": dict(pre_norm=True, patch_bias=False),
    "no final norm": dict(final_norm=False),
    "no projection biases": dict(proj_bias=False),
    "max pool": dict(pool="max", class_token=False),
    "avgmax pool over the prefix too": dict(pool="avgmax", num_registers=2, pool_include_prefix=True),
    "sum pool": dict(pool="sum", class_token=True),
    "map over the prefix too": dict(pool="map", class_token=True, pool_include_prefix=True),
    "distilled (DeiT)": dict(distilled=True, num_registers=1),
    "distilled without heads": dict(distilled=True, num_classes=0),
    "attention_dim 18": dict(attention_dim=18),
    "sinusoidal_1d over every token": dict(posemb="sinusoidal_1d"),
    "sinusoidal_1d over the patches": dict(posemb="sinusoidal_1d", posemb_on_cls=False),
    "sinusoidal_2d": dict(posemb="sinusoidal_2d", posemb_on_cls=False),
    "CaiT with every family knob it takes": dict(
        class_attention_depth=1,
        posemb_on_cls=False,
        gelu="quick",
        pre_norm=True,
        patch_bias=False,
        final_norm=False,
        proj_bias=False,
        attention_dim=6,
        posemb="sinusoidal_2d",
    ),
}


@pytest.mark.parametrize("name", KNOBS)
def test_each_family_knob_computes_the_reference_in_float64(name):
    """Every named value and attention map, and the gradients, within the float64 bounds."""
    cfg = ViTConfig(**(SMALL | KNOBS[name]))
    params, images = random_params(cfg, 0), random_images(cfg, 3, 1)
    model = model_for(cfg).double().eval()
    model.load_state_dict(from_reference(params, cfg))
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).clone().requires_grad_(True)
    named = model(nchw, intermediates=True, attention_maps=True)
    expected = vitspec.forward(cfg, params, images, intermediates=True, attention_maps=True)
    assert named.keys() == expected.keys()
    assert_close_f64({k: v.detach().numpy() for k, v in named.items()}, expected, "forward")
    cotangent = np.random.default_rng(2).standard_normal(expected["logits"].shape)
    (named["logits"] * torch.from_numpy(cotangent)).sum().backward()
    grads = to_reference({k: p.grad for k, p in model.named_parameters()}, cfg)
    grads["images"] = nchw.grad.permute(0, 2, 3, 1).numpy()
    assert_close_f64(grads, vitspec.vjp(cfg, params, images, cotangent), "grad")


@settings(max_examples=10)
@given(configs(), st.integers(0, 2**16))
def test_train_mode_without_rates_equals_eval_mode_exactly(cfg, seed):
    model = loaded_model(cfg.replace(**NO_RATES), seed)
    images = nchw_images(cfg, 2, seed)
    with torch.no_grad():
        train = model.train()(images, intermediates=True)
        evaluated = model.eval()(images, intermediates=True)
    assert all(torch.equal(train[k], evaluated[k]) for k in evaluated)


def test_train_mode_masks_change_from_step_to_step():
    model = loaded_model(ViTConfig(**SMALL, **RATES))
    images = nchw_images(model.cfg, 3)
    with torch.no_grad():
        first, second = model.train()(images), model(images)
        torch.manual_seed(7)
        replay_a = model(images)
        torch.manual_seed(7)
        replay_b = model(images)
        evaluated_a, evaluated_b = model.eval()(images), model(images)
    assert not torch.equal(first, second)
    assert torch.equal(replay_a, replay_b)
    assert torch.equal(evaluated_a, evaluated_b)


def assert_mean_is_eval_value(module, run, samples: int = 2000) -> None:
    """Mean of `samples` train-mode results of `run()` within Z_BOUND standard errors of eval's."""
    torch.manual_seed(0)
    with torch.no_grad():
        expected = run(module.eval())
        module.train()
        draws = torch.stack([run(module) for _ in range(samples)])
    standard_error = draws.std(dim=0) / math.sqrt(samples)
    z = (draws.mean(dim=0) - expected).abs() / standard_error.clamp_min(1e-12)
    assert z.max() < Z_BOUND, f"max z {z.max():.2f}"
    assert (standard_error > 0).any(), "train mode drew no randomness"


def test_attention_dropout_preserves_the_expectation():
    # The output is linear in each mask (probabilities, then after the projection): E[train] = eval.
    x = seeded_randn(2, 5, 12)
    attention = Attention(ViTConfig(**SMALL, **RATES)).double()
    assert_mean_is_eval_value(attention, lambda module: module(x)[0])


def test_mlp_dropout_preserves_the_expectation():
    # Dropout after GELU feeds the linear fc2, then dropout again: linear in both masks.
    x = seeded_randn(2, 5, 12)
    assert_mean_is_eval_value(Mlp(ViTConfig(**SMALL), dropout=0.3).double(), lambda mlp: mlp(x))


def test_drop_path_drops_whole_samples_and_preserves_the_expectation():
    drop_path = DropPath(0.4)
    x = seeded_randn(64, 5, 12)
    assert_mean_is_eval_value(drop_path, lambda module: module(x[:8]))
    out = drop_path.train()(x)
    kept = out.flatten(1).ne(0).any(dim=1)
    assert 0 < kept.sum() < 64
    torch.testing.assert_close(out[kept], x[kept] / 0.6, rtol=0, atol=0)
    assert out[~kept].eq(0).all()


def test_stochastic_depth_rate_is_linear_over_depth():
    model = VisionTransformer(ViTConfig(**{**SMALL, "depth": 5}, stochastic_depth=0.2))
    rates = [(block.drop_path1.rate, block.drop_path2.rate) for block in model.blocks]
    assert rates == [(r, r) for r in model.cfg.drop_path_rates]  # SPEC's formula: tests/test_spec_doc.py


@pytest.mark.parametrize("pool", ["token", "map"])
def test_train_mode_gradients_flow(pool):
    cfg = ViTConfig(
        **SMALL, **RATES, pool=pool, num_registers=1, qk_norm=True, layer_scale=0.1, representation_size=7
    )
    model = loaded_model(cfg).train()
    images = nchw_images(cfg, 4).requires_grad_(True)
    torch.manual_seed(0)
    torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 3])).backward()
    # Softmax ignores a shift shared by all keys: k_norm's bias, added last to the keys, has no
    # gradient (the key halves of attn_pool.kv.bias neither, but its value half has).
    for name, p in [*model.named_parameters(), ("images", images)]:
        assert torch.isfinite(p.grad).all(), name
        if not name.endswith("attn.k_norm.bias"):
            assert p.grad.abs().max() > 0, name


@pytest.fixture
def fresh_dynamo():
    # Each (flags, train/eval) pair is its own graph; a shared cache would hit dynamo's
    # recompile limit across tests, which fullgraph=True turns into an error.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_cases():
    cfg = ViTConfig(
        **SMALL,
        pool="map",
        num_registers=1,
        qk_norm=True,
        layer_scale=0.1,
        posemb="sincos2d",
        posemb_on_cls=False,
        **RATES,
    )
    return loaded_model(cfg).float(), nchw_images(cfg, 2).float()


FLAGS = [
    {},
    {"intermediates": True},
    {"attention_maps": True},
    {"intermediates": True, "attention_maps": True},
]


@pytest.mark.parametrize("flags", FLAGS)
def test_compiles_without_graph_breaks(flags, fresh_dynamo):
    # backend="eager" traces with dynamo only: fullgraph=True raises on any graph break.
    model, images = compile_cases()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        got, expected = compiled.eval()(images, **flags), model.eval()(images, **flags)
        compiled.train()(images, **flags)
    if not flags:
        got, expected = {"logits": got}, {"logits": expected}
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_family_knobs_compile_without_graph_breaks(fresh_dynamo):
    cfg = ViTConfig(
        **SMALL,
        **RATES,
        distilled=True,
        pre_norm=True,
        patch_bias=False,
        gelu="quick",
        posemb="sinusoidal_1d",
    )
    model, images = loaded_model(cfg).float(), nchw_images(cfg, 2).float()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    flags = {"intermediates": True, "attention_maps": True}
    with torch.no_grad():
        got, expected = compiled.eval()(images, **flags), model.eval()(images, **flags)
        compiled.train()(images, **flags)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager(fresh_dynamo):
    model, images = compile_cases()
    compiled = torch.compile(model.eval(), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_from_checkpoint_returns_the_eval_model(tmp_path, suffix):
    cfg = ViTConfig(**SMALL, **RATES)
    params = random_params(cfg, 0, np.float32)
    path = tmp_path / f"model{suffix}"
    vitspec.save(path, cfg, params)
    model = from_checkpoint(path)
    assert not model.training and model.cfg == cfg
    images = random_images(cfg, 2, 1, np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    np.testing.assert_allclose(logits.numpy(), vitspec.forward(cfg, params, images), rtol=1e-4, atol=1e-5)


def test_wrong_image_shape_is_named():
    model = VisionTransformer(ViTConfig(**SMALL))
    with pytest.raises(ValueError, match=r"shape \(1, 4, 6, 3\).*\[N, 3, 4, 6\] \(NCHW\)"):
        model(torch.zeros(1, 4, 6, 3))


def test_bfloat16_autocast_patch_embedding_is_right_where_onednn_conv_is_not():
    # torch 2.13's CPU bfloat16 conv gives wrong values (NaN included) for this shape: the reason
    # PatchEmbed applies its conv weight as a matmul.
    cfg = ViTConfig(
        image_size=(2, 2),
        patch_size=(1, 2),
        in_channels=1,
        width=24,
        depth=1,
        num_heads=2,
        mlp_dim=32,
        num_classes=5,
    )
    model = VisionTransformer(cfg).eval()
    images = nchw_images(cfg, 3).float()
    with torch.no_grad():
        expected = model(images, intermediates=True)["patch_embed"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(images, intermediates=True)["patch_embed"]
    torch.testing.assert_close(got.float(), expected, rtol=0.02, atol=0.02)
