"""The canonical parameter tree: init is seeded and follows the documented scheme; validation lists all."""

import numpy as np
import pytest

import vitspec
from vitspec import ParamTreeError


def test_init_is_deterministic_per_seed_and_name():
    cfg = vitspec.variant("cifar-notebook")
    a, b, c = (
        vitspec.init_params(cfg, seed=0),
        vitspec.init_params(cfg, seed=0),
        vitspec.init_params(cfg, seed=1),
    )
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["blocks/0/mlp/fc1/kernel"], c["blocks/0/mlp/fc1/kernel"])
    # Adding a knob's parameter leaves every other parameter as it was.
    d = vitspec.init_params(cfg.replace(qk_norm=True), seed=0)
    assert all(np.array_equal(a[k], d[k]) for k in a)


def test_init_follows_the_scheme():
    cfg = vitspec.variant(
        "B/16", num_registers=4, pool="map", class_token=True, representation_size=768, layer_scale=0.1
    )
    p = vitspec.init_params(cfg, seed=0)
    assert all(v.dtype == np.float32 for v in p.values())
    limit = np.sqrt(6 / (768 + 3072))
    fc1 = p["blocks/3/mlp/fc1/kernel"]
    assert np.abs(fc1).max() <= limit and np.abs(fc1).max() > 0.99 * limit  # xavier-uniform
    assert abs(fc1.std() - limit / np.sqrt(3)) < 0.01 * limit
    patch = p["patch_embed/kernel"]
    assert abs(patch.std() - np.sqrt(1 / (16 * 16 * 3))) < 0.02 * np.sqrt(1 / 768)  # lecun normal
    assert np.abs(patch).max() <= 2 * np.sqrt(1 / 768) / 0.8796256610342398 + 1e-6  # truncated at 2 std
    assert abs(p["pos_embed"].std() - 0.02) < 0.001
    assert abs(p["blocks/0/mlp/fc1/bias"].std() - 1e-6) < 1e-7
    assert not p["head/kernel"].any() and not p["head/bias"].any() and not p["cls_token"].any()
    assert (p["blocks/0/norm1/scale"] == 1).all() and not p["blocks/0/norm1/bias"].any()
    assert (p["blocks/0/ls1/scale"] == np.float32(0.1)).all()
    assert not p["blocks/0/attn/query/bias"].any()
    probe_limit = np.sqrt(6 / (1 + 768))
    assert np.abs(p["map_head/probe"]).max() <= probe_limit


def test_validation_lists_every_problem_at_once():
    cfg = vitspec.variant("Ti/16", depth=2)
    p = vitspec.init_params(cfg)
    del p["blocks/1/norm2/scale"], p["head/bias"]
    p["blocks/0/attn/qkv/kernel"] = np.zeros((192, 576))
    p["pos_embed"] = np.zeros((196, 192))
    p["cls_token"] = np.zeros(192, dtype=np.int32)
    with pytest.raises(ParamTreeError) as e:
        vitspec.validate_params(cfg, p)
    msg = str(e.value)
    assert "missing keys (2): ['blocks/1/norm2/scale', 'head/bias']" in msg
    assert "unexpected keys (1): ['blocks/0/attn/qkv/kernel']" in msg
    assert "pos_embed: expected (197, 192), got (196, 192)" in msg
    assert "cls_token: dtype int32" in msg


def test_knobs_add_exactly_their_parameters():
    base = set(vitspec.param_shapes(vitspec.variant("Ti/16", depth=1)))

    def added(**kw):
        return set(vitspec.param_shapes(vitspec.variant("Ti/16", depth=1, **kw))) - base

    assert added(qk_norm=True) == {f"blocks/0/attn/{n}_norm/{p}" for n in "qk" for p in ("scale", "bias")}
    assert added(layer_scale=1e-5) == {"blocks/0/ls1/scale", "blocks/0/ls2/scale"}
    assert added(num_registers=4) == {"reg_tokens"}
    assert added(representation_size=10) == {"pre_logits/kernel", "pre_logits/bias"}
    assert added(fc_norm=True) == {"fc_norm/scale", "fc_norm/bias"}
    assert set(vitspec.param_shapes(vitspec.variant("Ti/16", depth=1, fc_norm=True))).isdisjoint(
        {"norm/scale", "norm/bias"}
    )
    assert base - set(vitspec.param_shapes(vitspec.variant("Ti/16", depth=1, qkv_bias=False))) == {
        f"blocks/0/attn/{n}/bias" for n in ("query", "key", "value")
    }
    assert "pos_embed" not in vitspec.param_shapes(
        vitspec.variant("Ti/16", posemb="sincos2d", posemb_on_cls=False)
    )
