"""The pieces that make a streamed conversion fast keep it exact: the one-pass finiteness check,
the background prefetch of the next tensor, writes split at 64-byte file positions, reads into
memory aligned as the file is, the blocked transpose, and kernels passed between two [out, in]
layouts as the source stores them."""

from __future__ import annotations

import io
import itertools
import threading

import numpy as np
import pytest

import vitspec
from vitspec.app.convert import convert
from vitspec.formats import EXTERNAL
from vitspec.formats.atomic import empty_aligned_as, write_aligned
from vitspec.formats.checkpoint import open_reference
from vitspec.formats.files import write_tensors
from vitspec.formats.lazy import LazyTensors, finite, prefetched
from vitspec.formats.safetensors_file import read_safetensors, write_safetensors
from vitspec.formats.table import TRANSPOSING, FormatError, transposed


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([1.0, 2.0], np.float32), True),
        (np.zeros(0, np.float32), True),
        (np.array([1.0, np.nan], np.float32), False),
        (np.array([np.inf, 1.0], np.float32), False),
        (np.array([np.inf, -np.inf], np.float32), False),  # their sum is NaN: still refused
        (np.array([-np.inf], np.float64), False),
        (np.array([3e38, 3e38, -1.0], np.float32), True),  # the sum overflows; every value is finite
        (np.full(8, 60000, np.float16), True),  # past float16's range summed, so summed in float32
        (np.array([np.finfo(np.float64).max] * 2), True),
        (np.array([1 + 1j, complex(0, np.nan)], np.complex64), False),
        (np.arange(5, dtype=np.int32), True),
        (np.asfortranarray(np.ones((3, 4), np.float32)), True),
    ],
)
def test_finite_settles_each_value(values, expected):
    with np.errstate(all="raise"):  # no warning escapes from the sum of a bad tensor
        assert finite(values) is expected


def test_finite_finds_one_nan_among_millions():
    values = np.zeros(3_000_001, np.float32)
    values[1_234_567] = np.nan
    assert not finite(values)


def _recording(arrays: dict[str, np.ndarray], log: list[str], fail_on: str | None = None) -> LazyTensors:
    def get(name: str) -> np.ndarray:
        log.append(name)
        if name == fail_on:
            raise ValueError(f"cannot produce {name}")
        return arrays[name].copy()

    return LazyTensors({k: (v.shape, v.dtype) for k, v in arrays.items()}, get)


def test_prefetched_yields_every_value_in_the_order_asked_one_ahead():
    arrays = {f"t{i}": np.full(3, i, np.float32) for i in range(6)}
    produced: list[str] = []
    order = ["t3", "t0", "t5", "t1", "t2", "t4"]
    seen = []
    for name, value in prefetched(_recording(arrays, produced).__getitem__, order):
        assert len(produced) <= len(seen) + 2  # this value and at most the next
        np.testing.assert_array_equal(value, arrays[name])
        seen.append(name)
    assert seen == order and produced == order


def test_prefetched_produces_in_another_thread():
    threads = []
    list(prefetched(lambda name: threads.append(threading.current_thread()), ["a"]))
    assert threads and threads[0] is not threading.current_thread()


def test_prefetched_raises_a_producing_error_at_its_turn():
    arrays = {f"t{i}": np.zeros(2, np.float32) for i in range(5)}
    produced: list[str] = []
    seen = []
    with pytest.raises(ValueError, match="cannot produce t2"):
        for name, _ in prefetched(_recording(arrays, produced, fail_on="t2").__getitem__, arrays):
            seen.append(name)
    assert seen == ["t0", "t1"]
    assert produced == ["t0", "t1", "t2"]  # nothing after the failure


def test_prefetched_stops_producing_when_the_caller_stops():
    arrays = {f"t{i}": np.zeros(2, np.float32) for i in range(10)}
    produced: list[str] = []
    values = prefetched(_recording(arrays, produced).__getitem__, arrays)
    next(values)
    next(values)
    values.close()
    assert produced == ["t0", "t1", "t2"]


def test_prefetched_of_nothing_starts_no_thread():
    before = threading.active_count()
    assert list(prefetched({}.__getitem__, [])) == []
    assert threading.active_count() == before


