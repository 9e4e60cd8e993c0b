"""Position-embedding resampling as timm and transformers do it: vitspec.interpolate's NumPy bicubic
kernels against torch's F.interpolate, and vitspec.posemb's "timm" and "hf" methods against those
libraries' own functions.

Bounds: float64 runs the same arithmetic in another order, so it agrees to rounding (<= 1e-12 of
the largest value; measured <= 9e-15 over every height 1..40 -> 1..40). float32 agrees to F32_REL
of the largest value, not to the bit (measured <= 4.8e-6, 40 float32 ulps, over the same sweep):
the Keys polynomials cancel terms of size ~5 into weights of size ~0.1, so float32 weights carry
several ulps of rounding error, and torch's compiled kernel fuses some multiply-adds (FMA) that the
NumPy code rounds separately, so the two float32 roundings differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from vitspec.interpolate import keys_cubic, resize_bicubic
from vitspec.posemb import resample_grid, resample_posemb

F64_REL = 1e-12
F32_REL = 1e-5

SIZES = [
    ((7, 7), (14, 14)),
    ((14, 14), (7, 7)),
    ((24, 24), (37, 37)),
    ((37, 37), (24, 24)),
    ((6, 10), (9, 4)),
    ((1, 6), (3, 9)),
    ((6, 1), (1, 4)),
    ((1, 1), (4, 3)),
    ((5, 5), (1, 1)),
    ((16, 16), (5, 5)),
    ((3, 3), (40, 40)),
]


def torch_resize(grid: np.ndarray, size, antialias: bool) -> np.ndarray:
    """[h, w, D] through F.interpolate on its NCHW permutation, in grid's dtype.

    torch 2.13's antialiased CPU kernel resizes the height of a 1-wide grid (an [h, 1] input, or
    the [h, 1] intermediate of a resize to width 1) with output row 0's weights for every row; the
    same column inside a wider grid, or the transposed grid, is resized right: such a resize goes
    through torch transposed."""
    if antialias and size[1] == 1 and grid.shape[0] != size[0] > 1:
        return torch_resize(grid.transpose(1, 0, 2), size[::-1], antialias).transpose(1, 0, 2)
    nchw = torch.from_numpy(np.ascontiguousarray(grid)).permute(2, 0, 1)[None]
    out = F.interpolate(nchw, size=tuple(size), mode="bicubic", align_corners=False, antialias=antialias)
    return out[0].permute(1, 2, 0).numpy()


def assert_close_rel(actual: np.ndarray, expected: np.ndarray, rel: float) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = float(np.max(np.abs(expected)))
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel:g} x max |value| {scale:.3g}"


@pytest.mark.parametrize("antialias", [False, True], ids=["plain", "antialias"])
@pytest.mark.parametrize("old, new", SIZES, ids=str)
@pytest.mark.parametrize("dtype, rel", [(np.float64, F64_REL), (np.float32, F32_REL)], ids=["f64", "f32"])
def test_bicubic_is_torch_interpolate(old, new, antialias, dtype, rel):
    grid = np.random.default_rng(0).standard_normal((*old, 6)).astype(dtype)
    assert_close_rel(
        resize_bicubic(grid, new, antialias=antialias, dtype=dtype), torch_resize(grid, new, antialias), rel
    )


@given(
    st.tuples(st.integers(1, 30), st.integers(1, 30)),
    st.tuples(st.integers(1, 30), st.integers(1, 30)),
    st.booleans(),
)
def test_bicubic_is_torch_interpolate_at_any_sizes(old, new, antialias):
    grid = np.random.default_rng(sum(old + new)).standard_normal((*old, 3))
    assert_close_rel(
        resize_bicubic(grid, new, antialias=antialias), torch_resize(grid, new, antialias), F64_REL
    )


def test_a_one_wide_grid_resizes_as_its_column_inside_a_wider_grid():
    # The column of an [h, 1] grid is resized as it is inside an [h, 2] grid (both kernels), which
    # torch's antialiased kernel does not do for the [h, 1] grid itself (see torch_resize).
    column = np.random.default_rng(2).standard_normal((16, 1, 2))
    for antialias in (False, True):
        wide = torch_resize(np.repeat(column, 2, axis=1), (21, 2), antialias)[:, :1]
        np.testing.assert_allclose(
            resize_bicubic(column, (21, 1), antialias=antialias), wide, rtol=0, atol=1e-14
        )


def test_keys_kernel_is_the_cubic_convolution():
    # Keys' kernel interpolates (1 at 0, 0 at the other integers) and reproduces a constant: its
    # samples at any offset sum to 1. Checked at both parameters PyTorch uses.
    x = np.linspace(0, 1, 17)
    for a in (-0.75, -0.5):
        np.testing.assert_array_equal(keys_cubic(np.arange(-3, 4), a), [0, 0, 0, 1, 0, 0, 0])
        total = sum(keys_cubic(x + k, a) for k in (-2, -1, 0, 1))
        np.testing.assert_allclose(total, 1, rtol=0, atol=1e-15)


def test_what_each_kernel_reproduces_away_from_the_edges():
    # Keys' a = -0.5 kernel (antialiased) reproduces polynomials up to quadratics, a = -0.75 (plain)
    # only constants. With align_corners=False the source of output j is (j + 0.5) * in / out - 0.5.
    source = (np.arange(16) + 0.5) / 2 - 0.5
    interior = (source >= 1) & (source <= 6)
    quadratic = lambda x: 0.5 * x**2 - 3 * x + 1  # noqa: E731
    grid = quadratic(np.arange(8.0))[:, None, None]
    out = resize_bicubic(grid, (16, 1), antialias=True)[:, 0, 0]
    np.testing.assert_allclose(out[interior], quadratic(source[interior]), rtol=0, atol=1e-12)
    plain = resize_bicubic(grid, (16, 1), antialias=False)[:, 0, 0]
    assert np.max(np.abs(plain[interior] - quadratic(source[interior]))) > 1e-3
    np.testing.assert_allclose(
        resize_bicubic(np.full((8, 3, 1), 2.5), (16, 5), antialias=False), 2.5, atol=1e-14
    )


def test_float32_is_not_float64():
    # The float32 option rounds as a float32 computation; the default is float64 whatever the input.
    grid = np.random.default_rng(1).standard_normal((5, 5, 4)).astype(np.float32)
    assert resample_grid(grid, (8, 8), "timm").dtype == np.float64
    assert resample_grid(grid, (8, 8), "timm", "float32").dtype == np.float32
    assert not np.array_equal(resample_grid(grid, (8, 8), "hf", "float32"), resample_grid(grid, (8, 8), "hf"))


def test_bad_method_dtype_and_grid_are_named():
    with pytest.raises(ValueError, match=r"cannot resize a grid of shape \(4,\) to \(2, 2\)"):
        resize_bicubic(np.zeros(4), (2, 2), antialias=True)
    with pytest.raises(ValueError, match="computes in float32 or float64, not float16"):
        resize_bicubic(np.zeros((2, 2, 1)), (3, 3), antialias=False, dtype=np.float16)
    posemb = np.zeros((1 + 4, 3))
    with pytest.raises(ValueError, match="resample method 'bilinear': expected one of big_vision, timm, hf"):
        resample_posemb(posemb, (2, 2), (3, 3), 1, "bilinear")
    with pytest.raises(ValueError, match="big_vision's zoom computes in float64"):
        resample_posemb(posemb, (2, 2), (3, 3), 1, "big_vision", "float32")
    with pytest.raises(ValueError, match="compute dtype 'float16'"):
        resample_posemb(posemb, (2, 2), (3, 3), 1, "timm", "float16")


# --- the libraries' own functions ------------------------------------------------------------


def timm_resample_abs_pos_embed(posemb, new_size, old_size, num_prefix_tokens, compute=torch.float32):
    """timm's resample_abs_pos_embed as its call sequence (timm/layers/pos_embed.py, timm 1.0):
    prefix rows apart, the grid to NCHW, F.interpolate(size, bicubic, antialias=True) after
    `.float()`, back to the input dtype, prefix rows in front. `compute` float64 is the same
    sequence without timm's cast to float32."""
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.to(compute).reshape(1, *old_size, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)


