"""The Flax CaiT module: float64 parity with the reference, its big_vision-style tree and conversions,
training mode, and a training step.

Each parity config compiles one jitted function (named values and gradients together): compiling is
most of the cost, so the configs are few and each covers several knobs.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import vitspec
from backends.flax_vit import CaiT, VisionTransformer, cross_entropy, from_reference, module_for, to_reference
from backends.flax_vit.cait import ClassAttentionBlock
from parity_tests.cases import LABEL_SMOOTHING, Case, uses_cross_entropy
from parity_tests.strategies import random_images, random_params
from parity_tests.tolerances import assert_close_f64
from tests.test_training import write_fashion_mnist
from vitspec.app.convert import convert
from vitspec.app.training import TrainConfig, train_and_evaluate
from vitspec.formats import big_vision
from vitspec.formats.inference import LAYER_SCALE_PLACEHOLDER, reading_flags

SMALL = dict(
    image_size=(4, 6),
    patch_size=2,
    in_channels=2,
    width=12,
    num_heads=3,
    mlp_dim=8,
    num_classes=3,
    pool="token",
    posemb_on_cls=False,
)
CAITS = {
    "talking-2-class-blocks": vitspec.ViTConfig(
        **SMALL,
        depth=2,
        talking_heads=True,
        class_attention_depth=2,
        class_attention_mlp_dim=20,
        layer_scale=0.1,
    ),
    "plain-attention-no-biases-no-layerscale": vitspec.ViTConfig(
        **SMALL, depth=1, class_attention_depth=1, qkv_bias=False
    ),
    "tall-grid-sincos-tanh": vitspec.ViTConfig(
        **(SMALL | {"image_size": (9, 4), "patch_size": (3, 2)}),
        depth=1,
        talking_heads=True,
        class_attention_depth=2,
        qkv_bias=False,
        layer_scale=1e-5,
        posemb="sincos2d",
        gelu="tanh",
        ln_eps=1e-5,
    ),
    # Rates must not change the eval-mode function; no head: the objective is <cotangent, outputs>.
    "features-with-rates": vitspec.ViTConfig(
        **(SMALL | {"num_classes": 0}),
        depth=2,
        talking_heads=True,
        class_attention_depth=1,
        class_attention_mlp_dim=4,
        layer_scale=0.5,
        posemb="none",
        dropout=0.1,
        attention_dropout=0.1,
        stochastic_depth=0.1,
        drop_path_schedule="constant",
    ),
}
CAIT = CAITS["talking-2-class-blocks"]


def flax_float64(case: Case) -> tuple[dict, dict]:
    """Named values (intermediates and maps) and reference-named gradients, images' included."""
    cfg = case.cfg
    module = module_for(cfg, dtype=jnp.float64, param_dtype=jnp.float64)

    def objective(tree, images):
        named = module.apply({"params": tree}, images, intermediates=True, attention_maps=True)
        if uses_cross_entropy(cfg):
            return cross_entropy(named["logits"], case.labels, LABEL_SMOOTHING), named
        return jnp.sum(named["logits"] * case.cotangent), named

    with jax.enable_x64(True):
        (_, named), (grads, image_grads) = jax.jit(jax.value_and_grad(objective, (0, 1), has_aux=True))(
            from_reference(case.params, cfg)["params"], case.images
        )
        named = {k: np.asarray(v) for k, v in named.items()}
        return named, to_reference(grads, cfg) | {"images": np.asarray(image_grads)}


@pytest.mark.parametrize("cfg", CAITS.values(), ids=CAITS.keys())
def test_float64_matches_reference(cfg):
    case = Case(cfg, seed=3, batch=2)
    ref_named, ref_grads = case.reference(np.float64)
    named, grads = flax_float64(case)
    assert all(v.dtype == np.float64 for v in named.values())
    assert_close_f64(named, ref_named, "forward")
    assert_close_f64(grads, ref_grads, "grad")


def test_module_for_picks_cait_and_the_vit_module_refuses_a_cait_config():
    images = random_images(CAIT, 1, 0, np.float32)
    variables = from_reference(random_params(CAIT, 0, np.float32), CAIT)
    assert type(module_for(CAIT)) is CaiT
    assert (
        type(module_for(CAIT.replace(class_attention_depth=0, class_attention_mlp_dim=None)))
        is VisionTransformer
    )
    with pytest.raises(ValueError, match="CaiT"):
        VisionTransformer(CAIT).apply(variables, images)