class _Positions(io.BytesIO):
    """A file recording where each write began."""

    def __init__(self):
        super().__init__()
        self.starts: list[tuple[int, int]] = []

    def write(self, data) -> int:
        self.starts.append((self.tell(), len(memoryview(data).cast("B"))))
        return super().write(data)


@pytest.mark.parametrize("position", [0, 1, 8, 63, 64, 100])
@pytest.mark.parametrize("size", [0, 5, 64, 1000])
def test_write_aligned_writes_the_same_bytes_the_large_part_from_a_multiple_of_64(position, size):
    data = (np.arange(size) % 251).astype(np.uint8)
    f = _Positions()
    f.write(b"h" * position)
    f.starts.clear()
    write_aligned(f, data)
    assert f.getvalue() == b"h" * position + data.tobytes()
    assert all(start % 64 == 0 for start, n in f.starts if n > 63)


def test_write_aligned_takes_the_position_of_a_file_that_cannot_tell_it():
    f = _Positions()
    write_aligned(f, np.ones(200, np.uint8), position=10)  # as if the file were at 10
    assert [n for _, n in f.starts] == [54, 146]


@pytest.mark.parametrize("offset", [0, 8, 60, 4096 + 24])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int8])
def test_empty_aligned_as_is_aligned_as_the_file_and_for_its_dtype(offset, dtype):
    dtype = np.dtype(dtype)
    value = empty_aligned_as((3, 5), dtype, offset * dtype.itemsize)
    assert value.shape == (3, 5) and value.dtype == dtype
    assert value.flags.c_contiguous and value.flags.aligned and value.flags.writeable
    assert (value.ctypes.data - offset * dtype.itemsize) % 64 == 0


def test_empty_aligned_as_at_an_offset_its_dtype_cannot_sit_at_is_plain():
    value = empty_aligned_as((4,), np.dtype(np.float32), 6)
    assert value.shape == (4,) and value.flags.aligned


def test_safetensors_with_mixed_itemsizes_reads_back(tmp_path):
    # A float16 tensor of odd length puts the float32 tensor after it 2 bytes off a multiple of 4.
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.standard_normal(3).astype(np.float16),
        "b": rng.standard_normal((7, 9)).astype(np.float32),
        "c": rng.standard_normal(5),
        "d": np.arange(3, dtype=np.int8),
        "e": rng.standard_normal((33, 65)).astype(np.float32),
    }
    write_safetensors(tmp_path / "m.safetensors", arrays)
    back, _ = read_safetensors(tmp_path / "m.safetensors")
    assert list(back) == list(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (3, 5), (16, 17), (33, 16), (100, 7), (7, 100), (64, 64)])
def test_transposed_is_the_transpose(shape):
    array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(transposed(array), array.T)
    out = np.full((shape[1] * 2, shape[0]), -1.0, np.float32)
    transposed(array, out[: shape[1]])
    np.testing.assert_array_equal(out[: shape[1]], array.T)
    assert (out[shape[1] :] == -1).all()


@pytest.mark.parametrize("dst_name", ["out.safetensors", "out.npz"])
def test_a_reference_source_is_checked_once_and_a_nan_still_refused(tmp_path, dst_name):
    cfg = vitspec.variant("Ti/16").replace(depth=1)
    params = {k: np.ones(s, np.float32) for k, s in vitspec.param_shapes(cfg).items()}
    vitspec.save(tmp_path / "src.safetensors", cfg, params)
    _, lazy = open_reference(tmp_path / "src.safetensors")
    assert lazy.refuses_nonfinite and lazy.checked(lambda n, v: None).refuses_nonfinite
    assert not lazy.replace({"cls_token": params["cls_token"]}).refuses_nonfinite
    assert not open_reference(tmp_path / "src.safetensors", allow_nonfinite=True)[1].refuses_nonfinite

    params["cls_token"][..., 0] = np.inf
    tensors, metadata = read_safetensors(tmp_path / "src.safetensors")
    tensors["cls_token"] = params["cls_token"]
    write_safetensors(tmp_path / "bad.safetensors", tensors, metadata)
    with pytest.raises(Exception, match="NaN or infinite values in 1 tensor"):
        convert(tmp_path / "bad.safetensors", tmp_path / dst_name, to_fmt="ref", out=io.StringIO())
    assert not (tmp_path / dst_name).exists()


