"""Every layout's names, shapes and array layouts, written out by hand; bit-exact round trips.

The fixtures below build each ecosystem's checkpoint from a random reference tree with the native
names and transforms spelled out literally (from timm's vision_transformer.py, big_vision's
models/vit.py, vision_transformer's vit_jax/models_vit.py as timm's `_load_weights` reads it,
and transformers' modeling_vit.py), not produced by the code under test. Then: the code under
test must write exactly that, read it back exactly, and the read tree must give the reference's
logits in the target ecosystem's backend (torch for timm/HF, flax for big_vision/vit_jax).

Long because the fixtures are the layouts written out literally, one per ecosystem, and the
tests run over all of them; that table is the point of the module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vitspec
from parity_tests.strategies import SMALL_FIELDS, configs, random_images, random_params
from parity_tests.tolerances import assert_close_f64
from tests.nearest import SUFFIX, expressible
from vitspec.config import ViTConfig
from vitspec.formats import EXTERNAL, FormatError, hf, load_any, save_any
from vitspec.formats.inference import reading_flags
from vitspec.params import param_shapes

# Width 12 is no standard ViT width, so torch and HF files need heads=3 as a flag.
SMALL = SMALL_FIELDS
QKV = ("query", "key", "value")


def ln(p, ref, native, weight="weight"):
    return {f"{native}.{weight}": p[f"{ref}/scale"], f"{native}.bias": p[f"{ref}/bias"]}


def linear(p, ref, native):  # torch Linear: weight [out, in]
    return {f"{native}.weight": p[f"{ref}/kernel"].T, f"{native}.bias": p[f"{ref}/bias"]}


def timm_native(p):
    """Registers, qk-norm, LayerScale, MAP pooling, fc_norm, pre-logits: timm names for all of them."""
    b = "blocks.0"
    return {
        "patch_embed.proj.weight": p["patch_embed/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": p["patch_embed/bias"],
        "reg_token": p["reg_tokens"].reshape(1, 2, 12),
        "pos_embed": p["pos_embed"].reshape(1, 4, 12),
        **ln(p, "blocks/0/norm1", f"{b}.norm1"),
        f"{b}.attn.qkv.weight": np.concatenate([p[f"blocks/0/attn/{n}/kernel"].T for n in QKV]),
        f"{b}.attn.qkv.bias": np.concatenate([p[f"blocks/0/attn/{n}/bias"] for n in QKV]),
        **ln(p, "blocks/0/attn/q_norm", f"{b}.attn.q_norm"),
        **ln(p, "blocks/0/attn/k_norm", f"{b}.attn.k_norm"),
        **linear(p, "blocks/0/attn/out", f"{b}.attn.proj"),
        f"{b}.ls1.gamma": p["blocks/0/ls1/scale"],
        **ln(p, "blocks/0/norm2", f"{b}.norm2"),
        **linear(p, "blocks/0/mlp/fc1", f"{b}.mlp.fc1"),
        **linear(p, "blocks/0/mlp/fc2", f"{b}.mlp.fc2"),
        f"{b}.ls2.gamma": p["blocks/0/ls2/scale"],
        "attn_pool.latent": p["map_head/probe"].reshape(1, 1, 12),
        **linear(p, "map_head/attn/query", "attn_pool.q"),
        "attn_pool.kv.weight": np.concatenate([p[f"map_head/attn/{n}/kernel"].T for n in ("key", "value")]),
        "attn_pool.kv.bias": np.concatenate([p[f"map_head/attn/{n}/bias"] for n in ("key", "value")]),
        **linear(p, "map_head/attn/out", "attn_pool.proj"),
        **ln(p, "map_head/norm", "attn_pool.norm"),
        **linear(p, "map_head/mlp/fc1", "attn_pool.mlp.fc1"),
        **linear(p, "map_head/mlp/fc2", "attn_pool.mlp.fc2"),
        **ln(p, "fc_norm", "fc_norm"),
        **linear(p, "pre_logits", "pre_logits.fc"),
        **linear(p, "head", "head"),
    }


def flax_dense(p, ref, native):
    return {f"{native}/kernel": p[f"{ref}/kernel"], f"{native}/bias": p[f"{ref}/bias"]}


def flax_ln(p, ref, native):
    return {f"{native}/scale": p[f"{ref}/scale"], f"{native}/bias": p[f"{ref}/bias"]}


def flax_attention(p, ref, native):  # q/k/v kernels [D, H, dh], biases [H, dh]; out [H, dh, D]
    tree = {}
    for n in QKV:
        tree[f"{native}/{n}/kernel"] = p[f"{ref}/{n}/kernel"].reshape(12, 3, 4)
        tree[f"{native}/{n}/bias"] = p[f"{ref}/{n}/bias"].reshape(3, 4)
    tree[f"{native}/out/kernel"] = p[f"{ref}/out/kernel"].reshape(3, 4, 12)
    tree[f"{native}/out/bias"] = p[f"{ref}/out/bias"]
    return tree


def big_vision_native(p):
    """big_vision's own model: MAP head, posemb on the patches only, pre-logits."""
    b = "Transformer/encoderblock_0"
    return {
        "embedding/kernel": p["patch_embed/kernel"],
        "embedding/bias": p["patch_embed/bias"],
        "pos_embedding": p["pos_embed"].reshape(1, 4, 12),
        **flax_ln(p, "blocks/0/norm1", f"{b}/LayerNorm_0"),
        **flax_attention(p, "blocks/0/attn", f"{b}/MultiHeadDotProductAttention_0"),
        **flax_ln(p, "blocks/0/norm2", f"{b}/LayerNorm_1"),
        **flax_dense(p, "blocks/0/mlp/fc1", f"{b}/MlpBlock_0/Dense_0"),
        **flax_dense(p, "blocks/0/mlp/fc2", f"{b}/MlpBlock_0/Dense_1"),
        **flax_ln(p, "norm", "Transformer/encoder_norm"),
        "MAPHead_0/probe": p["map_head/probe"].reshape(1, 1, 12),
        **flax_attention(p, "map_head/attn", "MAPHead_0/MultiHeadDotProductAttention_0"),
        **flax_ln(p, "map_head/norm", "MAPHead_0/LayerNorm_0"),
        **flax_dense(p, "map_head/mlp/fc1", "MAPHead_0/MlpBlock_0/Dense_0"),
        **flax_dense(p, "map_head/mlp/fc2", "MAPHead_0/MlpBlock_0/Dense_1"),
        **flax_dense(p, "pre_logits", "pre_logits"),
        **flax_dense(p, "head", "head"),
    }


