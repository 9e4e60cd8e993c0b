"""The reference's family knobs (quick GELU, pre-norm, patch/proj biases, optional final norm, max/avgmax/
sum pools and pool_include_prefix, DeiT's distillation token, attention_dim, Scenic's sinusoidal posembs)
against a torch re-implementation written here from the definitions, its forward and its autograd
gradients in float64, and against finite differences."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitspec
from vitspec import reference as ref
from vitspec.fixed_posemb import posemb_sincos2d, posemb_sinusoidal_1d, posemb_sinusoidal_2d
from vitspec.grad import pool_vjp
from vitspec.gradcheck import REL_BOUND, fd_errors, random_images, random_params

# A 2x3 grid of 4x4 patches, 4 heads of 4.
BASE = dict(image_size=(8, 12), patch_size=(4, 4), width=16, depth=2, num_heads=4, mlp_dim=24, num_classes=5)
KNOBS = {
    "quick_gelu": dict(gelu="quick"),
    "pre_norm": dict(pre_norm=True, num_registers=1),
    "no_patch_bias": dict(patch_bias=False),
    "no_final_norm": dict(final_norm=False),
    "no_final_norm_gap": dict(final_norm=False, pool="gap"),
    "no_proj_bias": dict(proj_bias=False, layer_scale=0.1),
    "attention_dim_wider": dict(attention_dim=24, num_heads=3),
    "attention_dim_narrower": dict(attention_dim=8, num_heads=2),
    "distilled": dict(distilled=True, num_registers=1),
    "distilled_features": dict(distilled=True, num_classes=0),
    "max": dict(pool="max"),
    "max_with_prefix": dict(pool="max", pool_include_prefix=True, class_token=True, num_registers=1),
    "avgmax": dict(pool="avgmax", fc_norm=True),
    "avgmax_with_prefix": dict(pool="avgmax", pool_include_prefix=True, class_token=True),
    "sum": dict(pool="sum", num_registers=2, representation_size=6),
    "gap_with_prefix": dict(pool="gap", pool_include_prefix=True, class_token=True),
    "map_with_prefix": dict(pool="map", pool_include_prefix=True, class_token=True, num_registers=1),
    "sinusoidal_1d_on_all_tokens": dict(posemb="sinusoidal_1d", distilled=True),
    "sinusoidal_1d_on_patches": dict(posemb="sinusoidal_1d", posemb_on_cls=False, num_registers=1),
    "sinusoidal_2d": dict(posemb="sinusoidal_2d", pool="gap"),
    "sinusoidal_2d_with_cls": dict(posemb="sinusoidal_2d", posemb_on_cls=False),
    "clip_like": dict(gelu="quick", pre_norm=True, patch_bias=False, ln_eps=1e-5),
    "everything": dict(
        gelu="quick",
        pre_norm=True,
        patch_bias=False,
        proj_bias=False,
        attention_dim=12,
        num_heads=3,
        pool="avgmax",
        pool_include_prefix=True,
        class_token=True,
        num_registers=1,
        posemb="sinusoidal_1d",
        final_norm=False,
    ),
}
CASES = [pytest.param(vitspec.ViTConfig(**{**BASE, **kw}), id=name) for name, kw in KNOBS.items()]


# --- a torch ViT written from the definitions (conv patches, per-formula posembs, amax pools) -------------


def _linear(x, p, name):
    y = x @ p[f"{name}/kernel"]
    return y + p[f"{name}/bias"] if f"{name}/bias" in p else y


def _ln(x, p, name, eps):
    return F.layer_norm(x, x.shape[-1:], p[f"{name}/scale"], p[f"{name}/bias"], eps)


def _act(x, kind):
    if kind == "quick":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if kind == "tanh" else "none")


def _mha(xq, xkv, p, name, heads):
    def split(t):  # [n, t, heads * dh] -> [n, heads, t, dh]
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    q, k, v = (split(_linear(x, p, f"{name}/{w}")) for x, w in ((xq, "query"), (xkv, "key"), (xkv, "value")))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return _linear((weights @ v).transpose(1, 2).flatten(2), p, f"{name}/out")


def _mlp(x, p, name, kind):
    return _linear(_act(_linear(x, p, f"{name}/fc1"), kind), p, f"{name}/fc2")


def _fixed_table(cfg, rows):  # each formula as its source writes it, with torch's own pow and trig
    d = cfg.width
    if cfg.posemb == "sinusoidal_1d":  # PE(p, 2i) = sin(p / T^(2i/d)), PE(p, 2i+1) = cos(same)
        angle = torch.arange(rows, dtype=torch.float64)[:, None] / 10_000.0 ** (
            torch.arange(0, d, 2, dtype=torch.float64) / d
        )
        return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)
    quarter = d // 4
    denominator = quarter - 1 if cfg.posemb == "sincos2d" else quarter
    omega = 10_000.0 ** -(torch.arange(quarter, dtype=torch.float64) / denominator)
    gy, gx = cfg.grid_size
    ys, xs = torch.meshgrid(torch.arange(gy), torch.arange(gx), indexing="ij")
    ax, ay = xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1)


def torch_vit(cfg, p, images_nhwc):
    eps, d, named = cfg.ln_eps, cfg.width, {}
    kernel = p["patch_embed/kernel"].permute(3, 2, 0, 1)  # HWIO -> OIHW
    x = F.conv2d(images_nhwc.permute(0, 3, 1, 2), kernel, p.get("patch_embed/bias"), stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    n = x.shape[0]
    prefix = [
        p[k].reshape(1, -1, d).expand(n, -1, -1) for k in ("cls_token", "dist_token", "reg_tokens") if k in p
    ]
    table = p.get("pos_embed")
    if cfg.posemb not in ("learned", "none"):
        table = _fixed_table(cfg, cfg.num_tokens if cfg.posemb_on_cls else cfg.num_patches)
    if table is not None and not cfg.posemb_on_cls:
        x = x + table
    x = torch.cat([*prefix, x], dim=1)
    if table is not None and cfg.posemb_on_cls:
        x = x + table
    if cfg.pre_norm:
        named["embedded"] = x
        x = _ln(x, p, "pre_norm", eps)
    named["tokens"] = x
    for i in range(cfg.depth):
        b = f"blocks/{i}"
        ls1, ls2 = p.get(f"{b}/ls1/scale", 1.0), p.get(f"{b}/ls2/scale", 1.0)
        h = _ln(x, p, f"{b}/norm1", eps)
        x = x + ls1 * _mha(h, h, p, f"{b}/attn", cfg.num_heads)
        x = x + ls2 * _mlp(_ln(x, p, f"{b}/norm2", eps), p, f"{b}/mlp", cfg.gelu)
    if cfg.final_norm and not cfg.fc_norm:
        x = _ln(x, p, "norm", eps)
    named["encoded"] = x
    return named | _torch_head(cfg, p, x)


def _torch_head(cfg, p, x):
    if cfg.distilled:
        cls, dist = x[:, 0], x[:, 1]
        logits = (cls + dist) / 2
        if cfg.num_classes:
            logits = (_linear(cls, p, "head") + _linear(dist, p, "head_dist")) / 2
        return {"pooled": cls, "pooled_dist": dist, "logits": logits}
    tokens = x if cfg.pool_include_prefix else x[:, cfg.num_prefix_tokens :]
    if cfg.pool == "token":
        pooled = x[:, 0]
    elif cfg.pool == "map":
        probe = p["map_head/probe"].reshape(1, 1, -1).expand(x.shape[0], -1, -1)
        y = _mha(probe, tokens, p, "map_head/attn", cfg.num_heads)
        pooled = (y + _mlp(_ln(y, p, "map_head/norm", cfg.ln_eps), p, "map_head/mlp", cfg.gelu))[:, 0]
    else:
        reduce = {
            "gap": lambda t: t.mean(1),
            "max": lambda t: t.amax(1),
            "avgmax": lambda t: 0.5 * (t.amax(1) + t.mean(1)),  # timm's global_pool_nlc
            "sum": lambda t: t.sum(1),
        }
        pooled = reduce[cfg.pool](tokens)
    if cfg.fc_norm:
        pooled = _ln(pooled, p, "fc_norm", cfg.ln_eps)
    y = torch.tanh(_linear(pooled, p, "pre_logits")) if cfg.representation_size else pooled
    return {"pooled": pooled, "logits": _linear(y, p, "head") if cfg.num_classes else y}


def _relative_error(a, b, floor: float = 1e-300) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), floor))


def _torch_run(cfg, params, images, cotangent):
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    timages = torch.tensor(images, requires_grad=True)
    named = torch_vit(cfg, tp, timages)
    (named["logits"] * torch.from_numpy(cotangent)).sum().backward()
    grads = {k: v.grad.numpy() for k, v in tp.items()} | {"images": timages.grad.numpy()}
    return {k: v.detach().numpy() for k, v in named.items()}, grads


@pytest.mark.parametrize("cfg", CASES)
def test_forward_and_gradients_match_torch_autograd(cfg):
    params, images = random_params(cfg, 0), random_images(cfg, 2, 1)
    named = vitspec.forward(cfg, params, images, intermediates=True)
    cotangent = np.random.default_rng(2).standard_normal(named["logits"].shape)
    torch_named, torch_grads = _torch_run(cfg, params, images, cotangent)
    for name, value in torch_named.items():
        assert _relative_error(named[name], value) <= 1e-12, name
    grads = vitspec.vjp(cfg, params, images, cotangent)
    assert grads.keys() == torch_grads.keys()
    # The key bias's gradient is zero in exact math (a softmax row shifted by a constant): rounding
    # noise there is measured against the largest gradient.
    floor = 1e-4 * max(np.abs(g).max() for g in torch_grads.values())
    for name, value in torch_grads.items():
        assert _relative_error(grads[name], value, floor) <= 1e-11, name


@pytest.mark.parametrize("cfg", CASES)
def test_gradients_match_finite_differences(cfg):
    params, images = random_params(cfg, 3), random_images(cfg, 2, 4)
    if cfg.num_classes:
        labels = np.array([1, 4])
        _, grads = vitspec.loss_and_grad(cfg, params, images, labels, label_smoothing=0.1)

        def loss_of(p, x):
            return vitspec.cross_entropy(vitspec.forward(cfg, p, x), labels, 0.1)
    else:
        cotangent = np.random.default_rng(5).standard_normal((2, cfg.width))
        grads = vitspec.vjp(cfg, params, images, cotangent)

        def loss_of(p, x):
            return float(np.sum(vitspec.forward(cfg, p, x) * cotangent))

    errors = fd_errors(loss_of, params, images, grads, np.random.default_rng(6))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= REL_BOUND, f"{worst}: relative error {errors[worst]:.3g}"


@pytest.mark.parametrize("cfg", CASES)
def test_named_values_follow_the_knobs(cfg):
    params = random_params(cfg, 0)
    out = vitspec.forward(cfg, params, random_images(cfg, 2, 1), intermediates=True)
    assert ("embedded" in out) == cfg.pre_norm
    assert ("pooled_dist" in out) == cfg.distilled
    if cfg.pre_norm:  # the same computation: bit-equal
        norm = {"scale": params["pre_norm/scale"], "bias": params["pre_norm/bias"]}
        np.testing.assert_array_equal(out["tokens"], ref.layer_norm(out["embedded"], **norm, eps=cfg.ln_eps))
    if not cfg.final_norm:
        np.testing.assert_array_equal(out["encoded"], out[f"block_{cfg.depth - 1}"])
    assert out["tokens"].shape == (2, cfg.num_tokens, cfg.width)


@pytest.mark.parametrize("name", ["everything", "distilled", "sinusoidal_2d_with_cls"])
def test_float32_in_float32_out(name):
    cfg = vitspec.ViTConfig(**{**BASE, **KNOBS[name]})
    params, images = random_params(cfg, 0, dtype=np.float32), random_images(cfg, 2, 1, dtype=np.float32)
    out = vitspec.forward(cfg, params, images, intermediates=True)
    loss, grads = vitspec.loss_and_grad(cfg, params, images, np.array([0, 4]))
    assert {v.dtype for v in [*out.values(), loss, *grads.values()]} == {np.dtype(np.float32)}


# --- the fixed embeddings, entry by entry -----------------------------------------------------------------


def test_sinusoidal_2d_differs_from_sincos2d_in_the_denominator_only():
    # Width 8: quarters of 2 frequencies. big_vision: 1 / 10000 ** [0, 1]; Scenic: 1 / 10000 ** [0, 1/2].
    big_vision, scenic = posemb_sincos2d(2, 3, 8), posemb_sinusoidal_2d(2, 3, 8)
    row = 4  # (y=1, x=1), row-major over a 2 x 3 grid
    np.testing.assert_allclose(big_vision[row, [1, 3]], [math.sin(1e-4), math.cos(1e-4)], rtol=1e-15)
    np.testing.assert_allclose(scenic[row, [1, 3]], [math.sin(1e-2), math.cos(1e-2)], rtol=1e-15)
    np.testing.assert_array_equal(big_vision[:, [0, 2, 4, 6]], scenic[:, [0, 2, 4, 6]])  # omega_0 = 1 in both
    np.testing.assert_allclose(scenic[5, 4:], [math.sin(1), math.sin(1e-2), math.cos(1), math.cos(1e-2)])


def test_sinusoidal_1d_interleaves_sin_and_cos_of_the_sequence_index():
    table = posemb_sinusoidal_1d(5, 6)
    for p in range(5):
        for i in range(3):
            w = 10_000.0 ** (-2 * i / 6)
            np.testing.assert_allclose(
                table[p, 2 * i : 2 * i + 2], [math.sin(p * w), math.cos(p * w)], rtol=1e-14
            )


def test_sinusoidal_1d_numbers_the_class_token_first_unless_posemb_on_cls_is_false():
    for on_cls in (True, False):
        cfg = vitspec.ViTConfig(**BASE, posemb="sinusoidal_1d", posemb_on_cls=on_cls, distilled=True)
        params = random_params(cfg, 0)
        out = vitspec.forward(cfg, params, random_images(cfg, 1, 0), intermediates=True)
        table = posemb_sinusoidal_1d(cfg.num_tokens if on_cls else cfg.num_patches, cfg.width)
        prefix = np.stack([params["cls_token"], params["dist_token"]])
        expected = (
            np.concatenate([prefix + table[:2], out["patch_embed"][0] + table[2:]])
            if on_cls
            else (np.concatenate([prefix, out["patch_embed"][0] + table]))
        )
        np.testing.assert_array_equal(out["tokens"][0], expected)


def test_grid_posembs_refuse_prefix_tokens_and_1d_takes_them():
    vitspec.ViTConfig(**BASE, posemb="sinusoidal_1d")  # Scenic: the class token is position 0
    for posemb in ("sincos2d", "sinusoidal_2d"):
        with pytest.raises(ValueError, match=f"posemb='{posemb}' is defined on the patch grid only"):
            vitspec.ViTConfig(**BASE, posemb=posemb)


# --- pools, heads and GELU at their edges -----------------------------------------------------------------


def test_max_pool_splits_the_gradient_among_ties_as_torch_amax_and_jax_max_do():
    cfg = vitspec.ViTConfig(**BASE, pool="max", class_token=True)  # 7 tokens, the class token first
    x = np.random.default_rng(0).standard_normal((2, cfg.num_tokens, cfg.width))
    x[0, 2] = x[0, 5] = x[0, 3]  # three patch tokens tie in every feature of image 0
    x[1, 4, :3] = x[1, 1:].max(axis=0)[:3] + 1.0  # and a clear winner in image 1
    x[1, 6, :3] = x[1, 4, :3]
    gy = np.random.default_rng(1).standard_normal((2, cfg.width))
    ours = pool_vjp(x, gy, cfg)
    tx = torch.tensor(x, requires_grad=True)
    (tx[:, 1:].amax(dim=1) * torch.from_numpy(gy)).sum().backward()
    with jax.enable_x64(True):  # this test's only: other tests' jax runs in float32
        jax_grad = np.asarray(jax.grad(lambda t: (jax.numpy.max(t[:, 1:], axis=1) * gy).sum())(x))
    assert jax_grad.dtype == np.float64
    np.testing.assert_allclose(ours, tx.grad.numpy(), rtol=1e-15, atol=0)
    np.testing.assert_allclose(ours, jax_grad, rtol=1e-15, atol=0)
    assert ours[0, 2, 0] == ours[0, 5, 0] == gy[0, 0] / 3  # ties split, the cotangent conserved


def test_distilled_logits_are_the_mean_of_both_heads():
    cfg = vitspec.ViTConfig(**BASE, distilled=True)
    params = random_params(cfg, 0)
    out = vitspec.forward(cfg, params, random_images(cfg, 2, 0), intermediates=True)
    cls, dist = out["encoded"][:, 0], out["encoded"][:, 1]
    head = cls @ params["head/kernel"] + params["head/bias"]
    head_dist = dist @ params["head_dist/kernel"] + params["head_dist/bias"]
    np.testing.assert_allclose(out["logits"], (head + head_dist) / 2, rtol=1e-14)
    np.testing.assert_array_equal(out["pre_logits"], (cls + dist) / 2)


def test_quick_gelu_is_clips_and_stays_finite_far_out():
    x = np.array([-1e4, -50.0, -1.0, 0.0, 0.5, 50.0, 1e4])
    expected = [v / (1 + math.exp(-1.702 * v)) if v > -700 else -0.0 for v in x]
    with np.errstate(all="raise"):
        np.testing.assert_allclose(ref.gelu(x, "quick"), expected, rtol=1e-15, atol=0)
    assert (
        np.abs(ref.gelu(np.linspace(-4, 4, 81), "quick") - ref.gelu(np.linspace(-4, 4, 81), "exact")).max()
        > 1e-2
    )
