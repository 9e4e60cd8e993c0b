"""Position-embedding resampling: big_vision's bilinear zoom on the grid, prefix rows kept apart."""

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
from vitspec.posemb import resample_model, resample_posemb


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
