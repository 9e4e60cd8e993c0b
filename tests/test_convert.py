"""`python -m vitspec.convert`: the command, its summary, and an error naming the thing for every failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vitspec
from parity_tests.strategies import random_params
from vitspec.app.convert import convert, main
from vitspec.config import ViTConfig
from vitspec.formats import FormatError, load_any, save_any
from vitspec.formats.checkpoint import CheckpointError

SMALL = ViTConfig(
    image_size=(4, 6), patch_size=(2, 3), width=12, depth=1, num_heads=3, mlp_dim=20, num_classes=5
)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ref_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    vitspec.save(path, SMALL, random_params(SMALL, 0))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_reference_to_timm_and_back_with_check(ref_file, tmp_path, capsys):
    pt, back = tmp_path / "model.pt", tmp_path / "back.safetensors"
    code, out, err = run(capsys, ref_file, pt, "--check")
    assert (code, err) == (0, "")
    assert "model.safetensors (ref) -> model.pt (torch)" in out
    assert f"parameters: {vitspec.num_params(SMALL):,}" in out
    assert "read it back with --heads 3" in out
    assert "max |logit diff|" in out
    code, out, err = run(capsys, pt, back, "--heads", "3", "--check")
    assert (code, err) == (0, "")
    assert "heads 3: from --heads" in out and "gelu exact: not stored; timm's convention" in out
    cfg, params = vitspec.load(back)
    assert cfg == SMALL
    for key, value in random_params(SMALL, 0).items():
        np.testing.assert_array_equal(params[key], value)


@pytest.mark.parametrize(
    "dst, to, backend",
    [
        ("m.pt", None, "backends.torch_vit"),
        ("m.msgpack", None, "backends.flax_vit"),
        ("m.npz", "flax", "backends.flax_vit"),
        ("m.npz", "vit_jax", "the reference"),
        ("m.safetensors", "hf", "the reference"),
    ],
)
def test_check_runs_the_target_backend_and_agrees(ref_file, tmp_path, capsys, dst, to, backend):
    if backend.startswith("backends."):
        pytest.importorskip(backend)
    result = convert(ref_file, tmp_path / dst, to_fmt=to, check=True)
    out = capsys.readouterr().out
    assert backend in out
    assert result.max_logit_diff < 1e-12


def test_image_size_resamples_and_reports(ref_file, tmp_path, capsys):
    code, out, _ = run(
        capsys, ref_file, tmp_path / "big.npz", "--to", "flax", "--image-size", "8,12", "--check"
    )
    assert code == 0
    assert (
        "image size (4, 6) -> (8, 12): position embedding resampled 2x2 -> 4x4 (bilinear, big_vision's)"
    ) in out
    assert "read it back with --gelu exact --source-image-size 8,12" in out
    cfg, _ = load_any(tmp_path / "big.npz", gelu="exact", image_size=(8, 12))
    assert cfg.image_size == (8, 12)


def test_subprocess_run(ref_file, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vitspec.convert", str(ref_file), str(tmp_path / "m.npz"), "--to", "vit_jax"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "(ref) -> m.npz (vit_jax)" in result.stdout
    assert "read it back with --gelu exact" in result.stdout


# --- errors ----------------------------------------------------------------------------------------


def error_of(capsys, *argv) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2
    return err


def test_unknown_format_lists_the_known_ones(ref_file, tmp_path, capsys):
    err = error_of(capsys, ref_file, tmp_path / "m.pt", "--from", "keras")
    known = ", ".join(vitspec.formats.FORMATS)
    assert f"unknown format 'keras'; known formats: {known} (aliases: timm=torch, reference=ref)" in err
    assert all(name in known for name in ("torch", "big_vision_scan", "hf_clip", "scenic", "tutorial"))


def test_missing_and_unexpected_keys_are_all_listed(ref_file, tmp_path, capsys):
    state = {
        k: torch.from_numpy(v)
        for k, v in vitspec.formats.EXTERNAL["torch"].from_reference(random_params(SMALL, 0), SMALL).items()
    }
    del state["head.bias"], state["blocks.0.mlp.fc2.bias"]
    state["blocks.0.attn.q_bias"] = torch.zeros(12)
    torch.save(state, tmp_path / "broken.pt")
    err = error_of(capsys, tmp_path / "broken.pt", tmp_path / "out.safetensors", "--heads", "3")
    assert "missing keys (2): ['blocks.0.mlp.fc2.bias', 'head.bias']" in err
    assert "unexpected keys (1): ['blocks.0.attn.q_bias']" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path, capsys):
    native = vitspec.formats.EXTERNAL["flax"].from_reference(random_params(SMALL, 0), SMALL)
    native["Transformer/encoder_norm/bias"] = np.zeros(11)
    np.savez(tmp_path / "bad.npz", **native)
    err = error_of(capsys, tmp_path / "bad.npz", tmp_path / "out.npz", "--source-image-size", "4,6")
    assert "Transformer/encoder_norm/bias: expected (12,), got (11,)" in err


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "model.npz", "model.msgpack"])
def test_truncated_file_is_named(ref_file, tmp_path, capsys, name):
    full = tmp_path / f"full{Path(name).suffix}"
    fmt = {".safetensors": "ref", ".pt": "torch", ".npz": "flax", ".msgpack": "flax"}[full.suffix]
    save_any(full, fmt, SMALL, random_params(SMALL, 0))
    truncated = tmp_path / name
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    err = error_of(capsys, truncated, tmp_path / "out.safetensors", "--heads", "3")
    assert str(truncated) in err
    assert "truncated" in err or "not a readable" in err


def test_foreign_files_are_refused(tmp_path, capsys):
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    err = error_of(capsys, tmp_path / "other.npz", tmp_path / "out.safetensors")
    assert "cannot tell the checkpoint format from its keys (first: ['weights']); pass --from" in err
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    err = error_of(capsys, tmp_path / "list.pt", tmp_path / "out.safetensors")
    assert "holds a list, not a state dict" in err
    torch.save({"epoch": 3, "weights": torch.zeros(2)}, tmp_path / "mixed.pt")
    assert "entries that are not tensors: ['epoch']" in error_of(
        capsys, tmp_path / "mixed.pt", tmp_path / "out.safetensors"
    )
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    assert "not a readable torch checkpoint (UnpicklingError" in error_of(
        capsys, tmp_path / "junk.pt", tmp_path / "out.safetensors"
    )
    (tmp_path / "model.ckpt").write_bytes(b"x")
    assert "unknown suffix '.ckpt'" in error_of(capsys, tmp_path / "model.ckpt", tmp_path / "out.safetensors")


def test_inconsistent_flags_are_refused(ref_file, tmp_path, capsys):
    assert "inconsistent flags" in error_of(capsys, ref_file, tmp_path / "a.pt", "--gelu", "tanh")
    save_any(tmp_path / "bv.npz", "flax", SMALL, random_params(SMALL, 0))
    err = error_of(capsys, tmp_path / "bv.npz", tmp_path / "b.pt", "--heads", "4")
    assert "--heads 4, but the big_vision attention kernels have 3 heads" in err
    err = error_of(capsys, tmp_path / "bv.npz", tmp_path / "c.pt", "--source-image-size", "6,6")
    assert (
        "source image size (6, 6) gives 6 patches (+1 prefix tokens), but the position embedding has 5 rows"
    ) in err
    err = error_of(capsys, tmp_path / "bv.npz", tmp_path / "d.pt", "--posemb", "sincos2d")
    assert "--posemb sincos2d, but the checkpoint has a learned position embedding (5 rows)" in err


def test_heads_it_cannot_see_are_asked_for(ref_file, tmp_path, capsys):
    run(capsys, ref_file, tmp_path / "m.pt")
    err = error_of(capsys, tmp_path / "m.pt", tmp_path / "out.safetensors")
    assert "does not store the number of heads, and width 12 is no standard ViT width" in err
    assert "pass --heads N" in err


def test_standard_width_gives_heads_and_says_so(tmp_path, capsys):
    cfg = vitspec.variant("Ti/16", image_size=32, depth=1, num_classes=2)
    save_any(tmp_path / "ti.pt", "torch", cfg, random_params(cfg, 0, np.float32))
    code, out, _ = run(capsys, tmp_path / "ti.pt", tmp_path / "ti.safetensors")
    assert code == 0
    assert "heads 3: not stored in a timm checkpoint; the standard ViT of width 192 has 3" in out


def test_non_square_grid_needs_the_source_image_size(tmp_path, capsys):
    cfg = SMALL.replace(image_size=(4, 9))  # a 2x3 grid: 6 posemb rows after the class token
    save_any(tmp_path / "wide.npz", "vit_jax", cfg, random_params(cfg, 0))
    err = error_of(capsys, tmp_path / "wide.npz", tmp_path / "out.safetensors")
    assert (
        "the position embedding has 7 rows: 1 class/register row(s) + 6 patch rows, as vision_transformer's "
        "convention has it is not a square patch grid, so the image size cannot be read from it"
    ) in err
    assert "Pass --source-image-size H,W" in err
    code, _, _ = run(
        capsys, tmp_path / "wide.npz", tmp_path / "out.safetensors", "--source-image-size", "4,9"
    )
    assert code == 0


# Each ecosystem's convention says whether the prefix tokens have position-embedding rows. Where
# the rows fit a square grid only against it, the file is another model than the convention's:
# refused, naming the flag. (rows, prefix tokens, format): the example of the "proofs" issue is a
# timm 32x48 patch-8 model, 1 class row + 24 patch rows = 25, which is no 5x5 grid.
AMBIGUOUS = [
    ("torch", dict(image_size=(32, 48), patch_size=8), "(timm's no_embed_class models)"),
    (
        "torch",
        dict(image_size=(16, 16), patch_size=4, num_registers=2, posemb_on_cls=False),
        "(timm's no_embed_class models)",
    ),
    (
        "flax",
        dict(image_size=(8, 8), patch_size=4),
        "1 class/register row(s) + 4 patch rows would be a square",
    ),
    ("hf", dict(image_size=(8, 24), patch_size=8, ln_eps=1e-12), "is not a square patch grid"),
]


@pytest.mark.parametrize("fmt, overrides, alternative", AMBIGUOUS)
def test_a_reading_against_the_convention_is_refused_naming_the_flag(
    tmp_path, capsys, fmt, overrides, alternative
):
    cfg = ViTConfig(width=12, depth=1, num_heads=3, mlp_dim=8, num_classes=2, **overrides)
    path = tmp_path / ("model.npz" if fmt == "flax" else "model.safetensors")
    save_any(path, fmt, cfg, random_params(cfg, 0))
    err = error_of(capsys, path, tmp_path / "out.safetensors", "--heads", "3", "--from", fmt)
    assert "cannot be read from it" in err and alternative in err
    assert "Pass --source-image-size H,W" in err
    size = ",".join(map(str, cfg.image_size))
    code, _, _ = run(
        capsys,
        path,
        tmp_path / "back.safetensors",
        "--heads",
        "3",
        "--from",
        fmt,
        "--source-image-size",
        size,
        "--gelu",
        cfg.gelu,
        "--ln-eps",
        str(cfg.ln_eps),
    )
    assert code == 0
    back, params = vitspec.load(tmp_path / "back.safetensors")
    assert back.replace(layer_scale=cfg.layer_scale) == cfg


def test_existing_target_is_not_overwritten(ref_file, tmp_path, capsys):
    dst = tmp_path / "m.pt"
    dst.write_bytes(b"keep me")
    assert "exists; pass --overwrite" in error_of(capsys, ref_file, dst)
    assert dst.read_bytes() == b"keep me"
    code, _, _ = run(capsys, ref_file, dst, "--overwrite")
    assert code == 0 and dst.read_bytes() != b"keep me"


def test_failed_conversion_leaves_no_file(ref_file, tmp_path, capsys):
    cfg = SMALL.replace(num_registers=1)
    vitspec.save(tmp_path / "reg.safetensors", cfg, random_params(cfg, 0))
    err = error_of(capsys, tmp_path / "reg.safetensors", tmp_path / "out.safetensors", "--to", "hf")
    assert "the hf layout cannot express this config: no register tokens (config has 1)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "reg.safetensors"]


def test_target_format_and_suffix_must_agree(ref_file, tmp_path, capsys):
    err = error_of(capsys, ref_file, tmp_path / "m.pt", "--to", "vit_jax")
    assert "a vit_jax checkpoint is written as one of ['.npz'], not '.pt'" in err
    err = error_of(capsys, ref_file, tmp_path / "m.h5")
    assert "cannot tell the target format from suffix '.h5'; pass --to" in err


def test_bad_image_size_is_named(ref_file, tmp_path, capsys):
    err = error_of(capsys, ref_file, tmp_path / "m.pt", "--image-size", "5,6")
    assert "--image-size (5, 6): image_size=(5, 6) is not divisible by patch_size=(2, 3)" in err
    with pytest.raises(SystemExit):
        main([str(ref_file), str(tmp_path / "m.pt"), "--image-size", "x"])


def test_load_any_refuses_unknown_flags(ref_file):
    with pytest.raises(FormatError, match=r"unknown config flag\(s\) \['depth'\]"):
        load_any(ref_file, depth=3)


def test_wrapped_and_bfloat16_state_dicts_load(tmp_path):
    cfg = vitspec.variant("Ti/16", image_size=32, depth=1, num_classes=2)
    state = vitspec.formats.EXTERNAL["torch"].from_reference(random_params(cfg, 0, np.float32), cfg)
    bfloat16 = {k: torch.from_numpy(v).bfloat16() for k, v in state.items()}
    torch.save({"model": bfloat16}, tmp_path / "deit.pth")
    loaded_cfg, params = load_any(tmp_path / "deit.pth")
    assert loaded_cfg.num_heads == 3 and params["head/kernel"].dtype == np.float32
    with pytest.raises(CheckpointError, match="no such file"):
        load_any(tmp_path / "missing.pt")


def test_a_check_that_finds_other_logits_fails_with_exit_1(ref_file, tmp_path, capsys, monkeypatch):
    from vitspec.app import convert_check

    real = convert_check.run_target
    for wrong in (lambda x: x + 1e-3, lambda x: np.full_like(x, np.nan)):
        monkeypatch.setattr(
            convert_check, "run_target", lambda *a, wrong=wrong: (wrong(real(*a)[0]), "a broken backend")
        )
        code, _, err = run(capsys, ref_file, tmp_path / "m.pt", "--check", "--overwrite")
        assert code == 1 and "check failed: the written m.pt computes logits" in err


def test_evaluate_refuses_a_model_of_another_class_count(tmp_path, capsys):
    from tests.test_training import write_fashion_mnist
    from vitspec.app import cli

    write_fashion_mnist(tmp_path / "fashion-mnist", train=20, test=4)
    cfg = ViTConfig(
        image_size=28, patch_size=7, in_channels=1, width=8, depth=1, num_heads=2, mlp_dim=8, num_classes=12
    )
    vitspec.save(tmp_path / "m.safetensors", cfg, random_params(cfg, 0))
    code = cli.main(
        [
            "evaluate",
            str(tmp_path / "m.safetensors"),
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(tmp_path),
            "--validation-size",
            "4",
        ]
    )
    assert code == 2 and "has 12 classes; fashion-mnist has 10" in capsys.readouterr().err
