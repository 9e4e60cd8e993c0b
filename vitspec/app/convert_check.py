"""`vitspec convert --check`: the written file run in its own ecosystem's backend against the reference,
and a timm or transformers resampling of the position embedding against torch's own F.interpolate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats import load_any
from vitspec.formats.files import read_tensors
from vitspec.formats.inference import reading_flags
from vitspec.reference import forward

CHECK_BATCH = 2
# A conversion copies arrays: in float64 the written file's logits match the reference's to
# rounding (parity tests: <= 5e-13 of the largest logit). Above this, or not finite, it failed.
CHECK_REL = 1e-9
# vitspec.interpolate against torch's F.interpolate (tests/test_resample.py measures <= 9e-15 in
# float64, <= 4.8e-6 in float32, relative to the largest value).
RESAMPLE_REL = {"float64": 1e-12, "float32": 1e-5}


class CheckFailed(ValueError):
    """The written file does not compute what the source computes."""


def check_passed(diff: float, expected: np.ndarray) -> bool:
    return bool(np.isfinite(diff)) and diff <= CHECK_REL * float(np.max(np.abs(expected)))


def check_conversion(
    cfg: ViTConfig, params: dict[str, np.ndarray], dst: Path, to_fmt: str, resampled: bool, out: TextIO
) -> float:
    """Max |logits(reference on `params`) - logits(target backend on the written file)|, one random batch.

    `params` is the source tree as read, or after `--image-size` the resampled one (a model at
    another size cannot see the source's images): the check covers the written file; resampling
    is checked by check_resampling.
    """
    images = np.random.default_rng(0).standard_normal((CHECK_BATCH, *cfg.image_size, cfg.in_channels))
    expected = forward(cfg, params, images)
    actual, runner = run_target(dst, to_fmt, cfg, images)
    diff = float(np.max(np.abs(np.asarray(actual, np.float64) - expected)))
    scale = float(np.max(np.abs(expected)))
    against = "the resampled tree" if resampled else "the source tree"
    print(
        f"check: reference (float64) on {against} vs {runner} on {dst.name}: max |logit diff| {diff:.3g} "
        f"(max |logit| {scale:.3g}, batch {CHECK_BATCH})",
        file=out,
    )
    if scale == 0:
        print(
            "WARNING: every logit is 0 (a zero head, as freshly initialized): this check proves nothing",
            file=out,
        )
    elif not check_passed(diff, expected):
        raise CheckFailed(
            f"check failed: the written {dst.name} computes logits {diff:.3g} away from the source's "
            f"(bound {CHECK_REL:g} x max |logit|, {CHECK_REL * scale:.3g})"
        )
    return diff


def run_target(dst: Path, fmt: str, cfg: ViTConfig, images: np.ndarray) -> tuple[np.ndarray, str]:
    """Logits of the written file in the target ecosystem's backend, and that backend's name."""
    if dst.is_dir():  # an hf directory: transformers itself where installed, else its weights read back
        try:
            return _run_transformers(dst, images), "transformers (float64, from_pretrained)"
        except ImportError:
            dst = dst / "model.safetensors"
    if fmt == "torch":
        try:
            return _run_torch(dst, cfg, images), "backends.torch_vit (float64)"
        except ImportError:
            pass
    if fmt == "flax":
        try:
            return _run_flax(dst, cfg, images), "backends.flax_vit (float64)"
        except ImportError:
            pass
    cfg_back, params = load_any(dst, fmt, **reading_flags(cfg))
    return forward(cfg_back, params, images), "the reference (float64, file read back)"


def _run_torch(dst: Path, cfg: ViTConfig, images: np.ndarray) -> np.ndarray:
    import torch

    from backends.torch_vit import model_for

    state_dict = {k: torch.from_numpy(v) for k, v in read_tensors(dst)[0].items()}
    model = model_for(cfg).double().eval()
    model.load_state_dict(state_dict, strict=True)  # the file's own names, not re-derived ones
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def _run_flax(dst: Path, cfg: ViTConfig, images: np.ndarray) -> np.ndarray:
    import jax
    from flax import traverse_util

    from backends.flax_vit import module_for

    flat = {k: v.astype(np.float64) for k, v in read_tensors(dst)[0].items()}
    tree = traverse_util.unflatten_dict(flat, sep="/")
    with jax.enable_x64(True):  # scoped: float64 here only, the process's default stays float32
        return np.asarray(module_for(cfg).apply({"params": tree}, images))


def _run_transformers(directory: Path, images: np.ndarray) -> np.ndarray:
    """The written directory's output in transformers, by the class its config.json names."""
    import torch
    import transformers

    architecture = json.loads((directory / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(directory, dtype=torch.float64).eval()
    return transformers_output(model, images)


def transformers_output(model, images: np.ndarray) -> np.ndarray:
    """A transformers vision model's output on NHWC `images` as vitspec's: logits, else image_embeds
    (CLIP's projection), pooler_output, last_hidden_state (pool 'none')."""
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    for field in ("logits", "image_embeds", "pooler_output", "last_hidden_state"):
        value = getattr(out, field, None)
        if value is not None:
            return value.numpy()
    raise AssertionError(f"{type(model).__name__} returned none of logits, image_embeds, pooler_output")


def check_resampling(
    source: ViTConfig, old_posemb, cfg: ViTConfig, new_posemb, method: str, compute_dtype: str, out: TextIO
) -> float | None:
    """Max |our resampled grid - torch's F.interpolate of the source grid| for timm's and hf's methods
    (their libraries' calls: bicubic, antialiased for timm), in `compute_dtype`; None where there is
    nothing to run (big_vision's method is SciPy's zoom itself; torch not installed)."""
    if method == "big_vision":
        return None
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print(
            "check: torch is not installed; the posemb resampling is not compared with F.interpolate",
            file=out,
        )
        return None
    prefix = source.num_prefix_tokens if source.posemb_on_cls else 0
    grid = np.asarray(old_posemb, compute_dtype)[prefix:].reshape(*source.grid_size, -1)
    (new_h, new_w), antialias = cfg.grid_size, method == "timm"
    # torch 2.13's antialiased kernel resizes the height of a 1-wide grid with the first output row's
    # weights for every row (vitspec.interpolate): such a grid goes through it transposed.
    transposed = antialias and new_w == 1 and new_h not in (1, grid.shape[0])
    hwc = grid.transpose(1, 0, 2) if transposed else grid
    nchw = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))[None]
    size = (new_w, new_h) if transposed else (new_h, new_w)
    theirs = F.interpolate(nchw, size=size, mode="bicubic", align_corners=False, antialias=antialias)[0]
    expected = theirs.numpy().transpose((2, 1, 0) if transposed else (1, 2, 0))
    expected = expected.reshape(-1, grid.shape[-1]).astype(np.float64)
    ours = np.asarray(new_posemb)[prefix:]
    diff, scale = float(np.max(np.abs(ours.astype(np.float64) - expected))), float(np.max(np.abs(expected)))
    # The written posemb is rounded to the file's dtype: one rounding of it more.
    bound = (RESAMPLE_REL[compute_dtype] + float(np.finfo(ours.dtype).eps)) * scale
    print(
        f"check: posemb resampled as {method}'s vs torch F.interpolate ({compute_dtype}): "
        f"max |diff| {diff:.3g} (max |value| {scale:.3g})",
        file=out,
    )
    if not diff <= bound:
        raise CheckFailed(
            f"check failed: the resampled posemb is {diff:.3g} away from torch's F.interpolate "
            f"(bound {bound:.3g}: {RESAMPLE_REL[compute_dtype]:g} x max |value|, and one rounding to "
            f"{ours.dtype})"
        )
    return diff
