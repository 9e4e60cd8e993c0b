"""vitspec.formats.msgpack_file reads what flax's msgpack_restore reads: a plain file from an index
of where its arrays lie, anything else parsed whole."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vitspec.formats import msgpack_file
from vitspec.formats.msgpack_file import open_msgpack
from vitspec.formats.safetensors_file import CheckpointError

serialization = pytest.importorskip("flax.serialization", reason="flax writes the files these tests read")
traverse_util = pytest.importorskip("flax.traverse_util")
jnp = pytest.importorskip("jax.numpy")

SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
DTYPES = st.sampled_from(["<f4", "<f8", "<f2", "<i4", "|u1", "|b1"])
ARRAYS = st.one_of(
    DTYPES.flatmap(lambda dtype: hnp.arrays(dtype, SHAPES)),
    hnp.arrays(np.float32, SHAPES).map(lambda a: a.astype(jnp.bfloat16)),  # no Hypothesis strategy of its own
)
PATHS = st.lists(st.sampled_from(["a", "b", "kernel", "é", "Dense_0"]), min_size=1, max_size=3).map("/".join)


def _no_prefix_clash(arrays: dict) -> bool:
    return not any(other.startswith(name + "/") for name in arrays for other in arrays)


TREES = st.dictionaries(PATHS, ARRAYS, max_size=6).filter(_no_prefix_clash)


def flax_file(path, arrays: dict) -> dict:
    """Write `arrays` as flax does; return what flax reads back, flattened."""
    path.write_bytes(serialization.msgpack_serialize(traverse_util.unflatten_dict(arrays, sep="/")))
    return traverse_util.flatten_dict(serialization.msgpack_restore(path.read_bytes()), sep="/")


def assert_same(lazy, expected: dict) -> None:
    assert list(lazy) == list(expected)
    for name, value in expected.items():
        assert lazy.spec(name) == (value.shape, value.dtype)
        assert lazy[name].dtype == value.dtype
        assert lazy[name].tobytes() == np.asarray(value).tobytes()  # bit for bit, NaNs too


@given(TREES)
def test_a_flax_file_is_read_from_its_index_as_flax_reads_it(tmp_path_factory, arrays):
    path = tmp_path_factory.mktemp("msgpack") / "tree.msgpack"
    expected = flax_file(path, arrays)
    with pytest.MonkeyPatch.context() as patch:  # the whole-file parse is not what ran
        patch.setattr(msgpack_file, "_read_msgpack", lambda path: 1 / 0)
        assert_same(open_msgpack(path), expected)


def test_chunked_arrays_scalars_and_other_leaves_are_parsed_whole(tmp_path, monkeypatch):
    """flax writes an array over its chunk size (1 GB) as a map of chunks, and a NumPy scalar as
    another ext type: neither is the plain layout, and each reads as flax reads it."""
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 64)
    arrays = {"big": np.arange(100, dtype=np.float32), "small/x": np.ones(3, np.float32), "s": np.float32(2)}
    path = tmp_path / "tree.msgpack"
    expected = flax_file(path, arrays)
    assert "big/__msgpack_chunked_array__" not in expected  # flax's reader joined the chunks
    assert_same(open_msgpack(path), {k: np.asarray(v) for k, v in expected.items()})


def test_a_file_cut_short_after_it_was_opened_is_refused(tmp_path):
    path = tmp_path / "tree.msgpack"
    flax_file(path, {"a": np.zeros(1000, np.float32), "b": np.ones(3, np.float32)})
    lazy = open_msgpack(path)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"tree\.msgpack: a ends past the end of the file"):
        lazy["a"]


def test_duplicate_keys_and_deep_nesting_are_left_to_the_whole_file_parse(tmp_path):
    """msgpack allows a key twice in one map (a dict keeps the last value), and nesting past any
    parameter tree's: both left to the whole-file parse, which reads the first as flax does and
    refuses the second as flax does."""
    import msgpack

    pack = msgpack.Packer(default=serialization._msgpack_ext_pack, strict_types=True).pack
    path = tmp_path / "dup.msgpack"
    first, last = np.zeros(3, np.float32), {"b": np.ones(2, np.float32)}
    path.write_bytes(b"\x82" + pack("a") + pack(first) + pack("a") + pack(last))
    expected = traverse_util.flatten_dict(serialization.msgpack_restore(path.read_bytes()), sep="/")
    assert list(expected) == ["a/b"]
    assert_same(open_msgpack(path), expected)
    # 1,100 maps deep: past Python's recursion limit for a recursive walk, and past msgpack's stack
    path.write_bytes(b"\x81\xa1n" * 1100 + b"\x81\xa1w" + pack(np.arange(4.0)))
    with pytest.raises(CheckpointError, match="not a readable flax msgpack file"):
        open_msgpack(path)
