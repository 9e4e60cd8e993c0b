"""The vitspec Vision Transformer in PyTorch, with timm's state-dict names.

Images are NCHW, as PyTorch users pass them. Every ViTConfig knob is implemented; eval mode
computes exactly `vitspec.forward`, train mode adds dropout and stochastic depth.

State dict (D width, C in_channels, R registers, L posemb_length, dh head_dim, M mlp_dim,
F feature_dim, K num_classes). These are timm `VisionTransformer`'s names and shapes wherever
timm can express the config:

    patch_embed.proj.weight [D, C, ph, pw], patch_embed.proj.bias [D]
    cls_token [1, 1, D]                                  class_token
    reg_token [1, R, D]                                  num_registers > 0
    pos_embed [1, L, D]                                  posemb == "learned"
    blocks.{i}.norm1.weight / .bias [D]
    blocks.{i}.attn.qkv.weight [3D, D]                   rows: query, key, value
    blocks.{i}.attn.qkv.bias [3D]                        qkv_bias (timm has no key otherwise)
    blocks.{i}.attn.q_norm / .k_norm .weight / .bias [dh]  qk_norm
    blocks.{i}.attn.proj.weight [D, D], .bias [D]
    blocks.{i}.ls1.gamma, blocks.{i}.ls2.gamma [D]       layer_scale is not None
    blocks.{i}.norm2.weight / .bias [D]
    blocks.{i}.mlp.fc1.weight [M, D], .bias [M]; blocks.{i}.mlp.fc2.weight [D, M], .bias [D]
    norm.weight / .bias [D]                              not fc_norm (timm: norm and fc_norm exclusive)
    attn_pool.latent [1, 1, D]                           pool == "map" (timm AttentionPoolLatent)
    attn_pool.q.weight [D, D], .bias [D]; attn_pool.kv.weight [2D, D], .bias [2D] (rows: key, value)
    attn_pool.proj, attn_pool.norm, attn_pool.mlp.fc1 / .fc2
    fc_norm.weight / .bias [D]                           fc_norm
    pre_logits.fc.weight [F, D], .bias [F]               representation_size (old timm's name)
    head.weight [K, F], head.bias [K]                    num_classes > 0

Knobs timm lacks get names in the same style: `pre_logits.fc` (above), and the fixed
posemb == "sincos2d" table, a non-persistent buffer `pos_embed_sincos` [1, P, D] (not in the
state dict). A new model holds that buffer in float64 and casts it to the activations' dtype
where it is added, so `VisionTransformer(cfg).double()` adds the exact float64 table.

Dropout (train mode only) sits where timm puts it: on the tokens after the position embedding
(applied with posemb "none" too), on the attention probabilities (`attention_dropout`), after
the attention projection, and in the MLP after the activation and after fc2 (`dropout`).
Stochastic depth drops whole residual branches per sample at rates linear over depth. The MAP
head and the classifier have no dropout, as in timm's AttentionPoolLatent and big_vision's MAPHead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backends.torch_vit.convert import from_reference
from vitspec.config import ViTConfig
from vitspec.params import init_params
from vitspec.reference import posemb_sincos2d, select_outputs

GELU_APPROXIMATIONS = {"exact": "none", "tanh": "tanh"}


def attend(q, k, v, dropout_rate: float, return_probs: bool):
    """Softmax attention of [n, heads, tq, dh] queries over [n, heads, t, dh] keys and values.

    The fused kernel by default; the explicit matmul and softmax only when the probabilities
    [n, heads, tq, t] are wanted (returned before dropout, as the reference has them).
    """
    if not return_probs:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_rate), None
    probs = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
    return F.dropout(probs, dropout_rate) @ v, probs


def split_heads(x, num_heads: int):  # [n, t, d] -> [n, heads, t, d / heads]
    n, t, d = x.shape
    return x.reshape(n, t, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x):  # [n, heads, t, dh] -> [n, t, heads * dh]
    n, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(n, t, h * dh)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's `Attention`)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.attention_dropout = cfg.attention_dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias)
        self.q_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.ln_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.ln_eps) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.proj_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, return_probs: bool = False):  # [n, t, d] -> ([n, t, d], [n, heads, t, t] or None)
        q, k, v = [split_heads(part, self.num_heads) for part in self.qkv(x).chunk(3, dim=-1)]
        # Under autocast LayerNorm returns float32 while v stays low precision; attention needs one dtype.
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        dropout_rate = self.attention_dropout if self.training else 0.0
        context, probs = attend(q, k, v, dropout_rate, return_probs)
        return self.proj_drop(self.proj(merge_heads(context))), probs


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig, dropout: float, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.mlp_dim
        self.fc1 = nn.Linear(cfg.width, hidden)
        self.act = nn.GELU(approximate=GELU_APPROXIMATIONS[cfg.gelu])
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, cfg.width)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x):  # [..., d] -> [..., d]
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


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
        self.mlp = Mlp(cfg, cfg.dropout)
        self.ls2 = LayerScale(cfg.width) if has_layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path_rate)

    def forward(self, x, return_probs: bool = False):  # [n, t, d] -> ([n, t, d], probs or None)
        attended, probs = self.attn(self.norm1(x), return_probs)
        x = x + self.drop_path1(self.ls1(attended))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, probs


class AttentionPoolLatent(nn.Module):
    """Multi-head attention pooling with one learned query (timm AttentionPoolLatent, big_vision
    MAPHead): always biased, no qk-norm, no dropout, then y + MLP(LN(y))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.width, 2 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg, dropout=0.0)

    def forward(self, x, return_probs: bool = False):  # [n, t, d] -> ([n, d], [n, heads, 1, t] or None)
        q = split_heads(self.q(self.latent.expand(x.shape[0], -1, -1)), self.num_heads)
        k, v = [split_heads(part, self.num_heads) for part in self.kv(x).chunk(2, dim=-1)]
        context, probs = attend(q, k, v, 0.0, return_probs)
        y = self.proj(merge_heads(context))
        y = y + self.mlp(self.norm(y))
        return y[:, 0], probs


