"""The streaming readers and writers of vitspec.formats (lazy trees, one tensor at a time) give
what the whole-tree ones give: the same bytes, or the same arrays read back."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

import vitspec
from vitspec.app.convert import convert
from vitspec.formats import hf, open_with_notes, timm
from vitspec.formats.files import open_tensors, read_tensors, write_tensors
from vitspec.formats.lazy import LazyTensors
from vitspec.formats.msgpack_file import _read_msgpack, open_msgpack, write_msgpack
from vitspec.formats.npz_file import open_npz, write_npz
from vitspec.formats.safetensors_file import (
    CheckpointError,
    open_safetensors,
    read_safetensors,
    write_safetensors,
)


def _tree(rng) -> dict[str, np.ndarray]:
    return {
        "embedding/kernel": rng.standard_normal((2, 2, 3, 4)).astype(np.float32),
        "Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias": rng.standard_normal(8).astype(np.float32),
        "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel": rng.standard_normal((4, 8)),
        "Transformer/encoder_norm/scale": rng.standard_normal(4).astype(np.float16),
        "cls": np.arange(6, dtype=np.int32).reshape(1, 2, 3),
        "head/bias": np.zeros(0, np.float32),
    }


def _lazy(arrays: dict[str, np.ndarray], reads: list[str] | None = None) -> LazyTensors:
    def get(name):
        if reads is not None:
            reads.append(name)
        return arrays[name].copy()

    return LazyTensors({k: (v.shape, v.dtype) for k, v in arrays.items()}, get)


@pytest.mark.parametrize("lazy", [False, True])
def test_msgpack_writer_matches_flax_byte_for_byte(lazy):
    from flax import serialization, traverse_util

    arrays = _tree(np.random.default_rng(0))
    expected = serialization.msgpack_serialize(traverse_util.unflatten_dict(arrays, sep="/"))
    f = io.BytesIO()
    write_msgpack(f, _lazy(arrays) if lazy else arrays)
    assert f.getvalue() == expected


@pytest.mark.parametrize("n", [0, 1, 3, 5, 60, 64, 300, 17000, 70000])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8])
def test_msgpack_writer_writes_every_ext_length_as_flax(n, dtype):
    from flax import serialization

    arrays = {"a/x": (np.arange(n) % 100).astype(dtype)}
    f = io.BytesIO()
    write_msgpack(f, arrays)
    assert f.getvalue() == serialization.msgpack_serialize({"a": {"x": arrays["a/x"]}})


def test_msgpack_writer_chunks_large_arrays_as_flax_does(monkeypatch):
    from flax import serialization, traverse_util

    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 64)  # 16 float32s a chunk
    arrays = {"a/big": np.arange(100, dtype=np.float32).reshape(10, 10), "a/small": np.ones(3, np.float32)}
    expected = serialization.msgpack_serialize(traverse_util.unflatten_dict(arrays, sep="/"))
    f = io.BytesIO()
    write_msgpack(f, _lazy(arrays))
    assert f.getvalue() == expected
    restored = traverse_util.flatten_dict(serialization.msgpack_restore(f.getvalue()), sep="/")
    np.testing.assert_array_equal(restored["a/big"], arrays["a/big"])


def test_msgpack_writer_refuses_a_name_that_is_also_a_prefix():
    with pytest.raises(CheckpointError, match="prefix"):
        write_msgpack(io.BytesIO(), {"a": np.zeros(1), "a/b": np.zeros(1)})


def test_streamed_msgpack_reader_matches_flax_restore(tmp_path):
    from flax import serialization, traverse_util

    arrays = _tree(np.random.default_rng(1))
    path = tmp_path / "tree.msgpack"
    path.write_bytes(serialization.msgpack_serialize(traverse_util.unflatten_dict(arrays, sep="/")))
    expected = traverse_util.flatten_dict(serialization.msgpack_restore(path.read_bytes()), sep="/")
    got = _read_msgpack(path)
    assert list(got) == list(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype
        np.testing.assert_array_equal(got[k], expected[k])


@pytest.mark.parametrize("read", [_read_msgpack, open_msgpack])
def test_streamed_msgpack_reader_refuses_truncated_and_extra_bytes(tmp_path, read):
    from flax import serialization

    data = serialization.msgpack_serialize({"a": np.ones(100, np.float32)})
    path = tmp_path / "bad.msgpack"
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="not a readable flax msgpack file.*incomplete"):
        read(path)
    path.write_bytes(data + b"\x00")
    with pytest.raises(CheckpointError, match="not a readable flax msgpack file.*extra data"):
        read(path)


@pytest.mark.parametrize("lazy", [False, True])
def test_streamed_npz_reads_back_as_np_savez(lazy):
    arrays = {k.replace("/", "."): v for k, v in _tree(np.random.default_rng(2)).items()}
    ours, theirs = io.BytesIO(), io.BytesIO()
    write_npz(ours, _lazy(arrays) if lazy else arrays)
    np.savez(theirs, **arrays)
    ours.seek(0)
    theirs.seek(0)
    with np.load(ours) as a, np.load(theirs) as b:
        assert a.files == b.files
        for k in b.files:
            assert a[k].dtype == b[k].dtype
            np.testing.assert_array_equal(a[k], b[k])
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        assert [i.filename for i in a.infolist()] == [i.filename for i in b.infolist()]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in a.infolist())
        for name in b.namelist():
            assert a.read(name) == b.read(name)


def test_open_npz_reads_shapes_from_headers_and_values_on_access(tmp_path):
    arrays = {"a": np.arange(6.0).reshape(2, 3), "b": np.ones((1, 4), np.float32)}
    path = tmp_path / "x.npz"
    np.savez(path, **arrays)
    lazy = open_npz(path)
    assert lazy.spec("a") == ((2, 3), np.dtype(np.float64))
    assert lazy.spec("b") == ((1, 4), np.dtype(np.float32))
    np.testing.assert_array_equal(lazy["a"], arrays["a"])


def test_safetensors_streamed_write_and_lazy_read_match_whole(tmp_path):
    arrays = {k.replace("/", "."): v for k, v in _tree(np.random.default_rng(3)).items()}
    whole, streamed = tmp_path / "whole.safetensors", tmp_path / "streamed.safetensors"
    write_safetensors(whole, arrays, {"k": "v"})
    reads: list[str] = []
    write_safetensors(streamed, _lazy(arrays, reads), {"k": "v"})
    assert reads == list(arrays)  # each tensor produced once, in order
    assert whole.read_bytes() == streamed.read_bytes()
    lazy, metadata = open_safetensors(streamed)
    eager, _ = read_safetensors(streamed)
    assert metadata == {"k": "v"} and list(lazy) == list(eager) == list(arrays)
    for k, v in arrays.items():
        assert lazy.spec(k) == (v.shape, v.dtype)
        np.testing.assert_array_equal(lazy[k], v)


def test_lazy_safetensors_reads_the_file_it_checked(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": np.ones(3, np.float32), "b": np.ones(1000, np.float32)})
    lazy, _ = open_safetensors(path)
    write_safetensors(path, {"a": np.zeros(3, np.float32)})  # renamed over it: another file
    np.testing.assert_array_equal(lazy["a"], np.ones(3, np.float32))
    lazy, _ = open_safetensors(path)
    with path.open("r+b") as f:
        f.truncate(20)
    with pytest.raises(CheckpointError, match="shortened"):
        lazy["a"]


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_reader_maps_zip_files_and_still_reads_legacy_ones(tmp_path, zip_format):
    import torch

    state = {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(2, dtype=torch.bfloat16),
    }
    path = tmp_path / "x.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    lazy, _ = open_tensors(path)
    assert lazy.spec("b") == ((2,), np.dtype(np.float32))
    np.testing.assert_array_equal(lazy["w"], state["w"].numpy())
    np.testing.assert_array_equal(read_tensors(path)[0]["b"], np.ones(2, np.float32))


def test_fused_rows_read_their_source_once(tmp_path):
    cfg = vitspec.variant("Ti/16").replace(depth=1)
    rng = np.random.default_rng(4)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in vitspec.param_shapes(cfg).items()}
    native = timm.FORMAT.from_reference(params, cfg)
    reads: list[str] = []
    view = timm.FORMAT.reference_view(_lazy(native, reads), cfg)
    got = dict(view)
    assert sorted(reads) == sorted(native)  # fused qkv read once for q, k and v
    for k, v in params.items():
        np.testing.assert_array_equal(got[k], v)


@pytest.mark.parametrize("dst_name", ["out.safetensors", "out.npz", "out.pt", "out.msgpack", "hfdir"])
def test_streamed_conversion_refuses_a_nonfinite_source_and_leaves_nothing(tmp_path, dst_name):
    cfg = vitspec.variant("Ti/16").replace(depth=2)
    rng = np.random.default_rng(5)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in vitspec.param_shapes(cfg).items()}
    src = tmp_path / "src.safetensors"
    write_tensors(src, hf.FORMAT.from_reference(params, cfg))
    native, _ = read_tensors(src)
    last = list(native)[-3]
    native[last] = native[last].copy()
    native[last].flat[0] = np.nan
    write_tensors(src, native)
    to = {"out.safetensors": "ref", "out.npz": "flax", "out.pt": "torch", "out.msgpack": "flax"}
    with pytest.raises(Exception, match="NaN or infinite values in 1 tensor"):
        convert(src, tmp_path / dst_name, to_fmt=to.get(dst_name, "hf"), heads=3, out=io.StringIO())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]


def test_open_with_notes_reads_no_values_until_asked(tmp_path):
    cfg = vitspec.variant("Ti/16").replace(depth=1)
    params = {k: np.ones(s, np.float32) for k, s in vitspec.param_shapes(cfg).items()}
    src = tmp_path / "src.safetensors"
    vitspec.save(src, cfg, params)
    loaded = open_with_notes(src)
    assert isinstance(loaded.params, LazyTensors) and loaded.cfg == cfg
    np.testing.assert_array_equal(loaded.params["cls_token"], params["cls_token"])


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_streamed_reference_save_produces_each_tensor_once(tmp_path, suffix):
    """A conversion's source tensor is read (and transposed) once per write; a membership test on a
    lazy tree reads nothing (Mapping's default `in` would produce the value, as .npz saving did)."""
    cfg = vitspec.variant("Ti/16", depth=1, image_size=32)
    params = vitspec.init_params(cfg)
    reads: list[str] = []
    lazy = _lazy(params, reads)
    assert "head/kernel" in lazy and "nothing" not in lazy and not reads
    vitspec.save(tmp_path / f"x{suffix}", cfg, lazy)
    assert sorted(reads) == sorted(params) and len(reads) == len(set(reads))


# (file or directory name, --to) of each format bench/convert_scale.py converts between
PAIR_FORMATS = [
    ("ref.safetensors", "ref"),
    ("ref.npz", "ref"),
    ("timm.pt", "torch"),
    ("big_vision.npz", "flax"),
    ("big_vision.msgpack", "flax"),
    ("vit_jax.npz", "vit_jax"),
    ("hf.safetensors", "hf"),
    ("hf_dir", "hf"),
]


def test_every_conversion_reads_each_source_tensor_once(tmp_path, monkeypatch):
    """Between every pair of formats, each stored tensor of the source is read from its file once
    (a tree's lookups, views over views, and writers that need shapes first all read nothing)."""
    from vitspec.formats import files, msgpack_file, npz_file, safetensors_file
    from vitspec.formats.inference import reading_flags

    cfg = vitspec.variant("Ti/16", depth=2, image_size=32)
    flags = reading_flags(cfg)
    flags["source_image_size"] = flags.pop("image_size")
    vitspec.save(tmp_path / "source.safetensors", cfg, vitspec.init_params(cfg))
    for name, to in PAIR_FORMATS:
        convert(str(tmp_path / "source.safetensors"), str(tmp_path / name), to_fmt=to, out=io.StringIO())
    reads: dict = {}

    def counted(read, key):
        def read_counted(*args):
            reads[key(*args)] = reads.get(key(*args), 0) + 1
            return read(*args)

        return read_counted

    for module in (npz_file, safetensors_file, msgpack_file):
        where = lambda f, offset, *spec: (f.name, offset)  # noqa: E731
        monkeypatch.setattr(module, "read_array", counted(module.read_array, where))
    monkeypatch.setattr(files, "tensor_to_numpy", counted(files.tensor_to_numpy, lambda t: t.data_ptr()))

    for source, _ in PAIR_FORMATS:
        given = {} if source.startswith("ref.") else flags
        for target, to in PAIR_FORMATS:
            reads.clear()
            out = str(tmp_path / ("out_" + target))
            convert(str(tmp_path / source), out, to_fmt=to, overwrite=True, out=io.StringIO(), **given)
            assert reads and max(reads.values()) == 1, (source, target, max(reads.values()))
