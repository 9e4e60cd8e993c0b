"""`vitspec attention`: the same maps from every backend, and pictures that show something."""

from __future__ import annotations

import numpy as np
import pytest

import vitspec
from parity_tests.strategies import random_params
from vitspec.app import attention, cli

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

MODELS = {
    "cait": vitspec.ViTConfig(
        image_size=16,
        patch_size=4,
        width=16,
        depth=2,
        num_heads=2,
        mlp_dim=32,
        num_classes=3,
        talking_heads=True,
        class_attention_depth=2,
        layer_scale=0.1,
    ),
    "class token": vitspec.ViTConfig(
        image_size=16,
        patch_size=4,
        width=16,
        depth=2,
        num_heads=2,
        mlp_dim=32,
        num_classes=3,
        num_registers=1,
    ),
    "map head": vitspec.ViTConfig(
        image_size=(16, 12),
        patch_size=4,
        in_channels=1,
        width=16,
        depth=2,
        num_heads=4,
        mlp_dim=32,
        num_classes=3,
        pool="map",
        class_token=False,
    ),
    "average pool": vitspec.ViTConfig(
        image_size=16,
        patch_size=4,
        width=16,
        depth=1,
        num_heads=2,
        mlp_dim=32,
        num_classes=3,
        pool="gap",
        class_token=False,
    ),
}


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = [tmp_path / "noise.png", tmp_path / "ramp.jpg"]
    PIL.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(paths[0])
    ramp = np.broadcast_to(np.linspace(0, 255, 24, dtype=np.uint8)[None, :, None], (24, 24, 3))
    PIL.fromarray(np.ascontiguousarray(ramp)).save(paths[1])
    return paths


@pytest.mark.parametrize("name", list(MODELS))
def test_every_backend_draws_the_references_maps(name, images, tmp_path):
    cfg = MODELS[name]
    checkpoint = tmp_path / "model.safetensors"
    vitspec.save(checkpoint, cfg, random_params(cfg, 0))
    results = {
        backend: attention.main(
            [str(checkpoint), *map(str, images), "--out", str(tmp_path / backend), "--backend", backend]
        )
        for backend in attention.BACKENDS
    }
    for backend in ("torch", "flax"):
        for image in results["numpy"]:
            for kind in ("rollout", "heads"):
                np.testing.assert_allclose(
                    results[backend][image][kind],
                    results["numpy"][image][kind],
                    rtol=0,
                    atol=1e-5,
                    err_msg=f"{backend} {image} {kind}",
                )
    for maps in results["numpy"].values():
        assert maps["rollout"].shape[-2:] == cfg.grid_size
        np.testing.assert_allclose(maps["rollout"].sum(), 1.0, rtol=1e-5)
        assert maps["heads"].shape == (cfg.num_heads, *cfg.grid_size)
    for path in images:
        picture = np.asarray(PIL.open(tmp_path / "numpy" / f"{path.stem}.attention.png"))
        panels = 2 + cfg.num_heads
        columns = min(panels, 6)
        assert picture.shape[:2] == (round(100 * 2.4 * -(-panels // columns)), round(100 * 2.2 * columns))
        assert picture[..., :3].std() > 10  # not blank


def test_rollout_of_identity_attention_is_uniform_over_the_grid():
    cfg = MODELS["average pool"]
    tokens = cfg.num_tokens
    maps = {"attn_0": np.broadcast_to(np.eye(tokens), (1, cfg.num_heads, tokens, tokens))}
    np.testing.assert_allclose(attention.rollout(cfg, maps), np.full((1, *cfg.grid_size), 1 / tokens))


def test_an_unreadable_image_is_one_error_line(tmp_path, capsys):
    cfg = MODELS["class token"]
    vitspec.save(tmp_path / "model.safetensors", cfg, random_params(cfg, 0))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    code = cli.main(
        ["attention", str(tmp_path / "model.safetensors"), str(tmp_path / "bad.png"), "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "bad.png: not a readable image" in err