def vit_jax_native(p):
    """vision_transformer's i21k-style model: class token, posemb on it, pre-logits."""
    b = "Transformer/encoderblock_0"
    return {
        "embedding/kernel": p["patch_embed/kernel"],
        "embedding/bias": p["patch_embed/bias"],
        "cls": p["cls_token"].reshape(1, 1, 12),
        "Transformer/posembed_input/pos_embedding": p["pos_embed"].reshape(1, 5, 12),
        **flax_ln(p, "blocks/0/norm1", f"{b}/LayerNorm_0"),
        **flax_attention(p, "blocks/0/attn", f"{b}/MultiHeadDotProductAttention_1"),
        **flax_ln(p, "blocks/0/norm2", f"{b}/LayerNorm_2"),
        **flax_dense(p, "blocks/0/mlp/fc1", f"{b}/MlpBlock_3/Dense_0"),
        **flax_dense(p, "blocks/0/mlp/fc2", f"{b}/MlpBlock_3/Dense_1"),
        **flax_ln(p, "norm", "Transformer/encoder_norm"),
        **flax_dense(p, "pre_logits", "pre_logits"),
        **flax_dense(p, "head", "head"),
    }


# The blocks' names in transformers 4.x and in today's transformers (>= 5, read off 5.23.0).
HF_BLOCK_NAMES = {
    "hf4": {
        "layer": "encoder.layer.0",
        "query": "attention.attention.query",
        "key": "attention.attention.key",
        "value": "attention.attention.value",
        "out": "attention.output.dense",
        "fc1": "intermediate.dense",
        "fc2": "output.dense",
    },
    "hf": {
        "layer": "layers.0",
        "query": "attention.q_proj",
        "key": "attention.k_proj",
        "value": "attention.v_proj",
        "out": "attention.o_proj",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
    },
}


