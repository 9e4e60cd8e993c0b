"""timm's VisionTransformer and Cait state dicts (`torch`): the tables and the config their names show.

ViT names follow timm/models/vision_transformer.py: fused `attn.qkv` [3D, D] (rows: q, k, v, each
W.T), `attn.proj`, `ls1.gamma`, `attn_pool` (AttentionPoolLatent: `latent`, `q`, fused `kv`),
tokens with a leading batch axis. `pre_logits.fc` is the representation layer of timm releases
that had one. Every ViTConfig without class attention is expressible but talking heads (timm's ViT
has none; a sincos2d posemb is no parameter; the file cannot tell it from `posemb='none'`, so
reading it back needs `--posemb sincos2d`).

A config with class-attention blocks is timm/models/cait.py's `Cait`, recognised by
`blocks_token_only.`: the same stem and fused qkv over the patches only, talking heads as
`attn.proj_l` / `attn.proj_w` (Linear(H, H) on a trailing head axis: weight = kernel.T),
LayerScale as `gamma_1` / `gamma_2`, and class-attention blocks with separate `attn.q/k/v`.
Without talking heads or LayerScale their rows are absent (timm's Cait always has both).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import Format, count_blocks, optional_dim, require
from vitspec.formats.inference import Convention, Facts
from vitspec.formats.table import Layout, Rule, rule, token_rule

NAME = "torch"
CLASS_BLOCKS = "blocks_token_only"


class _Rows:
    """The row builders both tables share."""

    def __init__(self, cfg: ViTConfig):
        self.cfg = cfg

    def row(self, ref, native, layout=Layout.RESHAPE) -> Rule:
        return rule(ref, native, layout, self.cfg)

    def norm(self, ref, native) -> list[Rule]:
        return [self.row(f"{ref}/scale", f"{native}.weight"), self.row(f"{ref}/bias", f"{native}.bias")]

    def dense(self, ref, native, bias=True) -> list[Rule]:
        rows = [self.row(f"{ref}/kernel", f"{native}.weight", Layout.TRANSPOSE)]
        return rows + [self.row(f"{ref}/bias", f"{native}.bias")] if bias else rows

    def fused(self, ref, parts, native, bias=True) -> list[Rule]:
        kernels = tuple(f"{ref}/{p}/kernel" for p in parts)
        rows = [self.row(kernels, f"{native}.weight", Layout.FUSED_TRANSPOSE)]
        if bias:
            rows.append(self.row(tuple(f"{ref}/{p}/bias" for p in parts), f"{native}.bias", Layout.FUSED))
        return rows

    def stem(self) -> list[Rule]:
        return [
            self.row("patch_embed/kernel", "patch_embed.proj.weight", Layout.CONV),
            self.row("patch_embed/bias", "patch_embed.proj.bias"),
        ]

    def mlp(self, ref, native) -> list[Rule]:
        return self.dense(f"{ref}/fc1", f"{native}.fc1") + self.dense(f"{ref}/fc2", f"{native}.fc2")


def _table(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    return _cait_table(cfg) if cfg.class_attention_depth else _vit_table(cfg)


def _vit_table(cfg: ViTConfig) -> list[Rule]:
    t = _Rows(cfg)
    table = t.stem()
    if cfg.class_token:
        table.append(token_rule("cls_token", "cls_token", cfg))
    if cfg.num_registers:
        table.append(token_rule("reg_tokens", "reg_token", cfg))
    if cfg.posemb == "learned":
        table.append(token_rule("pos_embed", "pos_embed", cfg))
    for i in range(cfg.depth):
        ref, native = f"blocks/{i}", f"blocks.{i}"
        table += t.norm(f"{ref}/norm1", f"{native}.norm1")
        table += t.fused(f"{ref}/attn", ("query", "key", "value"), f"{native}.attn.qkv", bias=cfg.qkv_bias)
        if cfg.qk_norm:
            table += t.norm(f"{ref}/attn/q_norm", f"{native}.attn.q_norm")
            table += t.norm(f"{ref}/attn/k_norm", f"{native}.attn.k_norm")
        table += t.dense(f"{ref}/attn/out", f"{native}.attn.proj")
        if cfg.layer_scale is not None:
            table.append(t.row(f"{ref}/ls1/scale", f"{native}.ls1.gamma"))
        table += t.norm(f"{ref}/norm2", f"{native}.norm2")
        table += t.mlp(f"{ref}/mlp", f"{native}.mlp")
        if cfg.layer_scale is not None:
            table.append(t.row(f"{ref}/ls2/scale", f"{native}.ls2.gamma"))
    if not cfg.fc_norm:
        table += t.norm("norm", "norm")
    if cfg.pool == "map":
        table.append(token_rule("map_head/probe", "attn_pool.latent", cfg))
        table += t.dense("map_head/attn/query", "attn_pool.q")
        table += t.fused("map_head/attn", ("key", "value"), "attn_pool.kv")
        table += t.dense("map_head/attn/out", "attn_pool.proj")
        table += t.norm("map_head/norm", "attn_pool.norm")
        table += t.mlp("map_head/mlp", "attn_pool.mlp")
    if cfg.fc_norm:
        table += t.norm("fc_norm", "fc_norm")
    if cfg.representation_size:
        table += t.dense("pre_logits", "pre_logits.fc")
    if cfg.num_classes:
        table += t.dense("head", "head")
    return table


def _cait_table(cfg: ViTConfig) -> list[Rule]:
    t = _Rows(cfg)
    table = t.stem() + [token_rule("cls_token", "cls_token", cfg)]
    if cfg.posemb == "learned":
        table.append(token_rule("pos_embed", "pos_embed", cfg))

    def gammas(ref, native):
        if cfg.layer_scale is None:
            return []
        return [
            t.row(f"{ref}/ls1/scale", f"{native}.gamma_1"),
            t.row(f"{ref}/ls2/scale", f"{native}.gamma_2"),
        ]

    for i in range(cfg.depth):
        ref, native = f"blocks/{i}", f"blocks.{i}"
        table += t.norm(f"{ref}/norm1", f"{native}.norm1")
        table += t.fused(f"{ref}/attn", ("query", "key", "value"), f"{native}.attn.qkv", bias=cfg.qkv_bias)
        table += t.dense(f"{ref}/attn/out", f"{native}.attn.proj")
        if cfg.talking_heads:
            table += t.dense(f"{ref}/attn/talk_logits", f"{native}.attn.proj_l")
            table += t.dense(f"{ref}/attn/talk_weights", f"{native}.attn.proj_w")
        table += gammas(ref, native)
        table += t.norm(f"{ref}/norm2", f"{native}.norm2") + t.mlp(f"{ref}/mlp", f"{native}.mlp")
    for j in range(cfg.class_attention_depth):
        ref, native = f"class_blocks/{j}", f"{CLASS_BLOCKS}.{j}"
        table += t.norm(f"{ref}/norm1", f"{native}.norm1")
        for part, short in (("query", "q"), ("key", "k"), ("value", "v")):
            table += t.dense(f"{ref}/attn/{part}", f"{native}.attn.{short}", bias=cfg.qkv_bias)
        table += t.dense(f"{ref}/attn/out", f"{native}.attn.proj")
        table += gammas(ref, native)
        table += t.norm(f"{ref}/norm2", f"{native}.norm2") + t.mlp(f"{ref}/mlp", f"{native}.mlp")
    table += t.norm("norm", "norm")
    if cfg.num_classes:
        table += t.dense("head", "head")
    return table


def _cannot_express(cfg: ViTConfig) -> list[str]:
    if cfg.talking_heads and not cfg.class_attention_depth:
        return ["talking heads outside CaiT: timm's VisionTransformer has none (class_attention_depth=0)"]
    return []


def _facts(native: Mapping[str, np.ndarray]) -> Facts:
    fmt = "torch (timm)"
    width, channels, ph, pw = require(native, "patch_embed.proj.weight", fmt).shape
    shared = dict(
        width=int(width),
        depth=count_blocks(native, r"blocks\.(\d+)\.norm1\.weight", fmt),
        mlp_dim=int(require(native, "blocks.0.mlp.fc1.weight", fmt).shape[0]),
        patch_size=(int(ph), int(pw)),
        in_channels=int(channels),
        num_classes=optional_dim(native, "head.weight", 0) or 0,
        class_token="cls_token" in native,
        posemb_rows=optional_dim(native, "pos_embed", 1),
        qkv_bias="blocks.0.attn.qkv.bias" in native,
    )
    if not any(k.startswith(f"{CLASS_BLOCKS}.") for k in native):
        return Facts(
            **shared,
            representation_size=optional_dim(native, "pre_logits.fc.weight", 0),
            num_registers=optional_dim(native, "reg_token", 1) or 0,
            qk_norm="blocks.0.attn.q_norm.weight" in native,
            layer_scale="blocks.0.ls1.gamma" in native,
            fc_norm="fc_norm.weight" in native,
            map_head="attn_pool.latent" in native,
            heads=None,
        )
    first = f"{CLASS_BLOCKS}.0"
    # Cait's parts a ViT has (registers, qk-norm, fc_norm, an attention pool, pre-logits) it has not:
    # their names are not in its table, so a file holding them fails the names check when read.
    return Facts(
        **shared,
        representation_size=None,
        num_registers=0,
        qk_norm=False,
        layer_scale="blocks.0.gamma_1" in native,
        fc_norm=False,
        map_head=False,
        heads=optional_dim(native, "blocks.0.attn.proj_l.weight", 0),  # the talking-heads maps show them
        talking_heads="blocks.0.attn.proj_l.weight" in native,
        class_attention_depth=count_blocks(native, rf"{CLASS_BLOCKS}\.(\d+)\.norm1\.weight", fmt),
        class_attention_mlp_dim=int(require(native, f"{first}.mlp.fc1.weight", fmt).shape[0]),
    )


FORMAT = Format(
    name=NAME,
    description="timm VisionTransformer / Cait state dict (.pt/.pth/.bin/.safetensors)",
    convention=Convention("timm", gelu="exact", ln_eps=1e-6, posemb_absent="none", posemb_on_cls=True),
    build_table=_table,
    cannot_express=_cannot_express,
    read_facts=_facts,
    suffixes=(".pt", ".pth", ".bin", ".safetensors"),
)


def timm_kwargs(cfg: ViTConfig) -> dict:
    """The arguments of timm's `VisionTransformer` (timm.models.vision_transformer), or for a config
    with class attention its `Cait` (timm.models.cait), whose state dict is this config's table, but
    for the layers timm takes as classes (`timm_construction` spells them out): the LayerNorm eps,
    the GELU form, and a Cait's `attn_block` where it has no talking heads. A sincos2d embedding
    has no timm argument: timm's model computes without it."""
    shared = {
        "img_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "in_chans": cfg.in_channels,
        "num_classes": cfg.num_classes,
        "embed_dim": cfg.width,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_dim / cfg.width,
        "qkv_bias": cfg.qkv_bias,
    }
    if cfg.class_attention_depth:
        return shared | {
            "init_values": cfg.layer_scale,
            "depth_token_only": cfg.class_attention_depth,
            "mlp_ratio_token_only": cfg.class_attention_mlp_dim / cfg.width,
        }
    return shared | {
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
    """Python that builds the timm model this config's file loads into with load_state_dict(strict=True),
    and for a Cait what timm's always has that this file lacks."""
    kwargs = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs(cfg).items())
    gelu = "none" if cfg.gelu == "exact" else "tanh"
    layers = (
        f"norm_layer=functools.partial(torch.nn.LayerNorm, eps={cfg.ln_eps!r}), "
        f"act_layer=functools.partial(torch.nn.GELU, approximate={gelu!r})"
    )
    if not cfg.class_attention_depth:
        return f"timm.models.vision_transformer.VisionTransformer({kwargs}, {layers})"
    if not cfg.talking_heads:
        layers += ", attn_block=timm.layers.Attention"
    lacks = [
        part
        for part, absent in (
            ("LayerScale (gamma_1, gamma_2)", cfg.layer_scale is None),
            (f"a learned pos_embed (this config's posemb is {cfg.posemb!r})", cfg.posemb != "learned"),
        )
        if absent
    ]
    caveat = f" (but timm's Cait always has {' and '.join(lacks)}: strict loading fails)" if lacks else ""
    return f"timm.models.cait.Cait({kwargs}, {layers}){caveat}"
