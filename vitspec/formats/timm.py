"""timm's VisionTransformer state dict (`torch`): the table and the config its names show.

Names follow timm/models/vision_transformer.py: fused `attn.qkv` [3D, D] (rows: q, k, v, each
W.T), `attn.proj`, `ls1.gamma`, `attn_pool` (AttentionPoolLatent: `latent`, `q`, fused `kv`),
tokens with a leading batch axis. `pre_logits.fc` is the representation layer of timm releases
that had one. Every ViTConfig is expressible (a sincos2d posemb is no parameter; the file
cannot tell it from `posemb='none'`, so reading it back needs `--posemb sincos2d`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import Format, count_blocks, optional_dim, require
from vitspec.formats.inference import Convention, Facts
from vitspec.formats.table import Layout, Rule, rule, token_rule

NAME = "torch"


def _table(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    def row(ref, native, layout=Layout.RESHAPE):
        return rule(ref, native, layout, cfg)

    def norm(ref, native):
        return [row(f"{ref}/scale", f"{native}.weight"), row(f"{ref}/bias", f"{native}.bias")]

    def dense(ref, native):
        return [
            row(f"{ref}/kernel", f"{native}.weight", Layout.TRANSPOSE),
            row(f"{ref}/bias", f"{native}.bias"),
        ]

    def fused(ref, parts, native, bias=True):
        rows = [row(tuple(f"{ref}/{p}/kernel" for p in parts), f"{native}.weight", Layout.FUSED_TRANSPOSE)]
        if bias:
            rows.append(row(tuple(f"{ref}/{p}/bias" for p in parts), f"{native}.bias", Layout.FUSED))
        return rows

    table = [
        row("patch_embed/kernel", "patch_embed.proj.weight", Layout.CONV),
        row("patch_embed/bias", "patch_embed.proj.bias"),
    ]
    if cfg.class_token:
        table.append(token_rule("cls_token", "cls_token", cfg))
    if cfg.num_registers:
        table.append(token_rule("reg_tokens", "reg_token", cfg))
    if cfg.posemb == "learned":
        table.append(token_rule("pos_embed", "pos_embed", cfg))
    for i in range(cfg.depth):
        ref, native = f"blocks/{i}", f"blocks.{i}"
        table += norm(f"{ref}/norm1", f"{native}.norm1")
        table += fused(f"{ref}/attn", ("query", "key", "value"), f"{native}.attn.qkv", bias=cfg.qkv_bias)
        if cfg.qk_norm:
            table += norm(f"{ref}/attn/q_norm", f"{native}.attn.q_norm")
            table += norm(f"{ref}/attn/k_norm", f"{native}.attn.k_norm")
        table += dense(f"{ref}/attn/out", f"{native}.attn.proj")
        if cfg.layer_scale is not None:
            table.append(row(f"{ref}/ls1/scale", f"{native}.ls1.gamma"))
        table += norm(f"{ref}/norm2", f"{native}.norm2")
        table += dense(f"{ref}/mlp/fc1", f"{native}.mlp.fc1") + dense(f"{ref}/mlp/fc2", f"{native}.mlp.fc2")
        if cfg.layer_scale is not None:
            table.append(row(f"{ref}/ls2/scale", f"{native}.ls2.gamma"))
    if not cfg.fc_norm:
        table += norm("norm", "norm")
    if cfg.pool == "map":
        table.append(token_rule("map_head/probe", "attn_pool.latent", cfg))
        table += dense("map_head/attn/query", "attn_pool.q")
        table += fused("map_head/attn", ("key", "value"), "attn_pool.kv")
        table += dense("map_head/attn/out", "attn_pool.proj")
        table += norm("map_head/norm", "attn_pool.norm")
        table += dense("map_head/mlp/fc1", "attn_pool.mlp.fc1")
        table += dense("map_head/mlp/fc2", "attn_pool.mlp.fc2")
    if cfg.fc_norm:
        table += norm("fc_norm", "fc_norm")
    if cfg.representation_size:
        table += dense("pre_logits", "pre_logits.fc")
    if cfg.num_classes:
        table += dense("head", "head")
    return table


def _cannot_express(cfg: ViTConfig) -> list[str]:
    return []


def _facts(native: Mapping[str, np.ndarray]) -> Facts:
    width, channels, ph, pw = require(native, "patch_embed.proj.weight", "torch (timm)").shape
    return Facts(
        width=int(width),
        depth=count_blocks(native, r"blocks\.(\d+)\.norm1\.weight", "torch (timm)"),
        mlp_dim=int(require(native, "blocks.0.mlp.fc1.weight", "torch (timm)").shape[0]),
        patch_size=(int(ph), int(pw)),
        in_channels=int(channels),
        num_classes=optional_dim(native, "head.weight", 0) or 0,
        representation_size=optional_dim(native, "pre_logits.fc.weight", 0),
        class_token="cls_token" in native,
        num_registers=optional_dim(native, "reg_token", 1) or 0,
        posemb_rows=optional_dim(native, "pos_embed", 1),
        qkv_bias="blocks.0.attn.qkv.bias" in native,
        qk_norm="blocks.0.attn.q_norm.weight" in native,
        layer_scale="blocks.0.ls1.gamma" in native,
        fc_norm="fc_norm.weight" in native,
        map_head="attn_pool.latent" in native,
        heads=None,
    )


FORMAT = Format(
    name=NAME,
    description="timm VisionTransformer state dict (.pt/.pth/.bin/.safetensors)",
    convention=Convention("timm", gelu="exact", ln_eps=1e-6, posemb_absent="none", posemb_on_cls=True),
    build_table=_table,
    cannot_express=_cannot_express,
    read_facts=_facts,
    suffixes=(".pt", ".pth", ".bin", ".safetensors"),
)


def timm_kwargs(cfg: ViTConfig) -> dict:
    """The arguments of timm's `VisionTransformer` (timm.models.vision_transformer) whose state dict is
    this config's table, but for the LayerNorm eps and GELU form, which timm takes as layers
    (`timm_construction` spells them out). A sincos2d embedding has no timm argument: timm's model
    computes without it."""
    return {
        "img_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "in_chans": cfg.in_channels,
        "num_classes": cfg.num_classes,
        "embed_dim": cfg.width,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_dim / cfg.width,
        "qkv_bias": cfg.qkv_bias,
        "qk_norm": cfg.qk_norm,
        "init_values": cfg.layer_scale,
        "class_token": cfg.class_token,
        "reg_tokens": cfg.num_registers,
        "global_pool": {"token": "token", "gap": "avg", "map": "map", "none": ""}[cfg.pool],
        "no_embed_class": not cfg.posemb_on_cls,
        "fc_norm": cfg.fc_norm,
        "pos_embed": "learn" if cfg.posemb == "learned" else "none",
    }


def timm_construction(cfg: ViTConfig) -> str:
    """Python that builds the timm model this config's file loads into with load_state_dict(strict=True)."""
    kwargs = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs(cfg).items())
    gelu = "none" if cfg.gelu == "exact" else "tanh"
    return (
        f"timm.models.vision_transformer.VisionTransformer({kwargs}, "
        f"norm_layer=functools.partial(torch.nn.LayerNorm, eps={cfg.ln_eps!r}), "
        f"act_layer=functools.partial(torch.nn.GELU, approximate={gelu!r}))"
    )
