"""The vitspec Vision Transformer in PyTorch, with timm's state-dict names.

Images are NCHW, as PyTorch users pass them. Every ViTConfig knob is implemented; eval mode
computes exactly `vitspec.forward`, train mode adds dropout and stochastic depth.

State dict (D width, C in_channels, R registers, L posemb_length, A attention_dim, dh head_dim,
M mlp_dim, F feature_dim, K num_classes). These are timm `VisionTransformer`'s names and shapes
(`VisionTransformerDistilled`'s for a distilled config) wherever timm can express the config:

    patch_embed.proj.weight [D, C, ph, pw]
    patch_embed.proj.bias [D]                            patch_bias
    cls_token [1, 1, D]                                  class_token
    dist_token [1, 1, D]                                 distilled (after the class token)
    reg_token [1, R, D]                                  num_registers > 0
    pos_embed [1, L, D]                                  posemb == "learned"
    norm_pre.weight / .bias [D]                          pre_norm
    blocks.{i}.norm1.weight / .bias [D]
    blocks.{i}.attn.qkv.weight [3A, D]                   rows: query, key, value
    blocks.{i}.attn.qkv.bias [3A]                        qkv_bias (timm has no key otherwise)
    blocks.{i}.attn.q_norm / .k_norm .weight / .bias [dh]  qk_norm
    blocks.{i}.attn.proj.weight [D, A], .bias [D]        (bias: proj_bias)
    blocks.{i}.ls1.gamma, blocks.{i}.ls2.gamma [D]       layer_scale is not None
    blocks.{i}.norm2.weight / .bias [D]
    blocks.{i}.mlp.fc1.weight [M, D], .bias [M]; blocks.{i}.mlp.fc2.weight [D, M], .bias [D]
                                                         (biases: proj_bias, as timm's)
    norm.weight / .bias [D]                              final_norm and not fc_norm
    attn_pool.latent [1, 1, D]                           pool == "map" (timm AttentionPoolLatent)
    attn_pool.q.weight [D, D], .bias [D]; attn_pool.kv.weight [2D, D], .bias [2D] (rows: key, value)
    attn_pool.proj, attn_pool.norm, attn_pool.mlp.fc1 / .fc2
    fc_norm.weight / .bias [D]                           fc_norm
    pre_logits.fc.weight [F, D], .bias [F]               representation_size (old timm's name)
    head.weight [K, F], head.bias [K]                    num_classes > 0
    head_dist.weight [K, F], head_dist.bias [K]          distilled and num_classes > 0

Knobs timm lacks get names in the same style: `pre_logits.fc` (above), and the fixed posembs
(sincos2d, sinusoidal_1d, sinusoidal_2d: vitspec.fixed_posemb's tables), a non-persistent buffer
`pos_embed_sincos` [1, L, D] (not in the state dict). A new model holds that buffer in float64 and
casts it to the activations' dtype where it is added, so `VisionTransformer(cfg).double()` adds
the exact float64 table. The module also runs configs timm's classes cannot build (attention_dim
!= width, a patch bias not tied to pre_norm, pool "sum", ...): the timm format refuses to write
those (vitspec.formats.timm), this backend's state dict keeps the same names.

Dropout (train mode only) sits where timm puts it: on the tokens after the position embedding
(applied with posemb "none" too; `pos_drop`, here, before `norm_pre`), on the attention
probabilities (`attention_dropout`), after the attention projection, and in the MLP after the
activation and after fc2 (`dropout`): those three in layers.py (`attend`, `Attention`, `Mlp`).
Stochastic depth (`DropPath`, here) drops whole residual branches per sample at rates linear over
depth. The MAP head and the classifier have no dropout, as in timm's AttentionPoolLatent and
big_vision's MAPHead.
"""

from __future__ import annotations

import torch
from torch import nn

from backends.torch_vit.convert import from_reference
from backends.torch_vit.layers import (
    Attention,
    AttentionPoolLatent,
    LayerScale,
    Mlp,
    PatchEmbed,
    PreLogits,
    add_posemb,
    fixed_posemb_buffer,
    reduce_tokens,
)
from vitspec.config import ViTConfig
from vitspec.params import init_params
from vitspec.reference import select_outputs


class DropPath(nn.Module):
    """Stochastic depth (timm's DropPath): per sample, drop the whole branch with probability
    `rate` and scale the kept ones by 1 / (1 - rate), so the expectation is unchanged."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1 * Attn(LN1(x)), then + ls2 * MLP(LN2(x))."""

    def __init__(self, cfg: ViTConfig, drop_path_rate: float):
        super().__init__()
        has_layer_scale = cfg.layer_scale is not None
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.width) if has_layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg, cfg.dropout, bias=cfg.proj_bias)
        self.ls2 = LayerScale(cfg.width) if has_layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path_rate)

    def forward(self, x, return_probs: bool = False):  # [n, t, d] -> ([n, t, d], probs or None)
        attended, probs = self.attn(self.norm1(x), return_probs)
        x = x + self.drop_path1(self.ls1(attended))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, probs


