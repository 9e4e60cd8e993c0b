"""What big_vision's published `models/vit.py` can apply: the `big_vision` format's refusals, and the
`vit.Model(...)` that `vitspec convert --to flax` prints for a file, with what its code computes
otherwise (each needs a change there, or the flax backend, which has every knob)."""

from __future__ import annotations

from vitspec.config import ViTConfig

BIG_VISION_POOL = {"token": "tok", "gap": "gap", "map": "map", "none": "none"}
BIG_VISION_POSEMB = {"learned": "learn", "sincos2d": "sincos2d"}


def big_vision_lacks(cfg: ViTConfig) -> list[str]:
    """Each knob of `cfg` that big_vision's models/vit.py cannot carry, by name, and why."""
    checks = [
        (cfg.num_registers, f"num_registers={cfg.num_registers}: it has no register tokens"),
        (cfg.qk_norm, "qk_norm: its attention has no query/key LayerNorm"),
        (cfg.layer_scale is not None, "layer_scale: it has no LayerScale"),
        (cfg.talking_heads, "talking_heads: its attention has no talking heads"),
        (cfg.class_attention_depth, "class_attention_depth: it has no CaiT class-attention blocks"),
        (cfg.fc_norm, "fc_norm: its final LayerNorm is before pooling"),
        (not cfg.qkv_bias, "qkv_bias=False: its q, k and v always have biases"),
        (cfg.pre_norm, "pre_norm: it has no LayerNorm before the blocks"),
        (not cfg.patch_bias, "patch_bias=False: its patch embedding always has a bias"),
        (not cfg.final_norm, "final_norm=False: it always has encoder_norm"),
        (not cfg.proj_bias, "proj_bias=False: its attention output and MLP layers always have biases"),
        (cfg.distilled, "distilled: it has no distillation token or second head"),
        (
            cfg.attention_dim != cfg.width,
            f"attention_dim={cfg.attention_dim}: its attention is as wide as the model ({cfg.width})",
        ),
        (
            cfg.pool in ("max", "avgmax", "sum"),
            f"pool={cfg.pool!r}: its pool_type is 'tok', 'gap', 'map' or 'none'",
        ),
        (
            cfg.class_token and cfg.pool != "token",
            f"class_token with pool={cfg.pool!r}: it has a class token with pool_type 'tok' only",
        ),
        (
            cfg.posemb in ("sinusoidal_1d", "sinusoidal_2d", "none"),
            f"posemb={cfg.posemb!r}: its posemb is 'learn' or 'sincos2d'",
        ),
        (
            cfg.posemb == "learned" and cfg.posemb_on_cls and cfg.num_prefix_tokens > 0,
            "posemb_on_cls: its pos_embedding covers the patches only (the class token is prepended after)",
        ),
        (cfg.gelu != "tanh", f"gelu={cfg.gelu!r}: its MlpBlock calls nn.gelu, the tanh form"),
        (cfg.ln_eps != 1e-6, f"ln_eps={cfg.ln_eps:g}: its LayerNorms use flax's default 1e-6"),
    ]
    return [reason for present, reason in checks if present]


# What to change in big_vision's code (or the file) for a knob, where one small change does it.
REMEDIES = {
    "gelu='exact'": "use nn.gelu(x, approximate=False)",
    "posemb_on_cls": "add pos_embedding[:, :1] to cls and drop it (vit.fix_old_checkpoints does it)",
}


def big_vision_construction(cfg: ViTConfig, scan: bool = False) -> str:
    """The big_vision `vit.Model` a file of this config applies in (`scan`: a file of stacked blocks),
    then each knob its published code computes otherwise (`big_vision_lacks`), with the change that
    fixes it where one does."""
    if cfg.class_attention_depth:
        return (
            "no big_vision model: big_vision has no CaiT (class-attention blocks"
            + (", talking heads" if cfg.talking_heads else "")
            + "); backends.flax_vit.CaiT applies this tree"
        )
    kwargs = dict(
        num_classes=cfg.num_classes,
        patch_size=tuple(cfg.patch_size),
        width=cfg.width,
        depth=cfg.depth,
        mlp_dim=cfg.mlp_dim,
        num_heads=cfg.num_heads,
        posemb=BIG_VISION_POSEMB.get(cfg.posemb, cfg.posemb),
        rep_size=cfg.representation_size or False,
        pool_type=BIG_VISION_POOL.get(cfg.pool, cfg.pool),
    ) | ({"scan": True} if scan else {})
    model = "big_vision.models.vit.Model(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    differences = []
    for reason in big_vision_lacks(cfg):
        knob = reason.split(":", 1)[0]
        remedy = REMEDIES.get(knob, "backends.flax_vit has it")
        differences.append(f"{reason} ({remedy})")
    return model + "".join(f"; {d}" for d in differences)
