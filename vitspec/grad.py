"""The reference backward pass: analytic vector-Jacobian products in pure NumPy.

Each `*_vjp` mirrors a function of `reference.py`: it takes that function's inputs and the
cotangent of its output, recomputes the forward internals it needs (so the only tape is the
named intermediates of `reference.forward`), and returns the cotangents of its inputs and a
gradient tree shaped like its parameters. The layers' are in `grad_layers.py`; here are the
model's own parts (tokens, pools, heads) and the chain over the whole model.
"""

from __future__ import annotations

import numpy as np

from vitspec import reference as ref
from vitspec.config import ViTConfig
from vitspec.grad_layers import (
    block_vjp,
    class_block_vjp,
    dense_vjp,
    layer_norm_vjp,
    map_head_vjp,
    sum_to,
)
from vitspec.params import param_shapes


def pool_inputs_vjp(gy, cfg: ViTConfig, tokens_shape):  # [n, tokens pooled over, d] -> [n, t, d]
    if cfg.pool_include_prefix:
        return gy
    gx = np.zeros(tokens_shape, dtype=gy.dtype)
    gx[:, cfg.num_prefix_tokens :] = gy
    return gx


def max_vjp(x, gy):
    # x [n, t, d], gy [n, d] -> [n, t, d]: tied maxima share the cotangent equally, as the gradients
    # of torch's amax (timm's pools) and of jax's max do
    at_max = x == x.max(axis=1, keepdims=True)
    return at_max * (gy / at_max.sum(axis=1, dtype=gy.dtype))[:, None]


def pool_vjp(x, gy, cfg: ViTConfig):  # x [n, t, d], gy [n, d] -> [n, t, d] (identity for 'none')
    if cfg.pool == "none":
        return gy
    if cfg.pool == "token":
        gx = np.zeros(x.shape, dtype=gy.dtype)
        gx[:, 0] = gy
        return gx
    u = ref.pool_inputs(x, cfg)
    mean_vjp = np.broadcast_to(gy[:, None, :] / u.shape[1], u.shape)
    if cfg.pool == "gap":
        gu = mean_vjp
    elif cfg.pool == "max":
        gu = max_vjp(u, gy)
    elif cfg.pool == "avgmax":
        gu = 0.5 * (mean_vjp + max_vjp(u, gy))
    elif cfg.pool == "sum":
        gu = np.broadcast_to(gy[:, None, :], u.shape)
    else:
        raise AssertionError(f"pool {cfg.pool!r} has parameters: use map_head_vjp")
    return pool_inputs_vjp(gu, cfg, x.shape)


def mean_of_heads_vjp(cls, dist, gy, head=None, head_dist=None):
    # cls, dist [n, d], gy [n, classes] ([n, d] without heads) -> (g cls, g dist, grads of the heads)
    g = gy / 2
    if head is None:
        return g, g, {}
    g_cls, g_head = dense_vjp(cls, g, **head)
    g_dist, g_head_dist = dense_vjp(dist, g, **head_dist)
    return g_cls, g_dist, {"head": g_head, "head_dist": g_head_dist}


def add_tokens_and_posemb_vjp(
    gy, cfg: ViTConfig, cls_token=None, dist_token=None, reg_tokens=None, pos_embed=None
):
    # gy [n, tokens, d] -> (g patches [n, patches, d], grads of the prefix tokens and pos_embed);
    # a fixed posemb has none
    grads = {}
    if cfg.posemb == "learned" and cfg.posemb_on_cls:
        grads["pos_embed"] = gy.sum(axis=0)
    start = 0
    for name, token in (("cls_token", cls_token), ("dist_token", dist_token), ("reg_tokens", reg_tokens)):
        if token is not None:
            rows = token.size // cfg.width
            grads[name] = sum_to(gy[:, start : start + rows], token.shape)
            start += rows
    g_patches = gy[:, start:]
    if cfg.posemb == "learned" and not cfg.posemb_on_cls:
        grads["pos_embed"] = g_patches.sum(axis=0)
    return g_patches, grads


def embed_patches_vjp(images, gy, cfg: ViTConfig, kernel, bias=None):
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
    eps = cfg.ln_eps
    g, grads = _head_vjp(cfg, tree, out, g_logits)
    if cfg.final_norm and not cfg.fc_norm:
        g, grads["norm"] = layer_norm_vjp(_final_norm_input(cfg, out), g, **tree["norm"], eps=eps)
    if cfg.class_attention_depth:
        g, grads["cls_token"], grads["class_blocks"] = _class_attention_vjp(cfg, tree, out, g)
    grads["blocks"] = {}
    for i in reversed(range(cfg.depth)):
        block_input = out["tokens"] if i == 0 else out[f"block_{i - 1}"]
        g, grads["blocks"][str(i)] = block_vjp(block_input, g, cfg, **tree["blocks"][str(i)])
    if cfg.pre_norm:
        g, grads["pre_norm"] = layer_norm_vjp(out["embedded"], g, **tree["pre_norm"], eps=eps)
    prefix_cls = None if cfg.class_attention_depth else tree.get("cls_token")
    g, token_grads = add_tokens_and_posemb_vjp(
        g, cfg, prefix_cls, tree.get("dist_token"), tree.get("reg_tokens"), tree.get("pos_embed")
    )
    grads |= token_grads
    g_images, grads["patch_embed"] = embed_patches_vjp(images, g, cfg, **tree["patch_embed"])
    flat = flatten(grads)
    return {**{k: flat[k] for k in param_shapes(cfg)}, "images": g_images}


def _head_vjp(cfg: ViTConfig, tree: dict, out: dict, g):
    # g [n, classes] (the logits') -> (g encoded [n, t, d], grads of the pooling and heads' params)
    encoded, grads = out["encoded"], {}
    if cfg.distilled:
        g_cls, g_dist, grads = mean_of_heads_vjp(
            out["pooled"], out["pooled_dist"], g, tree.get("head"), tree.get("head_dist")
        )
        g = np.zeros(encoded.shape, dtype=g.dtype)
        g[:, 0], g[:, 1] = g_cls, g_dist
        return g, grads
    if cfg.num_classes:
        g, grads["head"] = dense_vjp(out["pre_logits"], g, **tree["head"])
    if cfg.representation_size:
        g = g * (1.0 - np.square(out["pre_logits"]))
        g, grads["pre_logits"] = dense_vjp(out["pooled"], g, **tree["pre_logits"])
    tokens = ref.pool_inputs(encoded, cfg)
    if cfg.fc_norm:
        pooled = (
            ref.map_head(tokens, cfg, **tree["map_head"])[0] if cfg.pool == "map" else ref.pool(encoded, cfg)
        )
        g, grads["fc_norm"] = layer_norm_vjp(pooled, g, **tree["fc_norm"], eps=cfg.ln_eps)
    if cfg.pool == "map":
        g_tokens, grads["map_head"] = map_head_vjp(tokens, g, cfg, **tree["map_head"])
        return pool_inputs_vjp(g_tokens, cfg, encoded.shape), grads
    return pool_vjp(encoded, g, cfg), grads


def _final_norm_input(cfg: ViTConfig, out: dict):  # -> [n, t, d]: what the encoder's final norm normalizes
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
    return g_patches, sum_to(g_cls, cls_token.shape), grads


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