TIMM_CASES = [((7, 7), (14, 14), 1), ((14, 14), (7, 7), 1), ((24, 24), (37, 37), 0), ((6, 10), (9, 4), 2)]


def random_posemb(old, prefix, dtype, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((prefix + old[0] * old[1], 8)).astype(dtype)


@pytest.mark.parametrize("old, new, prefix", TIMM_CASES, ids=str)
def test_timm_method_is_timms_call_sequence(old, new, prefix):
    # prefix 0: timm's no_embed_class models (DeiT-3, big_vision-style), whose posemb is the grid only.
    posemb = random_posemb(old, prefix, np.float64)
    expected = timm_resample_abs_pos_embed(torch.from_numpy(posemb)[None], new, old, prefix, torch.float64)[0]
    ours = resample_posemb(posemb, old, new, prefix, "timm")
    np.testing.assert_array_equal(ours[:prefix], posemb[:prefix])
    assert_close_rel(ours, expected.numpy(), F64_REL)
    f32 = posemb.astype(np.float32)
    expected = timm_resample_abs_pos_embed(torch.from_numpy(f32)[None], new, old, prefix)[0]
    assert_close_rel(resample_posemb(f32, old, new, prefix, "timm", "float32"), expected.numpy(), F32_REL)


@pytest.mark.parametrize("old, new, prefix", TIMM_CASES, ids=str)
def test_timm_method_is_timms_own_function(old, new, prefix):
    """timm's own resample_abs_pos_embed, where timm imports (see tests/test_torch_timm.py). timm
    casts to float32 whatever the dtype: it is compared with the float32 method, and its float64
    result with the float32 method's too."""
    pos_embed = pytest.importorskip(
        "timm.layers.pos_embed", reason="timm (with a torchvision matching this torch) is not installed"
    )
    for dtype in (np.float32, np.float64):
        posemb = random_posemb(old, prefix, dtype)
        theirs = pos_embed.resample_abs_pos_embed(
            torch.from_numpy(posemb)[None], new_size=list(new), old_size=list(old), num_prefix_tokens=prefix
        )[0].numpy()
        assert_close_rel(resample_posemb(posemb, old, new, prefix, "timm", "float32"), theirs, F32_REL)


HF_CASES = [((7, 7), (14, 14)), ((14, 14), (7, 7)), ((6, 6), (9, 4)), ((4, 4), (1, 5))]


def hf_interpolate(posemb: np.ndarray, old: int, new: tuple[int, int], dtype) -> np.ndarray:
    """transformers' ViTEmbeddings.interpolate_pos_encoding on a ViT of patch 2 at old*2 pixels,
    its position_embeddings set to `posemb`, asked for new*2 pixels, in `dtype`."""
    transformers_vit = pytest.importorskip("transformers.models.vit.modeling_vit")
    from transformers import ViTConfig as HFViTConfig

    config = HFViTConfig(image_size=2 * old, patch_size=2, hidden_size=posemb.shape[-1], num_channels=1)
    embeddings = transformers_vit.ViTEmbeddings(config).to(dtype)
    with torch.no_grad():
        embeddings.position_embeddings.copy_(torch.from_numpy(posemb)[None])
        tokens = torch.zeros(1, 1 + new[0] * new[1], posemb.shape[-1], dtype=dtype)
        return embeddings.interpolate_pos_encoding(tokens, 2 * new[0], 2 * new[1])[0].numpy()


@pytest.mark.parametrize("old, new", HF_CASES, ids=str)
def test_hf_method_is_transformers_interpolate_pos_encoding(old, new):
    posemb = random_posemb(old, 1, np.float64)
    ours = resample_posemb(posemb, old, new, 1, "hf")
    assert_close_rel(ours, hf_interpolate(posemb, old[0], new, torch.float64), F64_REL)
    f32 = posemb.astype(np.float32)
    ours = resample_posemb(f32, old, new, 1, "hf", "float32")
    assert_close_rel(ours, hf_interpolate(f32, old[0], new, torch.float32), F32_REL)
