"""CaiT in the reference: its gradients against finite differences, its forward against one written
here with loops over heads and against timm's Cait, talking heads' identity, and the released sizes."""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import erf

import vitspec
from parity_tests.strategies import cait_configs, random_images, random_params
from tests.test_spec_doc import _expand
from vitspec import ViTConfig
from vitspec.gradcheck import REL_BOUND, fd_errors, random_small_config

SPEC = (Path(__file__).resolve().parents[1] / "SPEC.md").read_text()
# Non-square 2x3 grid, 3 heads of 4, the class blocks' MLP narrower than the patches'.
SMALL = dict(
    image_size=(4, 6),
    patch_size=(2, 2),
    width=12,
    depth=2,
    num_heads=3,
    mlp_dim=24,
    num_classes=5,
    posemb_on_cls=False,
    class_attention_depth=2,
    class_attention_mlp_dim=18,
    layer_scale=0.1,
    talking_heads=True,
)


def _worst(errors: dict) -> tuple[str, float]:
    name = max(errors, key=errors.get)
    return name, errors[name]


@settings(max_examples=20)
@given(cfg=cait_configs(), seed=st.integers(0, 2**16), batch=st.integers(1, 3))
def test_loss_gradients_match_finite_differences(cfg, seed, batch):
    cfg = cfg.replace(num_classes=max(cfg.num_classes, 3))  # one class: a constant loss, all zeros
    params = random_params(cfg, seed)
    images = random_images(cfg, batch, seed + 1)
    labels = np.random.default_rng(seed).integers(0, cfg.num_classes, size=batch)
    _, grads = vitspec.loss_and_grad(cfg, params, images, labels, label_smoothing=0.1)

    def loss_of(p, x):
        return vitspec.cross_entropy(vitspec.forward(cfg, p, x), labels, 0.1)

    name, error = _worst(fd_errors(loss_of, params, images, grads, np.random.default_rng(seed)))
    assert error <= REL_BOUND, f"{name}: relative error {error:.3g}"


@settings(max_examples=8)
@given(cfg=cait_configs(), seed=st.integers(0, 2**16))
def test_vjp_of_any_cotangent_matches_finite_differences(cfg, seed):
    # num_classes=0 included: the cotangent then lands on the pooled class token itself.
    params = random_params(cfg, seed)
    images = random_images(cfg, 2, seed + 1)
    cotangent = np.random.default_rng(seed + 2).standard_normal(vitspec.forward(cfg, params, images).shape)
    grads = vitspec.vjp(cfg, params, images, cotangent)
    assert list(grads) == [*vitspec.param_shapes(cfg), "images"]

    def loss_of(p, x):
        return float(np.sum(vitspec.forward(cfg, p, x) * cotangent))

    name, error = _worst(fd_errors(loss_of, params, images, grads, np.random.default_rng(seed)))
    assert error <= REL_BOUND, f"{name}: relative error {error:.3g}"


def test_gradcheck_command_draws_cait_and_vit_configs():
    rng = np.random.default_rng(0)
    drawn = [random_small_config(rng) for _ in range(30)]
    cait = [c for c in drawn if c.class_attention_depth]
    assert 0 < len(cait) < len(drawn)
    assert {c.talking_heads for c in cait} == {False, True}


# --- the forward, written again with loops over heads --------------------------------------------


