"""The layers of the PyTorch ViT and CaiT modules, under timm's module and parameter names.

Dropout sites in this module (train mode only): the attention probabilities (`attend`), after the
attention projection (`Attention.proj_drop`) and in the MLP after the activation and after fc2
(`Mlp.drop1`, `Mlp.drop2`). Stochastic depth (`DropPath`) and the token dropout stay in model.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitspec.config import ViTConfig
from vitspec.fixed_posemb import fixed_posemb
from vitspec.reference import QUICK_GELU_COEFF

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


class QuickGELU(nn.Module):
    """OpenAI CLIP's x * sigmoid(1.702 x) (timm's `quick_gelu`)."""

    def forward(self, x):
        return x * torch.sigmoid(QUICK_GELU_COEFF * x)


def activation(gelu: str) -> nn.Module:
    return QuickGELU() if gelu == "quick" else nn.GELU(approximate=GELU_APPROXIMATIONS[gelu])


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's `Attention`): q, k and v
    project to `attention_dim` (heads x head_dim), `proj` back to the width."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.attention_dropout = cfg.attention_dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.attention_dim, bias=cfg.qkv_bias)
        self.q_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.ln_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.ln_eps) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.attention_dim, cfg.width, bias=cfg.proj_bias)
        self.proj_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, return_probs: bool = False):  # [n, t, d] -> ([n, t, d], [n, heads, t, t] or None)
        q, k, v = [split_heads(part, self.num_heads) for part in self.qkv(x).chunk(3, dim=-1)]
        # Under autocast LayerNorm returns float32 while v stays low precision; attention needs one dtype.
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        dropout_rate = self.attention_dropout if self.training else 0.0
        context, probs = attend(q, k, v, dropout_rate, return_probs)
        return self.proj_drop(self.proj(merge_heads(context))), probs


class Mlp(nn.Module):
    """fc1, the GELU, fc2; `bias=False` (a block's `proj_bias=False`, timm's) drops both biases."""

    def __init__(self, cfg: ViTConfig, dropout: float, hidden: int | None = None, bias: bool = True):
        super().__init__()
        hidden = hidden or cfg.mlp_dim
        self.fc1 = nn.Linear(cfg.width, hidden, bias=bias)
        self.act = activation(cfg.gelu)
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, cfg.width, bias=bias)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x):  # [..., d] -> [..., d]
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class AttentionPoolLatent(nn.Module):
    """Multi-head attention pooling with one learned query (timm AttentionPoolLatent, big_vision
    MAPHead): always biased and at the model width, no qk-norm, no dropout, then y + MLP(LN(y))."""

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
    """timm's PatchEmbed: `proj` is the conv with stride == kernel == patch size (no bias where
    `patch_bias=False`, as CLIP's).

    It is applied as one matmul over patches flattened in (row, column, channel) order, the
    reference's order: as fast as the conv on CPU, and oneDNN's bfloat16 conv returns wrong
    values, NaN included, for some shapes (torch 2.13 CPU: one input channel, a one-patch-wide
    grid, batch >= 3).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(
            cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias
        )

    def forward(self, images):  # [n, c, h, w] -> [n, patches, d], patches row-major over the grid
        if images.ndim != 4 or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(
                f"images have shape {tuple(images.shape)}; the config expects "
                f"[N, {self.proj.in_channels}, {self.image_size[0]}, {self.image_size[1]}] (NCHW)"
            )
        n, c, h, w = images.shape
        ph, pw = self.patch_size
        # Each patch flattened in the conv weight's own (c, ph, pw) order: the weight is used as it
        # is stored, so its gradient comes back contiguous, as DDP's buckets and fused AdamW expect.
        patches = images.reshape(n, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
        kernel = self.proj.weight.reshape(self.proj.weight.shape[0], -1)  # [d, c * ph * pw]
        return F.linear(patches.reshape(n, -1, c * ph * pw), kernel, self.proj.bias)


def fixed_posemb_buffer(cfg: ViTConfig) -> torch.Tensor | None:
    """The fixed posemb table (sincos2d, sinusoidal_1d/2d: vitspec.fixed_posemb's) [1, rows, width]
    in float64, cast where it is added; None for a learned posemb or none."""
    table = fixed_posemb(cfg)
    return None if table is None else torch.from_numpy(table)[None]


def add_posemb(tokens, patches, posemb, on_all_tokens: bool):
    """[prefix tokens..., patches] with the posemb [1, rows, d] (or None) added to every token or to
    the patches only: [n, t, d]."""
    if posemb is not None and not on_all_tokens:
        patches = patches + posemb
    x = torch.cat([*tokens, patches], dim=1)
    return x + posemb if posemb is not None and on_all_tokens else x


def reduce_tokens(x, pool: str):  # [n, t, d] -> [n, d]: the parameter-free pools (timm's global_pool_nlc)
    if pool == "gap":
        return x.mean(dim=1)
    if pool == "max":
        return x.amax(dim=1)
    if pool == "avgmax":
        return 0.5 * (x.mean(dim=1) + x.amax(dim=1))
    if pool == "sum":
        return x.sum(dim=1)
    raise AssertionError(f"pool {pool!r} is no reduction over the tokens")
