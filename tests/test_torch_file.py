"""The torch state-dict writer that streams gives torch.save's own bytes, and falls back to torch.save
where torch cannot leave the data out."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from vitspec.formats import torch_file
from vitspec.formats.atomic import atomic_write
from vitspec.formats.files import write_tensors
from vitspec.formats.lazy import LazyTensors

torch = pytest.importorskip("torch")


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "patch_embed.proj.weight": rng.standard_normal((8, 3, 2, 2)).astype(np.float32),
        "blocks.0.attn.qkv.weight": rng.standard_normal((24, 8)).astype(np.float32),
        "blocks.0.norm1.bias": np.zeros(0, np.float32),
        "scale": np.array(2.5),  # 0-d: torch.save got it 1-d through np.ascontiguousarray
        "index": np.arange(7, dtype=np.int64),
        "half": rng.standard_normal((70, 33)).astype(np.float16),
        "big": rng.standard_normal(100_000).astype(np.float32),
    }


def _torch_save(path, arrays) -> None:
    state_dict = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    atomic_write(path, lambda f: torch.save(state_dict, f))


def _lazy(arrays: dict[str, np.ndarray], produced: list[str]) -> LazyTensors:
    def get(name):
        produced.append(name)
        return arrays[name].copy()

    return LazyTensors({k: (np.shape(v), np.asarray(v).dtype) for k, v in arrays.items()}, get)


@pytest.mark.parametrize("lazy", [False, True])
def test_streamed_state_dict_is_torch_saves_bytes(tmp_path, lazy):
    arrays, produced = _arrays(), []
    _torch_save(tmp_path / "expected.pt", arrays)
    write_tensors(tmp_path / "streamed.pt", _lazy(arrays, produced) if lazy else arrays)
    assert (tmp_path / "streamed.pt").read_bytes() == (tmp_path / "expected.pt").read_bytes()
    assert zipfile.ZipFile(tmp_path / "streamed.pt").testzip() is None  # every CRC right
    loaded = torch.load(tmp_path / "streamed.pt", weights_only=True)
    for name, value in arrays.items():
        np.testing.assert_array_equal(loaded[name].numpy(), np.ascontiguousarray(value))
    assert produced == (list(arrays) if lazy else [])


def test_without_skip_data_torch_save_writes_the_whole_dict(tmp_path, monkeypatch):
    arrays = _arrays()
    _torch_save(tmp_path / "expected.pt", arrays)
    monkeypatch.delattr(torch.serialization, "skip_data")
    write_tensors(tmp_path / "whole.pt", arrays)
    assert (tmp_path / "whole.pt").read_bytes() == (tmp_path / "expected.pt").read_bytes()


def test_a_serialization_id_it_cannot_reproduce_falls_back_to_torch_save(tmp_path, monkeypatch):
    arrays = _arrays()
    _torch_save(tmp_path / "expected.pt", arrays)
    monkeypatch.setattr(torch_file, "_combined", lambda records, crcs: 12345)  # another torch's hash
    write_tensors(tmp_path / "whole.pt", arrays)
    assert (tmp_path / "whole.pt").read_bytes() == (tmp_path / "expected.pt").read_bytes()


def test_a_tensor_that_fails_leaves_no_file(tmp_path):
    arrays = _arrays()

    def get(name):
        if name == "half":
            raise ValueError("bad tensor")
        return arrays[name]

    lazy = LazyTensors({k: (np.shape(v), np.asarray(v).dtype) for k, v in arrays.items()}, get)
    with pytest.raises(ValueError, match="bad tensor"):
        write_tensors(tmp_path / "m.pt", lazy)
    assert list(tmp_path.iterdir()) == []
