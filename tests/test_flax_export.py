"""`vitspec convert --to flax` and `--to vit_jax` files apply, as they are, in the published flax ViTs.

The models are bench/peers/flax_published.py: big_vision's and vision_transformer's linen modules with
their own parameter names and settings. Nothing of vitspec is in the loading path: a file is read the
way a flax user reads it (`flax.serialization.msgpack_restore`, or `np.load` with '/'-split keys as
big_vision's `utils.load_params` and vit_jax's `checkpoint.load` do), and the module's logits are
compared with the NumPy reference on the source checkpoint.
"""

from __future__ import annotations

import ast
from functools import partial
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")

import jax
from flax import linen as nn
from flax import serialization, traverse_util
from flax.training import checkpoints

import vitspec
from bench.peers.flax_published import BigVisionViT, VitJaxViT
from parity_tests.strategies import random_images, random_params
from vitspec.app import cli

# A 3x2 patch grid, so that a transposed position embedding cannot pass; tanh GELU, as both
# codebases compute it.
BASE = dict(
    image_size=(6, 6),
    patch_size=(2, 3),
    width=12,
    depth=2,
    num_heads=3,
    mlp_dim=20,
    num_classes=5,
    gelu="tanh",
)
# Relative to the largest logit. float64 end to end: measured <1e-15.
F64_BOUND = 1e-12
# vit_jax's encoder blocks compute in float32 (dtype=jnp.float32 in models_vit.py) whatever the
# parameters' dtype: measured ~2e-7, and a GELU or layout mistake is >1e-5.
F32_BOUND = 2e-6

# (config overrides, big_vision `vit.Model` settings): every pool and posemb big_vision has.
BIG_VISION_CASES = {
    "tok": (dict(pool="token", posemb_on_cls=False), dict(pool_type="tok", posemb="learn")),
    "gap-sincos2d-rep": (
        dict(pool="gap", posemb="sincos2d", representation_size=7),
        dict(pool_type="gap", posemb="sincos2d", rep_size=7),
    ),
    "map-no-head": (dict(pool="map", num_classes=0), dict(pool_type="map", posemb="learn")),
}
BIG_VISION_FIELDS = (
    "num_classes",
    "patch_size",
    "width",
    "depth",
    "mlp_dim",
    "num_heads",
    "posemb",
    "rep_size",
    "pool_type",
)
# (config overrides, vit_jax `VisionTransformer` settings).
VIT_JAX_CASES = {
    "token": (dict(pool="token"), dict(classifier="token")),
    "gap-rep": (dict(pool="gap", representation_size=7), dict(classifier="gap", representation_size=7)),
}


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def convert(tmp_path: Path, cfg: vitspec.ViTConfig, dst: str, to: str) -> tuple[dict, Path]:
    params = random_params(cfg, 0)
    src = tmp_path / "model.safetensors"
    vitspec.save(src, cfg, params)
    assert cli.main(["convert", str(src), str(tmp_path / dst), "--to", to]) == 0
    return params, tmp_path / dst


def read_like_a_flax_user(path: Path) -> dict:
    if path.suffix == ".msgpack":
        return serialization.msgpack_restore(path.read_bytes())
    return traverse_util.unflatten_dict(dict(np.load(path)), sep="/")


def big_vision_model(cfg: vitspec.ViTConfig, **settings) -> BigVisionViT:
    return BigVisionViT(
        num_classes=cfg.num_classes,
        patch_size=cfg.patch_size,
        width=cfg.width,
        depth=cfg.depth,
        mlp_dim=cfg.mlp_dim,
        num_heads=cfg.num_heads,
        **settings,
    )


def printed_big_vision_model(output: str) -> tuple[dict, list[str]]:
    """The keywords of the `vit.Model(...)` that `vitspec convert --to flax` prints, and the
    differences it lists after it."""
    line = next(x for x in output.splitlines() if x.startswith("big_vision applies it in: "))
    model, *differences = line.split(": ", 1)[1].split("; ")
    call = ast.parse(model, mode="eval").body
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}, differences


def vars_of(module: nn.Module) -> dict:
    return {f: getattr(module, f) for f in BIG_VISION_FIELDS}


def shapes(tree: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def assert_same_tree(module: nn.Module, params: dict, images: np.ndarray) -> None:
    """The file's tree is the one the module declares: linen's apply ignores extra parameters,
    so applying alone would not show a stray one."""
    declared = jax.eval_shape(module.init, jax.random.key(0), images)["params"]
    assert shapes(params) == shapes(declared)


def assert_close(got, expected, bound: float) -> None:
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=bound * np.abs(expected).max())