def _ln(x, p, name, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p[f"{name}/scale"] + p[f"{name}/bias"]


def _linear(x, p, name):
    return x @ p[f"{name}/kernel"] + p.get(f"{name}/bias", 0.0)


def _block_by_hand(u, queries, p, b, cfg):
    """The residual stream u[:, :queries] updated by attention over all of u, then the MLP; and the
    weights on v, per head. Talking heads as the paper writes them: a sum over heads h per head g."""
    heads, dh = cfg.num_heads, cfg.head_dim
    h = _ln(u, p, f"{b}/norm1", cfg.ln_eps)
    q, k, v = (
        _linear(x, p, f"{b}/attn/{m}") for x, m in ((h[:, :queries], "query"), (h, "key"), (h, "value"))
    )
    cols = [slice(i * dh, (i + 1) * dh) for i in range(heads)]
    scores = [np.einsum("nqc,nkc->nqk", q[..., c], k[..., c]) / math.sqrt(dh) for c in cols]
    talk = f"{b}/attn/talk_logits/kernel" in p
    if talk:
        kern, bias = p[f"{b}/attn/talk_logits/kernel"], p[f"{b}/attn/talk_logits/bias"]
        scores = [sum(scores[i] * kern[i, g] for i in range(heads)) + bias[g] for g in range(heads)]
    weights = [np.exp(s - s.max(-1, keepdims=True)) for s in scores]
    weights = [w / w.sum(-1, keepdims=True) for w in weights]
    if talk:
        kern, bias = p[f"{b}/attn/talk_weights/kernel"], p[f"{b}/attn/talk_weights/bias"]
        weights = [sum(weights[i] * kern[i, g] for i in range(heads)) + bias[g] for g in range(heads)]
    context = np.concatenate([w @ v[..., c] for w, c in zip(weights, cols, strict=True)], axis=-1)
    x = u[:, :queries] + _linear(context, p, f"{b}/attn/out") * p[f"{b}/ls1/scale"]
    hidden = _linear(_ln(x, p, f"{b}/norm2", cfg.ln_eps), p, f"{b}/mlp/fc1")
    mlp = _linear(0.5 * hidden * (1 + erf(hidden / math.sqrt(2))), p, f"{b}/mlp/fc2")
    return x + mlp * p[f"{b}/ls2/scale"], np.stack(weights, axis=1)


@pytest.mark.parametrize("talking_heads", [False, True])
def test_forward_matches_one_written_with_loops_over_heads(talking_heads):
    cfg = ViTConfig(**SMALL | dict(talking_heads=talking_heads))
    p = random_params(cfg, 0)
    images = random_images(cfg, 2, 1)
    out = vitspec.forward(cfg, p, images, intermediates=True, attention_maps=True)
    n = len(images)
    patches = images.reshape(n, 2, 2, 3, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, 6, 12)
    x = patches @ p["patch_embed/kernel"].reshape(12, 12) + p["patch_embed/bias"] + p["pos_embed"]
    for i in range(cfg.depth):
        x, weights = _block_by_hand(x, x.shape[1], p, f"blocks/{i}", cfg)
        np.testing.assert_allclose(out[f"attn_{i}"], weights, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(out[f"block_{i}"], x, rtol=1e-12, atol=1e-14)
    cls = np.tile(p["cls_token"], (n, 1, 1))
    for j in range(cfg.class_attention_depth):
        cls, weights = _block_by_hand(np.concatenate([cls, x], axis=1), 1, p, f"class_blocks/{j}", cfg)
        np.testing.assert_allclose(out[f"class_attn_{j}"], weights, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(out[f"class_block_{j}"], cls, rtol=1e-12, atol=1e-14)
    encoded = _ln(np.concatenate([cls, x], axis=1), p, "norm", cfg.ln_eps)
    np.testing.assert_allclose(out["encoded"], encoded, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out["logits"], _linear(encoded[:, 0], p, "head"), rtol=1e-12, atol=1e-14)


def test_named_outputs_are_the_interfaces():
    cfg = ViTConfig(**SMALL)
    p = random_params(cfg, 0)
    images = random_images(cfg, 2, 1)
    inter = vitspec.forward(cfg, p, images, intermediates=True)
    maps = vitspec.forward(cfg, p, images, attention_maps=True)
    assert {k: v.shape for k, v in inter.items()} == {
        "patch_embed": (2, 6, 12),
        "tokens": (2, 6, 12),
        "block_0": (2, 6, 12),
        "block_1": (2, 6, 12),
        "class_block_0": (2, 1, 12),
        "class_block_1": (2, 1, 12),
        "encoded": (2, 7, 12),
        "pooled": (2, 12),
        "pre_logits": (2, 12),
        "logits": (2, 5),
    }
    assert {k: v.shape for k, v in maps.items()} == {
        "attn_0": (2, 3, 6, 6),
        "attn_1": (2, 3, 6, 6),
        "class_attn_0": (2, 3, 1, 7),
        "class_attn_1": (2, 3, 1, 7),
    }
    # Mixed after the softmax, talking heads' weights are not probabilities; the class blocks' are.
    assert not np.allclose(maps["attn_0"].sum(-1), 1.0)
    np.testing.assert_allclose(maps["class_attn_1"].sum(-1), 1.0, rtol=1e-14)


def test_identity_talking_heads_compute_what_plain_attention_does():
    with_talk = ViTConfig(**SMALL)
    plain = with_talk.replace(talking_heads=False)
    p = random_params(plain, 0)
    q = dict(p)
    for i in range(with_talk.depth):
        for m in ("talk_logits", "talk_weights"):
            q[f"blocks/{i}/attn/{m}/kernel"] = np.eye(with_talk.num_heads)
            q[f"blocks/{i}/attn/{m}/bias"] = np.zeros(with_talk.num_heads)
    images = random_images(plain, 2, 1)
    ours = vitspec.forward(with_talk, q, images, intermediates=True, attention_maps=True)
    theirs = vitspec.forward(plain, p, images, intermediates=True, attention_maps=True)
    assert list(ours) == list(theirs)
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-13, atol=1e-15, err_msg=name)
    labels = np.array([0, 4])
    _, g_ours = vitspec.loss_and_grad(with_talk, q, images, labels)
    _, g_theirs = vitspec.loss_and_grad(plain, p, images, labels)
    for name in g_theirs:
        np.testing.assert_allclose(g_ours[name], g_theirs[name], rtol=1e-12, atol=1e-15, err_msg=name)


# --- against timm's Cait, where timm is importable -------------------------------------------------


def _timm_state_dict(params: dict, cfg: ViTConfig) -> dict:
    """timm's Cait layout, written here from its module names: Linear weights are [out, in], the
    self-attention's q/k/v one fused `qkv`, talking heads `proj_l`/`proj_w`, LayerScale `gamma_*`."""
    import torch

    modules = {"query": "q", "key": "k", "value": "v", "out": "proj", "talk_logits": "proj_l"}
    modules |= {"talk_weights": "proj_w", "ls1": "gamma_1", "ls2": "gamma_2"}
    sd = {
        "patch_embed.proj.weight": params["patch_embed/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": params["patch_embed/bias"],
        "cls_token": params["cls_token"][None, None],
        "pos_embed": params["pos_embed"][None],
    }
    for name, value in params.items():
        stage = re.match(r"(class_)?blocks/(\d+)/(.*)/(kernel|bias|scale)$", name)
        if name.startswith(("norm/", "head/")) or stage:
            path, leaf = name.rsplit("/", 1)
            if stage:
                group = "blocks_token_only" if stage[1] else "blocks"
                path = f"{group}/{stage[2]}/" + "/".join(modules.get(m, m) for m in stage[3].split("/"))
            key = path.replace("/", ".")
            if key.endswith("gamma_1") or key.endswith("gamma_2"):
                sd[key] = value
            else:
                sd[f"{key}.{'bias' if leaf == 'bias' else 'weight'}"] = value.T if leaf == "kernel" else value
    for i in range(cfg.depth):
        a = f"blocks.{i}.attn"
        for leaf in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            sd[f"{a}.qkv.{leaf}"] = np.concatenate([sd.pop(f"{a}.{m}.{leaf}") for m in "qkv"])
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_forward_matches_timms_cait(qkv_bias):
    torch = pytest.importorskip("torch")
    cait = pytest.importorskip(
        "timm.models.cait", reason="timm (with a torchvision matching this torch) is not installed"
    )
    cfg = ViTConfig(**SMALL | dict(qkv_bias=qkv_bias, ln_eps=1e-5))
    theirs = cait.Cait(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_channels,
        num_classes=cfg.num_classes,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_dim / cfg.width,
        qkv_bias=qkv_bias,
        norm_layer=partial(torch.nn.LayerNorm, eps=cfg.ln_eps),
        init_values=cfg.layer_scale,
        depth_token_only=cfg.class_attention_depth,
        mlp_ratio_token_only=cfg.class_attention_mlp_dim / cfg.width,
    )
    params = random_params(cfg, 0)
    theirs.double().eval().load_state_dict(_timm_state_dict(params, cfg), strict=True)
    images = random_images(cfg, 2, 1)
    with torch.no_grad():
        features = theirs.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
        logits = theirs.forward_head(features).numpy()
    out = vitspec.forward(cfg, params, images, intermediates=True)
    np.testing.assert_allclose(out["encoded"], features.numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-12, atol=1e-13)


# --- the released models and SPEC.md --------------------------------------------------------------

# timm's published parameter counts of cait_{size}_{image} (1000 classes): independent of this code.
PUBLISHED = {
    "cait-xxs24-224": 11_956_264,
    "cait-xxs24-384": 12_029_224,
    "cait-xxs36-224": 17_299_720,
    "cait-xxs36-384": 17_372_680,
    "cait-xs24-384": 26_670_088,
    "cait-s24-224": 46_916_200,
    "cait-s24-384": 47_062_120,
    "cait-s36-384": 68_366_632,
    "cait-m36-384": 271_221_352,
    "cait-m48-448": 356_460_520,
}


def test_named_caits_have_timms_parameter_counts():
    assert list(vitspec.CAIT_VARIANTS) == list(PUBLISHED)
    for name, count in PUBLISHED.items():
        assert vitspec.num_params(vitspec.variant(name)) == count, name


def test_specs_cait_tables_match_the_code():
    section = SPEC.split("### CaiT")[1].split("\n## ")[0]
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if re.match(r"^\| `cait-", line)
    ]
    assert [r[0].strip("`") for r in rows] == list(PUBLISHED)
    for name, width, depth, heads, init, count in rows:
        cfg = vitspec.variant(name.strip("`"))
        assert (cfg.width, cfg.depth, cfg.num_heads, cfg.layer_scale) == (
            int(width),
            int(depth),
            int(heads),
            float(init),
        )
        assert int(count.replace(",", "")) == PUBLISHED[name.strip("`")]
    documented = [
        e
        for line in section.splitlines()
        if line.startswith("| `") and not line.startswith("| `cait-")
        for e in _expand(re.findall(r"`([^`]+)`", line.split("|")[1])[0])
    ]
    for name in vitspec.param_shapes(ViTConfig(**SMALL)):
        generic = re.sub(r"class_blocks/\d+", "class_blocks/{j}", re.sub(r"^blocks/\d+", "blocks/{i}", name))
        if "talk_" in name or name.startswith("class_blocks/"):
            assert generic in documented, f"{generic} is not in SPEC.md's CaiT parameter table"