class PreLogits(nn.Module):
    """The representation layer tanh(x W + b) of the original ViT (old timm's `pre_logits.fc`)."""

    def __init__(self, width: int, representation_size: int):
        super().__init__()
        self.fc = nn.Linear(width, representation_size)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: `proj` is the conv with stride == kernel == patch size.

    It is applied as one matmul over patches flattened in (row, column, channel) order, the
    reference's order: as fast as the conv on CPU, and oneDNN's bfloat16 conv returns wrong
    values, NaN included, for some shapes (torch 2.13 CPU: one input channel, a one-patch-wide
    grid, batch >= 3).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images):  # [n, c, h, w] -> [n, patches, d], patches row-major over the grid
        if images.ndim != 4 or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(
                f"images have shape {tuple(images.shape)}; the config expects "
                f"[N, {self.proj.in_channels}, {self.image_size[0]}, {self.image_size[1]}] (NCHW)"
            )
        n, c, h, w = images.shape
        ph, pw = self.patch_size
        patches = images.reshape(n, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 3, 5, 1)
        kernel = self.proj.weight.permute(0, 2, 3, 1)  # [d, ph, pw, c]
        return F.linear(
            patches.reshape(n, -1, ph * pw * c), kernel.reshape(kernel.shape[0], -1), self.proj.bias
        )


def fixed_posemb(cfg: ViTConfig) -> torch.Tensor | None:
    """The sincos2d table [1, patches, width] in float64 (cast where added), or None."""
    if cfg.posemb != "sincos2d":
        return None
    return torch.from_numpy(posemb_sincos2d(*cfg.grid_size, cfg.width))[None]


class VisionTransformer(nn.Module):
    """A ViT built from a ViTConfig; parameters start at `vitspec.init_params(cfg, seed)`.

    `model(images)` maps NCHW images to logits ([N, K], or [N, T, K] for pool "none"; the
    features when num_classes == 0). As in `vitspec.forward`, `intermediates=True` returns the
    dict of named values instead (patch_embed, tokens, block_{i}, encoded, pooled, pre_logits,
    logits) and `attention_maps=True` the attention probabilities attn_{i} [N, heads, T, T] (and
    map_attn [N, heads, 1, patches] for pool "map"), computed by the explicit attention path; both
    flags give one dict with both.
    """

    def __init__(self, cfg: ViTConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_registers, width)) if cfg.num_registers else None
        learned = cfg.posemb == "learned"
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.posemb_length, width)) if learned else None
        self.register_buffer("pos_embed_sincos", fixed_posemb(cfg), persistent=False)
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in cfg.drop_path_rates)
        self.norm = nn.Identity() if cfg.fc_norm else nn.LayerNorm(width, eps=cfg.ln_eps)
        self.attn_pool = AttentionPoolLatent(cfg) if cfg.pool == "map" else None
        self.fc_norm = nn.LayerNorm(width, eps=cfg.ln_eps) if cfg.fc_norm else nn.Identity()
        representation = cfg.representation_size
        self.pre_logits = PreLogits(width, representation) if representation else nn.Identity()
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.load_state_dict(from_reference(init_params(cfg, seed), cfg))

    def forward(self, images, intermediates: bool = False, attention_maps: bool = False):
        named: dict[str, torch.Tensor] = {}
        x = named["patch_embed"] = self.patch_embed(images)
        x = named["tokens"] = self.pos_drop(self._add_tokens_and_posemb(x))
        for i, block in enumerate(self.blocks):
            x, probs = block(x, attention_maps)
            named[f"block_{i}"] = x
            if attention_maps:
                named[f"attn_{i}"] = probs
        x = named["encoded"] = self.norm(x)
        x = named["pooled"] = self.fc_norm(self._pool(x, attention_maps, named))
        x = named["pre_logits"] = self.pre_logits(x)
        x = named["logits"] = self.head(x)
        return select_outputs(named, intermediates, attention_maps)

    def _add_tokens_and_posemb(self, patches):  # [n, patches, d] -> [n, tokens, d]
        n = patches.shape[0]
        prefix = [token.expand(n, -1, -1) for token in (self.cls_token, self.reg_token) if token is not None]
        if self.pos_embed_sincos is not None:
            patches = patches + self.pos_embed_sincos.to(patches.dtype)
        posemb_on_all_tokens = self.pos_embed is not None and self.cfg.posemb_on_cls
        if self.pos_embed is not None and not posemb_on_all_tokens:
            patches = patches + self.pos_embed
        tokens = torch.cat(prefix + [patches], dim=1)
        return tokens + self.pos_embed if posemb_on_all_tokens else tokens

    def _pool(self, x, attention_maps: bool, named: dict):  # [n, t, d] -> [n, d] ([n, t, d] for "none")
        pool = self.cfg.pool
        if pool == "token":
            return x[:, 0]
        if pool == "gap":
            return x[:, self.cfg.num_prefix_tokens :].mean(dim=1)
        if pool == "map":
            pooled, probs = self.attn_pool(x[:, self.cfg.num_prefix_tokens :], attention_maps)
            if attention_maps:
                named["map_attn"] = probs
            return pooled
        return x