@pytest.mark.parametrize("suffix", [".msgpack", ".npz"])
@pytest.mark.parametrize("case", list(BIG_VISION_CASES))
def test_big_vision_model_applies_the_flax_file(case, suffix, tmp_path, capsys):
    overrides, settings = BIG_VISION_CASES[case]
    cfg = vitspec.ViTConfig(**{**BASE, **overrides})
    params, path = convert(tmp_path, cfg, f"model{suffix}", "flax")
    printed, differences = printed_big_vision_model(capsys.readouterr().out)
    assert printed == {
        **vars_of(big_vision_model(cfg, **settings)),
        "rep_size": settings.get("rep_size", False),
    }
    assert differences == []  # what convert says the stock code computes otherwise: nothing here
    tree = read_like_a_flax_user(path)
    model = BigVisionViT(**printed)  # the module exactly as `vitspec convert` prints it
    images = random_images(cfg, 2, 1)
    assert_same_tree(model, tree, images)
    assert_close(model.apply({"params": tree}, images), vitspec.forward(cfg, params, images), F64_BOUND)


def test_posemb_on_the_class_token_folds_into_cls_as_big_vision_load_does(tmp_path):
    """vitspec's default (posemb_on_cls=True, timm's) writes a posemb row for the class token;
    big_vision adds the posemb before prepending the class token, so that row belongs in `cls`.
    big_vision's `vit.fix_old_checkpoints` folds it for square grids; this is the same fold."""
    cfg = vitspec.ViTConfig(**BASE, pool="token")
    params, path = convert(tmp_path, cfg, "model.npz", "flax")
    tree = read_like_a_flax_user(path)
    posemb = tree["pos_embedding"]
    tree["cls"], tree["pos_embedding"] = tree["cls"] + posemb[:, :1], posemb[:, 1:]
    model = big_vision_model(cfg, pool_type="tok", posemb="learn")
    images = random_images(cfg, 2, 1)
    assert_same_tree(model, tree, images)
    assert_close(model.apply({"params": tree}, images), vitspec.forward(cfg, params, images), F64_BOUND)


def test_big_vision_computes_tanh_gelu_and_an_exact_gelu_model_needs_it_changed(
    tmp_path, monkeypatch, capsys
):
    """flax's nn.gelu is the tanh approximation: a stock big_vision model runs an exact-GELU
    checkpoint (vitspec's default, timm's) slightly wrong, and exactly once its MlpBlock's
    nn.gelu is the erf form."""
    cfg = vitspec.ViTConfig(**{**BASE, "gelu": "exact"}, pool="token", posemb_on_cls=False)
    params, path = convert(tmp_path, cfg, "model.msgpack", "flax")
    assert any(
        "nn.gelu(x, approximate=False)" in d for d in printed_big_vision_model(capsys.readouterr().out)[1]
    )
    variables = {"params": read_like_a_flax_user(path)}
    model = big_vision_model(cfg, pool_type="tok", posemb="learn")
    images = random_images(cfg, 2, 1)
    exact = vitspec.forward(cfg, params, images)
    stock = np.asarray(model.apply(variables, images))
    assert_close(stock, vitspec.forward(cfg.replace(gelu="tanh"), params, images), F64_BOUND)
    assert np.abs(stock - exact).max() > 1e-6 * np.abs(exact).max()
    monkeypatch.setattr(nn, "gelu", partial(nn.gelu, approximate=False))
    assert_close(model.apply(variables, images), exact, F64_BOUND)


@pytest.mark.low_precision
@pytest.mark.parametrize("case", list(VIT_JAX_CASES))
def test_vision_transformer_model_applies_the_vit_jax_file(case, tmp_path):
    overrides, settings = VIT_JAX_CASES[case]
    cfg = vitspec.ViTConfig(**{**BASE, **overrides})
    params, path = convert(tmp_path, cfg, "model.npz", "vit_jax")
    # vit_jax's checkpoint.load: its files keep pre-linen module numbers (MlpBlock_3, ...).
    tree = checkpoints.convert_pre_linen(read_like_a_flax_user(path))
    model = VitJaxViT(
        num_classes=cfg.num_classes,
        patch_size=cfg.patch_size,
        hidden_size=cfg.width,
        num_layers=cfg.depth,
        mlp_dim=cfg.mlp_dim,
        num_heads=cfg.num_heads,
        **settings,
    )
    images = random_images(cfg, 2, 1)
    assert_same_tree(model, tree, images)
    assert_close(model.apply({"params": tree}, images), vitspec.forward(cfg, params, images), F32_BOUND)
