"""Analytic matmul FLOPs of a ViT (CaiT included) and the machine's measured fp32 matmul peak."""

from __future__ import annotations

from vitspec.config import ViTConfig


def forward_matmul_flops(cfg: ViTConfig) -> int:
    """Matmul FLOPs of one image's forward pass (a multiply-add counts 2), from the config.

    With N patches, T = cfg.num_tokens tokens (patches + class/register tokens), width D, patch
    area P*P*C, MLP width M, depth L, K classes:
        patch embed            2 * N * (P*P*C) * D
        per block  qkv         2 * T * D * 3D
                   scores      2 * T * T * D        (q k^T over all heads)
                   context     2 * T * T * D        (probs v over all heads)
                   out proj    2 * T * D * D
                   MLP         2 * T * D * M * 2
                   talking heads (CaiT, H heads)  2 * T * T * H * H * 2  (logits and weights mixed)
        class-attention blocks (CaiT: the class token queries the 1 + N tokens), each:
                   q           2 * D * D
                   k, v        2 * (1+N) * D * D * 2
                   scores      2 * (1+N) * D
                   context     2 * (1+N) * D
                   out proj    2 * D * D
                   MLP         2 * D * Mc * 2       (Mc = class_attention_mlp_dim, one token)
        pre-logits (if any)    2 * D * R
        head                   2 * feature_dim * K
    (A CaiT's self-attention blocks see the patches only: T = N.)
    Norms, softmax, GELU and adds are left out: they are not matmuls and are a few percent.
    Training counts 3x this (forward, then the input and weight gradients of every matmul).
    """
    ph, pw = cfg.patch_size
    n, t, d, m, h = cfg.num_patches, cfg.num_tokens, cfg.width, cfg.mlp_dim, cfg.num_heads
    patch_embed = 2 * n * ph * pw * cfg.in_channels * d
    block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * m
    if cfg.talking_heads:
        block += 2 * 2 * t * t * h * h
    class_block = 0
    if cfg.class_attention_depth:
        u, mc = 1 + n, cfg.class_attention_mlp_dim
        class_block = 2 * d * d + 2 * 2 * u * d * d + 2 * 2 * u * d + 2 * d * d + 2 * 2 * d * mc
    pre_logits = 2 * d * cfg.representation_size if cfg.representation_size else 0
    head = 2 * cfg.feature_dim * cfg.num_classes
    return patch_embed + cfg.depth * block + cfg.class_attention_depth * class_block + pre_logits + head


def train_matmul_flops(cfg: ViTConfig) -> int:
    """One image's training step: forward plus backward, 3x the forward matmuls."""
    return 3 * forward_matmul_flops(cfg)
