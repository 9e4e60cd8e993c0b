"""The timm model a `torch` (timm) file of a config loads into: `timm_kwargs` and `timm_construction`.

`vitspec.formats.timm` refuses the configs timm's classes cannot build; for the rest, the keywords
here build `timm.models.vision_transformer.VisionTransformer`, `timm.models.deit.
VisionTransformerDistilled` (distilled) or `timm.models.cait.Cait` (class attention), whose
state dict is the config's table.
"""

from __future__ import annotations

from vitspec.config import ViTConfig

# timm's global_pool value of each pool ("sum" has none: the format refuses it).
GLOBAL_POOLS = {"token": "token", "gap": "avg", "max": "max", "avgmax": "avgmax", "map": "map", "none": ""}
# VisionTransformer resolves act_layer names through timm.layers.get_act_layer; Cait takes a class.
ACT_LAYER_NAMES = {"exact": "gelu", "tanh": "gelu_tanh", "quick": "quick_gelu"}
ACT_LAYER_CLASSES = {
    "exact": "functools.partial(torch.nn.GELU, approximate='none')",
    "tanh": "functools.partial(torch.nn.GELU, approximate='tanh')",
    "quick": "timm.layers.QuickGELU",
}


def timm_kwargs(cfg: ViTConfig) -> dict:
    """The arguments of timm's `VisionTransformer` (timm.models.vision_transformer; the same for
    `VisionTransformerDistilled`), or for a config with class attention its `Cait`
    (timm.models.cait), whose state dict is this config's table, but for the layers timm takes as
    classes or names (`timm_construction` spells them out): the LayerNorm eps, the GELU form, and a
    Cait's `attn_block` where it has no talking heads. A fixed posemb (sincos2d, sinusoidal_1d/2d)
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
        "global_pool": GLOBAL_POOLS[cfg.pool],
        "no_embed_class": not cfg.posemb_on_cls,
        "fc_norm": cfg.fc_norm,
        "pos_embed": "learn" if cfg.posemb == "learned" else "none",
        "pre_norm": cfg.pre_norm,  # timm: and a patch bias exactly without it
        "final_norm": cfg.final_norm,
        "proj_bias": cfg.proj_bias,  # timm: the attention projection's and both MLP layers' biases
        "pool_include_prefix": cfg.pool_include_prefix,
    }


def timm_class(cfg: ViTConfig) -> str:
    if cfg.class_attention_depth:
        return "timm.models.cait.Cait"
    if cfg.distilled:  # timm's deit_*_distilled_* models
        return "timm.models.deit.VisionTransformerDistilled"
    return "timm.models.vision_transformer.VisionTransformer"


def timm_construction(cfg: ViTConfig) -> str:
    """Python that builds the timm model this config's file loads into with load_state_dict(strict=True),
    and for a Cait what timm's always has that this file lacks."""
    kwargs = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs(cfg).items())
    norm = f"norm_layer=functools.partial(torch.nn.LayerNorm, eps={cfg.ln_eps!r})"
    if not cfg.class_attention_depth:
        return f"{timm_class(cfg)}({kwargs}, {norm}, act_layer={ACT_LAYER_NAMES[cfg.gelu]!r})"
    layers = f"{norm}, act_layer={ACT_LAYER_CLASSES[cfg.gelu]}"
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
    return f"{timm_class(cfg)}({kwargs}, {layers}){caveat}"
