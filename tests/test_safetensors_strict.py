"""Reading .safetensors as strictly as the `safetensors` package: every malformed file is a short
CheckpointError naming the file, a forged size costs nothing, and damage never loads wrong contents.
"""

import json
import struct
import time
import tracemalloc
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import vitspec
from parity_tests.strategies import SMALL_FIELDS
from vitspec import CheckpointError
from vitspec.formats import checkpoint as ckpt
from vitspec.formats import safetensors_file

MAX_MESSAGE = 400
F32 = np.arange(4, dtype=np.float32).tobytes()


def write(path: Path, header, data: bytes = F32) -> Path:
    """A file of `header` (a dict as JSON, or raw bytes) padded to 8 bytes, then `data`."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def entry(shape, begin, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def refused(path: Path, match: str, read=safetensors_file.read_safetensors) -> str:
    """The message of the CheckpointError reading `path` raises; nothing else may escape."""
    with pytest.raises(CheckpointError, match=match) as e:
        read(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and len(message) < MAX_MESSAGE, message
    return message


# The cases and their neighbours; most were read as something else, or raised a bare traceback.
MALFORMED = {
    "overlapping offsets (a bias read from the kernel's bytes)": (
        {"kernel": entry([4], 0, 16), "bias": entry([2], 0, 8)},
        "invalid offset for tensor",
    ),
    "negative offsets (read from the end of the file)": ({"w": entry([4], -16, 0)}, "expected usize"),
    "reversed offsets": ({"w": entry([4], 16, 0)}, "invalid offset for tensor `w`"),
    "a gap between tensors": ({"a": entry([1], 0, 4), "b": entry([2], 8, 16)}, "invalid offset"),
    "float offsets": ({"w": entry([4], 0.0, 16.0)}, "floating point `0.0`, expected usize"),
    "shape [-1, -8]": ({"w": entry([-1, -8], 0, 16)}, "integer `-1`, expected usize"),
    'shape ["8"]': ({"w": entry(["8"], 0, 16)}, 'string "8", expected usize'),
    "a shape that overflows": ({"w": entry([2**40, 2**40], 0, 16)}, "overflow computing buffer size"),
    "a shape the bytes do not fill": ({"w": entry([3], 0, 16)}, "invalid shape, data type, or offset"),
    "__metadata__ as a string": (
        {"__metadata__": "config", "w": entry([4], 0, 16)},
        'string "config", expected a map',
    ),
    "a metadata value that is not a string": (
        {"__metadata__": {"vitspec_config": {"depth": 1}}, "w": entry([4], 0, 16)},
        "expected a string",
    ),
    "a 100k-deep JSON header": (b"[" * 100_000 + b"]" * 100_000, "invalid JSON in header"),
    "a header that is not an object": (b"[1, 2]", "invalid JSON in header"),
    "an unknown dtype": ({"w": entry([4], 0, 16, "X32")}, "unknown variant `X32`"),
    "a dtype NumPy has no type for": ({"w": entry([16], 0, 16, "F8_E4M3")}, "dtype F8_E4M3, which this"),
    "duplicate tensor names": (
        b'{"w": '
        + json.dumps(entry([2], 0, 8)).encode()
        + b', "w": '
        + json.dumps(entry([2], 8, 16)).encode()
        + b"}",
        "invalid offset for tensor `w`",
    ),
    "duplicate tensor names with the same entry (the package reads these)": (
        b'{"w": '
        + json.dumps(entry([4], 0, 16)).encode()
        + b', "w": '
        + json.dumps(entry([4], 0, 16)).encode()
        + b"}",
        "the key 'w' twice",
    ),
    "duplicate metadata keys: two configs (the package reads these)": (
        b'{"__metadata__": {"vitspec_config": "a", "vitspec_config": "b"}, "w": '
        + json.dumps(entry([4], 0, 16)).encode()
        + b"}",
        "the key 'vitspec_config' twice",
    ),
    "a tensor name of a megabyte in an error": ({"w" * 2**20: entry([4], -16, 0)}, "expected usize"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_header_is_a_named_error(tmp_path, case):
    header, match = MALFORMED[case]
    path = write(tmp_path / "bad.safetensors", header)
    refused(path, match)
    refused(path, match, read=vitspec.load)


def test_trailing_bytes_are_refused(tmp_path):
    path = write(tmp_path / "long.safetensors", {"w": entry([4], 0, 16)}, F32 + b"\0" * 8)
    refused(path, r"not fully covered \(a truncated file, or bytes after the last tensor\)")


def test_a_forged_header_length_reads_nothing(tmp_path):
    """A sparse 201 MB file declaring a 200 MB header (over the format's 100 MB limit), and one
    declaring a header past its end: refused from the first 8 bytes."""
    for declared, size, match in [
        (200 * 2**20, 201 * 2**20, "header length 209715200 exceeds the format's limit of 104857600"),
        (50 * 2**20, 40 * 2**20, "header length 52428800 runs past the file's 41943040 bytes"),
    ]:
        path = tmp_path / f"forged{declared}.safetensors"
        with path.open("wb") as f:
            f.write(struct.pack("<Q", declared))
            f.truncate(size)
        tracemalloc.start()
        try:
            refused(path, match)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**20, peak


@pytest.fixture
def tiny(tmp_path):
    cfg = vitspec.ViTConfig(**SMALL_FIELDS)
    path = tmp_path / "tiny.safetensors"
    vitspec.save(path, cfg, vitspec.init_params(cfg))
    return cfg, path


@pytest.mark.parametrize("depth", [10**6, 10**7])
def test_a_config_far_larger_than_its_file_is_refused_before_building_it(tiny, depth):
    cfg, tiny_path = tiny
    tensors, metadata = safetensors_file.read_safetensors(tiny_path)
    path = tiny_path.with_name("deep.safetensors")
    save_file(tensors, path, metadata={**metadata, ckpt.CONFIG_KEY: cfg.replace(depth=depth).to_json()})
    assert path.stat().st_size < 10_000
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = refused(path, "the stored config implies .* parameters", read=vitspec.load)
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 2 and peak < 4 * 2**20, (seconds, peak, message)


def test_a_tree_far_smaller_than_its_config_is_refused_by_the_counts(tiny):
    cfg, path = tiny
    _, params = vitspec.load(path)
    start = time.perf_counter()
    with pytest.raises(
        vitspec.ParamTreeError,
        match=r"the config has 16000008 tensors \(1184000389 values, depth 1000000\); the tree has 24$",
    ):
        vitspec.validate_params(cfg.replace(depth=10**6), params)
    assert time.perf_counter() - start < 1


def test_mismatch_messages_list_the_first_keys_and_a_count(tiny):
    cfg, path = tiny
    _, params = vitspec.load(path)
    with pytest.raises(vitspec.ParamTreeError) as e:
        vitspec.validate_params(cfg.replace(depth=5), params)
    message = str(e.value)
    assert "missing keys (64): ['blocks/1/norm1/scale', " in message and "'] and 59 more" in message
    assert len(message) < MAX_MESSAGE


def test_a_deeply_nested_stored_config_is_a_named_error(tiny):
    _, tiny_path = tiny
    tensors, metadata = safetensors_file.read_safetensors(tiny_path)
    path = tiny_path.with_name("nested.safetensors")
    save_file(tensors, path, metadata={**metadata, ckpt.CONFIG_KEY: "[" * 100_000 + "]" * 100_000})
    refused(path, "the stored config is invalid", read=vitspec.load)


def test_loaded_arrays_are_their_own_whatever_happens_to_the_file(tiny):
    """Each tensor is read into an array of its own: updating one leaves the file alone, and a file
    rewritten in place (cp, torch.save, truncation) or saved over leaves the arrays as they were."""
    cfg, path = tiny
    before = path.read_bytes()
    _, params = vitspec.load(path)
    params["patch_embed/kernel"] += 1  # the training loop updates loaded parameters in place
    assert path.read_bytes() == before
    kept = {k: v.copy() for k, v in params.items()}
    with open(path, "r+b") as f:  # in place, as cp does
        f.truncate(8)
    assert all(np.array_equal(params[k], kept[k]) for k in params)
    vitspec.save(path, cfg, vitspec.init_params(cfg, seed=1))
    assert all(np.array_equal(params[k], kept[k]) for k in params)


def test_a_file_replaced_while_being_checked_is_not_read(tiny, monkeypatch):
    cfg, path = tiny
    other = path.with_name("other.safetensors")
    vitspec.save(other, cfg.replace(num_classes=2), vitspec.init_params(cfg.replace(num_classes=2)))
    checked = safetensors_file.safe_open

    def replaced_meanwhile(*args, **kwargs):
        other.replace(path)
        return checked(*args, **kwargs)

    monkeypatch.setattr(safetensors_file, "safe_open", replaced_meanwhile)
    refused(path, "replaced by another file while being read")


# --- fuzzing: a small valid reference checkpoint, damaged at random ---------------------------

FUZZ_EXAMPLES = 500


@cache
def base_file() -> bytes:
    import tempfile

    cfg = vitspec.ViTConfig(**{**SMALL_FIELDS, "width": 6, "num_heads": 2, "mlp_dim": 4})
    with tempfile.TemporaryDirectory() as tmp:
        vitspec.save(Path(tmp) / "m.safetensors", cfg, vitspec.init_params(cfg, seed=1))
        return (Path(tmp) / "m.safetensors").read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict | str, body: bytes, pad: bool = True) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    raw += b" " * (-len(raw) % 8) if pad else b""
    return struct.pack("<Q", len(raw)) + raw + body


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
) | st.sampled_from([10**4000, 10**400, -(10**400), 10**6, 10**7, 0, -1, "8", [], {}])
CONFIG_FIELDS = sorted(vitspec.ViTConfig().to_dict())
MUTATIONS = (
    *("flip", "truncate", "extend", "length", "unpadded"),  # bytes
    *("offsets", "shape", "dtype", "reinterpret", "swap", "drop", "rename", "duplicate"),  # entries
    *("metadata", "config field", "config text"),  # metadata
)
ITEMSIZE = {"F64": 8, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def mutate(data: st.DataObject, original: bytes) -> tuple[str, bytes]:
    """One random mutation of a valid file: its kind and the damaged bytes."""
    header, body = split(original)
    names = [k for k in header if k != "__metadata__"]
    name = data.draw(st.sampled_from(names))
    kind = data.draw(st.sampled_from(MUTATIONS))
    info = header[name]
    if kind == "flip":
        out = bytearray(original)
        # Most flips land in the header, where a flip changes meaning rather than a value.
        span = data.draw(st.sampled_from([len(original), 8 + len(original) - len(body)]))
        for at in data.draw(st.lists(st.integers(0, min(span, len(out)) - 1), min_size=1, max_size=4)):
            out[at] ^= 1 << data.draw(st.integers(0, 7))
        return kind, bytes(out)
    if kind == "truncate":
        return kind, original[: data.draw(st.integers(0, len(original) - 1))]
    if kind == "extend":
        return kind, original + data.draw(st.binary(min_size=1, max_size=64))
    if kind == "length":
        declared = data.draw(st.integers(0, 2**64 - 1) | st.integers(0, len(original)))
        return kind, struct.pack("<Q", declared) + original[8:]
    if kind == "offsets":
        info["data_offsets"] = data.draw(
            st.lists(JSON_VALUES, max_size=3) | st.just(info["data_offsets"][::-1])
        )
    elif kind == "shape":
        info["shape"] = data.draw(JSON_VALUES | st.lists(st.integers(-2, 64), max_size=4))
    elif kind == "dtype":
        info["dtype"] = data.draw(
            st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "X", "U16"])
        )
    elif kind == "reinterpret":  # a consistent other dtype: a valid file with other contents
        dtype = data.draw(st.sampled_from(sorted(ITEMSIZE)))
        size = info["data_offsets"][1] - info["data_offsets"][0]
        if size % ITEMSIZE[dtype] == 0:
            info["dtype"], info["shape"] = dtype, [size // ITEMSIZE[dtype]]
    elif kind == "swap":
        other = header[data.draw(st.sampled_from(names))]
        info["data_offsets"], other["data_offsets"] = other["data_offsets"], info["data_offsets"]
    elif kind == "drop":
        del header[name]
    elif kind == "rename":
        header[data.draw(st.text(max_size=8))] = header.pop(name)
    elif kind == "duplicate":  # JSON objects cannot hold one, so spliced into the text
        second = data.draw(st.sampled_from([info, entry([1], 0, 4)]))
        text = json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(second)}}}"
        return kind, join(text, body)
    elif kind == "metadata":
        header["__metadata__"] = data.draw(JSON_VALUES)
    elif kind == "config field":
        config = json.loads(header["__metadata__"][ckpt.CONFIG_KEY])
        config[data.draw(st.sampled_from(CONFIG_FIELDS))] = data.draw(JSON_VALUES)
        header["__metadata__"][ckpt.CONFIG_KEY] = json.dumps(config)
    elif kind == "config text":
        text = header["__metadata__"][ckpt.CONFIG_KEY]
        at = data.draw(st.integers(0, len(text)))
        header["__metadata__"][ckpt.CONFIG_KEY] = text[:at] + data.draw(st.text(max_size=4)) + text[at + 1 :]
    return kind, join(header, body, pad=kind != "unpadded")


def decoded_independently(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """What torch's safetensors reader makes of the file (it has bfloat16), widened as we widen."""
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in tensors.items()}, metadata


