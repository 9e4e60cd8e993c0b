"""Scenic's, vit-flax's and the PyTorch tutorial's ViT files through `vitspec convert`, against their
own modules.

Each model is the library's module as bench/peers re-implements it from the library's source
(scenic_vit, vit_flax, tutorial_vit), with random float64 parameters, saved the library's way (a
flax msgpack of {"params": ...} or an .npz of '/'-joined paths; torch.save of the state dict). It
is converted by `vitspec.convert` to the reference format and read back: the reference forward in
float64 must give the module's logits to REL (max-norm relative; measured at most 1.3e-15 over the
cases below, three seeds each). Then the reference tree written back in the layout must be the
library's tree bit for bit, and the module applied to it gives its logits exactly (the same
computation on the same values). Scenic's and vit-flax's numerics (tanh GELU, LayerNorm eps 1e-6)
and the tutorial's (tanh GELU, eps 1e-5) are the formats' conventions, so only what the files
cannot show is passed.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import serialization, traverse_util

import vitspec
from bench.peers import scenic_vit, tutorial_vit, vit_flax
from tests.backend_outputs import three_outputs
from vitspec.app import cli
from vitspec.formats import FormatError, load_any, load_with_notes, save_any

REL = 1e-12
SMALL = dict(image_size=(4, 6), patch_size=(2, 3), width=12, depth=1, num_heads=3, mlp_dim=20, num_classes=5)
IMAGES = np.random.default_rng(1).standard_normal((2, 4, 6, 3))  # NHWC: 2x3 patches make a 2x2 grid


def relative_error(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def randomized(flat: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Every parameter random in float64 (inits leave zeros, which would hide a misplaced tensor)."""
    rng = np.random.default_rng(seed)
    return {
        name: (1.0 if name.endswith("scale") else 0.0) + rng.normal(0.0, 0.3, np.shape(value))
        for name, value in flat.items()
    }


