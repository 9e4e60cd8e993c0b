"""The from-scratch PyTorch ViT of the widely copied tutorial (tintn/vision-transformer-from-scratch,
vit.py: `ViTForClassfication`), module for module, so that its state dict is the tutorial's own:
`embedding.patch_embeddings.projection` (conv), `embedding.cls_token`,
`embedding.position_embeddings` (over [class, patches]), `encoder.blocks.{i}` with `layernorm_1`,
`attention` (`heads.{h}.{query,key,value}`, one Linear per head, or with `use_faster_attention` one
`qkv_projection`), `attention.output_projection`, `layernorm_2`, `mlp.dense_1/2`, and `classifier`.

Inference path only (dropout is the identity there). Kept as published, traps included: no
LayerNorm after the blocks (the classifier reads the raw class token); torch's default LayerNorm
epsilon 1e-5; the GELU is the tanh form (`NewGELUActivation`); the head size is
hidden_size // num_attention_heads, so the attention is heads x that wide, narrower than the
model where the heads do not divide it. Images are NCHW, as torch's.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class NewGELUActivation(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class PatchEmbeddings(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        size, patch = config["image_size"], config["patch_size"]
        self.num_patches = (size // patch) ** 2
        self.projection = nn.Conv2d(config["num_channels"], config["hidden_size"], patch, stride=patch)

    def forward(self, x):  # [b, c, h, w] -> [b, patches, hidden]
        return self.projection(x).flatten(2).transpose(1, 2)


class Embeddings(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.patch_embeddings = PatchEmbeddings(config)
        hidden = config["hidden_size"]
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden))
        self.position_embeddings = nn.Parameter(torch.randn(1, self.patch_embeddings.num_patches + 1, hidden))

    def forward(self, x):
        x = self.patch_embeddings(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.position_embeddings


class AttentionHead(nn.Module):
    def __init__(self, hidden_size: int, head_size: int, bias: bool):
        super().__init__()
        self.head_size = head_size
        self.query = nn.Linear(hidden_size, head_size, bias=bias)
        self.key = nn.Linear(hidden_size, head_size, bias=bias)
        self.value = nn.Linear(hidden_size, head_size, bias=bias)

    def forward(self, x):
        scores = self.query(x) @ self.key(x).transpose(-1, -2) / math.sqrt(self.head_size)
        return nn.functional.softmax(scores, dim=-1) @ self.value(x)


class MultiHeadAttention(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        head_size = hidden // heads
        self.heads = nn.ModuleList(AttentionHead(hidden, head_size, config["qkv_bias"]) for _ in range(heads))
        self.output_projection = nn.Linear(heads * head_size, hidden)

    def forward(self, x):
        return self.output_projection(torch.cat([head(x) for head in self.heads], dim=-1))


class FasterMultiHeadAttention(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, self.num_heads = config["hidden_size"], config["num_attention_heads"]
        self.head_size = hidden // self.num_heads
        all_heads = self.num_heads * self.head_size
        self.qkv_projection = nn.Linear(hidden, all_heads * 3, bias=config["qkv_bias"])
        self.output_projection = nn.Linear(all_heads, hidden)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (
            t.view(b, n, self.num_heads, self.head_size).transpose(1, 2)
            for t in torch.chunk(self.qkv_projection(x), 3, dim=-1)
        )
        weights = nn.functional.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_size), dim=-1)
        out = (weights @ v).transpose(1, 2).contiguous().view(b, n, self.num_heads * self.head_size)
        return self.output_projection(out)


class MLP(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.dense_1 = nn.Linear(config["hidden_size"], config["intermediate_size"])
        self.activation = NewGELUActivation()
        self.dense_2 = nn.Linear(config["intermediate_size"], config["hidden_size"])

    def forward(self, x):
        return self.dense_2(self.activation(self.dense_1(x)))


class Block(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        faster = config.get("use_faster_attention", False)
        self.attention = FasterMultiHeadAttention(config) if faster else MultiHeadAttention(config)
        self.layernorm_1 = nn.LayerNorm(config["hidden_size"])
        self.mlp = MLP(config)
        self.layernorm_2 = nn.LayerNorm(config["hidden_size"])

    def forward(self, x):
        x = x + self.attention(self.layernorm_1(x))
        return x + self.mlp(self.layernorm_2(x))


class Encoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config["num_hidden_layers"]))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class ViTForClassfication(nn.Module):  # sic: the tutorial's spelling
    """The tutorial's config dict: image_size, patch_size (square), num_channels, hidden_size,
    num_hidden_layers, num_attention_heads, intermediate_size, num_classes, qkv_bias,
    use_faster_attention. NCHW images -> logits."""

    def __init__(self, config: dict):
        super().__init__()
        self.embedding = Embeddings(config)
        self.encoder = Encoder(config)
        self.classifier = nn.Linear(config["hidden_size"], config["num_classes"])

    def forward(self, x):
        return self.classifier(self.encoder(self.embedding(x))[:, 0, :])