def hf_native(p, prefix, naming="hf4"):
    """ViTForImageClassification (prefix 'vit.') or ViTModel (no prefix), in transformers 4.x or 5 names."""
    names = HF_BLOCK_NAMES[naming]
    e, layer = f"{prefix}embeddings", f"{prefix}{names['layer']}"
    tree = {
        f"{e}.cls_token": p["cls_token"].reshape(1, 1, 12),
        f"{e}.position_embeddings": p["pos_embed"].reshape(1, 5, 12),
        f"{e}.patch_embeddings.projection.weight": p["patch_embed/kernel"].transpose(3, 2, 0, 1),
        f"{e}.patch_embeddings.projection.bias": p["patch_embed/bias"],
        **ln(p, "blocks/0/norm1", f"{layer}.layernorm_before"),
        **linear(p, "blocks/0/attn/query", f"{layer}.{names['query']}"),
        **linear(p, "blocks/0/attn/key", f"{layer}.{names['key']}"),
        **linear(p, "blocks/0/attn/value", f"{layer}.{names['value']}"),
        **linear(p, "blocks/0/attn/out", f"{layer}.{names['out']}"),
        **ln(p, "blocks/0/norm2", f"{layer}.layernorm_after"),
        **linear(p, "blocks/0/mlp/fc1", f"{layer}.{names['fc1']}"),
        **linear(p, "blocks/0/mlp/fc2", f"{layer}.{names['fc2']}"),
        **ln(p, "norm", f"{prefix}layernorm"),
    }
    if "head/kernel" in p:
        tree |= linear(p, "head", "classifier")
    if "pre_logits/kernel" in p:
        tree |= linear(p, "pre_logits", f"{prefix}pooler.dense")
    return tree


def save_torch(path, native):
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in native.items()}
    torch.save({"state_dict": tensors}, path)


def save_npz(prefix):
    return lambda path, native: np.savez(path, **{prefix + k: v for k, v in native.items()})


def save_safetensors(path, native):
    from safetensors.numpy import save_file  # the package as the oracle of the file format

    save_file({k: np.ascontiguousarray(v) for k, v in native.items()}, str(path))


FIXTURES = {
    # name: (format, config overrides, native builder, writer, file name, flags for reading)
    "timm, every knob": (
        "torch",
        dict(
            pool="map",
            class_token=False,
            num_registers=2,
            posemb_on_cls=False,
            qk_norm=True,
            layer_scale=0.1,
            fc_norm=True,
            representation_size=7,
        ),
        timm_native,
        save_torch,
        "model.pth",
        dict(heads=3, image_size=SMALL["image_size"]),
    ),
    "big_vision MAP": (
        "flax",
        dict(pool="map", class_token=False, posemb_on_cls=False, representation_size=7, gelu="tanh"),
        big_vision_native,
        save_npz("params/"),
        "bv.npz",
        {},
    ),
    "vision_transformer i21k": (
        "vit_jax",
        dict(representation_size=7, gelu="tanh"),
        vit_jax_native,
        save_npz(""),
        "ViT-Ti_16.npz",
        {},
    ),
    "HF 4.x ViTForImageClassification": (
        "hf4",
        dict(ln_eps=1e-12),
        lambda p: hf_native(p, "vit."),
        save_safetensors,
        "model.safetensors",
        dict(heads=3),
    ),
    "HF 4.x ViTModel with pooler": (
        "hf4",
        dict(ln_eps=1e-12, num_classes=0, representation_size=12),
        lambda p: hf_native(p, ""),
        save_torch,
        "pytorch_model.bin",
        dict(heads=3),
    ),
    "HF ViTForImageClassification": (
        "hf",
        dict(ln_eps=1e-12),
        lambda p: hf_native(p, "vit.", "hf"),
        save_safetensors,
        "model.safetensors",
        dict(heads=3),
    ),
    "HF ViTModel with pooler": (
        "hf",
        dict(ln_eps=1e-12, num_classes=0, representation_size=12),
        lambda p: hf_native(p, "", "hf"),
        save_torch,
        "pytorch_model.bin",
        dict(heads=3),
    ),
}


