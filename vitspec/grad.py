"""The reference backward pass: analytic vector-Jacobian products in pure NumPy.

Each `*_vjp` mirrors a function of `reference.py`: it takes that function's inputs and the
cotangent of its output, recomputes the forward internals it needs (so the only tape is the
named intermediates of `reference.forward`), and returns the cotangents of its inputs and a
gradient tree shaped like its parameters.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from vitspec import reference as ref
from vitspec.config import ViTConfig
from vitspec.params import param_shapes


def _sum_to(g, shape):  # [..., *shape] -> shape: the cotangent of a broadcast
    return g.reshape(-1, *shape).sum(axis=0)


def dense_vjp(x, gy, kernel, bias=None):
    # x [..., d_in], gy [..., d_out] -> (gx [..., d_in], {kernel [d_in, d_out], bias [d_out]})
    grads = {"kernel": x.reshape(-1, x.shape[-1]).T @ gy.reshape(-1, gy.shape[-1])}
    if bias is not None:
        grads["bias"] = _sum_to(gy, bias.shape)
    return gy @ kernel.T, grads


def layer_norm_vjp(x, gy, scale, bias, eps: float):
    # x, gy [..., d] -> (gx [..., d], {scale [d], bias [d]})
    mean = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(np.square(x - mean).mean(axis=-1, keepdims=True) + eps)
    x_hat = (x - mean) * rstd
    g_hat = gy * scale
    gx = rstd * (
        g_hat - g_hat.mean(axis=-1, keepdims=True) - x_hat * (g_hat * x_hat).mean(axis=-1, keepdims=True)
    )
    return gx, {"scale": _sum_to(gy * x_hat, scale.shape), "bias": _sum_to(gy, bias.shape)}


def gelu_vjp(x, gy, approximate: str):  # [...] -> [...]
    if approximate == "tanh":
        t = np.tanh(ref.SQRT_2_OVER_PI * (x + ref.GELU_TANH_COEFF * x**3))
        du = ref.SQRT_2_OVER_PI * (1.0 + 3.0 * ref.GELU_TANH_COEFF * x**2)
        return gy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
    cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return gy * (cdf + x * pdf)


def softmax_vjp(probs, gp):  # [..., n] -> [..., n]
    return probs * (gp - (gp * probs).sum(axis=-1, keepdims=True))


def mix_heads_vjp(x, gy, kernel, bias):
    # x, gy [n, heads, tq, t] -> (gx [n, heads, tq, t], {kernel [heads, heads], bias [heads]})
    gx, grads = dense_vjp(np.moveaxis(x, 1, -1), np.moveaxis(gy, 1, -1), kernel, bias)
    return np.moveaxis(gx, -1, 1), grads


def attention_vjp(
    x_q,
    x_kv,
    gy,
    query,
    key,
    value,
    out,
    num_heads: int,
    eps: float,
    q_norm=None,
    k_norm=None,
    talk_logits=None,
    talk_weights=None,
):
    # x_q [n, tq, d], x_kv [n, t, d], gy [n, tq, d] -> (g x_q, g x_kv, grads like the attention's params)
    q_raw = ref.split_heads(ref.dense(x_q, **query), num_heads)
    k_raw = ref.split_heads(ref.dense(x_kv, **key), num_heads)
    v = ref.split_heads(ref.dense(x_kv, **value), num_heads)
    q, k = q_raw, k_raw
    if q_norm is not None:
        q = ref.layer_norm(q_raw, **q_norm, eps=eps)
        k = ref.layer_norm(k_raw, **k_norm, eps=eps)
    scale = q.shape[-1] ** -0.5
    raw_scores = scores = (q * scale) @ k.swapaxes(-1, -2)
    if talk_logits is not None:
        scores = ref.mix_heads(raw_scores, **talk_logits)
    probs = weights = ref.softmax(scores)
    if talk_weights is not None:
        weights = ref.mix_heads(probs, **talk_weights)
    context = ref.merge_heads(weights @ v)

    grads = {}
    g_context, grads["out"] = dense_vjp(context, gy, **out)
    g_context = ref.split_heads(g_context, num_heads)
    g_v = weights.swapaxes(-1, -2) @ g_context
    g_probs = g_context @ v.swapaxes(-1, -2)
    if talk_weights is not None:
        g_probs, grads["talk_weights"] = mix_heads_vjp(probs, g_probs, **talk_weights)
    g_scores = softmax_vjp(probs, g_probs)
    if talk_logits is not None:
        g_scores, grads["talk_logits"] = mix_heads_vjp(raw_scores, g_scores, **talk_logits)
    g_q = (g_scores @ k) * scale
    g_k = g_scores.swapaxes(-1, -2) @ (q * scale)
    if q_norm is not None:
        g_q, grads["q_norm"] = layer_norm_vjp(q_raw, g_q, **q_norm, eps=eps)
        g_k, grads["k_norm"] = layer_norm_vjp(k_raw, g_k, **k_norm, eps=eps)
    g_xq, grads["query"] = dense_vjp(x_q, ref.merge_heads(g_q), **query)
    g_xk, grads["key"] = dense_vjp(x_kv, ref.merge_heads(g_k), **key)
    g_xv, grads["value"] = dense_vjp(x_kv, ref.merge_heads(g_v), **value)
    return g_xq, g_xk + g_xv, grads


def feed_forward_vjp(x, gy, fc1, fc2, approximate: str):  # x, gy [..., d] -> (gx, grads)
    hidden = ref.dense(x, **fc1)
    g_act, g_fc2 = dense_vjp(ref.gelu(hidden, approximate), gy, **fc2)
    gx, g_fc1 = dense_vjp(x, gelu_vjp(hidden, g_act, approximate), **fc1)
    return gx, {"fc1": g_fc1, "fc2": g_fc2}


def block_vjp(x, gy, cfg: ViTConfig, **block_params):
    # x, gy [n, t, d] -> (gx [n, t, d], grads like the block's params)
    return _queries_block_vjp(x, x.shape[1], gy, cfg, **block_params)


def class_block_vjp(x, cls, gy, cfg: ViTConfig, **block_params):
    # patches [n, p, d], class token [n, 1, d], gy [n, 1, d] -> (g patches, g class token, grads)
    gu, grads = _queries_block_vjp(np.concatenate([cls, x], axis=1), 1, gy, cfg, **block_params)
    return gu[:, 1:], gu[:, :1], grads


def _queries_block_vjp(u, tq, gy, cfg: ViTConfig, norm1, attn, norm2, mlp, ls1=None, ls2=None):
    # u [n, t, d], gy [n, tq, d] -> (gu [n, t, d], grads): a block whose queries and residual stream are
    # u's first tq rows, attending over all of u (a self-attention block: tq = t; a class block: 1)
    eps, grads = cfg.ln_eps, {}
    h1 = ref.layer_norm(u, **norm1, eps=eps)
    a, _ = ref.attention(h1[:, :tq], h1, **attn, num_heads=cfg.num_heads, eps=eps)
    x1 = u[:, :tq] + ref.layer_scale(a, ls1)
    h2 = ref.layer_norm(x1, **norm2, eps=eps)

    g_m = gy
    if ls2 is not None:
        m = ref.feed_forward(h2, **mlp, approximate=cfg.gelu)
        grads["ls2"] = {"scale": _sum_to(gy * m, ls2["scale"].shape)}
        g_m = gy * ls2["scale"]
    g_h2, grads["mlp"] = feed_forward_vjp(h2, g_m, **mlp, approximate=cfg.gelu)
    g_h2, grads["norm2"] = layer_norm_vjp(x1, g_h2, **norm2, eps=eps)
    g_x1 = gy + g_h2

    g_a = g_x1
    if ls1 is not None:
        grads["ls1"] = {"scale": _sum_to(g_x1 * a, ls1["scale"].shape)}
        g_a = g_x1 * ls1["scale"]
    g_q, g_h1, grads["attn"] = attention_vjp(h1[:, :tq], h1, g_a, **attn, num_heads=cfg.num_heads, eps=eps)
    g_h1[:, :tq] += g_q
    gu, grads["norm1"] = layer_norm_vjp(u, g_h1, **norm1, eps=eps)
    gu[:, :tq] += g_x1
    return gu, grads


def map_head_vjp(x, gy, cfg: ViTConfig, probe, attn, norm, mlp):
    # x [n, t, d], gy [n, d] -> (gx [n, t, d], grads like the head's params)
    eps, grads = cfg.ln_eps, {}
    query = np.broadcast_to(probe, (x.shape[0], 1, probe.shape[-1]))
    y, _ = ref.attention(query, x, **attn, num_heads=cfg.num_heads, eps=eps)
    gy = gy[:, None, :]
    g_h, grads["mlp"] = feed_forward_vjp(ref.layer_norm(y, **norm, eps=eps), gy, **mlp, approximate=cfg.gelu)
    g_h, grads["norm"] = layer_norm_vjp(y, g_h, **norm, eps=eps)
    g_query, gx, grads["attn"] = attention_vjp(query, x, gy + g_h, **attn, num_heads=cfg.num_heads, eps=eps)
    grads["probe"] = _sum_to(g_query, probe.shape)
    return gx, grads


def pool_vjp(gy, cfg: ViTConfig, tokens_shape):  # [n, d] -> [n, t, d] (identity for 'none')
    if cfg.pool == "none":
        return gy
    gx = np.zeros(tokens_shape, dtype=gy.dtype)
    if cfg.pool == "token":
        gx[:, 0] = gy
    elif cfg.pool == "gap":
        gx[:, cfg.num_prefix_tokens :] = gy[:, None, :] / cfg.num_patches
    return gx


def add_tokens_and_posemb_vjp(gy, cfg: ViTConfig, cls_token=None, reg_tokens=None, pos_embed=None):
    # gy [n, tokens, d] -> (g patches [n, patches, d], grads of cls_token, reg_tokens, pos_embed)
    grads = {}
    if cfg.posemb == "learned" and cfg.posemb_on_cls:
        grads["pos_embed"] = gy.sum(axis=0)
    if cls_token is not None:
        grads["cls_token"] = gy[:, 0].sum(axis=0)
    if reg_tokens is not None:
        start = int(cls_token is not None)
        grads["reg_tokens"] = gy[:, start : start + cfg.num_registers].sum(axis=0)
    g_patches = gy[:, cfg.num_prefix_tokens :]
    if cfg.posemb == "learned" and not cfg.posemb_on_cls:
        grads["pos_embed"] = g_patches.sum(axis=0)
    return g_patches, grads


def embed_patches_vjp(images, gy, cfg: ViTConfig, kernel, bias):
    # images [n, h, w, c], gy [n, patches, d] -> (g images, {kernel [ph, pw, c, d], bias [d]})
    kernel_2d = kernel.reshape(-1, kernel.shape[-1])
    g_patches, grads = dense_vjp(ref.patchify(images, cfg.patch_size), gy, kernel_2d, bias)
    grads["kernel"] = grads["kernel"].reshape(kernel.shape)
    n, h, w, c = images.shape
    (ph, pw), (gh, gw) = cfg.patch_size, cfg.grid_size
    g_images = g_patches.reshape(n, gh, gw, ph, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
    return g_images, grads


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else key
        flat |= flatten(value, name) if isinstance(value, dict) else {name: value}
    return flat


def _backward(cfg: ViTConfig, tree: dict, images, out: dict, g_logits) -> dict[str, np.ndarray]:
    """Cotangents of every parameter and of the images, given those of the logits."""
    eps, grads = cfg.ln_eps, {}
    g = g_logits
    if cfg.num_classes:
        g, grads["head"] = dense_vjp(out["pre_logits"], g, **tree["head"])
    if cfg.representation_size:
        g = g * (1.0 - np.square(out["pre_logits"]))
        g, grads["pre_logits"] = dense_vjp(out["pooled"], g, **tree["pre_logits"])
    encoded = out["encoded"]
    patches = encoded[:, cfg.num_prefix_tokens :]
    if cfg.fc_norm:
        pooled = (
            ref.map_head(patches, cfg, **tree["map_head"])[0] if cfg.pool == "map" else ref.pool(encoded, cfg)
        )
        g, grads["fc_norm"] = layer_norm_vjp(pooled, g, **tree["fc_norm"], eps=eps)
    if cfg.pool == "map":
        g_patches, grads["map_head"] = map_head_vjp(patches, g, cfg, **tree["map_head"])
        g = np.zeros_like(encoded)
        g[:, cfg.num_prefix_tokens :] = g_patches
    else:
        g = pool_vjp(g, cfg, encoded.shape)
    if not cfg.fc_norm:
        g, grads["norm"] = layer_norm_vjp(_pre_norm(cfg, out), g, **tree["norm"], eps=eps)
    if cfg.class_attention_depth:
        g, grads["cls_token"], grads["class_blocks"] = _class_attention_vjp(cfg, tree, out, g)
    grads["blocks"] = {}
    for i in reversed(range(cfg.depth)):
        block_input = out["tokens"] if i == 0 else out[f"block_{i - 1}"]
        g, grads["blocks"][str(i)] = block_vjp(block_input, g, cfg, **tree["blocks"][str(i)])
    prefix_cls = None if cfg.class_attention_depth else tree.get("cls_token")
    g, token_grads = add_tokens_and_posemb_vjp(
        g, cfg, prefix_cls, tree.get("reg_tokens"), tree.get("pos_embed")
    )
    grads |= token_grads
    g_images, grads["patch_embed"] = embed_patches_vjp(images, g, cfg, **tree["patch_embed"])
    flat = flatten(grads)
    return {**{k: flat[k] for k in param_shapes(cfg)}, "images": g_images}


def _pre_norm(cfg: ViTConfig, out: dict):  # -> [n, t, d]: what the encoder norm normalizes
    tokens = out[f"block_{cfg.depth - 1}"]
    if not cfg.class_attention_depth:
        return tokens
    return np.concatenate([out[f"class_block_{cfg.class_attention_depth - 1}"], tokens], axis=1)


def _class_attention_vjp(cfg: ViTConfig, tree: dict, out: dict, g):
    # g [n, 1 + p, d] on [class, patches] -> (g patches [n, p, d], g cls_token [d], class blocks' grads)
    # The patches get the norm's cotangent plus, from every class block, that of their keys and values.
    patches = out[f"block_{cfg.depth - 1}"]
    g_cls, g_patches = g[:, :1], g[:, 1:].copy()
    cls_token = tree["cls_token"]
    grads = {}
    for j in reversed(range(cfg.class_attention_depth)):
        cls = out[f"class_block_{j - 1}"] if j else np.broadcast_to(cls_token, (len(patches), 1, cfg.width))
        g_x, g_cls, grads[str(j)] = class_block_vjp(patches, cls, g_cls, cfg, **tree["class_blocks"][str(j)])
        g_patches += g_x
    return g_patches, _sum_to(g_cls, cls_token.shape), grads


def vjp(cfg: ViTConfig, params: dict[str, np.ndarray], images, cotangent) -> dict[str, np.ndarray]:
    """Gradients of <cotangent, forward(images)> w.r.t. every parameter and the images."""
    out = ref.forward(cfg, params, images, intermediates=True)
    cotangent = np.asarray(cotangent, dtype=out["logits"].dtype)
    if cotangent.shape != out["logits"].shape:
        raise ValueError(
            f"cotangent has shape {cotangent.shape}; the logits have shape {out['logits'].shape}"
        )
    tree = ref.unflatten({k: np.asarray(v, dtype=out["logits"].dtype) for k, v in params.items()})
    return _backward(cfg, tree, np.asarray(images, dtype=cotangent.dtype), out, cotangent)


def loss_and_grad(
    cfg: ViTConfig, params: dict[str, np.ndarray], images, labels, label_smoothing: float = 0.0
):
    """Mean softmax cross-entropy and its gradients w.r.t. every parameter and the images."""
    if cfg.pool == "none" or not cfg.num_classes:
        raise ValueError(
            f"loss_and_grad needs per-image logits: pool={cfg.pool!r}, num_classes={cfg.num_classes}"
            " (use vjp with a cotangent on the outputs instead)"
        )
    out = ref.forward(cfg, params, images, intermediates=True)
    logits = out["logits"]
    loss = ref.cross_entropy(logits, labels, label_smoothing)
    targets = ref.smoothed_targets(np.asarray(labels), cfg.num_classes, label_smoothing, logits.dtype)
    g_logits = (ref.softmax(logits) - targets) / logits.shape[0]
    tree = ref.unflatten({k: np.asarray(v, dtype=logits.dtype) for k, v in params.items()})
    return loss, _backward(cfg, tree, np.asarray(images, dtype=logits.dtype), out, g_logits)
