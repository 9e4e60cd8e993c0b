"""Reference parameter tree <-> timm-named PyTorch state dict, both ways from one mapping table.

`mapping_table(cfg)` lists every parameter once as (reference names, timm name, layout). The
layout is the only place array layouts change (like timm's `_n2p` for big_vision checkpoints):

    copy         same array (LayerNorm scale -> weight, biases, LayerScale scale -> gamma)
    dense        kernel [in, out] -> Linear weight [out, in]
    conv         patch kernel HWIO [ph, pw, C, D] -> Conv2d weight OIHW [D, C, ph, pw]
    tokens       rows [..., D] -> [1, rows, D] (a leading batch axis, as timm stores tokens)
    fused_dense  q, k, v (or k, v) kernels -> concatenated Linear weights [3D, D] (or [2D, D])
    fused_bias   q, k, v (or k, v) biases -> concatenated [3D] (or [2D])

Both directions check every name and shape before converting anything and list every missing,
unexpected and mis-shaped key in one error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import torch

from vitspec.config import ViTConfig
from vitspec.params import param_shapes

Shape = tuple[int, ...]


class ConversionError(ValueError):
    """A parameter tree or state dict that does not match its config; lists every problem."""


class Layout(NamedTuple):
    to_timm: Callable[[list[np.ndarray]], np.ndarray]
    to_reference: Callable[[np.ndarray, list[Shape]], list[np.ndarray]]
    timm_shape: Callable[[list[Shape]], Shape]


def _split_rows(array: np.ndarray, parts: int) -> list[np.ndarray]:
    return np.split(array, parts, axis=0)


LAYOUTS: dict[str, Layout] = {
    "copy": Layout(
        to_timm=lambda arrays: arrays[0],
        to_reference=lambda array, shapes: [array],
        timm_shape=lambda shapes: shapes[0],
    ),
    "dense": Layout(
        to_timm=lambda arrays: arrays[0].T,
        to_reference=lambda array, shapes: [array.T],
        timm_shape=lambda shapes: shapes[0][::-1],
    ),
    "conv": Layout(
        to_timm=lambda arrays: arrays[0].transpose(3, 2, 0, 1),
        to_reference=lambda array, shapes: [array.transpose(2, 3, 1, 0)],
        timm_shape=lambda shapes: (shapes[0][3], shapes[0][2], shapes[0][0], shapes[0][1]),
    ),
    "tokens": Layout(
        to_timm=lambda arrays: arrays[0].reshape(1, -1, arrays[0].shape[-1]),
        to_reference=lambda array, shapes: [array.reshape(shapes[0])],
        timm_shape=lambda shapes: (1, int(np.prod(shapes[0][:-1])), shapes[0][-1]),
    ),
    "fused_dense": Layout(
        to_timm=lambda arrays: np.concatenate([a.T for a in arrays], axis=0),
        to_reference=lambda array, shapes: [part.T for part in _split_rows(array, len(shapes))],
        timm_shape=lambda shapes: (sum(s[1] for s in shapes), shapes[0][0]),
    ),
    "fused_bias": Layout(
        to_timm=lambda arrays: np.concatenate(arrays, axis=0),
        to_reference=lambda array, shapes: _split_rows(array, len(shapes)),
        timm_shape=lambda shapes: (sum(s[0] for s in shapes),),
    ),
}


class Rule(NamedTuple):
    reference_names: tuple[str, ...]
    timm_name: str
    layout: str


def _rule(reference_name: str, timm_name: str, layout: str) -> Rule:
    return Rule((reference_name,), timm_name, layout)


def _layer_norm(ref: str, timm: str) -> list[Rule]:
    return [_rule(f"{ref}/scale", f"{timm}.weight", "copy"), _rule(f"{ref}/bias", f"{timm}.bias", "copy")]


def _dense(ref: str, timm: str) -> list[Rule]:
    return [_rule(f"{ref}/kernel", f"{timm}.weight", "dense"), _rule(f"{ref}/bias", f"{timm}.bias", "copy")]


def _fused(ref: str, parts: tuple[str, ...], timm: str, bias: bool) -> list[Rule]:
    rules = [Rule(tuple(f"{ref}/{p}/kernel" for p in parts), f"{timm}.weight", "fused_dense")]
    if bias:
        rules.append(Rule(tuple(f"{ref}/{p}/bias" for p in parts), f"{timm}.bias", "fused_bias"))
    return rules


def _block(cfg: ViTConfig, i: int) -> list[Rule]:
    ref, timm = f"blocks/{i}", f"blocks.{i}"
    rules = _layer_norm(f"{ref}/norm1", f"{timm}.norm1")
    rules += _fused(f"{ref}/attn", ("query", "key", "value"), f"{timm}.attn.qkv", bias=cfg.qkv_bias)
    if cfg.qk_norm:
        rules += _layer_norm(f"{ref}/attn/q_norm", f"{timm}.attn.q_norm")
        rules += _layer_norm(f"{ref}/attn/k_norm", f"{timm}.attn.k_norm")
    rules += _dense(f"{ref}/attn/out", f"{timm}.attn.proj")
    if cfg.layer_scale is not None:
        rules.append(_rule(f"{ref}/ls1/scale", f"{timm}.ls1.gamma", "copy"))
    rules += _layer_norm(f"{ref}/norm2", f"{timm}.norm2")
    rules += _dense(f"{ref}/mlp/fc1", f"{timm}.mlp.fc1") + _dense(f"{ref}/mlp/fc2", f"{timm}.mlp.fc2")
    if cfg.layer_scale is not None:
        rules.append(_rule(f"{ref}/ls2/scale", f"{timm}.ls2.gamma", "copy"))
    return rules


def _map_head() -> list[Rule]:
    return [
        _rule("map_head/probe", "attn_pool.latent", "tokens"),
        *_dense("map_head/attn/query", "attn_pool.q"),
        *_fused("map_head/attn", ("key", "value"), "attn_pool.kv", bias=True),
        *_dense("map_head/attn/out", "attn_pool.proj"),
        *_layer_norm("map_head/norm", "attn_pool.norm"),
        *_dense("map_head/mlp/fc1", "attn_pool.mlp.fc1"),
        *_dense("map_head/mlp/fc2", "attn_pool.mlp.fc2"),
    ]


def mapping_table(cfg: ViTConfig) -> list[Rule]:
    """Every parameter of `cfg` as (reference names, timm name, layout), in forward order."""
    rules = [
        _rule("patch_embed/kernel", "patch_embed.proj.weight", "conv"),
        _rule("patch_embed/bias", "patch_embed.proj.bias", "copy"),
    ]
    if cfg.class_token:
        rules.append(_rule("cls_token", "cls_token", "tokens"))
    if cfg.num_registers:
        rules.append(_rule("reg_tokens", "reg_token", "tokens"))
    if cfg.posemb == "learned":
        rules.append(_rule("pos_embed", "pos_embed", "tokens"))
    for i in range(cfg.depth):
        rules += _block(cfg, i)
    if not cfg.fc_norm:
        rules += _layer_norm("norm", "norm")
    if cfg.pool == "map":
        rules += _map_head()
    if cfg.fc_norm:
        rules += _layer_norm("fc_norm", "fc_norm")
    if cfg.representation_size:
        rules += _dense("pre_logits", "pre_logits.fc")
    if cfg.num_classes:
        rules += _dense("head", "head")
    return rules


def timm_shapes(cfg: ViTConfig) -> dict[str, Shape]:
    """Every state-dict name of `cfg` and its shape."""
    reference_shapes = param_shapes(cfg)
    return {
        rule.timm_name: LAYOUTS[rule.layout].timm_shape([reference_shapes[n] for n in rule.reference_names])
        for rule in mapping_table(cfg)
    }


def _check(arrays: Mapping[str, object], expected: dict[str, Shape], what: str) -> None:
    missing = [k for k in expected if k not in arrays]
    unexpected = sorted(k for k in arrays if k not in expected)
    misshaped = [
        f"{k}: expected {expected[k]}, got {tuple(arrays[k].shape)}"
        for k in expected
        if k in arrays and tuple(arrays[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if misshaped:
        problems.append(f"shape mismatches ({len(misshaped)}): " + "; ".join(misshaped))
    if problems:
        raise ConversionError(f"{what} does not match the config:\n  " + "\n  ".join(problems))


def from_reference(params: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """The timm-named state dict of a reference parameter tree (dtypes kept, memory not shared)."""
    params = {k: np.asarray(v) for k, v in params.items()}
    _check(params, param_shapes(cfg), "reference params")
    state_dict = {}
    for rule in mapping_table(cfg):
        array = LAYOUTS[rule.layout].to_timm([params[n] for n in rule.reference_names])
        state_dict[rule.timm_name] = torch.from_numpy(np.array(array, copy=True, order="C"))
    return state_dict


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    # NumPy has no bfloat16: widen it (and float16, for symmetry) to float32, which holds it exactly.
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.numpy()


def to_reference(state_dict: Mapping[str, torch.Tensor], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """The reference parameter tree of a timm-named state dict (dtypes kept; bf16/fp16 -> float32)."""
    _check(state_dict, timm_shapes(cfg), "state_dict")
    reference_shapes = param_shapes(cfg)
    params = {}
    for rule in mapping_table(cfg):
        shapes = [reference_shapes[n] for n in rule.reference_names]
        arrays = LAYOUTS[rule.layout].to_reference(_to_numpy(state_dict[rule.timm_name]), shapes)
        params |= {n: np.array(a, copy=True, order="C") for n, a in zip(rule.reference_names, arrays)}
    return {n: params[n] for n in reference_shapes}
