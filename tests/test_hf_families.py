"""The transformers families (DeiT with teacher, CLIP vision, SigLIP vision, DINOv2 with and without
registers) against transformers' own classes (5.23.0 here), in float64.

Each tiny model is built by transformers with random weights, saved with `save_pretrained`, converted
by `vitspec.convert` (the library function behind `vitspec convert`) and run by the reference: its
output must be transformers' (logits, image_embeds, pooler_output or last_hidden_state) to 1e-12
relative. Written back (`--to hf_*`), transformers loads every tensor it expects and computes the same.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

import vitspec
from tests.backend_outputs import three_outputs
from vitspec.app.convert_check import transformers_output
from vitspec.formats import FormatError, load_with_notes, save_any
from vitspec.formats.flags import given_values

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
REL = 1e-12


def _families():
    t = transformers
    return {
        "deit": (
            t.DeiTForImageClassificationWithTeacher,
            t.DeiTConfig(**SIZES, intermediate_size=48, num_labels=5),
        ),
        "deit_features": (
            t.DeiTForImageClassificationWithTeacher,
            t.DeiTConfig(**SIZES, intermediate_size=48, num_labels=0),
        ),
        "clip": (t.CLIPVisionModel, t.CLIPVisionConfig(**SIZES, intermediate_size=48)),
        "clip_projection": (
            t.CLIPVisionModelWithProjection,
            t.CLIPVisionConfig(**SIZES, intermediate_size=48, projection_dim=16),
        ),
        "siglip": (t.SiglipVisionModel, t.SiglipVisionConfig(**SIZES, intermediate_size=48)),
        "siglip_no_head": (
            t.SiglipVisionModel,
            t.SiglipVisionConfig(**SIZES, intermediate_size=48, vision_use_head=False),
        ),
        "dinov2": (t.Dinov2Model, t.Dinov2Config(**SIZES, mlp_ratio=2)),
        "dinov2_registers": (
            t.Dinov2WithRegistersModel,
            t.Dinov2WithRegistersConfig(**SIZES, mlp_ratio=2, num_register_tokens=3),
        ),
    }


FORMAT_OF = {
    "deit": "hf_deit",
    "deit_features": "hf_deit",
    "clip": "hf_clip",
    "clip_projection": "hf_clip",
    "siglip": "hf_siglip",
    "siglip_no_head": "hf_siglip",
    "dinov2": "hf_dinov2",
    "dinov2_registers": "hf_dinov2",
}


def random_model(name: str, seed: int = 0):
    """transformers' model in float64 with every parameter random (its init zeroes tokens and heads)."""
    cls, config = _families()[name]
    torch.manual_seed(seed)
    model = cls(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def images(n: int = 2, size: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3))


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("name", list(FORMAT_OF))
def test_the_reference_and_both_backends_compute_what_transformers_does(name, tmp_path):
    model = random_model(name)
    model.save_pretrained(tmp_path / name)
    vitspec.convert(tmp_path / name, tmp_path / "ref.safetensors", out=io.StringIO())
    cfg, params = vitspec.load(tmp_path / "ref.safetensors")
    x = images()
    expected = transformers_output(model, x)
    for who, got in three_outputs(cfg, params, x).items():
        error = relative_error(got, expected)
        assert error <= REL, f"{who} on {name}: relative error {error:.3g}"
    assert load_with_notes(tmp_path / name).fmt == FORMAT_OF[name]


@pytest.mark.parametrize("name", list(FORMAT_OF))
def test_written_back_transformers_loads_every_tensor_and_computes_the_same(name, tmp_path):
    model = random_model(name, seed=2)
    model.save_pretrained(tmp_path / "source")
    loaded = load_with_notes(tmp_path / "source")
    save_any(tmp_path / "back", loaded.fmt, loaded.cfg, loaded.params)
    architecture = json.loads((tmp_path / "back" / "config.json").read_text())["architectures"][0]
    assert architecture == type(model).__name__
    back, info = getattr(transformers, architecture).from_pretrained(
        tmp_path / "back", dtype=torch.float64, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    x = images(seed=3)
    error = relative_error(transformers_output(back.eval(), x), transformers_output(model, x))
    assert error <= REL, f"{name}: relative error {error:.3g}"
    again = load_with_notes(tmp_path / "back")  # ours -> transformers -> ours: the same tree, bit for bit
    assert again.cfg == loaded.cfg
    assert all(np.array_equal(again.params[k], loaded.params[k]) for k in loaded.params)


TEXT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, vocab_size=64)


