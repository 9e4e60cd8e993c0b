"""`vitspec convert ... DIR --to hf` writes what transformers loads with `from_pretrained(DIR)`."""

from __future__ import annotations

import json

import numpy as np
import pytest

import vitspec
from parity_tests.strategies import random_images, random_params
from vitspec.app import cli

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

BASE = dict(image_size=(8, 12), patch_size=4, width=12, depth=2, num_heads=3, mlp_dim=20, ln_eps=1e-12)


@pytest.mark.parametrize(
    "overrides, model_class",
    [
        (dict(num_classes=5), "ViTForImageClassification"),
        (dict(num_classes=3, gelu="tanh", qkv_bias=False, ln_eps=1e-6), "ViTForImageClassification"),
        (dict(num_classes=0, representation_size=12), "ViTModel"),
    ],
)
def test_transformers_loads_the_directory_and_computes_the_same_logits(
    overrides, model_class, tmp_path, capsys
):
    cfg = vitspec.ViTConfig(**{**BASE, **overrides})
    params = random_params(cfg, 0)
    vitspec.save(tmp_path / "model.safetensors", cfg, params)
    assert (
        cli.main(
            ["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "hf"), "--to", "hf", "--check"]
        )
        == 0
    )
    assert "transformers (float64, from_pretrained)" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [model_class] and config["layer_norm_eps"] == cfg.ln_eps
    cls = getattr(transformers, model_class)
    model = cls.from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    images = random_images(cfg, 2, 1)
    with torch.no_grad():
        out = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    got = (out.logits if cfg.num_classes else out.pooler_output).numpy()
    expected = vitspec.forward(cfg, params, images)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def test_what_transformers_cannot_express_is_refused_before_writing(tmp_path, capsys):
    cfg = vitspec.ViTConfig(**BASE, num_classes=2, num_registers=1)
    vitspec.save(tmp_path / "model.safetensors", cfg, random_params(cfg, 0))
    assert cli.main(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "no register tokens" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (dict(pre_norm=True), "pre_norm"),
        (dict(patch_bias=False), "patch_bias"),
        (dict(final_norm=False), "final_norm"),
        (dict(proj_bias=False), "proj_bias"),
        (dict(distilled=True), "hf_deit"),
        (dict(attention_dim=6), "attention_dim=6"),
        (dict(gelu="quick"), "hidden_act names no 'quick' GELU"),
        (dict(pool="max", class_token=True), "pool='max'"),
    ],
)
def test_the_family_knobs_vit_lacks_are_refused_by_name(overrides, reason, tmp_path, capsys):
    cfg = vitspec.ViTConfig(**{**BASE, "num_classes": 2, **overrides})
    vitspec.save(tmp_path / "model.safetensors", cfg, random_params(cfg, 0))
    assert cli.main(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