def backend_logits(fmt, cfg, params, native, images):
    """Logits in the target ecosystem's backend (both are installed by the test set-up)."""
    if fmt in ("torch", "hf", "hf4"):
        return torch_logits(fmt, cfg, params, native, images)
    return flax_logits(fmt, cfg, params, native, images)


def torch_logits(fmt, cfg, params, native, images):
    from backends import torch_vit

    model = torch_vit.VisionTransformer(cfg).double().eval()
    # timm files load as they are: their names are the model's own.
    state = native if fmt == "torch" else torch_vit.from_reference(params, cfg)
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)).double() for k, v in state.items()})
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def flax_logits(fmt, cfg, params, native, images):
    import jax
    from flax import traverse_util

    from backends import flax_vit

    # big_vision trees load as they are: their paths are the module's own.
    variables = (
        {"params": traverse_util.unflatten_dict(native, sep="/")}
        if fmt == "flax"
        else flax_vit.from_reference(params, cfg)
    )
    with jax.enable_x64(True):
        return np.asarray(flax_vit.VisionTransformer(config=cfg).apply(variables, images))


@pytest.mark.parametrize("name", list(FIXTURES))
def test_written_out_fixture_converts_exactly(name, tmp_path):
    fmt, overrides, build, write, file_name, flags = FIXTURES[name]
    cfg = ViTConfig(**{**SMALL, **overrides})
    params = random_params(cfg, 0)
    native = build(params)

    written = EXTERNAL[fmt].from_reference(params, cfg)
    assert sorted(written) == sorted(native)
    for key, value in native.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
        assert written[key].shape == value.shape, key

    path = tmp_path / file_name
    write(path, native)
    loaded_cfg, loaded = load_any(path, gelu=cfg.gelu, ln_eps=cfg.ln_eps, **flags)
    assert loaded_cfg.replace(layer_scale=cfg.layer_scale) == cfg
    for key, value in params.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)

    images = random_images(cfg, 2, 1)
    assert_close_f64(
        {"logits": backend_logits(fmt, loaded_cfg, loaded, native, images)},
        {"logits": vitspec.forward(cfg, params, images)},
        "forward",
    )


@pytest.mark.parametrize("fmt", sorted(EXTERNAL))
@given(cfg=configs(), dtype=st.sampled_from([np.float32, np.float64]))
def test_reference_to_format_to_reference_is_bit_exact(fmt, cfg, dtype):
    cfg = expressible(fmt, cfg)
    params = random_params(cfg, 0, dtype)
    back = EXTERNAL[fmt].to_reference(EXTERNAL[fmt].from_reference(params, cfg), cfg)
    assert list(back) == list(params)
    for key, value in params.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("fmt", sorted(SUFFIX))
@given(cfg=configs())
def test_file_round_trip_gives_back_the_model(tmp_path_factory, fmt, cfg):
    cfg = expressible(fmt, cfg)
    params = random_params(cfg, 0)
    path = tmp_path_factory.mktemp(fmt) / f"model{SUFFIX[fmt]}"
    save_any(path, fmt, cfg, params)
    loaded_cfg, loaded = load_any(path, **reading_flags(cfg))
    assert param_shapes(loaded_cfg) == param_shapes(cfg)
    for key, value in params.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    images = random_images(cfg, 1, 0)
    np.testing.assert_array_equal(
        vitspec.forward(loaded_cfg, loaded, images), vitspec.forward(cfg, params, images)
    )