def _as_stored(arrays: dict[str, np.ndarray]) -> LazyTensors:
    """A source whose values are the arrays themselves, so sharing memory with it can be seen."""
    return LazyTensors({k: (v.shape, v.dtype) for k, v in arrays.items()}, arrays.__getitem__)


@pytest.mark.parametrize(
    ("src", "dst"), [("torch", "hf"), ("hf", "torch"), ("hf", "hf4"), ("torch", "torch")]
)
def test_kernels_pass_between_out_in_layouts_as_stored_and_bit_exact(src, dst):
    cfg = vitspec.variant("Ti/16").replace(depth=2, num_classes=5)
    rng = np.random.default_rng(6)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in vitspec.param_shapes(cfg).items()}
    source, target = EXTERNAL[src], EXTERNAL[dst]
    native = source.from_reference(params, cfg)
    through_arrays = target.from_reference(source.to_reference(native, cfg), cfg)
    view = target.native_view(source.reference_view(_as_stored(native), cfg), cfg)
    assert list(view) == list(through_arrays)
    for name, value in through_arrays.items():
        assert view[name].dtype == value.dtype
        np.testing.assert_array_equal(view[name], value)
    # Every kernel the target stores alone is the source's array or a row slice of it: no copy.
    single = [r.native for r in target.table(cfg) if r.layout in TRANSPOSING and len(r.reference) == 1]
    assert single
    for name in single:
        assert any(np.shares_memory(view[name], v) for v in native.values()), name


def test_a_nan_in_a_kernel_passed_as_stored_is_still_refused(tmp_path):
    cfg = vitspec.variant("Ti/16").replace(depth=1)
    params = {k: np.ones(s, np.float32) for k, s in vitspec.param_shapes(cfg).items()}
    native = EXTERNAL["torch"].from_reference(params, cfg)
    native["blocks.0.attn.qkv.weight"][-1, 0] = np.nan  # in v's rows
    write_tensors(tmp_path / "bad.pt", native)
    with pytest.raises(Exception, match="NaN or infinite values in 1 tensor"):
        convert(tmp_path / "bad.pt", tmp_path / "out.safetensors", to_fmt="hf", heads=3, out=io.StringIO())
    assert not (tmp_path / "out.safetensors").exists()


VIEW_CONFIGS = {  # configs that the layouts between them can express: plain, MAP head, CLIP, DINOv2, DeiT
    "plain": dict(),
    "map": dict(pool="map", class_token=False, gelu="tanh"),
    "clip": dict(pre_norm=True, patch_bias=False, gelu="quick", ln_eps=1e-5),
    "layer_scale": dict(layer_scale=1e-5, num_classes=0),
    "distilled": dict(distilled=True),
    "no_qkv_bias": dict(qkv_bias=False),
}


@pytest.mark.parametrize("overrides", VIEW_CONFIGS.values(), ids=VIEW_CONFIGS)
def test_every_pair_of_layouts_converts_through_views_as_through_arrays(overrides):
    """A streamed conversion (the source's reference view under the target's native view, kernels
    passed as stored where both are [out, in]) writes what converting whole trees writes."""
    cfg = vitspec.variant("Ti/16").replace(depth=2, num_classes=5).replace(**overrides)
    rng = np.random.default_rng(7)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in vitspec.param_shapes(cfg).items()}
    natives = {}
    for name, layout in EXTERNAL.items():
        try:
            natives[name] = layout.from_reference(params, cfg)
        except FormatError:
            continue  # a layout that cannot express this config
    assert len(natives) >= 2
    for (src, native), dst in itertools.product(natives.items(), natives):
        source, target = EXTERNAL[src], EXTERNAL[dst]
        view = target.native_view(source.reference_view(_as_stored(native), cfg), cfg)
        assert list(view) == list(natives[dst]), (src, dst)
        for name, value in natives[dst].items():
            got = view[name]
            assert got.dtype == value.dtype and np.array_equal(got, value), (src, dst, name)
