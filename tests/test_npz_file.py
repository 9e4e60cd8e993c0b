"""vitspec.formats.npz_file writes np.savez's bytes and reads what np.load reads, checking each
member's CRC-32 itself."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vitspec.formats import npz_file
from vitspec.formats.npz_file import open_npz, write_npz
from vitspec.formats.safetensors_file import CheckpointError

DTYPES = st.sampled_from(["<f4", ">f4", "<f8", "<f2", "<i4", ">i8", "|u1", "|b1", "<c8"])
NAMES = st.text(st.sampled_from("ab/._é0"), min_size=1, max_size=6)
ARRAYS = st.dictionaries(
    NAMES,
    DTYPES.flatmap(lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))),
    max_size=4,
)


def savez_bytes(arrays) -> bytes:
    f = io.BytesIO()
    np.savez(f, **arrays)
    return f.getvalue()


def written(arrays) -> bytes:
    f = io.BytesIO()
    write_npz(f, arrays)
    return f.getvalue()


@given(ARRAYS)
def test_write_npz_writes_np_savez_bytes(arrays):
    assert written(arrays) == savez_bytes(arrays)


@pytest.mark.parametrize("limit", [90, 200, 1000])
def test_zip64_records_past_the_limit_are_np_savez_bytes(monkeypatch, limit):
    """A ViT-H file passes zipfile's 2^31 - 1 limit: members at larger offsets carry the offset in a
    zip64 extra field, and the central directory a zip64 end record. Both writers read their limit
    at the call, so a small one puts these records into a small file."""
    arrays = {f"w{i}": np.full((7, 5), i, np.float32) for i in range(6)}
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", limit)
    monkeypatch.setattr(npz_file, "_ZIP64_LIMIT", limit)
    ours = written(arrays)
    assert ours == savez_bytes(arrays)
    assert (b"PK\x06\x06" in ours) == (len(ours) > limit)  # the zip64 end record, where needed


def test_write_npz_orders_a_fortran_array_as_c_and_refuses_objects():
    value = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    assert written({"f": value}) == savez_bytes({"f": np.ascontiguousarray(value)})
    with pytest.raises(ValueError, match="'o'|o: an array of Python objects"):
        written({"o": np.array([None, 1], dtype=object)})


@given(ARRAYS)
def test_open_npz_reads_what_np_load_reads(tmp_path_factory, arrays):
    path = tmp_path_factory.mktemp("npz") / "x.npz"
    np.savez(path, **arrays)
    lazy = open_npz(path)
    with np.load(path) as theirs:
        assert list(lazy) == theirs.files
        for name in theirs.files:
            assert lazy.spec(name) == (theirs[name].shape, theirs[name].dtype)
            assert lazy[name].dtype == theirs[name].dtype
            np.testing.assert_array_equal(lazy[name], theirs[name])


def test_a_stored_member_is_read_from_the_file_not_through_np_load(tmp_path, monkeypatch):
    """The fast path is the one taken: with np.load's member reading broken, np.savez's members
    still read."""
    path = tmp_path / "x.npz"
    np.savez(path, a=np.arange(5.0), b=np.ones((2, 3), np.float32))
    lazy = open_npz(path)
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, key: 1 / 0)
    np.testing.assert_array_equal(lazy["a"], np.arange(5.0))
    np.testing.assert_array_equal(lazy["b"], np.ones((2, 3), np.float32))


@pytest.mark.parametrize("save", [np.savez_compressed, np.savez])
def test_members_np_load_reads_itself_compressed_and_fortran(tmp_path, save):
    path = tmp_path / "x.npz"
    arrays = {"c": np.arange(6.0).reshape(2, 3), "f": np.asfortranarray(np.arange(6.0).reshape(2, 3))}
    save(path, **arrays)
    lazy = open_npz(path)
    for name, value in arrays.items():
        np.testing.assert_array_equal(lazy[name], value)


def test_a_damaged_member_is_refused_naming_the_file_and_the_member(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.zeros(1000, np.float32), b=np.ones(3))
    data = bytearray(path.read_bytes())
    data[data.index(b"a.npy") + 500] ^= 1  # inside a's zeros, past its local header and .npy header
    path.write_bytes(bytes(data))
    lazy = open_npz(path)
    np.testing.assert_array_equal(lazy["b"], np.ones(3))
    with pytest.raises(CheckpointError, match=r"x\.npz: a\.npy does not match its CRC-32"):
        lazy["a"]


def test_a_file_cut_short_is_refused(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.zeros(1000, np.float32))
    lazy = open_npz(path)
    with open(path, "r+b") as f:  # shortened in place after it was opened
        f.truncate(200)
    with pytest.raises(CheckpointError, match=r"x\.npz: a\.npy ends past the end of the file"):
        lazy["a"]