BLOCK, CLASS_BLOCK = "Transformer/encoderblock_0", "Transformer/classblock_0"
ATTN, CLASS_ATTN = f"{BLOCK}/MultiHeadDotProductAttention_0", f"{CLASS_BLOCK}/MultiHeadDotProductAttention_0"
# One block of each kind, talking heads, LayerScale, a class MLP of its own width: written out by hand.
ONE_OF_EACH = CAIT.replace(depth=1, class_attention_depth=1)
ONE_OF_EACH_TREE = {
    "embedding/kernel": (2, 2, 2, 12),
    "embedding/bias": (12,),
    "cls": (1, 1, 12),
    "pos_embedding": (1, 6, 12),
    **{
        f"{BLOCK}/{norm}/{leaf}": (12,)
        for norm in ("LayerNorm_0", "LayerNorm_1")
        for leaf in ("scale", "bias")
    },
    **{f"{ATTN}/{proj}/kernel": (12, 3, 4) for proj in ("query", "key", "value")},
    **{f"{ATTN}/{proj}/bias": (3, 4) for proj in ("query", "key", "value")},
    **{f"{ATTN}/{talk}/kernel": (3, 3) for talk in ("talk_logits", "talk_weights")},
    **{f"{ATTN}/{talk}/bias": (3,) for talk in ("talk_logits", "talk_weights")},
    f"{ATTN}/out/kernel": (3, 4, 12),
    f"{ATTN}/out/bias": (12,),
    f"{BLOCK}/LayerScale_0/scale": (12,),
    f"{BLOCK}/MlpBlock_0/Dense_0/kernel": (12, 8),
    f"{BLOCK}/MlpBlock_0/Dense_0/bias": (8,),
    f"{BLOCK}/MlpBlock_0/Dense_1/kernel": (8, 12),
    f"{BLOCK}/MlpBlock_0/Dense_1/bias": (12,),
    f"{BLOCK}/LayerScale_1/scale": (12,),
    **{
        f"{CLASS_BLOCK}/{norm}/{leaf}": (12,)
        for norm in ("LayerNorm_0", "LayerNorm_1")
        for leaf in ("scale", "bias")
    },
    **{f"{CLASS_ATTN}/{proj}/kernel": (12, 3, 4) for proj in ("query", "key", "value")},
    **{f"{CLASS_ATTN}/{proj}/bias": (3, 4) for proj in ("query", "key", "value")},
    f"{CLASS_ATTN}/out/kernel": (3, 4, 12),
    f"{CLASS_ATTN}/out/bias": (12,),
    f"{CLASS_BLOCK}/LayerScale_0/scale": (12,),
    f"{CLASS_BLOCK}/MlpBlock_0/Dense_0/kernel": (12, 20),
    f"{CLASS_BLOCK}/MlpBlock_0/Dense_0/bias": (20,),
    f"{CLASS_BLOCK}/MlpBlock_0/Dense_1/kernel": (20, 12),
    f"{CLASS_BLOCK}/MlpBlock_0/Dense_1/bias": (12,),
    f"{CLASS_BLOCK}/LayerScale_1/scale": (12,),
    "Transformer/encoder_norm/scale": (12,),
    "Transformer/encoder_norm/bias": (12,),
    "head/kernel": (12, 3),
    "head/bias": (3,),
}


def module_tree(cfg) -> dict[str, tuple[int, ...]]:
    """The tree linen itself creates (nn.Module.init, which CaiT.init replaces), traced, not run."""
    images = random_images(cfg, 1, 0, np.float32)
    variables = jax.eval_shape(partial(nn.Module.init, CaiT(cfg)), jax.random.key(0), images)
    return {"/".join(path): v.shape for path, v in _flatten(variables["params"])}


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        yield from _flatten(value, (*prefix, key)) if isinstance(value, dict) else [((*prefix, key), value)]


