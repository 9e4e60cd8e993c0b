"""The reference forward pass in pure NumPy: the definition of the math every backend must match.

Small pure functions whose keyword arguments are the parameter tree's leaves (`kernel`, `bias`,
`scale`), each ending in a shape comment. Vectorized over batch, tokens and heads. The dtype
follows the images (float32 or float64); parameters are cast to it. Eval mode only: dropout and
stochastic depth are training randomness and belong to the backends.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import (
    erf,  # float64-exact (NumPy has no erf; math.erf is scalar-only)
    expit,  # the logistic sigmoid without overflow for large |x|
)

from vitspec.config import ViTConfig
from vitspec.fixed_posemb import fixed_posemb
from vitspec.fixed_posemb import posemb_sincos2d as posemb_sincos2d  # the backends' import
from vitspec.params import validate_params

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_COEFF = 0.044715
QUICK_GELU_COEFF = 1.702  # OpenAI CLIP's x * sigmoid(1.702 x)


def unflatten(params: dict[str, np.ndarray]) -> dict:
    """{'blocks/0/mlp/fc1/kernel': a} -> {'blocks': {'0': {'mlp': {'fc1': {'kernel': a}}}}}."""
    tree: dict = {}
    for name, value in params.items():
        *scopes, leaf = name.split("/")
        node = tree
        for s in scopes:
            node = node.setdefault(s, {})
        node[leaf] = value
    return tree


def gelu(x, approximate: str):  # [...] -> [...]
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + GELU_TANH_COEFF * x**3)))
    if approximate == "quick":
        return x * expit(QUICK_GELU_COEFF * x)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def layer_norm(x, scale, bias, eps: float):  # [..., d] -> [..., d]
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)  # biased, as every framework's LN
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def dense(x, kernel, bias=None):  # [..., d_in] -> [..., d_out]
    y = x @ kernel
    return y if bias is None else y + bias


def softmax(x):  # [..., n] -> [..., n]
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x):  # [..., n] -> [..., n]
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def split_heads(x, num_heads: int):  # [n, t, d] -> [n, heads, t, d/heads]
    n, t, d = x.shape
    return x.reshape(n, t, num_heads, d // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):  # [n, heads, t, d/heads] -> [n, t, d]
    n, h, t, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(n, t, h * dh)


def mix_heads(x, kernel, bias):  # [n, heads, tq, t] -> [n, heads, tq, t]: talking heads' dense over heads
    return np.moveaxis(dense(np.moveaxis(x, 1, -1), kernel, bias), -1, 1)


def attention(
    x_q,
    x_kv,
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
    # [n, tq, d], [n, t, d] -> ([n, tq, d], weights on v [n, heads, tq, t])
    q = split_heads(dense(x_q, **query), num_heads)
    k = split_heads(dense(x_kv, **key), num_heads)
    v = split_heads(dense(x_kv, **value), num_heads)
    if q_norm is not None:
        q = layer_norm(q, **q_norm, eps=eps)
        k = layer_norm(k, **k_norm, eps=eps)
    scores = (q * q.shape[-1] ** -0.5) @ k.swapaxes(-1, -2)
    if talk_logits is not None:
        scores = mix_heads(scores, **talk_logits)
    weights = softmax(scores)
    if talk_weights is not None:
        weights = mix_heads(weights, **talk_weights)
    return dense(merge_heads(weights @ v), **out), weights


def feed_forward(x, fc1, fc2, approximate: str):  # [..., d] -> [..., d]
    return dense(gelu(dense(x, **fc1), approximate), **fc2)


def layer_scale(x, ls=None):  # [..., d] -> [..., d]; identity without LayerScale
    return x if ls is None else x * ls["scale"]


def block(x, cfg: ViTConfig, norm1, attn, norm2, mlp, ls1=None, ls2=None):
    # [n, t, d] -> ([n, t, d], attention weights [n, heads, t, t])
    h = layer_norm(x, **norm1, eps=cfg.ln_eps)
    a, probs = attention(h, h, **attn, num_heads=cfg.num_heads, eps=cfg.ln_eps)
    x = x + layer_scale(a, ls1)
    m = feed_forward(layer_norm(x, **norm2, eps=cfg.ln_eps), **mlp, approximate=cfg.gelu)
    return x + layer_scale(m, ls2), probs


def class_block(x, cls, cfg: ViTConfig, norm1, attn, norm2, mlp, ls1=None, ls2=None):
    # patches [n, p, d], class token [n, 1, d] -> ([n, 1, d], probabilities [n, heads, 1, 1 + p])
    h = layer_norm(np.concatenate([cls, x], axis=1), **norm1, eps=cfg.ln_eps)
    a, probs = attention(h[:, :1], h, **attn, num_heads=cfg.num_heads, eps=cfg.ln_eps)
    cls = cls + layer_scale(a, ls1)
    m = feed_forward(layer_norm(cls, **norm2, eps=cfg.ln_eps), **mlp, approximate=cfg.gelu)
    return cls + layer_scale(m, ls2), probs


def map_head(x, cfg: ViTConfig, probe, attn, norm, mlp):
    # [n, t, d] -> ([n, d], attention probabilities [n, heads, 1, t])
    query = np.broadcast_to(probe, (x.shape[0], 1, probe.shape[-1]))
    y, probs = attention(query, x, **attn, num_heads=cfg.num_heads, eps=cfg.ln_eps)
    y = y + feed_forward(layer_norm(y, **norm, eps=cfg.ln_eps), **mlp, approximate=cfg.gelu)
    return y[:, 0], probs


def patchify(images, patch_size: tuple[int, int]):  # [n, h, w, c] -> [n, gh*gw, ph*pw*c]
    n, h, w, c = images.shape
    ph, pw = patch_size
    x = images.reshape(n, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // ph) * (w // pw), ph * pw * c)


def embed_patches(images, cfg: ViTConfig, kernel, bias=None):  # [n, h, w, c] -> [n, patches, d]
    return dense(patchify(images, cfg.patch_size), kernel.reshape(-1, kernel.shape[-1]), bias)


def add_tokens_and_posemb(
    x, cfg: ViTConfig, cls_token=None, dist_token=None, reg_tokens=None, pos_embed=None
):  # [n, patches, d] -> [n, tokens, d]; tokens are [class, distillation, registers..., patches]
    n, _, d = x.shape
    prefix = [
        np.broadcast_to(t.reshape(1, -1, d), (n, t.size // d, d))
        for t in (cls_token, dist_token, reg_tokens)
        if t is not None
    ]
    posemb = pos_embed if cfg.posemb == "learned" else fixed_posemb(cfg)
    if posemb is not None:
        posemb = posemb.astype(x.dtype, copy=False)
    if posemb is not None and not cfg.posemb_on_cls:
        x = x + posemb
    x = np.concatenate([*prefix, x], axis=1)
    if posemb is not None and cfg.posemb_on_cls:
        x = x + posemb
    return x


def pool_inputs(x, cfg: ViTConfig):  # [n, tokens, d] -> [n, tokens pooled over, d]
    return x if cfg.pool_include_prefix else x[:, cfg.num_prefix_tokens :]


def pool(x, cfg: ViTConfig):  # [n, tokens, d] -> [n, d] ([n, tokens, d] for pool 'none')
    if cfg.pool == "token":
        return x[:, 0]
    if cfg.pool == "none":
        return x
    x = pool_inputs(x, cfg)
    if cfg.pool == "gap":
        return x.mean(axis=1)
    if cfg.pool == "max":
        return x.max(axis=1)
    if cfg.pool == "avgmax":  # timm's global_pool_nlc
        return 0.5 * (x.mean(axis=1) + x.max(axis=1))
    if cfg.pool == "sum":
        return x.sum(axis=1)
    raise AssertionError(f"pool {cfg.pool!r} has parameters: use map_head")


def mean_of_heads(cls, dist, head=None, head_dist=None):
    # [n, d], [n, d] -> [n, classes] ([n, d] without heads): DeiT at inference
    if head is None:
        return (cls + dist) / 2
    return (dense(cls, **head) + dense(dist, **head_dist)) / 2


def check_images(cfg: ViTConfig, images) -> np.ndarray:
    images = np.asarray(images)
    expected = (*cfg.image_size, cfg.in_channels)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(
            f"images have shape {images.shape}; the config expects [N, {', '.join(map(str, expected))}]"
            " (NHWC)"
        )
    if images.dtype not in (np.float32, np.float64):
        raise ValueError(f"images have dtype {images.dtype}; the reference computes in float32 or float64")
    return images


def forward(
    cfg: ViTConfig,
    params: dict[str, np.ndarray],
    images,
    *,
    intermediates: bool = False,
    attention_maps: bool = False,
):
    """Logits for NHWC images, or with `intermediates`/`attention_maps` the dict of named values.

    Intermediates: patch_embed [n, patches, d], with pre_norm embedded [n, t, d] (the tokens with
    their posemb, before the pre-norm), tokens [n, t, d] (block 0's input), block_{i} [n, t, d], for
    CaiT class_block_{j} [n, 1, d] (the class token after class block j), encoded [n, t, d]
    ([n, 1 + patches, d] for CaiT), pooled (for a distilled model: the class token, and pooled_dist
    the distillation token, both [n, d]), pre_logits (distilled: their mean, timm's pre_logits
    features), logits; attention maps: attn_{i} [n, heads, t, t] (the weights on v: after the
    talking-heads mix), for pool 'map', map_attn [n, heads, 1, tokens pooled over], for CaiT
    class_attn_{j} [n, heads, 1, 1 + patches].
    """
    validate_params(cfg, params)
    images = check_images(cfg, images)
    tree = unflatten({k: np.asarray(v, dtype=images.dtype) for k, v in params.items()})
    out: dict[str, np.ndarray] = {}
    x = out["encoded"] = encode(cfg, tree, images, out)
    if cfg.distilled:
        out["pooled"], out["pooled_dist"] = x[:, 0], x[:, 1]
        out["pre_logits"] = (x[:, 0] + x[:, 1]) / 2
        out["logits"] = mean_of_heads(x[:, 0], x[:, 1], tree.get("head"), tree.get("head_dist"))
        return select_outputs(out, intermediates, attention_maps)
    if cfg.pool == "map":
        x, out["map_attn"] = map_head(pool_inputs(x, cfg), cfg, **tree["map_head"])
    else:
        x = pool(x, cfg)
    if cfg.fc_norm:
        x = layer_norm(x, **tree["fc_norm"], eps=cfg.ln_eps)
    out["pooled"] = x
    if cfg.representation_size:
        x = np.tanh(dense(x, **tree["pre_logits"]))
    out["pre_logits"] = x
    if cfg.num_classes:
        x = dense(x, **tree["head"])
    out["logits"] = x
    return select_outputs(out, intermediates, attention_maps)


def encode(cfg: ViTConfig, tree: dict, images, out: dict):
    # [n, h, w, c] -> [n, t, d]: the tokens after the encoder's final norm; named values go to `out`
    x = out["patch_embed"] = embed_patches(images, cfg, **tree["patch_embed"])
    cls_token = tree.get("cls_token")
    prefix_cls = None if cfg.class_attention_depth else cls_token  # CaiT's enters after the blocks
    x = add_tokens_and_posemb(
        x, cfg, prefix_cls, tree.get("dist_token"), tree.get("reg_tokens"), tree.get("pos_embed")
    )
    if cfg.pre_norm:
        out["embedded"] = x
        x = layer_norm(x, **tree["pre_norm"], eps=cfg.ln_eps)
    out["tokens"] = x
    for i in range(cfg.depth):
        x, out[f"attn_{i}"] = block(x, cfg, **tree["blocks"][str(i)])
        out[f"block_{i}"] = x
    if cfg.class_attention_depth:
        cls = np.broadcast_to(cls_token, (x.shape[0], 1, cfg.width))
        for j in range(cfg.class_attention_depth):
            cls, out[f"class_attn_{j}"] = class_block(x, cls, cfg, **tree["class_blocks"][str(j)])
            out[f"class_block_{j}"] = cls
        x = np.concatenate([cls, x], axis=1)
    if cfg.final_norm and not cfg.fc_norm:
        x = layer_norm(x, **tree["norm"], eps=cfg.ln_eps)
    return x


def is_attention_map(name: str) -> bool:
    """Whether a named output is an attention map (attn_{i}, class_attn_{j}, map_attn) rather than an
    intermediate."""
    return name.startswith(("attn_", "class_attn_")) or name == "map_attn"


def select_outputs(out: dict, intermediates: bool, attention_maps: bool):
    """The logits alone, or the named values asked for: intermediates and/or attention maps."""
    if not (intermediates or attention_maps):
        return out["logits"]
    return {k: v for k, v in out.items() if (attention_maps if is_attention_map(k) else intermediates)}


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Softmax cross-entropy, mean over the batch; targets (1 - eps) * onehot + eps / classes."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy needs logits [batch, classes], got shape {logits.shape}")
    n, k = logits.shape
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}), got range [{labels.min()}, {labels.max()}]")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r}: expected a value in [0, 1)")
    return -(smoothed_targets(labels, k, label_smoothing, logits.dtype) * log_softmax(logits)).sum(-1).mean()


def smoothed_targets(labels, num_classes: int, label_smoothing: float, dtype) -> np.ndarray:
    # [n] -> [n, classes]
    onehot = np.eye(num_classes, dtype=dtype)[labels]
    return onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
