"""The reference backward of the layers: analytic vector-Jacobian products in pure NumPy.

Each `*_vjp` mirrors a function of `reference.py`: it takes that function's inputs and the
cotangent of its output, recomputes the forward internals it needs, and returns the cotangents of
its inputs and a gradient tree shaped like its parameters. `grad.py` chains them over the model.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf, expit

from vitspec import reference as ref
from vitspec.config import ViTConfig


def sum_to(g, shape):  # [..., *shape] -> shape: the cotangent of a broadcast
    return g.reshape(-1, *shape).sum(axis=0)


def dense_vjp(x, gy, kernel, bias=None):
    # x [..., d_in], gy [..., d_out] -> (gx [..., d_in], {kernel [d_in, d_out], bias [d_out]})
    grads = {"kernel": x.reshape(-1, x.shape[-1]).T @ gy.reshape(-1, gy.shape[-1])}
    if bias is not None:
        grads["bias"] = sum_to(gy, bias.shape)
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
    return gx, {"scale": sum_to(gy * x_hat, scale.shape), "bias": sum_to(gy, bias.shape)}


def gelu_vjp(x, gy, approximate: str):  # [...] -> [...]
    if approximate == "quick":  # d/dx x s(ax) = s + a x s (1 - s)
        s = expit(ref.QUICK_GELU_COEFF * x)
        return gy * (s + ref.QUICK_GELU_COEFF * x * s * (1.0 - s))
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
        grads["ls2"] = {"scale": sum_to(gy * m, ls2["scale"].shape)}
        g_m = gy * ls2["scale"]
    g_h2, grads["mlp"] = feed_forward_vjp(h2, g_m, **mlp, approximate=cfg.gelu)
    g_h2, grads["norm2"] = layer_norm_vjp(x1, g_h2, **norm2, eps=eps)
    g_x1 = gy + g_h2

    g_a = g_x1
    if ls1 is not None:
        grads["ls1"] = {"scale": sum_to(g_x1 * a, ls1["scale"].shape)}
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
    grads["probe"] = sum_to(g_query, probe.shape)
    return gx, grads
