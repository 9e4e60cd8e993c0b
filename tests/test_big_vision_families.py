"""big_vision's own trees read and written: a SigLIP-style image tower, plain and scanned, alone and
inside a two-tower checkpoint, against big_vision's module (bench/peers/flax_published.py, written
from its models/vit.py) and the reference, in float64; the `big_vision` format's refusals.

The tower is SigLIP's image model in small: MAP pooling, no class token, the learned posemb over
the patches only, tanh GELU (flax's nn.gelu), no head (the tower's output is the MAP head's).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import serialization, traverse_util

import vitspec
from bench.peers.flax_published import BigVisionViT
from parity_tests.strategies import random_images, random_params
from tests.backend_outputs import three_outputs
from vitspec.formats import FormatError, load_any, load_with_notes, save_any
from vitspec.formats.flax_trees import unstacked

# A 2x3 patch grid, so a transposed posemb cannot pass; the reading needs the image size for it.
SIGLIP = vitspec.ViTConfig(
    image_size=(8, 12),
    patch_size=4,
    width=16,
    depth=3,
    num_heads=2,
    mlp_dim=24,
    num_classes=0,
    pool="map",
    posemb_on_cls=False,
    gelu="tanh",
)
# Relative to the largest output: float64 end to end (measured < 1e-15).
F64_BOUND = 1e-12
# Two-tower files hold these beside the image tower; the reading leaves them out.
TEXT_TOWER = {"txt/Embed_0/embedding": (11, 16), "txt/head/kernel": (16, 8), "t": (1,), "b": (1,)}


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def siglip_tower(scan: bool) -> BigVisionViT:
    return BigVisionViT(
        num_classes=None,
        patch_size=SIGLIP.patch_size,
        width=SIGLIP.width,
        depth=SIGLIP.depth,
        mlp_dim=SIGLIP.mlp_dim,
        num_heads=SIGLIP.num_heads,
        pool_type="map",
        posemb="learn",
        scan=scan,
    )


def flat_shapes(module, images) -> dict[str, tuple[int, ...]]:
    declared = jax.eval_shape(module.init, jax.random.key(0), images)["params"]
    return {k: v.shape for k, v in traverse_util.flatten_dict(declared, sep="/").items()}


def random_tree(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: 0.3 * rng.standard_normal(s) for k, s in shapes.items()}


def write(path: Path, flat: dict[str, np.ndarray]) -> None:
    """As big_vision saves: an .npz of '/'-joined names, or flax's msgpack of the nested tree."""
    if path.suffix == ".npz":
        np.savez(path, **flat)
    else:
        path.write_bytes(serialization.msgpack_serialize(traverse_util.unflatten_dict(flat, sep="/")))


def relative_error(got, expected) -> float:
    expected = np.asarray(expected)
    return float(np.abs(np.asarray(got) - expected).max() / np.abs(expected).max())


