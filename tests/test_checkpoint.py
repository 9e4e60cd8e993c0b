"""Checkpoints: bit-exact round trips, the safetensors format as others read it, named errors, atomicity."""

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import vitspec
from parity_tests.strategies import configs, random_params
from vitspec import CheckpointError
from vitspec.formats import checkpoint as ckpt
from vitspec.formats import safetensors_file


@settings(max_examples=10)
@given(
    cfg=configs(),
    seed=st.integers(0, 2**16),
    suffix=st.sampled_from([".safetensors", ".npz"]),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_save_then_load_is_bit_exact(tmp_path_factory, cfg, seed, suffix, dtype):
    path = tmp_path_factory.mktemp("ckpt") / f"model{suffix}"
    params = random_params(cfg, seed, dtype=dtype)
    vitspec.save(path, cfg, params)
    cfg2, params2 = vitspec.load(path)
    assert cfg2 == cfg
    assert list(params2) == list(params)
    for k in params:
        assert params2[k].dtype == params[k].dtype and params2[k].tobytes() == params[k].tobytes(), k


def test_our_safetensors_is_what_the_safetensors_package_reads(tmp_path):
    cfg = vitspec.variant("Ti/16", depth=2, image_size=32)
    params = vitspec.init_params(cfg, seed=3)
    vitspec.save(tmp_path / "a.safetensors", cfg, params)
    theirs = load_file(tmp_path / "a.safetensors")
    assert set(theirs) == set(params) and all(np.array_equal(theirs[k], params[k]) for k in params)
    # And the other way: a file the package writes, with our metadata, loads here.
    save_file(params, tmp_path / "b.safetensors", metadata={ckpt.CONFIG_KEY: cfg.to_json()})
    cfg2, params2 = vitspec.load(tmp_path / "b.safetensors")
    assert cfg2 == cfg and all(np.array_equal(params2[k], params[k]) for k in params)


def test_bfloat16_tensors_are_widened_exactly(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 1e-3], dtype=np.float32)
    bf16_bits = (values.view(np.uint32) >> 16).astype("<u2")
    header = json.dumps({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "bf.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bf16_bits.tobytes())
    tensors, _ = safetensors_file.read_safetensors(tmp_path / "bf.safetensors")
    np.testing.assert_array_equal(tensors["w"], (bf16_bits.astype(np.uint32) << 16).view(np.float32))


@pytest.fixture
def saved(tmp_path):
    cfg = vitspec.variant("Ti/16", depth=1, image_size=32, num_classes=10)
    vitspec.save(tmp_path / "m.safetensors", cfg, vitspec.init_params(cfg))
    return cfg, tmp_path / "m.safetensors"


def test_truncated_file_is_named(saved):
    _, path = saved
    data = path.read_bytes()
    for cut, message in [(4, "too short"), (20, "header length"), (len(data) - 100, "truncated file")]:
        bad = path.with_name(f"cut{cut}.safetensors")
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=message) as e:
            vitspec.load(bad)
        assert str(bad) in str(e.value)


def test_foreign_files_are_named(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 8)
    with pytest.raises(CheckpointError, match="not a valid safetensors file: invalid JSON in header"):
        vitspec.load(tmp_path / "x.safetensors")
    save_file({"w": np.zeros(3, np.float32)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no vitspec config in the file"):
        vitspec.load(tmp_path / "plain.safetensors")
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(CheckpointError, match=r"x.npz: not a readable .npz file"):
        vitspec.load(tmp_path / "x.npz")
    np.savez(tmp_path / "noconfig.npz", w=np.zeros(3))
    with pytest.raises(CheckpointError, match="no vitspec config"):
        vitspec.load(tmp_path / "noconfig.npz")
    (tmp_path / "m.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint suffix '.pt'"):
        vitspec.load(tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        vitspec.load(tmp_path / "missing.safetensors")


def test_tree_not_matching_its_config_names_the_keys(saved, tmp_path):
    cfg, path = saved
    tensors, metadata = safetensors_file.read_safetensors(path)
    tensors["head/kernel"] = np.zeros((192, 7), np.float32)
    del tensors["norm/bias"]
    save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError) as e:
        vitspec.load(tmp_path / "bad.safetensors")
    assert "missing keys (1): ['norm/bias']" in str(e.value)
    assert "head/kernel: expected (192, 10), got (192, 7)" in str(e.value)
    bad_config = dict(metadata, **{ckpt.CONFIG_KEY: json.dumps({**cfg.to_dict(), "num_heads": 5})})
    tensors = safetensors_file.read_safetensors(path)[0]
    save_file(tensors, tmp_path / "badcfg.safetensors", metadata=bad_config)
    with pytest.raises(
        CheckpointError, match="the stored config is invalid: num_heads=5 does not divide width=192"
    ):
        vitspec.load(tmp_path / "badcfg.safetensors")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial(saved, monkeypatch):
    cfg, path = saved
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "fsync", explode)
    with pytest.raises(OSError, match="disk full"):
        vitspec.save(path, cfg, vitspec.init_params(cfg, seed=1))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_save_refuses_a_tree_that_does_not_match(tmp_path):
    cfg = vitspec.variant("Ti/16", depth=1)
    with pytest.raises(vitspec.ParamTreeError, match="missing keys"):
        vitspec.save(tmp_path / "m.safetensors", cfg, {})


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    cfg = vitspec.ViTConfig(
        image_size=4, patch_size=2, width=8, depth=1, num_heads=2, mlp_dim=8, num_classes=2
    )
    old = os.umask(0o022)
    try:
        vitspec.save(tmp_path / "a.safetensors", cfg, vitspec.init_params(cfg))
        os.umask(0o077)
        vitspec.save(tmp_path / "b.npz", cfg, vitspec.init_params(cfg))
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.npz").stat().st_mode & 0o777 == 0o600


def test_non_finite_tensors_are_refused_by_name_on_save_and_load(tmp_path):
    cfg = vitspec.ViTConfig(
        image_size=4, patch_size=2, width=8, depth=1, num_heads=2, mlp_dim=8, num_classes=2
    )
    params = vitspec.init_params(cfg)
    params["head/bias"] = np.array([np.nan, 1.0], np.float32)
    with pytest.raises(
        CheckpointError, match="refusing to write NaN or infinite values in 1 tensor.*head/bias"
    ):
        vitspec.save(tmp_path / "m.safetensors", cfg, params)
    assert not (tmp_path / "m.safetensors").exists()
    from safetensors.numpy import save_file  # a file written by someone else

    save_file(dict(params), str(tmp_path / "m.safetensors"), metadata={"vitspec_config": cfg.to_json()})
    with pytest.raises(CheckpointError, match="NaN or infinite values in 1 tensor.*head/bias"):
        vitspec.load(tmp_path / "m.safetensors")
    assert np.isnan(vitspec.load(tmp_path / "m.safetensors", allow_nonfinite=True)[1]["head/bias"][0])


def test_a_symlink_is_written_through_and_stale_temp_files_are_cleared(tmp_path):
    cfg = vitspec.ViTConfig(
        image_size=4, patch_size=2, width=8, depth=1, num_heads=2, mlp_dim=8, num_classes=2
    )
    target, link = tmp_path / "run1.safetensors", tmp_path / "latest.safetensors"
    vitspec.save(target, cfg, vitspec.init_params(cfg, 0))
    link.symlink_to(target.name)
    stale = tmp_path / ".run1.safetensors.abc123.tmp"  # left by a write killed earlier
    stale.write_bytes(b"x" * 100)
    vitspec.save(link, cfg, vitspec.init_params(cfg, 1))
    assert link.is_symlink() and not stale.exists()
    np.testing.assert_array_equal(
        vitspec.load(target)[1]["pos_embed"], vitspec.init_params(cfg, 1)["pos_embed"]
    )
