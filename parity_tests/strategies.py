"""Hypothesis strategies shared by every test: configs over every knob, within a size budget.

The budget (width <= 24, <= 12 tokens, depth <= 2, batch <= 3) keeps one reference forward and
backward in float64 around a millisecond, so a full finite-difference sweep per example stays cheap.
"""

from __future__ import annotations

from hypothesis import strategies as st

from vitspec.config import ViTConfig
from vitspec.gradcheck import random_images, random_params

__all__ = ["cait_configs", "configs", "family_configs", "random_images", "random_params"]

# The small config the unit tests start from (each replaces the fields it is about).
SMALL_FIELDS = dict(
    image_size=(4, 6),
    patch_size=(2, 3),
    in_channels=3,
    width=12,
    depth=1,
    num_heads=3,
    mlp_dim=20,
    num_classes=5,
)

WIDTH_HEADS = [(w, h) for w in (8, 12, 16, 24) for h in (1, 2, 3, 4, 6) if w % h == 0 and w // h >= 2]


@st.composite
def configs(draw: st.DrawFn, *, max_depth: int = 2, allow_none_pool: bool = True) -> ViTConfig:
    """Any valid ViTConfig in the size budget; every knob and their combinations are reachable."""
    width, num_heads = draw(st.sampled_from(WIDTH_HEADS))
    patch = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    grid = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pools = ["token", "gap", "map"] + (["none"] if allow_none_pool else [])
    pool = draw(st.sampled_from(pools))
    class_token = True if pool == "token" else draw(st.booleans())
    num_registers = draw(st.integers(0, 2))
    posemb = draw(st.sampled_from(["learned", "sincos2d", "none"]))
    prefix = int(class_token) + num_registers
    posemb_on_cls = False if (posemb == "sincos2d" and prefix) else draw(st.booleans())
    return ViTConfig(
        image_size=(grid[0] * patch[0], grid[1] * patch[1]),
        patch_size=patch,
        in_channels=draw(st.integers(1, 3)),
        width=width,
        depth=draw(st.integers(1, max_depth)),
        num_heads=num_heads,
        mlp_dim=draw(st.sampled_from([4, 8, 20, 32])),
        num_classes=draw(st.sampled_from([0, 1, 3, 5])),
        pool=pool,
        class_token=class_token,
        posemb=posemb,
        posemb_on_cls=posemb_on_cls,
        fc_norm=draw(st.booleans()),
        representation_size=draw(st.sampled_from([None, 3, 7])),
        qkv_bias=draw(st.booleans()),
        # LayerNorm over a 2-wide head is +-1 smoothed at scale sqrt(ln_eps): a step function that
        # no finite difference resolves and no real model has. qk-norm heads are >= 4 wide here.
        qk_norm=draw(st.booleans()) if width // num_heads >= 4 else False,
        layer_scale=draw(st.sampled_from([None, 0.1, 1e-5])),
        num_registers=num_registers,
        ln_eps=draw(st.sampled_from([1e-6, 1e-5, 1e-12])),
        gelu=draw(st.sampled_from(["exact", "tanh"])),
        # Rates must not change the eval-mode map: drawing them checks that.
        dropout=draw(st.sampled_from([0.0, 0.1])),
        attention_dropout=draw(st.sampled_from([0.0, 0.1])),
        stochastic_depth=draw(st.sampled_from([0.0, 0.1])),
    )


@st.composite
def cait_configs(draw: st.DrawFn, *, max_depth: int = 2) -> ViTConfig:
    """Any valid CaiT (class_attention_depth > 0) in the size budget; a separate strategy, since the
    backends take `configs()` and CaiT is the reference's first."""
    width, num_heads = draw(st.sampled_from(WIDTH_HEADS))
    patch = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    grid = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    return ViTConfig(
        image_size=(grid[0] * patch[0], grid[1] * patch[1]),
        patch_size=patch,
        in_channels=draw(st.integers(1, 3)),
        width=width,
        depth=draw(st.integers(1, max_depth)),
        num_heads=num_heads,
        mlp_dim=draw(st.sampled_from([4, 8, 20, 32])),
        num_classes=draw(st.sampled_from([0, 1, 3, 5])),
        posemb=draw(st.sampled_from(["learned", "sincos2d", "none"])),
        posemb_on_cls=False,
        qkv_bias=draw(st.booleans()),
        layer_scale=draw(st.sampled_from([None, 0.1, 1e-5])),
        ln_eps=draw(st.sampled_from([1e-6, 1e-5, 1e-12])),
        gelu=draw(st.sampled_from(["exact", "tanh"])),
        dropout=draw(st.sampled_from([0.0, 0.1])),
        attention_dropout=draw(st.sampled_from([0.0, 0.1])),
        stochastic_depth=draw(st.sampled_from([0.0, 0.1])),
        drop_path_schedule=draw(st.sampled_from(["linear", "constant"])),
        talking_heads=draw(st.booleans()),
        class_attention_depth=draw(st.integers(1, 2)),
        class_attention_mlp_dim=draw(st.sampled_from([None, 4, 12, 32])),
    )


@st.composite
def family_configs(
    draw: st.DrawFn, *, max_depth: int = 2, with_cait: bool = True, allow_none_pool: bool = True
) -> ViTConfig:
    """`configs()` (with_cait: a CaiT one time in four) with the ViT families' knobs drawn on top:
    quick GELU, pre-norm, patch and projection biases, the final norm, attention_dim, Scenic's
    posembs, and for a ViT the token pools with pool_include_prefix and DeiT's distillation token. A
    separate strategy: the formats `configs()` feeds mostly lack these knobs."""
    cait = with_cait and draw(st.sampled_from([False, False, False, True]))
    vit = configs(max_depth=max_depth, allow_none_pool=allow_none_pool)
    cfg = draw(cait_configs(max_depth=max_depth) if cait else vit)
    distilled = not cait and draw(st.booleans())
    pool = cfg.pool
    if not cait:
        pools = ["token", "gap", "max", "avgmax", "sum", "map"] + (["none"] if allow_none_pool else [])
        pool = "token" if distilled else draw(st.sampled_from(pools))
    class_token = cfg.class_token or pool == "token"
    prefix = not cait and (class_token or distilled or cfg.num_registers)
    posemb = draw(st.sampled_from(["learned", "sincos2d", "sinusoidal_1d", "sinusoidal_2d", "none"]))
    grid_posemb = posemb in ("sincos2d", "sinusoidal_2d")
    # Head widths as configs() has them (qk-norm heads >= 4 wide), now free of the model width.
    head_dim = draw(st.sampled_from([4, 6] if cfg.qk_norm else [2, 4, 6]))
    fc_norm = cfg.fc_norm and not distilled
    return cfg.replace(
        gelu=draw(st.sampled_from(["exact", "tanh", "quick"])),
        pre_norm=draw(st.booleans()),
        patch_bias=draw(st.booleans()),
        proj_bias=draw(st.booleans()),
        fc_norm=fc_norm,
        final_norm=fc_norm or draw(st.booleans()),
        pool=pool,
        class_token=class_token,
        pool_include_prefix=pool not in ("token", "none") and draw(st.booleans()),
        distilled=distilled,
        representation_size=None if distilled else cfg.representation_size,
        attention_dim=head_dim * cfg.num_heads,
        posemb=posemb,
        posemb_on_cls=cfg.posemb_on_cls and not (prefix and grid_posemb),
    )
