"""CaiT (Touvron et al. 2021, arXiv:2103.17239) in PyTorch, with timm's `Cait` state-dict names.

A config with `class_attention_depth > 0`: `depth` self-attention blocks over the patches only,
then `class_attention_depth` class-attention blocks in which the class token, entering there,
queries [class, patches] and only it is updated. Eval mode computes exactly `vitspec.forward`.

State dict (D width, C in_channels, P patches, H heads, M mlp_dim, M' class_attention_mlp_dim,
K num_classes), timm.models.cait.Cait's names and shapes:

    patch_embed.proj.weight [D, C, ph, pw], patch_embed.proj.bias [D]
    cls_token [1, 1, D]; pos_embed [1, P, D]                 posemb == "learned"
    blocks.{i}.norm1, blocks.{i}.attn.qkv.weight [3D, D]     rows: query, key, value
    blocks.{i}.attn.qkv.bias [3D]                            qkv_bias
    blocks.{i}.attn.proj_l / .proj_w .weight [H, H], .bias [H]  talking_heads (weight = kernel.T)
    blocks.{i}.attn.proj, blocks.{i}.gamma_1 / .gamma_2 [D]  (gammas: layer_scale is not None)
    blocks.{i}.norm2, blocks.{i}.mlp.fc1 [M, D], blocks.{i}.mlp.fc2 [D, M]
    blocks_token_only.{j}.norm1, .attn.q / .attn.k / .attn.v [D, D] (biases: qkv_bias), .attn.proj
    blocks_token_only.{j}.gamma_1 / .gamma_2, .norm2, .mlp.fc1 [M', D], .mlp.fc2 [D, M']
    norm, head.weight [K, D], head.bias [K]                  (head: num_classes > 0)

timm's Cait always has talking heads and LayerScale; without them the rows are simply absent
(timm's `attn_block=Attention` builds the former). A sincos2d posemb is the non-persistent
float64 buffer `pos_embed_sincos`, as in the ViT module (the sinusoidal ones too). The knobs of
the ViT families apply as in the ViT module: `norm_pre` (pre_norm), no `patch_embed.proj.bias`
(patch_bias=False), no `norm` (final_norm=False), no attn.proj / mlp biases in either kind of
block (proj_bias=False), q/k/v of attention_dim; timm's Cait has none of these.

Training: the self-attention blocks draw dropout, attention dropout (on the weights after the
talk_weights mix) and stochastic depth exactly as the ViT module's blocks; the class-attention
blocks have none, as timm's `blocks_token_only`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backends.torch_vit.convert import from_reference
from backends.torch_vit.layers import (
    Attention,
    Mlp,
    PatchEmbed,
    add_posemb,
    attend,
    fixed_posemb_buffer,
    merge_heads,
    split_heads,
)
from backends.torch_vit.model import DropPath, VisionTransformer
from vitspec.config import ViTConfig
from vitspec.params import init_params
from vitspec.reference import select_outputs


def model_for(cfg: ViTConfig, seed: int = 0) -> nn.Module:
    """The backend's module for `cfg`: CaiT where it has class-attention blocks, else the ViT."""
    return Cait(cfg, seed) if cfg.class_attention_depth else VisionTransformer(cfg, seed)


def mix_heads(scores, mix: nn.Linear):
    """Talking heads: mix [n, heads, q, k] across the head axis with a Linear(heads, heads)."""
    return mix(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TalkingHeadAttention(Attention):
    """timm's TalkingHeadAttn: the fused-qkv attention with the logits mixed across heads before
    the softmax (`proj_l`) and the weights after it (`proj_w`)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__(cfg)
        self.proj_l = nn.Linear(cfg.num_heads, cfg.num_heads)
        self.proj_w = nn.Linear(cfg.num_heads, cfg.num_heads)

    def forward(self, x, return_probs: bool = False):  # [n, t, d] -> ([n, t, d], [n, heads, t, t] or None)
        q, k, v = [split_heads(part, self.num_heads) for part in self.qkv(x).chunk(3, dim=-1)]
        scores = mix_heads((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), self.proj_l)
        weights = mix_heads(torch.softmax(scores, dim=-1), self.proj_w)
        dropout_rate = self.attention_dropout if self.training else 0.0
        context = F.dropout(weights, dropout_rate) @ v
        return self.proj_drop(self.proj(merge_heads(context))), weights if return_probs else None


def layer_scale(cfg: ViTConfig) -> nn.Parameter | None:
    """timm's gamma_1 / gamma_2 (`init_values * ones`), or None where the config has no LayerScale."""
    return None if cfg.layer_scale is None else nn.Parameter(torch.ones(cfg.width))


def scaled(gamma, x):
    return x if gamma is None else gamma * x


class LayerScaleBlock(nn.Module):
    """A self-attention block over the patches: the ViT block with timm's gamma names."""

    def __init__(self, cfg: ViTConfig, drop_path_rate: float):
        super().__init__()
        self.gamma_1, self.gamma_2 = layer_scale(cfg), layer_scale(cfg)
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = TalkingHeadAttention(cfg) if cfg.talking_heads else Attention(cfg)
        self.drop_path1 = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg, cfg.dropout, bias=cfg.proj_bias)
        self.drop_path2 = DropPath(drop_path_rate)

    def forward(self, x, return_probs: bool = False):  # [n, p, d] -> ([n, p, d], probs or None)
        attended, probs = self.attn(self.norm1(x), return_probs)
        x = x + self.drop_path1(scaled(self.gamma_1, attended))
        x = x + self.drop_path2(scaled(self.gamma_2, self.mlp(self.norm2(x))))
        return x, probs