def two_tower(image: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """big_vision two_towers' checkpoint: `params/` around `img/`, `txt/`, `t` and `b`."""
    rng = np.random.default_rng(seed)
    text = {k: rng.standard_normal(s) for k, s in TEXT_TOWER.items()}
    return {f"params/{k}": v for k, v in ({f"img/{k}": v for k, v in image.items()} | text).items()}


@pytest.mark.parametrize("suffix", [".npz", ".msgpack"])
@pytest.mark.parametrize("towers", ["image", "two"])
@pytest.mark.parametrize("scan", [False, True], ids=["plain", "scan"])
def test_siglip_image_tower_reads_and_computes_what_big_vision_does(tmp_path, scan, towers, suffix):
    tower = siglip_tower(scan)
    images = random_images(SIGLIP, 2, 1)
    native = random_tree(flat_shapes(tower, images), 0)
    path = tmp_path / f"siglip{suffix}"
    write(path, two_tower(native, 1) if towers == "two" else native)

    loaded = load_with_notes(path, image_size=SIGLIP.image_size)
    # Scanned blocks and two towers are big_vision's own: its format reads them.
    assert loaded.fmt == ("big_vision_scan" if scan else "big_vision" if towers == "two" else "flax")
    assert loaded.cfg == SIGLIP
    notes = {note.keyword: str(note) for note in loaded.notes}
    assert ("scan" in notes) == scan and ("tower" in notes) == (towers == "two")
    if towers == "two":  # the text tower and the temperature and bias are named as left out
        assert "4 tensor(s) under b, t, txt/" in notes["tower"]
    if scan:
        assert f"{SIGLIP.depth} blocks" in notes["scan"]

    expected = tower.apply({"params": traverse_util.unflatten_dict(native, sep="/")}, images)
    for who, got in three_outputs(loaded.cfg, loaded.params, images).items():
        assert relative_error(got, expected) < F64_BOUND, who


@pytest.mark.parametrize("fmt, scan", [("big_vision", False), ("big_vision_scan", True)])
def test_written_tree_is_the_one_big_vision_declares_and_applies(tmp_path, fmt, scan):
    params = random_params(SIGLIP, 0)
    path = tmp_path / "tower.npz"
    save_any(path, fmt, SIGLIP, params)
    tree = dict(np.load(path))
    tower = siglip_tower(scan)
    images = random_images(SIGLIP, 2, 1)
    assert {k: v.shape for k, v in tree.items()} == flat_shapes(tower, images)
    applied = tower.apply({"params": traverse_util.unflatten_dict(tree, sep="/")}, images)
    assert relative_error(applied, vitspec.forward(SIGLIP, params, images)) < F64_BOUND
    cfg, back = load_any(path, image_size=SIGLIP.image_size)
    assert cfg == SIGLIP
    for name, value in params.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_scanned_tensors_of_another_depth_are_refused_naming_them(tmp_path):
    native = random_tree(flat_shapes(siglip_tower(True), random_images(SIGLIP, 1, 0)), 0)
    name = "Transformer/encoderblock/LayerNorm_0/scale"
    native[name] = native[name][:2]
    write(tmp_path / "bad.npz", native)
    with pytest.raises(FormatError, match="one leading depth axis") as error:
        load_any(tmp_path / "bad.npz", image_size=SIGLIP.image_size)
    assert f"{name}: (2, 16)" in str(error.value)


def test_scanned_and_numbered_blocks_together_are_refused(tmp_path):
    native = random_tree(flat_shapes(siglip_tower(True), random_images(SIGLIP, 1, 0)), 0)
    native["Transformer/encoderblock_0/LayerNorm_0/scale"] = np.ones(16)
    write(tmp_path / "both.npz", native)
    with pytest.raises(FormatError, match="both scanned blocks .* and numbered ones"):
        load_any(tmp_path / "both.npz", image_size=SIGLIP.image_size)


# (knob, config overrides): each a knob big_vision's models/vit.py lacks, refused by its name.
LACKING = {
    "num_registers": dict(num_registers=1),
    "qk_norm": dict(qk_norm=True),
    "layer_scale": dict(layer_scale=0.1),
    "pre_norm": dict(pre_norm=True),
    "patch_bias": dict(patch_bias=False),
    "final_norm": dict(final_norm=False),
    "proj_bias": dict(proj_bias=False),
    "attention_dim": dict(attention_dim=8),
    "gelu": dict(gelu="quick"),
    "ln_eps": dict(ln_eps=1e-5),
}


def test_big_vision_format_refuses_every_knob_its_code_lacks_by_name():
    cfg = SIGLIP.replace(**{k: v for overrides in LACKING.values() for k, v in overrides.items()})
    with pytest.raises(FormatError, match="the big_vision layout cannot express this config") as error:
        vitspec.formats.EXTERNAL["big_vision"].from_reference(random_params(cfg, 0), cfg)
    for knob in LACKING:
        assert knob in str(error.value)
    for overrides in (
        {"pool": "avgmax"},
        {"posemb": "sinusoidal_2d"},
        {"distilled": True, "pool": "token", "class_token": True},
    ):
        cfg = SIGLIP.replace(**overrides)
        with pytest.raises(FormatError, match=next(iter(overrides))):
            vitspec.formats.EXTERNAL["big_vision_scan"].from_reference(random_params(cfg, 0), cfg)


def test_a_flax_file_with_a_knob_big_vision_lacks_reads_as_flax_and_is_refused_as_big_vision(tmp_path):
    cfg = SIGLIP.replace(num_registers=2, pre_norm=True)
    save_any(tmp_path / "m.npz", "flax", cfg, random_params(cfg, 0))
    assert load_any(tmp_path / "m.npz", image_size=cfg.image_size)[0] == cfg
    with pytest.raises(FormatError, match="cannot express") as error:
        load_any(tmp_path / "m.npz", "big_vision", image_size=cfg.image_size)
    assert "num_registers=2" in str(error.value) and "pre_norm" in str(error.value)


def test_unstacked_blocks_are_the_stacked_rows_however_often_read():
    # Each stacked tensor is held until every block's row is handed out, then released: a row asked
    # for again is read anew.
    name = "Transformer/encoderblock/LayerNorm_0/scale"
    stacked = {name: np.random.default_rng(0).standard_normal((3, 4)), "cls": np.ones((1, 1, 4))}
    tree = unstacked(stacked, "test")
    block = "Transformer/encoderblock_{}/LayerNorm_0/scale".format
    assert set(tree) == {block(0), block(1), block(2), "cls"}
    for i in (2, 0, 1, 1, 2):
        np.testing.assert_array_equal(tree[block(i)], stacked[name][i])
    np.testing.assert_array_equal(tree["cls"], stacked["cls"])