class VisionTransformer(nn.Module):
    """A ViT built from a ViTConfig; parameters start at `vitspec.init_params(cfg, seed)`.

    `model(images)` maps NCHW images to logits ([N, K], or [N, T, K] for pool "none"; the
    features when num_classes == 0; a distilled model's: the mean of its two heads, or of its two
    tokens). As in `vitspec.forward`, `intermediates=True` returns the dict of named values
    instead (patch_embed, embedded (pre_norm only), tokens, block_{i}, encoded, pooled,
    pooled_dist (distilled only), pre_logits, logits) and `attention_maps=True` the attention
    probabilities attn_{i} [N, heads, T, T] (and map_attn [N, heads, 1, tokens pooled over] for
    pool "map"), computed by the explicit attention path; both flags give one dict with both.
    """

    def __init__(self, cfg: ViTConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, width)) if cfg.distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_registers, width)) if cfg.num_registers else None
        learned = cfg.posemb == "learned"
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.posemb_length, width)) if learned else None
        self.register_buffer("pos_embed_sincos", fixed_posemb_buffer(cfg), persistent=False)
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.norm_pre = nn.LayerNorm(width, eps=cfg.ln_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in cfg.drop_path_rates)
        final_norm = cfg.final_norm and not cfg.fc_norm  # timm: norm and fc_norm exclusive
        self.norm = nn.LayerNorm(width, eps=cfg.ln_eps) if final_norm else nn.Identity()
        self.attn_pool = AttentionPoolLatent(cfg) if cfg.pool == "map" else None
        self.fc_norm = nn.LayerNorm(width, eps=cfg.ln_eps) if cfg.fc_norm else nn.Identity()
        representation = cfg.representation_size
        self.pre_logits = PreLogits(width, representation) if representation else nn.Identity()
        self.head = head(cfg)
        self.head_dist = head(cfg) if cfg.distilled else None
        self.load_state_dict(from_reference(init_params(cfg, seed), cfg))

    def forward(self, images, intermediates: bool = False, attention_maps: bool = False):
        named: dict[str, torch.Tensor] = {}
        x = named["encoded"] = self._encode(images, attention_maps, named)
        if self.head_dist is not None:  # DeiT at inference: the mean of both heads (or both tokens)
            named["pooled"], named["pooled_dist"] = x[:, 0], x[:, 1]
            named["pre_logits"] = (x[:, 0] + x[:, 1]) / 2
            named["logits"] = (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
            return select_outputs(named, intermediates, attention_maps)
        x = named["pooled"] = self.fc_norm(self._pool(x, attention_maps, named))
        x = named["pre_logits"] = self.pre_logits(x)
        named["logits"] = self.head(x)
        return select_outputs(named, intermediates, attention_maps)

    def _encode(self, images, attention_maps: bool, named: dict):  # [n, c, h, w] -> [n, t, d]
        x = named["patch_embed"] = self.patch_embed(images)
        tokens = (self.cls_token, self.dist_token, self.reg_token)
        prefix = [t.expand(x.shape[0], -1, -1) for t in tokens if t is not None]
        x = self.pos_drop(add_posemb(prefix, x, self._posemb(x.dtype), self.cfg.posemb_on_cls))
        if self.cfg.pre_norm:
            named["embedded"] = x
        x = named["tokens"] = self.norm_pre(x)
        for i, block in enumerate(self.blocks):
            x, probs = block(x, attention_maps)
            named[f"block_{i}"] = x
            if attention_maps:
                named[f"attn_{i}"] = probs
        return self.norm(x)

    def _posemb(self, dtype):  # [1, rows, d] or None: the learned one, or the fixed table in `dtype`
        if self.pos_embed is not None:
            return self.pos_embed
        return None if self.pos_embed_sincos is None else self.pos_embed_sincos.to(dtype)

    def _pool(self, x, attention_maps: bool, named: dict):  # [n, t, d] -> [n, d] ([n, t, d] for "none")
        pool = self.cfg.pool
        if pool == "token":
            return x[:, 0]
        if pool == "none":
            return x
        if not self.cfg.pool_include_prefix:
            x = x[:, self.cfg.num_prefix_tokens :]
        if pool != "map":
            return reduce_tokens(x, pool)
        pooled, probs = self.attn_pool(x, attention_maps)
        if attention_maps:
            named["map_attn"] = probs
        return pooled


def head(cfg: ViTConfig) -> nn.Module:
    return nn.Linear(cfg.feature_dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