class ClassAttention(nn.Module):
    """timm's ClassAttn: the class token (row 0) queries every token; separate q, k, v (to
    attention_dim, as the self-attention's)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.width, cfg.attention_dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.width, cfg.attention_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.width, cfg.attention_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.attention_dim, cfg.width, bias=cfg.proj_bias)

    def forward(self, u, return_probs: bool = False):  # [n, 1+p, d] -> ([n, 1, d], [n, heads, 1, 1+p])
        q = split_heads(self.q(u[:, :1]), self.num_heads)
        k, v = split_heads(self.k(u), self.num_heads), split_heads(self.v(u), self.num_heads)
        context, probs = attend(q, k, v, 0.0, return_probs)
        return self.proj(merge_heads(context)), probs


class LayerScaleBlockClassAttn(nn.Module):
    """A class-attention block: updates the class token only; no dropout, no stochastic depth."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.gamma_1, self.gamma_2 = layer_scale(cfg), layer_scale(cfg)
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = ClassAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg, dropout=0.0, hidden=cfg.class_attention_mlp_dim, bias=cfg.proj_bias)

    def forward(self, x, cls, return_probs: bool = False):  # patches [n, p, d], cls [n, 1, d]
        attended, probs = self.attn(self.norm1(torch.cat((cls, x), dim=1)), return_probs)
        cls = cls + scaled(self.gamma_1, attended)
        cls = cls + scaled(self.gamma_2, self.mlp(self.norm2(cls)))
        return cls, probs


class Cait(nn.Module):
    """CaiT built from a ViTConfig with class_attention_depth > 0; parameters start at
    `vitspec.init_params(cfg, seed)`.

    `model(images)` maps NCHW images to logits [N, K] (the pooled features when num_classes == 0).
    `intermediates=True` returns the named values instead (patch_embed, tokens, block_{i},
    class_block_{j} [N, 1, D], encoded [N, 1+P, D], pooled, pre_logits, logits) and
    `attention_maps=True` the attention weights attn_{i} [N, H, P, P] (after the talk_weights mix)
    and class_attn_{j} [N, H, 1, 1+P]; both flags give one dict with both, as the ViT module.
    """

    def __init__(self, cfg: ViTConfig, seed: int = 0):
        super().__init__()
        if not cfg.class_attention_depth:
            raise ValueError("Cait needs class_attention_depth > 0; a config without it is the ViT's")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        learned = cfg.posemb == "learned"
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.posemb_length, cfg.width)) if learned else None
        self.register_buffer("pos_embed_sincos", fixed_posemb_buffer(cfg), persistent=False)
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.norm_pre = nn.LayerNorm(cfg.width, eps=cfg.ln_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(LayerScaleBlock(cfg, rate) for rate in cfg.drop_path_rates)
        self.blocks_token_only = nn.ModuleList(
            LayerScaleBlockClassAttn(cfg) for _ in range(cfg.class_attention_depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps) if cfg.final_norm else nn.Identity()
        self.head = nn.Linear(cfg.width, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.load_state_dict(from_reference(init_params(cfg, seed), cfg))

    def forward(self, images, intermediates: bool = False, attention_maps: bool = False):
        named: dict[str, torch.Tensor] = {}
        x = named["patch_embed"] = self.patch_embed(images)
        fixed = None if self.pos_embed_sincos is None else self.pos_embed_sincos.to(x.dtype)
        x = self.pos_drop(add_posemb([], x, fixed if self.pos_embed is None else self.pos_embed, False))
        if self.cfg.pre_norm:
            named["embedded"] = x
        x = named["tokens"] = self.norm_pre(x)
        for i, block in enumerate(self.blocks):
            x, probs = block(x, attention_maps)
            named[f"block_{i}"] = x
            if attention_maps:
                named[f"attn_{i}"] = probs
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for j, block in enumerate(self.blocks_token_only):
            cls, probs = block(x, cls, attention_maps)
            named[f"class_block_{j}"] = cls
            if attention_maps:
                named[f"class_attn_{j}"] = probs
        encoded = named["encoded"] = self.norm(torch.cat((cls, x), dim=1))
        named["pooled"] = named["pre_logits"] = encoded[:, 0]
        named["logits"] = self.head(encoded[:, 0])
        return select_outputs(named, intermediates, attention_maps)
