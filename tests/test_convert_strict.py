"""Every value a reading infers is a note naming the flag that settles it; --strict refuses the unsettled.

Each case writes a checkpoint lacking something (a head, q/k/v biases, a class token, ...) or not
storing it (GELU form, eps, grid), then reads it: without --strict the note says what was inferred
and from what; with --strict the CLI exits 2 with `error: ...` naming the field and the flag, and
the Python API raises StrictError; passing the flags it names converts. Also: what the format
itself settles, the formats' conventions that make a missing name an error, a transformers
directory's config.json, and the refusal of pickles that hold Python objects.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vitspec
from parity_tests.strategies import random_params
from vitspec.app.convert import convert, main
from vitspec.config import ViTConfig
from vitspec.formats import StrictError, load_any, load_with_notes, save_any
from vitspec.formats.checkpoint import CheckpointError
from vitspec.formats.strict import unsettled

# Width 12 is no standard ViT width, so torch and HF files are read with --heads 3 (a flag: settled).
SMALL = ViTConfig(
    image_size=(4, 6), patch_size=(2, 3), width=12, depth=2, num_heads=3, mlp_dim=20, num_classes=5
)
ROOT = Path(__file__).resolve().parents[1]
SUFFIX = {"torch": ".pt", "flax": ".npz", "vit_jax": ".npz", "hf": ".safetensors"}
BIG_VISION = dict(posemb_on_cls=False)  # big_vision's convention, which its files are read by

# (format, config overrides, the reading, why it was inferred, the flag that settles it)
NO_POSEMB = dict(posemb="none", patch_size=2, image_size=4)  # 224 divides into its patches
QUERY_LN = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query_ln/scale"
INFERENCES = [
    ("torch", dict(num_classes=0), "num_classes 0", "no head.weight, head.bias (a feature extractor)",
     "--num-classes 0"),
    ("torch", dict(qkv_bias=False), "qkv_bias False", "no blocks.0.attn.qkv.bias, blocks.1.attn.qkv.bias",
     "--no-qkv-bias"),
    ("torch", dict(class_token=False, pool="gap"), "class_token False", "no cls_token", "--no-class-token"),
    ("torch", {}, "representation_size None", "no pre_logits.fc.weight, pre_logits.fc.bias",
     "--representation-size 0"),
    ("torch", {}, "num_registers 0", "no reg_token (no register tokens)", "--registers 0"),
    ("torch", {}, "qk_norm False", "no blocks.0.attn.q_norm.weight", "--no-qk-norm"),
    ("torch", {}, "layer_scale None", "no blocks.0.ls1.gamma, blocks.0.ls2.gamma and 2 more",
     "--no-layer-scale"),
    ("torch", {}, "pool token", "a class token and no attention pool", "--pool token"),
    ("torch", dict(fc_norm=True, pool="gap"), "pool gap", "fc_norm and no attention pool", "--pool gap"),
    ("torch", {}, "patch grid 2x2", "the square grid that the 5-row position embedding",
     "--source-image-size 4,6"),
    ("torch", {}, "gelu exact", "not stored; timm's convention", "--gelu exact"),
    ("torch", {}, "ln_eps 1e-06", "not stored; timm's convention", "--ln-eps 1e-06"),
    ("torch", NO_POSEMB, "posemb none", "timm's convention", "--posemb none"),
    ("torch", NO_POSEMB, "image size 224", "no position embedding", "--source-image-size 224,224"),
    ("torch", dict(width=192, mlp_dim=8), "heads 3", "the standard ViT of width 192 has 3", "--heads 3"),
    ("flax", dict(num_classes=0, **BIG_VISION), "num_classes 0", "no head/kernel, head/bias",
     "--num-classes 0"),
    ("flax", dict(NO_POSEMB, posemb="sincos2d", **BIG_VISION), "posemb sincos2d", "big_vision's convention",
     "--posemb sincos2d"),
    ("flax", BIG_VISION, "qk_norm False", QUERY_LN, "--no-qk-norm"),
    ("vit_jax", dict(num_classes=0), "num_classes 0", "no head/kernel, head/bias", "--num-classes 0"),
    ("vit_jax", {}, "gelu tanh", "vision_transformer's convention", "--gelu tanh"),
    ("hf", dict(num_classes=0), "num_classes 0", "no classifier.weight, classifier.bias", "--num-classes 0"),
    ("hf", dict(num_classes=0), "representation_size None", "no pooler.dense.weight, pooler.dense.bias",
     "--representation-size 0"),
    ("hf", dict(num_classes=0), "pool token", "a class token and no attention pool", "--pool token"),
    ("hf", {}, "ln_eps 1e-12", "Hugging Face's convention", "--ln-eps 1e-12"),
]  # fmt: skip
IDS = [f"{fmt}-{reading}-{'-'.join(overrides)}" for fmt, overrides, reading, _, _ in INFERENCES]


def checkpoint(tmp_path: Path, fmt: str, cfg: ViTConfig) -> Path:
    path = tmp_path / f"model{SUFFIX[fmt]}"
    save_any(path, fmt, cfg, random_params(cfg, 0))
    return path


def heads_flag(fmt: str, cfg: ViTConfig) -> dict:
    return {"heads": cfg.num_heads} if fmt in ("torch", "hf") and cfg.width == 12 else {}


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_flags(flags: dict) -> list[str]:
    return [a for k, v in flags.items() for a in (f"--{k}", str(v))]


@pytest.mark.parametrize("fmt, overrides, reading, why, flag", INFERENCES, ids=IDS)
def test_without_strict_each_inference_is_a_note(tmp_path, capsys, fmt, overrides, reading, why, flag):
    cfg = SMALL.replace(**overrides)
    path = checkpoint(tmp_path, fmt, cfg)
    notes = load_with_notes(path, fmt, **heads_flag(fmt, cfg)).notes
    [note] = [n for n in notes if n.reading == reading]
    assert why in note.why and note.settle == flag
    code, out, _ = cli(
        capsys, path, tmp_path / "out.safetensors", "--from", fmt, *cli_flags(heads_flag(fmt, cfg))
    )
    assert code == 0
    assert f"  {reading}: " in out and why in out and f"({flag} settles it)" in out
    assert f"--strict refuses them unless settled: {' '.join(unsettled(notes))}" in out


@pytest.mark.parametrize("fmt, overrides, reading, why, flag", INFERENCES, ids=IDS)
def test_strict_refuses_each_inference_naming_its_flag(tmp_path, capsys, fmt, overrides, reading, why, flag):
    cfg = SMALL.replace(**overrides)
    path = checkpoint(tmp_path, fmt, cfg)
    argv = [path, tmp_path / "out.safetensors", "--from", fmt, "--strict", *cli_flags(heads_flag(fmt, cfg))]
    code, _, err = cli(capsys, *argv)
    assert code == 2 and err.startswith(f"error: {path}: --strict")
    assert f"{reading}: " in err and why in err and f"[{flag}]" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(StrictError, match="--strict") as error:
        load_any(path, fmt, strict=True, **heads_flag(fmt, cfg))
    assert isinstance(error.value, ValueError)
    assert f"{reading}: " in str(error.value) and f"[{flag}]" in str(error.value)


@pytest.mark.parametrize("fmt, overrides, reading, why, flag", INFERENCES, ids=IDS)
def test_the_flags_strict_names_settle_it(tmp_path, capsys, fmt, overrides, reading, why, flag):
    cfg = SMALL.replace(**overrides)
    path = checkpoint(tmp_path, fmt, cfg)
    flags = unsettled(load_with_notes(path, fmt, **heads_flag(fmt, cfg)).notes)
    assert flag in flags
    argv = [path, tmp_path / "out.safetensors", "--from", fmt, "--strict", *cli_flags(heads_flag(fmt, cfg))]
    code, out, err = cli(capsys, *argv, *" ".join(flags).split())
    assert (code, err) == (0, "")
    assert "settles it" not in out and "inferred" not in out


def test_the_installed_command_exits_2_with_one_error_paragraph(tmp_path):
    path = checkpoint(tmp_path, "torch", SMALL.replace(num_classes=0))
    argv = [
        sys.executable,
        "-m",
        "vitspec",
        "convert",
        str(path),
        str(tmp_path / "o.safetensors"),
        "--strict",
    ]
    result = subprocess.run([*argv, "--heads", "3"], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {path}: --strict")
    assert "num_classes 0: the checkpoint has no head.weight, head.bias" in result.stderr
    assert "[--num-classes 0]" in result.stderr and len(result.stderr.splitlines()) == 1


def test_python_api_takes_the_same_flags_as_keywords(tmp_path):
    cfg = SMALL.replace(num_classes=0, qkv_bias=False, class_token=False, pool="gap")
    path = checkpoint(tmp_path, "torch", cfg)
    keywords = dict(
        heads=3, pool="gap", gelu="exact", ln_eps=1e-6, num_classes=0, representation_size=0,
        class_token=False, num_registers=0, qkv_bias=False, qk_norm=False, layer_scale=False,
    )  # fmt: skip
    loaded, _ = load_any(path, strict=True, image_size=(4, 6), **keywords)
    assert loaded == cfg
    result = convert(
        path,
        tmp_path / "out.safetensors",
        strict=True,
        source_image_size=(4, 6),
        out=io.StringIO(),
        **keywords,
    )
    assert result.source_config == cfg
    with pytest.raises(StrictError, match=r"patch grid 2x2: .* \[--source-image-size 4,6\]"):
        convert(path, tmp_path / "other.safetensors", strict=True, out=io.StringIO(), **keywords)


def test_a_file_whose_format_settles_everything_converts_under_strict(tmp_path, capsys):
    ref = tmp_path / "model.safetensors"
    vitspec.save(ref, SMALL, random_params(SMALL, 0))
    code, out, err = cli(capsys, ref, tmp_path / "copy.safetensors", "--strict")
    assert (code, err) == (0, "") and "config: stored in model.safetensors" in out
    code, out, err = cli(capsys, ref, tmp_path / "hf", "--to", "hf")  # a directory with config.json
    assert (code, err) == (0, "") and "WARNING" not in out  # config.json states what the weights cannot
    code, out, err = cli(capsys, tmp_path / "hf", tmp_path / "back.safetensors", "--strict")
    assert (code, err) == (0, "")
    assert "heads 3: from config.json" in out and "pool token: the only pooling a hf model" in out
    cfg, params = vitspec.load(tmp_path / "back.safetensors")
    assert cfg == SMALL
    for key, value in random_params(SMALL, 0).items():
        np.testing.assert_array_equal(params[key], value)


def test_what_the_format_settles_is_no_note(tmp_path):
    """HF has no LayerScale, qk-norm, registers or fc_norm, and its classifier reads the class token;
    vision_transformer's 'gap' models have no class token; timm's fc_norm would replace `norm`."""
    hf = load_with_notes(checkpoint(tmp_path, "hf", SMALL), heads=3).notes
    assert {n.keyword for n in hf if n.settle} == {"image_size", "gelu", "ln_eps"}
    assert not {"layer_scale", "qk_norm", "num_registers", "fc_norm", "representation_size"} & {
        n.keyword for n in hf
    }
    gap = SMALL.replace(class_token=False, pool="gap")
    vit_jax = load_with_notes(checkpoint(tmp_path, "vit_jax", gap), "vit_jax").notes
    assert "class_token" not in {n.keyword for n in vit_jax}
    timm = load_with_notes(checkpoint(tmp_path, "torch", SMALL), heads=3).notes
    assert "fc_norm" not in {n.keyword for n in timm}


def test_a_name_the_format_always_has_is_an_error_when_missing(tmp_path, capsys):
    # 3 patches + the class row = 4 rows: without cls_token the rows still read as a 2x2 grid.
    cfg = SMALL.replace(image_size=(2, 9))
    path = checkpoint(tmp_path, "hf", cfg)
    state = vitspec.formats.files.read_tensors(path)[0]
    del state["vit.embeddings.cls_token"]
    vitspec.formats.files.write_tensors(tmp_path / "no_cls.safetensors", state)
    code, _, err = cli(capsys, tmp_path / "no_cls.safetensors", tmp_path / "out.safetensors", "--heads", "3")
    assert code == 2 and "the hf layout cannot express" in err and "ViTModel always has a class token" in err
    state = dict(np.load(checkpoint(tmp_path, "vit_jax", SMALL)))
    for key in [k for k in state if k.endswith(("query/bias", "key/bias", "value/bias"))]:
        del state[key]
    np.savez(tmp_path / "no_bias.npz", **state)
    code, _, err = cli(capsys, tmp_path / "no_bias.npz", tmp_path / "out.safetensors", "--from", "vit_jax")
    assert (
        code == 2 and "q/k/v always have biases" in err and "a part its models always have is missing" in err
    )


def test_a_flag_the_parameters_contradict_is_refused(tmp_path, capsys):
    path = checkpoint(tmp_path, "torch", SMALL.replace(num_classes=0, qkv_bias=False))
    for flags, message in [
        (
            ["--num-classes", "3"],
            "--num-classes 3 gives num_classes 3, but the checkpoint's parameters show 0",
        ),
        (["--qkv-bias"], "--qkv-bias gives qkv_bias True, but the checkpoint's parameters show False"),
        (["--no-class-token"], "--no-class-token gives class_token False, but the checkpoint's parameters"),
        (["--pool", "map"], "--pool map, but the checkpoint has no attention pool"),
    ]:
        code, _, err = cli(capsys, path, tmp_path / "out.safetensors", "--heads", "3", *flags)
        assert code == 2 and message in err, err
    with pytest.raises(ValueError, match=r"layer_scale=0\.1: expected True or False"):
        load_any(path, heads=3, layer_scale=0.1)


def test_config_json_settles_and_must_agree_with_the_weights(tmp_path, capsys):
    ref = tmp_path / "model.safetensors"
    vitspec.save(ref, SMALL, random_params(SMALL, 0))
    save_any(tmp_path / "hf", "hf", SMALL, random_params(SMALL, 0))
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    code, _, err = cli(capsys, tmp_path / "hf", tmp_path / "out.safetensors", "--heads", "4")
    assert code == 2 and "inconsistent flags: --heads 4, but config.json gives num_heads 3" in err
    for change, message in [
        (dict(qkv_bias=False), "config.json gives qkv_bias False, but the checkpoint's parameters show True"),
        (dict(hidden_size=16), "config.json gives width 16, which the weights are not"),
        (dict(hidden_act="relu"), "hidden_act 'relu' is none of ['gelu', 'gelu_pytorch_tanh', 'gelu_new']"),
        (dict(model_type="beit"), "model_type 'beit' is none of"),
    ]:
        config_path.write_text(json.dumps({**config, **change}))
        code, _, err = cli(capsys, tmp_path / "hf", tmp_path / "out.safetensors")
        assert code == 2 and message in err, err


class Net:  # a Python object that torch pickles by reference to this module
    pass


@pytest.mark.parametrize("payload", [Net(), print], ids=["class instance", "function"])
def test_a_pickle_of_python_objects_is_refused_without_torchs_advice(tmp_path, capsys, payload):
    path = tmp_path / "checkpoint.pt"
    torch.save({"weights": torch.zeros(2), "extra": payload}, path)
    code, _, err = cli(capsys, path, tmp_path / "out.safetensors")
    assert code == 2 and err.startswith(f"error: {path}: holds Python objects beyond tensors")
    with pytest.raises(CheckpointError) as error:
        load_any(path)
    for message in (err, str(error.value)):
        assert str(path) in message
        assert "weights_only" not in message and "will likely succeed" not in message
        assert "never unpickles arbitrary objects" in message and "can run any code" in message
        assert "torch.save(model.state_dict(), path)" in message and ".safetensors" in message
    assert "Unsupported global" in err  # torch's reason, in a few words


def flag_units(tokens: list[str]) -> list[list[str]]:
    """['--heads', '3', '--no-qkv-bias'] -> [['--heads', '3'], ['--no-qkv-bias']]."""
    units: list[list[str]] = []
    for token in tokens:
        if token.startswith("--"):
            units.append([token])
        else:
            units[-1].append(token)
    return units


READ_BACK = [
    ("torch", {}),
    ("torch", dict(qkv_bias=False, num_classes=0, class_token=False, pool="gap")),
    ("flax", {}),
    ("vit_jax", dict(gelu="exact")),
    ("hf", dict(ln_eps=1e-6)),
    # A fixed table over the class token too (timm's code), or over the patches only (big_vision's):
    # no parameter shows it, and each file reads by its ecosystem's code.
    ("torch", dict(posemb="sinusoidal_1d")),
    ("flax", dict(posemb="sinusoidal_1d", posemb_on_cls=False)),
    ("flax", dict(posemb="none")),  # posemb_on_cls means nothing here: the config's default either way
]


@pytest.mark.parametrize("fmt, overrides", READ_BACK, ids=[f"{f}-{'-'.join(o)}" for f, o in READ_BACK])
def test_the_warning_names_exactly_the_flags_that_read_the_file_back(tmp_path, capsys, fmt, overrides):
    """Writing a foreign file warns with the flags it cannot show: with them the file reads back as
    the same config; without any one of them it reads as another config or not at all."""
    cfg = SMALL.replace(**overrides)
    ref, written = tmp_path / "model.safetensors", tmp_path / f"out{SUFFIX[fmt]}"
    back = tmp_path / "back.safetensors"
    vitspec.save(ref, cfg, random_params(cfg, 0))
    code, out, err = cli(capsys, ref, written, "--to", fmt)
    assert (code, err) == (0, "")
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, out  # each of these configs has a field the format cannot show
    units = flag_units(warnings[0].split(" read it back with ", 1)[1].split())
    code, _, err = cli(capsys, written, back, "--from", fmt, *sum(units, []))
    assert (code, err) == (0, "")
    assert vitspec.load(back)[0] == cfg
    for dropped in units:
        rest = sum((unit for unit in units if unit is not dropped), [])
        code, _, _ = cli(capsys, written, back, "--from", fmt, "--overwrite", *rest)
        assert code == 2 or vitspec.load(back)[0] != cfg, f"{' '.join(dropped)} was not needed"


@pytest.mark.parametrize("fmt, on_cls", [("torch", False), ("flax", True)])
def test_a_fixed_1d_posemb_over_other_tokens_than_the_formats_code_is_refused_unwritten(
    tmp_path, capsys, fmt, on_cls
):
    cfg = SMALL.replace(posemb="sinusoidal_1d", posemb_on_cls=on_cls)
    ref = tmp_path / "model.safetensors"
    vitspec.save(ref, cfg, random_params(cfg, 0))
    code, out, err = cli(capsys, ref, tmp_path / f"out{SUFFIX[fmt]}", "--to", fmt)
    assert code == 2 and f"posemb='sinusoidal_1d' with posemb_on_cls={on_cls}" in err, err
    assert "no parameter shows it" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_without_a_posemb_posemb_on_cls_is_the_default():
    assert SMALL.replace(posemb="none", posemb_on_cls=False) == SMALL.replace(posemb="none")
    assert SMALL.replace(posemb="none", posemb_on_cls=False).posemb_on_cls
