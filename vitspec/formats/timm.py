"""timm's VisionTransformer and Cait state dicts (`torch`): the tables and the config their names show.

ViT names follow timm/models/vision_transformer.py: fused `attn.qkv` [3D, D] (rows: q, k, v, each
W.T), `attn.proj`, `ls1.gamma`, `attn_pool` (AttentionPoolLatent: `latent`, `q`, fused `kv`),
tokens with a leading batch axis. `pre_logits.fc` is the representation layer of timm releases
that had one. The families' parts: `norm_pre` (pre_norm), no `patch_embed.proj.bias`
(patch_bias=False), no `norm` (final_norm=False), no `attn.proj.bias` and `mlp.fc1/fc2.bias`
(proj_bias=False: timm's `proj_bias` drops all three), and DeiT's `dist_token` (after the class
token, with a pos_embed row) and `head_dist` (timm.models.deit.VisionTransformerDistilled). A fixed
posemb (sincos2d, sinusoidal_1d/2d) is no parameter: the file cannot tell it from `posemb='none'`,
so reading it back needs `--posemb`.

What timm's classes cannot build is refused (`_cannot_express`, every reason at once): talking
heads outside CaiT, attention_dim != width (VisionTransformer passes no head width to its
Attention), a patch bias not tied to pre_norm (timm's PatchEmbed has a bias exactly without
norm_pre), pool "sum", and DeiT's distillation token with registers or without a learned posemb on
all tokens. The torch backend's modules run all of these but talking heads outside CaiT, under the
same names: `state_dict_table` is its table.

A config with class-attention blocks is timm/models/cait.py's `Cait`, recognised by
`blocks_token_only.`: the same stem and fused qkv over the patches only, talking heads as
`attn.proj_l` / `attn.proj_w` (Linear(H, H) on a trailing head axis: weight = kernel.T),
LayerScale as `gamma_1` / `gamma_2`, and class-attention blocks with separate `attn.q/k/v`.
Without talking heads or LayerScale their rows are absent (timm's Cait always has both). timm's Cait
has none of the families' parts (nor attention_dim != width): the format refuses them; the torch
backend names them as in the ViT.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from vitspec.config import ViTConfig
from vitspec.formats.base import Format, count_blocks, optional_dim, require
from vitspec.formats.inference import Convention, Facts
from vitspec.formats.table import Layout, Rule, refuse, rule, token_rule
from vitspec.formats.timm_construction import timm_construction, timm_kwargs

__all__ = ["FORMAT", "NAME", "state_dict_table", "timm_construction", "timm_kwargs"]

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
        rows = [self.row("patch_embed/kernel", "patch_embed.proj.weight", Layout.CONV)]
        return rows + [self.row("patch_embed/bias", "patch_embed.proj.bias")] if self.cfg.patch_bias else rows

    def mlp(self, ref, native, bias=True) -> list[Rule]:
        return self.dense(f"{ref}/fc1", f"{native}.fc1", bias) + self.dense(
            f"{ref}/fc2", f"{native}.fc2", bias
        )

    def block_mlp(self, ref, native) -> list[Rule]:  # a block's: its biases are proj_bias's, as timm's
        return self.mlp(f"{ref}/mlp", f"{native}.mlp", self.cfg.proj_bias)

    def proj(self, ref, native) -> list[Rule]:
        return self.dense(f"{ref}/attn/out", f"{native}.attn.proj", self.cfg.proj_bias)

    def pre_norm(self) -> list[Rule]:
        return self.norm("pre_norm", "norm_pre") if self.cfg.pre_norm else []


def _table(cfg: ViTConfig, native_keys: Collection[str] | None = None) -> list[Rule]:
    return _cait_table(cfg) if cfg.class_attention_depth else _vit_table(cfg)


def _vit_table(cfg: ViTConfig) -> list[Rule]:
    t = _Rows(cfg)
    table = t.stem()
    if cfg.class_token:
        table.append(token_rule("cls_token", "cls_token", cfg))
    if cfg.distilled:
        table.append(token_rule("dist_token", "dist_token", cfg))
    if cfg.num_registers:
        table.append(token_rule("reg_tokens", "reg_token", cfg))
    if cfg.posemb == "learned":
        table.append(token_rule("pos_embed", "pos_embed", cfg))
    table += t.pre_norm()
    for i in range(cfg.depth):
        ref, native = f"blocks/{i}", f"blocks.{i}"
        table += t.norm(f"{ref}/norm1", f"{native}.norm1")
        table += t.fused(f"{ref}/attn", ("query", "key", "value"), f"{native}.attn.qkv", bias=cfg.qkv_bias)
        if cfg.qk_norm:
            table += t.norm(f"{ref}/attn/q_norm", f"{native}.attn.q_norm")
            table += t.norm(f"{ref}/attn/k_norm", f"{native}.attn.k_norm")
        table += t.proj(ref, native)
        if cfg.layer_scale is not None:
            table.append(t.row(f"{ref}/ls1/scale", f"{native}.ls1.gamma"))
        table += t.norm(f"{ref}/norm2", f"{native}.norm2")
        table += t.block_mlp(ref, native)
        if cfg.layer_scale is not None:
            table.append(t.row(f"{ref}/ls2/scale", f"{native}.ls2.gamma"))
    if cfg.final_norm and not cfg.fc_norm:
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
        if cfg.distilled:
            table += t.dense("head_dist", "head_dist")
    return table


def _cait_table(cfg: ViTConfig) -> list[Rule]:
    t = _Rows(cfg)
    table = t.stem() + [token_rule("cls_token", "cls_token", cfg)]
    if cfg.posemb == "learned":
        table.append(token_rule("pos_embed", "pos_embed", cfg))
    table += t.pre_norm()

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
        table += t.proj(ref, native)
        if cfg.talking_heads:
            table += t.dense(f"{ref}/attn/talk_logits", f"{native}.attn.proj_l")
            table += t.dense(f"{ref}/attn/talk_weights", f"{native}.attn.proj_w")
        table += gammas(ref, native)
        table += t.norm(f"{ref}/norm2", f"{native}.norm2") + t.block_mlp(ref, native)
    for j in range(cfg.class_attention_depth):
        ref, native = f"class_blocks/{j}", f"{CLASS_BLOCKS}.{j}"
        table += t.norm(f"{ref}/norm1", f"{native}.norm1")
        for part, short in (("query", "q"), ("key", "k"), ("value", "v")):
            table += t.dense(f"{ref}/attn/{part}", f"{native}.attn.{short}", bias=cfg.qkv_bias)
        table += t.proj(ref, native)
        table += gammas(ref, native)
        table += t.norm(f"{ref}/norm2", f"{native}.norm2") + t.block_mlp(ref, native)
    if cfg.final_norm:
        table += t.norm("norm", "norm")
    if cfg.num_classes:
        table += t.dense("head", "head")
    return table


def _no_names(cfg: ViTConfig) -> list[str]:
    """Where the table has no names (and the torch backend no module)."""
    if cfg.talking_heads and not cfg.class_attention_depth:
        return ["talking heads outside CaiT: timm's VisionTransformer has none (class_attention_depth=0)"]
    return []


def _cannot_express(cfg: ViTConfig) -> list[str]:
    """Every reason timm's classes cannot build `cfg` (the torch backend's modules may still run it)."""
    reasons = _no_names(cfg)
    if cfg.attention_dim != cfg.width:
        reasons.append(
            f"attention_dim={cfg.attention_dim} != width={cfg.width}: timm's VisionTransformer and Cait "
            "build their attention at embed_dim (VisionTransformer passes no attn_head_dim to its Attention)"
        )
    if cfg.class_attention_depth:
        return reasons + _cait_lacks(cfg)
    if cfg.patch_bias == cfg.pre_norm:
        reasons.append(
            f"patch_bias={cfg.patch_bias} with pre_norm={cfg.pre_norm}: timm's VisionTransformer gives the "
            "patch embedding a bias exactly when it has no norm_pre"
        )
    if cfg.pool == "sum":
        reasons.append("pool='sum': timm's global_pool has none ('avg', 'max', 'avgmax', 'token', 'map', '')")
    return reasons + (_distilled_lacks(cfg) if cfg.distilled else [])


def _distilled_lacks(cfg: ViTConfig) -> list[str]:
    deit = "timm's VisionTransformerDistilled"
    problems = (
        (
            f"distilled with num_registers={cfg.num_registers}: {deit} has no register tokens",
            cfg.num_registers,
        ),
        (
            f"distilled with posemb={cfg.posemb!r}: {deit} always has a learned pos_embed",
            cfg.posemb != "learned",
        ),
        (
            f"distilled with posemb_on_cls=False: {deit}'s pos_embed always has rows for the class and "
            "distillation tokens",
            not cfg.posemb_on_cls,
        ),
    )
    return [text for text, bad in problems if bad]


def _cait_lacks(cfg: ViTConfig) -> list[str]:
    problems = (
        ("pre_norm=True: timm's Cait has no norm_pre", cfg.pre_norm),
        ("patch_bias=False: timm's Cait always has a patch bias", not cfg.patch_bias),
        ("final_norm=False: timm's Cait always has its final norm", not cfg.final_norm),
        (
            "proj_bias=False: timm's Cait always has the attention projection's and MLP's biases",
            not cfg.proj_bias,
        ),
    )
    return [text for text, bad in problems if bad]


def state_dict_table(cfg: ViTConfig) -> list[Rule]:
    """The torch backend's state-dict table: timm's names, also for the configs timm's classes cannot
    build (attention_dim != width, pool 'sum', ...); refused only where it has no names."""
    refuse(NAME, _no_names(cfg))
    return _table(cfg)


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
        attention_dim=int(require(native, "blocks.0.attn.qkv.weight", fmt).shape[0]) // 3,
        pre_norm="norm_pre.weight" in native,
        patch_bias="patch_embed.proj.bias" in native,
        final_norm="norm.weight" in native or "fc_norm.weight" in native,
        proj_bias="blocks.0.attn.proj.bias" in native,
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
            distilled="dist_token" in native,
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