REFUSALS = [
    ("vit_jax", dict(num_registers=1), "no register tokens"),
    ("vit_jax", dict(pool="map"), "no MAP pooling"),
    ("vit_jax", dict(pool="gap", class_token=True), "'gap' models have no class token"),
    ("vit_jax", dict(posemb="sincos2d", posemb_on_cls=False), "always learned"),
    ("vit_jax", dict(posemb_on_cls=False), "always covers the class token"),
    ("vit_jax", dict(qkv_bias=False), "q/k/v always have biases"),
    ("vit_jax", dict(qk_norm=True), "no qk-norm"),
    ("vit_jax", dict(layer_scale=0.1), "no LayerScale"),
    ("vit_jax", dict(fc_norm=True), "no fc_norm"),
    ("hf", dict(num_registers=2), "no register tokens"),
    ("hf", dict(pool="map"), "read the class token (config: pool='map')"),
    ("hf", dict(pool="gap", class_token=False), "always has a class token"),
    ("hf", dict(qk_norm=True), "no qk-norm"),
    ("hf", dict(layer_scale=1e-5), "no LayerScale"),
    ("hf", dict(fc_norm=True), "no fc_norm"),
    ("hf", dict(posemb_on_cls=False), "always covers the class token"),
    ("hf", dict(representation_size=7, num_classes=0), "pooler is width x width"),
    ("hf", dict(representation_size=12), "ViTForImageClassification has no pooler"),
]


@pytest.mark.parametrize("fmt, overrides, reason", REFUSALS)
def test_config_the_format_cannot_express_is_refused_with_the_reason(fmt, overrides, reason):
    cfg = ViTConfig(**{**SMALL, "pool": "token", **overrides})
    params = random_params(cfg, 0)
    with pytest.raises(FormatError, match=f"the {fmt} layout cannot express this config") as error:
        EXTERNAL[fmt].from_reference(params, cfg)
    assert reason in str(error.value)


def test_every_reason_is_listed_at_once():
    cfg = ViTConfig(**SMALL, num_registers=1, qk_norm=True, layer_scale=0.1)
    with pytest.raises(FormatError) as error:
        EXTERNAL["hf"].from_reference(random_params(cfg, 0), cfg)
    for reason in ("no register tokens", "no qk-norm", "no LayerScale"):
        assert reason in str(error.value)


@given(configs())
def test_backends_write_the_same_trees_as_the_formats(cfg):
    """The torch and flax backends' own converters and vitspec.formats name and lay out alike."""
    torch_vit = pytest.importorskip("backends.torch_vit")
    flax_vit = pytest.importorskip("backends.flax_vit")
    from flax import traverse_util

    params = random_params(cfg, 0)
    for backend_tree, fmt in (
        ({k: v.numpy() for k, v in torch_vit.from_reference(params, cfg).items()}, "torch"),
        (traverse_util.flatten_dict(flax_vit.from_reference(params, cfg)["params"], sep="/"), "flax"),
    ):
        ours = EXTERNAL[fmt].from_reference(params, cfg)
        assert sorted(backend_tree) == sorted(ours), fmt
        for key, value in ours.items():
            np.testing.assert_array_equal(np.asarray(backend_tree[key]), value, err_msg=f"{fmt} {key}")
            assert np.shape(backend_tree[key]) == value.shape, f"{fmt} {key}"


def test_either_transformers_naming_reads_as_the_other():
    cfg = ViTConfig(
        image_size=(4, 4),
        patch_size=2,
        width=12,
        depth=1,
        num_heads=3,
        mlp_dim=8,
        num_classes=3,
        ln_eps=1e-12,
    )
    params = random_params(cfg, 0)
    today, old = EXTERNAL["hf"], EXTERNAL["hf4"]
    for writer, reader in ((today, old), (old, today)):
        native = writer.from_reference(params, cfg)
        back = reader.to_reference(native, cfg)
        assert all(np.array_equal(back[k], params[k]) for k in params)
    assert "vit.layers.0.attention.q_proj.weight" in today.from_reference(params, cfg)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in old.from_reference(params, cfg)


@pytest.mark.parametrize(
    "act, form", [("gelu", "exact"), ("gelu_pytorch_tanh", "tanh"), ("gelu_new", "tanh")]
)
def test_transformers_hidden_act_names_read_as_their_gelu_form(act, form):
    assert hf.stated_fields({"model_type": "vit", "hidden_act": act}, "config.json")["gelu"] == form


def test_an_unknown_hidden_act_is_refused_by_name():
    with pytest.raises(FormatError, match=r"config.json: hidden_act 'quick_gelu' is none of"):
        hf.stated_fields({"model_type": "vit", "hidden_act": "quick_gelu"}, "config.json")