def outcome(path: Path) -> str:
    """Read and load `path`: a named refusal's class, or "loaded exactly" after checking contents."""
    read = bounded(safetensors_file.read_safetensors, path)
    if isinstance(read, str):
        return "reader: " + read
    tensors, metadata = read
    theirs, their_metadata = decoded_independently(path)
    assert metadata == their_metadata and tensors.keys() == theirs.keys()
    for k, v in tensors.items():
        assert (v.dtype, v.shape, v.tobytes()) == (theirs[k].dtype, theirs[k].shape, theirs[k].tobytes()), k
    loaded = bounded(vitspec.load, path)
    if isinstance(loaded, str):
        return "load: " + loaded
    cfg, params = loaded
    assert params.keys() == vitspec.param_shapes(cfg).keys()
    assert all(params[k].tobytes() == tensors[k].tobytes() for k in params)
    return "loaded exactly"


def bounded(read, path: Path):
    """read(path), or the class of the CheckpointError it raises; either within the bounds."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        return read(path)
    except CheckpointError as e:
        return classify(path, str(e))
    finally:
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert seconds < 2 and peak < 4 * 2**20, (seconds, peak)


def classify(path: Path, message: str) -> str:
    assert message.startswith(str(path)) and len(message) < MAX_MESSAGE, message
    for marker, label in [
        ("too short", "too short"),
        ("header length", "header length"),
        ("not a valid safetensors file", "refused by safetensors"),
        ("twice", "duplicate key"),
        ("this reader does not support", "unsupported dtype"),
        ("no vitspec config", "no config"),
        ("stored config is invalid", "invalid config"),
        ("stored config implies", "config larger than the file"),
        ("does not match the config", "tree does not match the config"),
        ("NaN or infinite", "non-finite values"),
    ]:
        if marker in message:
            return label
    raise AssertionError(f"an unclassified refusal: {message}")


@pytest.mark.slow
def test_damaged_files_are_refused_by_name_or_read_exactly(tmp_path_factory):
    pytest.importorskip("torch")  # the independent reader of bfloat16
    directory = tmp_path_factory.mktemp("fuzz")
    outcomes: Counter = Counter()

    @settings(max_examples=FUZZ_EXAMPLES, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one(data):
        kind, damaged = mutate(data, base_file())
        path = directory / f"{outcomes.total()}.safetensors"
        path.write_bytes(damaged)
        outcomes[kind, outcome(path)] += 1

    one()
    by_outcome = Counter()
    for (_, result), n in outcomes.items():
        by_outcome[result] += n
    # The counts SPEC.md quotes (pytest -s shows them).
    print(f"\n{outcomes.total()} mutations; by outcome: {dict(by_outcome.most_common())}")
    for (kind, result), n in sorted(outcomes.items()):
        print(f"  {kind:12s} -> {result}: {n}")
    assert by_outcome["loaded exactly"] and len(by_outcome) > 5
