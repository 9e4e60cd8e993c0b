"""Position-embedding resampling: big_vision's bilinear zoom on the grid, prefix rows kept apart; which
method `vitspec convert --image-size` and a fine-tuning start use (the source format's own, or --resample)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vitspec
from parity_tests.strategies import random_images, random_params
from parity_tests.tolerances import assert_close_f64
from vitspec.config import ViTConfig
from vitspec.posemb import describe, resample_model, resample_posemb


@given(st.integers(0, 3), st.integers(1, 5), st.integers(1, 5), st.sampled_from([np.float32, np.float64]))
def test_same_size_is_the_identity(prefix, h, w, dtype):
    posemb = np.random.default_rng(0).standard_normal((prefix + h * w, 8)).astype(dtype)
    out = resample_posemb(posemb, (h, w), (h, w), prefix)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, posemb)


def test_prefix_rows_are_kept_and_the_grid_grows():
    posemb = np.random.default_rng(0).standard_normal((2 + 3 * 4, 6))
    out = resample_posemb(posemb, (3, 4), (5, 7), num_prefix=2)
    assert out.shape == (2 + 5 * 7, 6)
    np.testing.assert_array_equal(out[:2], posemb[:2])


def test_bilinear_with_corners_pinned_like_big_vision():
    # A function linear in (row, column) is reproduced exactly by bilinear interpolation whose
    # corner samples sit on the old corners (scipy.ndimage.zoom, order=1, as big_vision uses).
    rows, cols = np.mgrid[:3, :4]
    grid = np.stack([rows, cols, 2 * rows - cols], axis=-1).reshape(12, 3).astype(np.float64)
    out = resample_posemb(grid, (3, 4), (5, 7), num_prefix=0).reshape(5, 7, 3)
    new_rows, new_cols = np.mgrid[:5, :7]
    expected_rows, expected_cols = new_rows * 2 / 4, new_cols * 3 / 6
    np.testing.assert_allclose(out[..., 0], expected_rows, atol=1e-12)
    np.testing.assert_allclose(out[..., 1], expected_cols, atol=1e-12)
    np.testing.assert_allclose(out[..., 2], 2 * expected_rows - expected_cols, atol=1e-12)


def test_shape_that_does_not_match_the_grid_is_refused():
    expected = r"does not hold 1 prefix rows and an 2x2 grid \(expected \[5, D\]\)"
    with pytest.raises(ValueError, match=expected):
        resample_posemb(np.zeros((6, 4)), (2, 2), (3, 3), num_prefix=1)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pool="token"),
        dict(pool="token", num_registers=2, posemb_on_cls=False),
        dict(pool="gap", class_token=False),
    ],
)
def test_resampled_model_runs_in_both_backends_and_they_agree(overrides):
    torch_vit = pytest.importorskip("backends.torch_vit")
    flax_vit = pytest.importorskip("backends.flax_vit")
    import jax

    cfg = ViTConfig(
        image_size=(4, 6),
        patch_size=2,
        width=12,
        depth=1,
        num_heads=3,
        mlp_dim=20,
        num_classes=5,
        **overrides,
    )
    new_cfg, params = resample_model(cfg, random_params(cfg, 0), (10, 8))
    assert new_cfg.grid_size == (5, 4)
    images = random_images(new_cfg, 2, 0)
    expected = {"logits": vitspec.forward(new_cfg, params, images)}

    model = torch_vit.VisionTransformer(new_cfg).double().eval()
    model.load_state_dict(torch_vit.from_reference(params, new_cfg))
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    with jax.enable_x64(True):
        flax_logits = np.asarray(
            flax_vit.VisionTransformer(config=new_cfg).apply(flax_vit.from_reference(params, new_cfg), images)
        )
    assert_close_f64({"logits": torch_logits}, expected, "forward")
    assert_close_f64({"logits": flax_logits}, expected, "forward")


# --- which method a conversion or a fine-tuning start uses ------------------------------------

SMALL = ViTConfig(
    image_size=(4, 6), patch_size=(2, 3), width=12, depth=1, num_heads=3, mlp_dim=20, num_classes=5
)


def test_every_source_format_named_exists_and_maps_to_a_method():
    from vitspec.app.resampling import SOURCE_METHOD
    from vitspec.formats import FORMATS
    from vitspec.posemb import RESAMPLE_METHODS

    assert set(SOURCE_METHOD) <= set(FORMATS), set(SOURCE_METHOD) - set(FORMATS)
    assert set(SOURCE_METHOD.values()) <= set(RESAMPLE_METHODS)
    assert (SOURCE_METHOD["ref"], SOURCE_METHOD["torch"], SOURCE_METHOD["hf"]) == ("big_vision", "timm", "hf")


def test_a_format_without_a_resampling_of_its_own_needs_the_flag():
    from vitspec.app.resampling import resample_method

    with pytest.raises(ValueError, match=r"a vit_flax checkpoint's ecosystem .* pass --resample"):
        resample_method("vit_flax", None)
    assert resample_method("vit_flax", "hf") == ("hf", "(bicubic, transformers'), as --resample hf asks")
    assert resample_method("ref", None)[1] == (
        "(bilinear, big_vision's), the default for vitspec's own files (--resample to choose)"
    )
    assert resample_method("torch", None, "float32")[1] == (
        "(bicubic antialiased, timm's, in float32), a torch source's own (--resample to choose)"
    )


@pytest.fixture
def ref_file(tmp_path):
    path = tmp_path / "model.safetensors"
    vitspec.save(path, SMALL, random_params(SMALL, 0))
    return path


@pytest.mark.parametrize("method", ["timm", "hf", "big_vision"])
def test_convert_resamples_as_asked_and_says_so(ref_file, tmp_path, capsys, method):
    from vitspec.app.convert import main

    dst = tmp_path / "big.safetensors"
    assert main([str(ref_file), str(dst), "--image-size", "8,12", "--resample", method]) == 0
    out = capsys.readouterr().out
    assert f"position embedding resampled 2x2 -> 4x4 ({describe(method)}), as --resample {method} asks" in out
    cfg, params = vitspec.load(dst)
    _, expected = resample_model(SMALL, random_params(SMALL, 0), (8, 12), method)
    assert cfg.image_size == (8, 12)
    np.testing.assert_array_equal(params["pos_embed"], expected["pos_embed"])


def test_convert_follows_the_source_format_and_checks_against_torch(tmp_path, capsys):
    from vitspec.app.convert import main
    from vitspec.formats import load_any, save_any

    params = random_params(SMALL, 0)
    save_any(tmp_path / "m.pt", "torch", SMALL, params)
    for dtype in ("float64", "float32"):
        dst = tmp_path / f"{dtype}.safetensors"
        flags = ["--heads", "3", "--image-size", "8,12", "--resample-dtype", dtype, "--check"]
        assert main([str(tmp_path / "m.pt"), str(dst), *flags]) == 0
        out = capsys.readouterr().out
        assert f"({describe('timm', dtype)}), a torch source's own (--resample to choose)" in out
        assert f"check: posemb resampled as timm's vs torch F.interpolate ({dtype}): max |diff|" in out
        expected = resample_model(SMALL, params, (8, 12), "timm", dtype)[1]["pos_embed"]
        written = load_any(dst)[1]["pos_embed"]
        np.testing.assert_array_equal(written, expected.astype(written.dtype))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resample", "timm"], "--resample and --resample-dtype choose how --image-size resamples"),
        (
            ["--image-size", "8,12", "--resample", "big_vision", "--resample-dtype", "float32"],
            "--image-size (8, 12): resample compute dtype 'float32': big_vision's zoom computes in float64",
        ),
    ],
)
def test_convert_refuses_resampling_flags_that_do_nothing(ref_file, tmp_path, capsys, argv, message):
    from vitspec.app.convert import main

    assert main([str(ref_file), str(tmp_path / "x.safetensors"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_fine_tuning_resamples_as_the_source_format_or_as_asked(tmp_path):
    from vitspec.app.training.init import fine_tuning_start
    from vitspec.formats import save_any

    params = random_params(SMALL, 1)
    save_any(tmp_path / "m.pt", "torch", SMALL, params)
    model = SMALL.replace(image_size=(8, 12))
    for chosen, method in ((None, "timm"), ("big_vision", "big_vision")):
        loaded, notes = fine_tuning_start(model, tmp_path / "m.pt", chosen)
        expected = resample_model(SMALL, params, (8, 12), method)[1]["pos_embed"]
        np.testing.assert_array_equal(loaded["pos_embed"], expected.astype(np.float32))
        assert (
            f"position embedding resampled 2x2 -> 4x4 patches (8x12 images) ({describe(method)})" in notes[1]
        )


def test_the_resampling_check_fails_on_a_wrong_posemb():
    import io

    from vitspec.app.convert_check import CheckFailed, check_resampling

    params = random_params(SMALL, 0)
    big, resampled = resample_model(SMALL, params, (8, 12), "hf")
    out = io.StringIO()
    diff = check_resampling(SMALL, params["pos_embed"], big, resampled["pos_embed"], "hf", "float64", out)
    assert diff <= 1e-12 * np.max(np.abs(resampled["pos_embed"]))
    assert (
        check_resampling(
            SMALL, params["pos_embed"], big, resampled["pos_embed"], "big_vision", "float64", out
        )
        is None
    )
    wrong = resampled["pos_embed"].copy()
    wrong[-1, 0] += 1e-6
    with pytest.raises(CheckFailed, match="away from torch's F.interpolate"):
        check_resampling(SMALL, params["pos_embed"], big, wrong, "hf", "float64", out)
    with pytest.raises(CheckFailed):  # timm's is antialiased: not transformers'
        check_resampling(SMALL, params["pos_embed"], big, resampled["pos_embed"], "timm", "float64", out)


def test_fine_tuning_from_a_format_without_resampling_asks_for_the_method(tmp_path, monkeypatch):
    from vitspec.app import resampling
    from vitspec.app.training.init import fine_tuning_start
    from vitspec.formats import save_any

    save_any(tmp_path / "m.pt", "torch", SMALL, random_params(SMALL, 1))
    monkeypatch.delitem(resampling.SOURCE_METHOD, "torch")  # a format whose code never resamples
    bigger = SMALL.replace(image_size=(8, 12))
    with pytest.raises(ValueError, match=r"no position-embedding resampling to follow; choose one with "):
        fine_tuning_start(bigger, tmp_path / "m.pt")
    params, notes = fine_tuning_start(bigger, tmp_path / "m.pt", "timm")
    assert "resampled" in notes[1] and params["pos_embed"].shape[0] == bigger.posemb_length