def flax_model(module, images, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The module's flat parameter tree, randomized, and its float64 logits on `images`. Only the
    tree's shapes are initialized (eval_shape): running flax's initializers costs a compile each."""
    with jax.enable_x64(True):
        variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
        params = randomized(traverse_util.flatten_dict(variables["params"], sep="/"), seed)
        return params, np.asarray(module.apply({"params": nested(params)}, images))


def flax_logits(module, params: dict[str, np.ndarray], images) -> np.ndarray:
    with jax.enable_x64(True):
        return np.asarray(module.apply({"params": nested(params)}, images))


def nested(flat: dict[str, np.ndarray]) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def save_flax(path, params: dict[str, np.ndarray]) -> None:
    """As the libraries' users save them: a msgpack of the variables, or an .npz of flat paths."""
    if path.suffix == ".msgpack":
        path.write_bytes(serialization.msgpack_serialize({"params": nested(params)}))
    else:
        np.savez(path, **params)


def load_flax(path) -> dict[str, np.ndarray]:
    """A flax file read back as the library would: msgpack_restore, or np.load."""
    if path.suffix == ".msgpack":
        tree = serialization.msgpack_restore(path.read_bytes())
        return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def assert_same_tree(written: dict[str, np.ndarray], original: dict[str, np.ndarray]) -> None:
    assert sorted(written) == sorted(original)
    for name, value in original.items():
        assert written[name].dtype == value.dtype, name
        np.testing.assert_array_equal(written[name], value, err_msg=name)


def assert_written_back_as_theirs(back, fmt: str, cfg, ours, module, params, logits) -> None:
    """The reference tree written back to `back` in `fmt` is the library's tree bit for bit, on which
    its module gives its logits exactly."""
    save_any(back, fmt, cfg, ours)
    written = load_flax(back)
    assert_same_tree(written, params)
    np.testing.assert_array_equal(flax_logits(module, written, IMAGES), logits)


def converted(tmp_path, src, **flags):
    """The reference config and tree that `vitspec.convert` makes of `src` (format detected)."""
    dst = tmp_path / "reference.safetensors"
    result = vitspec.convert(src, dst, out=open(tmp_path / "summary.txt", "w"), **flags)
    cfg, params = load_any(dst)
    return result.source_format, cfg, params


# --- Scenic -----------------------------------------------------------------------------------------

SCENIC_POOL = {"token": "token", "gap": "gap", "gmp": "max", "gsp": "sum"}
SCENIC_CASES = {
    "token-learned": ("token", "learned_1d", None, ".msgpack"),
    "gap-sinusoidal_2d": ("gap", "sinusoidal_2d", None, ".npz"),
    "gmp-sinusoidal_1d-prelogits": ("gmp", "sinusoidal_1d", 7, ".msgpack"),
    "gsp-none": ("gsp", "none", None, ".npz"),
    "token-sinusoidal_1d": ("token", "sinusoidal_1d", None, ".npz"),
}


@pytest.mark.parametrize("case", list(SCENIC_CASES))
def test_scenic_file_converts_to_its_logits_and_back(tmp_path, case):
    classifier, posemb, representation_size, suffix = SCENIC_CASES[case]
    module = scenic_vit.ViT(
        num_classes=5,
        mlp_dim=20,
        num_layers=2,
        num_heads=3,
        patches=(2, 3),
        hidden_size=12,
        positional_embedding=posemb,
        representation_size=representation_size,
        classifier=classifier,
    )
    params, logits = flax_model(module, IMAGES, seed=2)
    src = tmp_path / f"scenic{suffix}"
    save_flax(src, params)
    flags = {} if posemb == "learned_1d" else {"posemb": posemb, "source_image_size": (4, 6)}
    if classifier in ("gmp", "gsp"):  # the file shows a class token or none, not which reduction
        flags["pool"] = SCENIC_POOL[classifier]
    fmt, cfg, ours = converted(tmp_path, src, **flags)

    assert fmt == "scenic"
    assert (cfg.pool, cfg.class_token, cfg.gelu, cfg.ln_eps) == (
        SCENIC_POOL[classifier],
        classifier == "token",
        "tanh",
        1e-6,
    )
    for who, got in three_outputs(cfg, ours, IMAGES).items():
        assert relative_error(got, logits) <= REL, who

    assert_written_back_as_theirs(tmp_path / f"back{suffix}", "scenic", cfg, ours, module, params, logits)


def test_scenic_without_a_learned_posemb_needs_the_flag(tmp_path):
    cfg = vitspec.ViTConfig(**SMALL, pool="gap", posemb="none", gelu="tanh")
    save_any(tmp_path / "scenic.npz", "scenic", cfg, vitspec.init_params(cfg, 0))
    with pytest.raises(FormatError, match="pass --posemb"):
        load_any(tmp_path / "scenic.npz")
    cfg_back, _ = load_any(tmp_path / "scenic.npz", posemb="sinusoidal_1d", image_size=(4, 6))
    assert (cfg_back.posemb, cfg_back.posemb_on_cls) == ("sinusoidal_1d", True)


def test_scenic_refuses_what_its_vit_cannot_be(tmp_path):
    cfg = vitspec.ViTConfig(**SMALL, pool="avgmax", final_norm=False, attention_dim=6)
    with pytest.raises(FormatError) as refusal:
        save_any(tmp_path / "out.npz", "scenic", cfg, vitspec.init_params(cfg, 0))
    for knob in ("pool 'avgmax'", "final_norm=False", "attention_dim 6"):
        assert knob in str(refusal.value)
    assert not (tmp_path / "out.npz").exists()


# --- vit-flax ---------------------------------------------------------------------------------------

VIT_FLAX_CASES = {
    "cls-2heads": ("cls", 2, ".msgpack"),
    "mean-1head": ("mean", 1, ".npz"),
    "mean-3heads": ("mean", 3, ".msgpack"),
}


@pytest.mark.parametrize("case", list(VIT_FLAX_CASES))
def test_vit_flax_file_converts_to_its_logits_and_back(tmp_path, case):
    pool, heads, suffix = VIT_FLAX_CASES[case]
    module = vit_flax.ViT(
        image_size=(4, 6),
        patch_size=(2, 3),
        num_classes=5,
        dim=12,
        depth=2,
        heads=heads,
        mlp_dim=20,
        pool=pool,
    )
    params, logits = flax_model(module, IMAGES, seed=4)
    src = tmp_path / f"vit_flax{suffix}"
    save_flax(src, params)
    ours_pool = {"cls": "token", "mean": "gap"}[pool]
    fmt, cfg, ours = converted(tmp_path, src, patch_size=(2, 3), pool=ours_pool)

    assert fmt == "vit_flax"
    assert (cfg.pool, cfg.pool_include_prefix, cfg.fc_norm, cfg.final_norm, cfg.qkv_bias) == (
        ours_pool,
        pool == "mean",
        True,
        True,
        False,
    )
    assert (cfg.num_heads, cfg.attention_dim, cfg.in_channels) == (heads, 64 * heads, 3)
    for who, got in three_outputs(cfg, ours, IMAGES).items():
        assert relative_error(got, logits) <= REL, who

    assert_written_back_as_theirs(tmp_path / f"back{suffix}", "vit_flax", cfg, ours, module, params, logits)


def test_vit_flax_needs_the_patch_size_and_pool_it_cannot_show(tmp_path):
    cfg = vitspec.ViTConfig(**SMALL, fc_norm=True, qkv_bias=False, attention_dim=64 * 3)
    save_any(tmp_path / "vit_flax.msgpack", "vit_flax", cfg, vitspec.init_params(cfg, 0))
    with pytest.raises(FormatError, match="--patch-size.*--pool"):
        load_any(tmp_path / "vit_flax.msgpack")
    with pytest.raises(FormatError, match="18 inputs, not a multiple of 4 x 4"):
        load_any(tmp_path / "vit_flax.msgpack", patch_size=4, pool="token")


def test_vit_flax_refuses_what_its_vit_cannot_be(tmp_path):
    cfg = vitspec.ViTConfig(
        image_size=(4, 6),
        patch_size=(2, 3),
        width=12,
        depth=1,
        num_heads=2,
        mlp_dim=20,
        num_classes=5,
        fc_norm=True,
        qkv_bias=True,
        attention_dim=128,
    )
    params = vitspec.init_params(cfg, 0)
    with pytest.raises(FormatError, match="qkv_bias=True"):
        save_any(tmp_path / "out.msgpack", "vit_flax", cfg, params)
    narrow = cfg.replace(qkv_bias=False, attention_dim=12)
    with pytest.raises(FormatError, match="dim_head = 64"):
        save_any(tmp_path / "out.msgpack", "vit_flax", narrow, vitspec.init_params(narrow, 0))


# --- the PyTorch tutorial ---------------------------------------------------------------------------

TUTORIAL_CASES = {
    "per-head": (12, 3, True, False, ".pt"),
    "heads-not-dividing-width": (10, 3, False, False, ".pth"),
    "faster-attention": (12, 4, True, True, ".pt"),
}


def tutorial_model(hidden: int, heads: int, qkv_bias: bool, faster: bool) -> tutorial_vit.ViTForClassfication:
    config = dict(
        image_size=4,
        patch_size=2,
        num_channels=3,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=20,
        num_classes=5,
        qkv_bias=qkv_bias,
        use_faster_attention=faster,
    )
    torch.manual_seed(6)
    model = tutorial_vit.ViTForClassfication(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = "layernorm" in name and name.endswith("weight")
            p.copy_(float(is_norm_scale) + 0.3 * torch.randn_like(p))
    return model


def torch_logits(model, images_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.mark.parametrize("case", list(TUTORIAL_CASES))
def test_tutorial_file_converts_to_its_logits_and_back(tmp_path, case):
    hidden, heads, qkv_bias, faster, suffix = TUTORIAL_CASES[case]
    model = tutorial_model(hidden, heads, qkv_bias, faster)
    images = IMAGES[:, :, :4]  # the tutorial's images are square
    logits = torch_logits(model, images)
    src = tmp_path / f"tutorial{suffix}"
    torch.save(model.state_dict(), src)
    fmt, cfg, ours = converted(tmp_path, src, **({"heads": heads} if faster else {}))

    assert fmt == "tutorial"
    assert (cfg.final_norm, cfg.pool, cfg.gelu, cfg.ln_eps) == (False, "token", "tanh", 1e-5)
    assert (cfg.num_heads, cfg.attention_dim, cfg.qkv_bias) == (heads, heads * (hidden // heads), qkv_bias)
    for who, got in three_outputs(cfg, ours, images).items():
        assert relative_error(got, logits) <= REL, who

    back = tmp_path / f"back{suffix}"
    save_any(back, "tutorial", cfg, ours)  # written with one Linear per head, the tutorial's default
    per_head = tutorial_model(hidden, heads, qkv_bias, faster=False)
    per_head.load_state_dict(torch.load(back, weights_only=True), strict=True)
    if faster:
        assert relative_error(torch_logits(per_head, images), logits) <= REL
    else:
        assert_same_tree(
            {k: v.numpy() for k, v in per_head.state_dict().items()},
            {k: v.numpy() for k, v in model.state_dict().items()},
        )
        np.testing.assert_array_equal(torch_logits(per_head, images), logits)


def test_a_tutorial_file_without_qkv_biases_is_noted_by_its_own_names(tmp_path):
    cfg = vitspec.ViTConfig(**SMALL, final_norm=False, qkv_bias=False).replace(image_size=4, patch_size=2)
    save_any(tmp_path / "t.pt", "tutorial", cfg, vitspec.init_params(cfg, 0))
    notes = [str(note) for note in load_with_notes(tmp_path / "t.pt").notes if note.keyword == "qkv_bias"]
    assert notes and "no encoder.blocks.0.attention.heads.0.query.bias" in notes[0]


def test_tutorial_refuses_a_final_norm(tmp_path):
    cfg = vitspec.ViTConfig(
        image_size=4, patch_size=2, width=12, depth=1, num_heads=3, mlp_dim=20, num_classes=5
    )
    with pytest.raises(FormatError, match="final_norm=True"):
        save_any(tmp_path / "out.pt", "tutorial", cfg, vitspec.init_params(cfg, 0))


# --- the command line -------------------------------------------------------------------------------


def test_cli_writes_a_vit_flax_file_and_reads_it_back_with_the_flags_it_prints(tmp_path, capsys):
    cfg = vitspec.ViTConfig(
        image_size=(4, 6),
        patch_size=(2, 3),
        width=12,
        depth=2,
        num_heads=2,
        mlp_dim=20,
        num_classes=5,
        pool="gap",
        class_token=True,
        pool_include_prefix=True,
        fc_norm=True,
        qkv_bias=False,
        attention_dim=128,
        gelu="tanh",
    )
    params = randomized(vitspec.init_params(cfg, 0), 7)
    vitspec.save(tmp_path / "ours.safetensors", cfg, params)
    assert (
        cli.main(
            [
                "convert",
                str(tmp_path / "ours.safetensors"),
                str(tmp_path / "theirs.msgpack"),
                "--to",
                "vit_flax",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "read it back with --pool gap --patch-size 2,3" in printed
    assert "vit_flax.vit.ViT(image_size=(4, 6), patch_size=(2, 3)" in printed and "pool='mean'" in printed

    argv = ["convert", str(tmp_path / "theirs.msgpack"), str(tmp_path / "back.safetensors")]
    assert cli.main([*argv, "--pool", "gap", "--patch-size", "2,3"]) == 0
    cfg_back, back = load_any(tmp_path / "back.safetensors")
    assert cfg_back == cfg
    assert_same_tree(back, params)