@pytest.mark.parametrize(
    "model_class, config_class", [("CLIPModel", "CLIPConfig"), ("SiglipModel", "SiglipConfig")]
)
def test_a_two_tower_directory_is_read_as_its_image_tower(model_class, config_class, tmp_path):
    vision = {**SIZES, "intermediate_size": 48}
    config = getattr(transformers, config_class)(
        vision_config=vision, text_config={**TEXT, "bos_token_id": 0}
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "two")
    loaded = load_with_notes(tmp_path / "two")
    assert any(note.keyword == "tower" and "text_model" in note.why for note in loaded.notes)
    x = images()
    with torch.no_grad():
        features = model.get_image_features(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    expected = getattr(features, "pooler_output", features).numpy()
    error = relative_error(vitspec.forward(loaded.cfg, loaded.params, x), expected)
    assert error <= REL, f"{model_class}: relative error {error:.3g}"


def test_folding_the_class_row_into_the_class_token_is_exact_at_another_image_size():
    """DINOv2 with registers: the class row is never resampled, so the folded class token (ours) and
    transformers' class token + class row agree at any size; here 48x48 against 32x32 trained rows,
    the patch rows taken from transformers' own interpolate_pos_encoding."""
    model = random_model("dinov2_registers")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    fmt = vitspec.formats.EXTERNAL["hf_dinov2"]
    cfg, _ = fmt.read_config(state, given_values({"heads": 4}))
    params = fmt.to_reference(state, cfg)
    size = 48
    tokens = torch.zeros(1, 1 + (size // 8) ** 2, cfg.width, dtype=torch.float64)
    with torch.no_grad():
        resampled = model.embeddings.interpolate_pos_encoding(tokens, size, size).numpy()
    assert np.array_equal(resampled[0, 0], state["embeddings.position_embeddings"][0, 0])  # never resampled
    big = cfg.replace(image_size=size)
    params = {**params, "pos_embed": resampled[0, 1:]}
    x = images(size=size)
    error = relative_error(vitspec.forward(big, params, x), transformers_output(model, x))
    assert error <= REL, f"relative error {error:.3g}"


@pytest.mark.parametrize("name", list(FORMAT_OF))
def test_a_weights_file_alone_is_told_by_its_names_with_the_conventions_noted(name, tmp_path):
    model = random_model(name)
    model.save_pretrained(tmp_path)
    with pytest.raises(FormatError, match="--heads"):  # width 32 is no standard ViT's
        load_with_notes(tmp_path / "model.safetensors")
    loaded = load_with_notes(tmp_path / "model.safetensors", heads=4)
    assert loaded.fmt == FORMAT_OF[name]
    unsettled = [note.settle for note in loaded.notes if note.settle]
    # what a file cannot show is its family's convention (its transformers config's defaults), noted
    gelu = {"gelu": "exact", "quick_gelu": "quick", "gelu_pytorch_tanh": "tanh"}[model.config.hidden_act]
    assert f"--gelu {gelu}" in unsettled and f"--ln-eps {model.config.layer_norm_eps:g}" in unsettled
    x = images()
    assert relative_error(vitspec.forward(loaded.cfg, loaded.params, x), transformers_output(model, x)) <= REL


OLD_NAMES = {  # transformers 4.x's names of today's (what its conversion_mapping renames on load)
    "deit": [
        (".layers.", ".encoder.layer."),
        ("attention.q_proj", "attention.attention.query"),
        ("attention.k_proj", "attention.attention.key"),
        ("attention.v_proj", "attention.attention.value"),
        ("attention.o_proj", "attention.output.dense"),
        ("mlp.fc1", "intermediate.dense"),
        ("mlp.fc2", "output.dense"),
    ],
    "dinov2": [
        ("attention.q_proj", "attention.attention.query"),
        ("attention.k_proj", "attention.attention.key"),
        ("attention.v_proj", "attention.attention.value"),
        ("attention.o_proj", "attention.output.dense"),
    ],
}


@pytest.mark.parametrize("name", list(OLD_NAMES))
def test_transformers_4_names_are_read_too(name, tmp_path):
    from safetensors.numpy import save_file

    model = random_model(name)
    state = {}
    for key, value in model.state_dict().items():
        for today, old in OLD_NAMES[name]:
            key = key.replace(today, old)
        state[key] = value.numpy()
    assert not any("q_proj" in key for key in state)
    save_file(state, tmp_path / "model.safetensors")
    loaded = load_with_notes(tmp_path / "model.safetensors", heads=4)
    assert loaded.fmt == FORMAT_OF[name]
    x = images()
    assert relative_error(vitspec.forward(loaded.cfg, loaded.params, x), transformers_output(model, x)) <= REL


def _directory(tmp_path, name: str, **config_changes):
    random_model(name).save_pretrained(tmp_path / name)
    path = tmp_path / name / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return tmp_path / name


@pytest.mark.parametrize(
    "name, changes, reason",
    [
        ("deit", {"architectures": ["DeiTForImageClassification"]}, "averages the heads of both tokens"),
        ("deit", {"architectures": ["DeiTModel"]}, "tanh layer on the class token alone"),
        ("clip", {"architectures": ["CLIPForImageClassification"]}, "mean of the patch tokens"),
        ("siglip", {"architectures": ["SiglipForImageClassification"]}, "leaves the attention-pooling head"),
        ("dinov2", {"architectures": ["Dinov2ForImageClassification"]}, r"\[class token, mean of the patch"),
        ("dinov2", {"use_swiglu_ffn": True}, "SwiGLU feed-forward"),
        ("dinov2", {"model_type": "beit"}, "model_type 'beit' is none of"),
    ],
)
def test_a_directory_of_an_architecture_we_cannot_compute_is_refused_with_the_reason(
    name, changes, reason, tmp_path
):
    with pytest.raises(FormatError, match=reason):
        load_with_notes(_directory(tmp_path, name, **changes))


def test_a_deit_with_one_classifier_is_refused_by_its_names(tmp_path):
    config = transformers.DeiTConfig(**SIZES, intermediate_size=48, num_labels=5)
    transformers.DeiTForImageClassification(config).save_pretrained(tmp_path)
    with pytest.raises(
        FormatError, match="DeiTForImageClassification checkpoint cannot be read: one classifier"
    ):
        load_with_notes(tmp_path / "model.safetensors", heads=4)


def test_swiglu_weights_are_refused_by_their_names():
    state = {k: v.numpy() for k, v in random_model("dinov2").state_dict().items()}
    state["encoder.layer.0.mlp.weights_in.weight"] = np.zeros((8, 32))
    with pytest.raises(FormatError, match="SwiGLU"):
        vitspec.formats.EXTERNAL["hf_dinov2"].read_config(state, {})


BASE = dict(image_size=16, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32, num_classes=0)


@pytest.mark.parametrize(
    "fmt, config, reasons",
    [
        ("hf_deit", dict(num_classes=3), ["distilled=True"]),
        (
            "hf_clip",
            dict(image_size=(16, 24)),
            ["pre_norm=True", "patch_bias=False", "image_size is one int"],
        ),
        ("hf_siglip", dict(pool="token", num_classes=3), ["pool='token'", "no classifier", "no class token"]),
        ("hf_dinov2", dict(num_registers=2, layer_scale=1.0), ["registers have no position rows"]),
        # 22 x (30 / 22) is 29.999...: no float mlp_ratio gives 30
        ("hf_dinov2", dict(width=22, mlp_dim=30), ["LayerScale", "int(hidden_size x mlp_ratio)"]),
        ("hf", dict(distilled=True, num_classes=2), ["no distillation token"]),
    ],
)
def test_what_a_family_cannot_express_is_refused_before_writing_with_every_reason(
    fmt, config, reasons, tmp_path
):
    cfg = vitspec.ViTConfig(**{**BASE, **config})
    with pytest.raises(FormatError) as refused:
        save_any(tmp_path / "out", fmt, cfg, vitspec.init_params(cfg))
    for reason in reasons:
        assert reason in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_a_clip_head_with_a_bias_is_not_written_as_a_projection_without_one(tmp_path):
    model = random_model("clip_projection")
    model.save_pretrained(tmp_path / "source")
    loaded = load_with_notes(tmp_path / "source")
    assert not loaded.params["head/bias"].any()  # read as a zero bias
    params = {**loaded.params, "head/bias": np.full(16, 0.5)}
    with pytest.raises(FormatError, match=r"head/bias is not zero \(max \|value\| 0.5\)"):
        save_any(tmp_path / "back", "hf_clip", loaded.cfg, params)
