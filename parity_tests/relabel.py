"""The same model with its hidden units relabeled: equal math, other rounding.

A ViT's output does not change when the residual channels, the MLP's hidden units, the heads and
the pre-logits units are put in another order, each parameter's axes permuted to match. In float32
every sum then runs in another order, so the permuted reference is a second, equally valid
rounding of the same function. The tolerance rule compares a backend's error with the largest
error of several such roundings of the reference: a single rounding can land lucky (a one-element
logit that cancels is a ratio of two independent rounding errors, whose tail is Cauchy's), the
largest of several cannot.

A relabeling is a dict of permutations by axis label: 'd' residual channels (the model's width,
also under an `attention_dim` of its own), 'm' MLP hidden units, 'c' those of CaiT's
class-attention blocks, 'h' heads (both axes of a talking-heads mix), 'hd' the blocks' q/k/v
columns and out projection's rows, `attention_dim` wide, permuted as the heads in blocks of
head_dim columns, 'hw' the same for the MAP head's attention, which is the model's width wide
(blocks of width / heads), 'r' pre-logits units. The ViT families' parameters: the distillation
token and the pre-norm are residual-stream vectors ('d'), DeiT's second head has the first one's
axes, and an optional bias (patch, projection, q/k/v) carries its layer's output label when present.
"""

from __future__ import annotations

import numpy as np

from vitspec.config import FIXED_POSEMBS, ViTConfig


def _param_axes(cfg: ViTConfig, name: str) -> tuple:
    """Which label each axis of parameter `name` carries (None: not relabeled)."""
    leaf = name.rsplit("/", 1)[-1]
    layer = name.rsplit("/", 2)[-2] if name.count("/") >= 1 else ""
    if name == "patch_embed/kernel":
        return (None, None, None, "d")
    if name in ("reg_tokens", "pos_embed"):
        return (None, "d")
    if name in ("head/kernel", "head_dist/kernel"):
        return ("r" if cfg.representation_size else "d", None)
    if name in ("head/bias", "head_dist/bias"):
        return (None,)
    if name == "pre_logits/kernel":
        return ("d", "r")
    if name == "pre_logits/bias":
        return ("r",)
    # The blocks' attention is attention_dim wide ('hd'); the MAP head's is the model's width ('hw').
    columns = "hw" if name.startswith("map_head/") else "hd"
    if layer in ("query", "key", "value"):
        return ("d", columns) if leaf == "kernel" else (columns,)
    if layer in ("q_norm", "k_norm"):
        return (None,)
    if layer == "out":
        return (columns, "d") if leaf == "kernel" else ("d",)
    if layer in ("talk_logits", "talk_weights"):
        return ("h", "h") if leaf == "kernel" else ("h",)
    hidden = "c" if name.startswith("class_blocks/") else "m"
    if layer == "fc1":
        return ("d", hidden) if leaf == "kernel" else (hidden,)
    if layer == "fc2":
        return (hidden, "d") if leaf == "kernel" else ("d",)
    # cls/dist tokens, norms (pre_norm included), layer scales, biases on the residual stream
    # (patch_embed, out, fc2), the MAP probe
    return ("d",)


def _value_axes(cfg: ViTConfig, name: str, ndim: int) -> tuple:
    """Which label each axis of a named intermediate, attention map or image gradient carries."""
    if name.startswith(("attn_", "class_attn_")) or name == "map_attn":
        return (None, "h", None, None)
    feature = "r" if cfg.representation_size else "d"
    if name == "pre_logits" or (name == "logits" and not cfg.num_classes):
        return (None,) * (ndim - 1) + (feature,)
    if name in ("logits", "images"):
        return (None,) * ndim
    return (None,) * (ndim - 1) + ("d",)


def random_relabeling(cfg: ViTConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random permutations of every label. The channels keep their order under a fixed position
    embedding (sincos2d, sinusoidal_1d/2d), a function of the channel index. The heads permute the
    `attention_dim` q/k/v columns in blocks of head_dim."""
    heads = rng.permutation(cfg.num_heads)
    map_head_dim = cfg.width // cfg.num_heads  # the MAP head's (pool 'map' needs heads | width)
    return {
        "d": np.arange(cfg.width) if cfg.posemb in FIXED_POSEMBS else rng.permutation(cfg.width),
        "m": rng.permutation(cfg.mlp_dim),
        "c": rng.permutation(cfg.class_attention_mlp_dim or 1),
        "h": heads,
        "hd": (heads[:, None] * cfg.head_dim + np.arange(cfg.head_dim)).reshape(-1),
        "hw": (heads[:, None] * map_head_dim + np.arange(map_head_dim)).reshape(-1),
        "r": rng.permutation(cfg.representation_size or 1),
    }


def _take(x: np.ndarray, axes: tuple, perms: dict[str, np.ndarray], inverse: bool) -> np.ndarray:
    for axis, label in enumerate(axes):
        if label is not None:
            perm = perms[label]
            x = np.take(x, np.argsort(perm) if inverse else perm, axis=axis)
    return x


def relabel_params(cfg: ViTConfig, params: dict, perms: dict) -> dict[str, np.ndarray]:
    return {k: _take(v, _param_axes(cfg, k), perms, inverse=False) for k, v in params.items()}


def restore_params(cfg: ViTConfig, params: dict, perms: dict) -> dict[str, np.ndarray]:
    """Parameter-shaped values (gradients) of the relabeled model in the original order."""
    return {k: _take(v, _param_axes(cfg, k), perms, inverse=True) for k, v in params.items()}


def relabel_values(cfg: ViTConfig, named: dict, perms: dict) -> dict[str, np.ndarray]:
    """Named values in the relabeled model's order (a cotangent on its outputs)."""
    return {k: _take(v, _value_axes(cfg, k, v.ndim), perms, inverse=False) for k, v in named.items()}


def restore_values(cfg: ViTConfig, named: dict, perms: dict) -> dict[str, np.ndarray]:
    """Named values (intermediates, maps, the images' gradient) in the original order."""
    return {k: _take(v, _value_axes(cfg, k, v.ndim), perms, inverse=True) for k, v in named.items()}