def test_tree_is_big_vision_style_and_the_table_is_the_module_tree():
    assert module_tree(ONE_OF_EACH) == ONE_OF_EACH_TREE
    table = {rule.native: rule.native_shape for rule in big_vision.FLAX.table(ONE_OF_EACH)}
    assert table == ONE_OF_EACH_TREE
    for cfg in CAITS.values():
        assert module_tree(cfg) == {r.native: r.native_shape for r in big_vision.FLAX.table(cfg)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cfg", CAITS.values(), ids=CAITS.keys())
def test_reference_to_flax_to_reference_is_exact(cfg, dtype):
    params = random_params(cfg, 1, dtype)
    back = to_reference(from_reference(params, cfg), cfg)
    assert back.keys() == params.keys()
    for name, value in params.items():
        assert back[name].dtype == dtype
        np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.parametrize("suffix", [".msgpack", ".npz"])
def test_convert_to_flax_and_back_is_exact(tmp_path, capsys, suffix):
    src, native, back = tmp_path / "m.safetensors", tmp_path / f"m{suffix}", tmp_path / "back.safetensors"
    params = random_params(CAIT, 2)
    vitspec.save(src, CAIT, params)
    result = convert(src, native, to_fmt="flax", check=True)
    out = capsys.readouterr().out
    assert "backends.flax_vit" in out and "big_vision has no CaiT" in out
    assert result.max_logit_diff < 1e-12
    flags = reading_flags(CAIT)
    convert(native, back, source_image_size=flags.pop("image_size"), **flags)
    cfg, read = vitspec.load(back)
    # A file stores LayerScale's gammas, not their init value.
    assert cfg == CAIT.replace(layer_scale=LAYER_SCALE_PLACEHOLDER)
    for name, value in params.items():
        np.testing.assert_array_equal(read[name], value, err_msg=name)


def test_big_vision_construction_says_it_has_no_cait():
    assert big_vision.big_vision_construction(CAIT).startswith("no big_vision model: big_vision has no CaiT")
    vit = CAIT.replace(class_attention_depth=0, class_attention_mlp_dim=None)
    assert "talking heads" in big_vision.big_vision_construction(vit)


def test_outputs_have_the_reference_keys_and_shapes_in_the_computation_dtype():
    cfg = CAITS["tall-grid-sincos-tanh"]
    params, images = random_params(cfg, 0, np.float32), random_images(cfg, 2, 0, np.float32)
    module = CaiT(cfg, dtype=jnp.bfloat16)
    variables = jax.eval_shape(module.init, jax.random.key(0), images)
    assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    for intermediates, attention_maps in ((True, False), (False, True), (True, True)):
        flags = {"intermediates": intermediates, "attention_maps": attention_maps}
        named = jax.eval_shape(partial(module.apply, **flags), variables, images)
        ref = vitspec.forward(cfg, params, images, **flags)
        assert {k: v.shape for k, v in named.items()} == {k: v.shape for k, v in ref.items()}
        assert {v.dtype for v in named.values()} == {jnp.dtype(jnp.bfloat16)}


def test_train_mode_draws_masks_in_the_self_attention_blocks_only():
    cfg = CAIT.replace(dropout=0.3, attention_dropout=0.3, stochastic_depth=0.3)
    params, images = random_params(cfg, 0, np.float32), random_images(cfg, 4, 0, np.float32)
    module, variables = CaiT(cfg), from_reference(params, cfg)
    tree = variables["params"]

    @jax.jit
    def train_then_class_blocks_in_eval(key):
        named = module.apply(variables, images, train=True, rngs={"dropout": key}, intermediates=True)
        cls = jnp.broadcast_to(tree["cls"], (len(images), 1, cfg.width))
        x = named[f"block_{cfg.depth - 1}"]
        evaluated = []
        for j in range(cfg.class_attention_depth):
            block = ClassAttentionBlock(cfg)
            cls, _ = block.apply({"params": tree["Transformer"][f"classblock_{j}"]}, cls, x)
            evaluated.append(cls)
        return named, evaluated

    first, evaluated = train_then_class_blocks_in_eval(jax.random.key(0))
    other, _ = train_then_class_blocks_in_eval(jax.random.key(1))
    for i in range(cfg.depth):
        assert not np.array_equal(first[f"block_{i}"], other[f"block_{i}"])
    # Given the self-attention blocks' (random) output, the class blocks are their eval-mode function.
    for j, cls in enumerate(evaluated):
        np.testing.assert_allclose(first[f"class_block_{j}"], cls, rtol=1e-6, atol=1e-6)


def test_training_steps_move_every_parameter(tmp_path):
    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", train=40, test=10)
    overrides = {"depth": 1, "width": 16, "num_heads": 2, "mlp_dim": 32, "class_attention_depth": 1}
    run = TrainConfig(
        dataset="fashion-mnist",
        model="cait-fmnist",
        model_overrides=overrides,
        data_dir=tmp_path / "data",
        validation_size=8,
        batch_size=16,
        epochs=1,
        eval_batch_size=8,
        # The head starts at zero (big_vision's), so the first step's gradient reaches the head alone.
        max_steps=2,
    )
    summary = train_and_evaluate(run, tmp_path / "run", "flax")
    assert summary["steps_done"] == 2
    cfg, trained = vitspec.load(summary["checkpoint"])
    assert cfg == vitspec.variant("cait-fmnist", **overrides)
    initial = vitspec.init_params(cfg, run.seed)
    # A key bias adds q . b_k to a whole softmax row: its gradient is zero in exact math.
    moving = [name for name in trained if not name.endswith("attn/key/bias")]
    unmoved = [name for name in moving if np.array_equal(trained[name], initial[name])]
    assert not unmoved, f"two AdamW steps left {unmoved} unchanged"
