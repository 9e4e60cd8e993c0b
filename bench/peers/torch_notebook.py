"""A ViT as from-scratch PyTorch notebooks write it: one q/k/v Linear per head, a Python loop over
heads, an explicit softmax. Same sizes as a vitspec config; the math is a standard pre-norm ViT."""

from __future__ import annotations

import torch
from torch import nn

from vitspec.config import ViTConfig


class HeadAttention(nn.Module):
    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(width, head_dim) for _ in range(3))
        self.scale = head_dim**-0.5

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        return weights @ v


class MultiHeadAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.heads = nn.ModuleList(HeadAttention(width, width // num_heads) for _ in range(num_heads))
        self.out = nn.Linear(width, width)

    def forward(self, x):
        return self.out(torch.cat([head(x) for head in self.heads], dim=-1))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1, self.norm2 = (
            nn.LayerNorm(cfg.width, eps=cfg.ln_eps),
            nn.LayerNorm(cfg.width, eps=cfg.ln_eps),
        )
        self.attention = MultiHeadAttention(cfg.width, cfg.num_heads)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, cfg.mlp_dim), nn.GELU(), nn.Linear(cfg.mlp_dim, cfg.width)
        )

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class NotebookViT(nn.Module):
    """NCHW images -> logits; class token, learned position embedding, class-token head."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        self.patchify = nn.Conv2d(cfg.in_channels, cfg.width, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embedding = nn.Parameter(torch.randn(1, cfg.num_patches + 1, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.head = nn.Linear(cfg.width, cfg.num_classes)

    def forward(self, images):
        x = self.patchify(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
