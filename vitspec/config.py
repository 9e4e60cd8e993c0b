"""ViTConfig: every knob of the Vision Transformers in timm, big_vision, vision_transformer and HF.

The config is the single source of truth for shapes and math; `params.param_shapes` and the
reference forward read nothing else. It is frozen and validated on construction, so an invalid
model cannot exist.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

POOLS = ("token", "gap", "max", "avgmax", "sum", "map", "none")
TOKEN_POOLS = ("gap", "max", "avgmax", "sum")  # parameter-free reductions over the tokens
POSEMBS = ("learned", "sincos2d", "sinusoidal_1d", "sinusoidal_2d", "none")
FIXED_POSEMBS = ("sincos2d", "sinusoidal_1d", "sinusoidal_2d")
GELUS = ("exact", "tanh", "quick")
DROP_PATH_SCHEDULES = ("linear", "constant")


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected a positive int or a pair (h, w) of them")
    if isinstance(value, int):
        value = (value, value)
    try:
        h, w = value
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected a positive int or a pair (h, w) of them") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={value!r}: expected a positive int or a pair (h, w) of them")
    return (int(h), int(w))


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")


def _rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r}: expected a rate in [0, 1)")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """A Vision Transformer, pre-norm, as in Dosovitskiy et al. 2020 (arXiv:2010.11929).

    Sizes: `image_size` and `patch_size` are ints or (h, w); the patch grid is
    (image_h / patch_h, image_w / patch_w). `num_classes=0` means no head: the model returns the
    pooled features (after `pre_logits` when `representation_size` is set).

    Tokens: `class_token` (default: True exactly when `pool == "token"`) and `num_registers`
    register tokens (Darcet et al. 2023) are prepended in the order [class, registers, patches].
    `posemb_on_cls`: whether those prefix tokens get position embeddings too (default: yes, as timm,
    HF and vision_transformer; big_vision: no, it adds the posemb to the patches before prepending;
    a CaiT: no). With `posemb="none"` it means nothing and is always the default, so two configs of
    the same model compare equal.

    Numerics that differ across ecosystems: `ln_eps` (timm and big_vision 1e-6, torch default
    1e-5, HF 1e-12) and `gelu` ("exact" = erf form, timm/HF; "tanh" = the approximation, which is
    what flax's `nn.gelu` computes by default and so what big_vision checkpoints were trained with;
    "quick" = x * sigmoid(1.702 x), OpenAI CLIP's).

    The families around the plain ViT: `pre_norm` is a LayerNorm over all tokens after the position
    embedding (timm `norm_pre`, CLIP `pre_layrnorm`); `patch_bias=False` drops the patch
    embedding's bias (CLIP); `final_norm=False` drops the encoder's last LayerNorm (timm
    `final_norm=False`, vit-flax before pooling); `proj_bias=False` drops the biases of each
    block's attention output projection and of both MLP layers (timm `proj_bias`). Pools "max",
    "avgmax" ((mean + max) / 2, timm) and "sum" (Scenic `gsp`) reduce the tokens as "gap" does;
    `pool_include_prefix` makes those pools (and "map") see the class/distillation/register
    tokens too (timm `pool_include_prefix`; vit-flax's mean). `distilled` adds DeiT's
    distillation token after the class token and a second head on it (`head_dist`): the output is
    the mean of both heads' logits (DeiT at inference; with `num_classes=0`, the mean of the two
    tokens). `attention_dim` (default `width`) is heads x head width of the blocks' attention,
    free of the model width (vit-flax `heads * dim_head`). `posemb` "sinusoidal_1d" and
    "sinusoidal_2d" are Scenic's fixed embeddings, "sincos2d" big_vision's (SPEC.md section 2).

    CaiT (Touvron et al. 2021, arXiv:2103.17239): `talking_heads` mixes the attention logits across
    heads before the softmax and the weights after it (two learned heads x heads maps with biases);
    `class_attention_depth > 0` makes the `depth` blocks self-attention over the patches only and
    adds that many class-attention blocks, where the class token (entering there) queries
    [class, patches] and only it is updated; their MLP width is `class_attention_mlp_dim` (default
    `mlp_dim`). `drop_path_schedule`: stochastic depth linear over the blocks (ViT, DeiT) or the
    same rate in each (CaiT); class-attention blocks have none.
    """

    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    in_channels: int = 3
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    pool: str = "token"
    class_token: bool | None = None
    posemb: str = "learned"
    posemb_on_cls: bool | None = None
    fc_norm: bool = False
    representation_size: int | None = None
    qkv_bias: bool = True
    qk_norm: bool = False
    layer_scale: float | None = None
    num_registers: int = 0
    ln_eps: float = 1e-6
    gelu: str = "exact"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    stochastic_depth: float = 0.0
    drop_path_schedule: str = "linear"
    talking_heads: bool = False
    class_attention_depth: int = 0
    class_attention_mlp_dim: int | None = None
    pre_norm: bool = False
    patch_bias: bool = True
    final_norm: bool = True
    proj_bias: bool = True
    pool_include_prefix: bool = False
    distilled: bool = False
    attention_dim: int | None = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("image_size", _pair(self.image_size, "image_size"))
        set_("patch_size", _pair(self.patch_size, "patch_size"))
        pairs = zip(self.image_size, self.patch_size, strict=True)
        for (i, p), axis in zip(pairs, ("height", "width"), strict=True):
            if i % p:
                raise ValueError(
                    f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}: "
                    f"image {axis} {i} % patch {axis} {p} = {i % p}"
                )
        for name in ("in_channels", "width", "depth", "num_heads", "mlp_dim"):
            _positive_int(name, getattr(self, name))
        _positive_int("num_classes", self.num_classes, minimum=0)
        _positive_int("num_registers", self.num_registers, minimum=0)
        if self.attention_dim is None:
            if self.width % self.num_heads:
                raise ValueError(
                    f"num_heads={self.num_heads} does not divide width={self.width} "
                    f"(width % num_heads = {self.width % self.num_heads}); set attention_dim for an "
                    "attention of another width"
                )
            set_("attention_dim", self.width)
        _positive_int("attention_dim", self.attention_dim)
        if self.attention_dim % self.num_heads:
            name = "width" if self.attention_dim == self.width else "attention_dim"  # as stored: resolved
            raise ValueError(
                f"num_heads={self.num_heads} does not divide {name}={self.attention_dim} "
                f"({name} % num_heads = {self.attention_dim % self.num_heads})"
            )
        _choice("pool", self.pool, POOLS)
        _choice("posemb", self.posemb, POSEMBS)
        _choice("gelu", self.gelu, GELUS)
        if self.class_token is None:
            set_("class_token", self.pool == "token")
        if self.posemb_on_cls is None or self.posemb == "none":
            set_("posemb_on_cls", not self.class_attention_depth)  # a CaiT's class token enters after it
        booleans = ("class_token", "posemb_on_cls", "fc_norm", "qkv_bias", "qk_norm", "talking_heads")
        booleans += ("pre_norm", "patch_bias", "final_norm", "proj_bias", "pool_include_prefix", "distilled")
        for name in booleans:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected True or False")
        if self.pool == "token" and not self.class_token:
            raise ValueError("pool='token' reads the class token, but class_token=False")
        self._check_families()
        if self.representation_size is not None:
            _positive_int("representation_size", self.representation_size)
        if self.layer_scale is not None and (
            isinstance(self.layer_scale, bool) or not isinstance(self.layer_scale, (int, float))
        ):
            raise ValueError(f"layer_scale={self.layer_scale!r}: expected None or a float init value")
        eps = self.ln_eps  # bounded first: an int past float's range (a forged file's) overflows float()
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= sys.float_info.max:
            raise ValueError(f"ln_eps={eps!r}: expected a finite float > 0")
        set_("ln_eps", float(eps))
        for name in ("dropout", "attention_dropout", "stochastic_depth"):
            _rate(name, getattr(self, name))
        _choice("drop_path_schedule", self.drop_path_schedule, DROP_PATH_SCHEDULES)
        self._check_class_attention(set_)
        if self.posemb in ("sincos2d", "sinusoidal_2d"):
            if self.width % 4 or self.width < 8:
                raise ValueError(
                    f"posemb={self.posemb!r} needs width divisible by 4 and >= 8 (sin/cos of x and y), "
                    f"got width={self.width}"
                )
        if self.posemb == "sinusoidal_1d" and self.width % 2:
            raise ValueError(
                f"posemb='sinusoidal_1d' needs an even width (sin and cos), got width={self.width}"
            )
        # Scenic's 1-D table numbers the whole sequence, class token included; the 2-D ones are grids.
        if self.posemb in ("sincos2d", "sinusoidal_2d") and self.posemb_on_cls and self.num_prefix_tokens:
            raise ValueError(
                f"posemb={self.posemb!r} is defined on the patch grid only: set posemb_on_cls=False "
                f"(the model has {self.num_prefix_tokens} class/distillation/register token(s))"
            )

    def _check_families(self) -> None:
        if self.distilled:
            conflicts = [
                text
                for text, bad in (
                    ("pool must be 'token'", self.pool != "token"),
                    ("fc_norm must be False", self.fc_norm),
                    ("representation_size must be None", self.representation_size is not None),
                    ("class_attention_depth must be 0", self.class_attention_depth),
                )
                if bad
            ]
            if conflicts:
                raise ValueError(
                    "distilled=True (DeiT: heads on the class and distillation tokens): "
                    + "; ".join(conflicts)
                )
        if self.fc_norm and not self.final_norm:
            raise ValueError(
                "fc_norm=True moves the final norm after pooling, but final_norm=False has none "
                "(timm's final_norm=False drops both)"
            )
        if self.pool_include_prefix and self.pool not in (*TOKEN_POOLS, "map"):
            raise ValueError(
                f"pool_include_prefix=True: pool={self.pool!r} does not reduce over tokens "
                f"(it applies to {', '.join(map(repr, (*TOKEN_POOLS, 'map')))})"
            )

    def _check_class_attention(self, set_) -> None:
        _positive_int("class_attention_depth", self.class_attention_depth, minimum=0)
        if not self.class_attention_depth:
            if self.class_attention_mlp_dim is not None:
                raise ValueError("class_attention_mlp_dim is set, but class_attention_depth=0")
            return
        if self.class_attention_mlp_dim is None:
            set_("class_attention_mlp_dim", self.mlp_dim)
        _positive_int("class_attention_mlp_dim", self.class_attention_mlp_dim)
        # CaiT's class token enters after the self-attention blocks and is what the head reads:
        # the knobs that place tokens or pool otherwise have no meaning there.
        conflicts = [
            text
            for text, bad in (
                ("pool must be 'token'", self.pool != "token"),
                ("class_token must be True", not self.class_token),
                ("num_registers must be 0", self.num_registers),
                ("posemb_on_cls must be False (the posemb is over the patches)", self.posemb_on_cls),
                ("fc_norm must be False", self.fc_norm),
                ("qk_norm must be False", self.qk_norm),
                ("representation_size must be None", self.representation_size is not None),
                ("pool_include_prefix must be False", self.pool_include_prefix),
            )
            if bad
        ]
        if conflicts:
            raise ValueError(
                f"class_attention_depth={self.class_attention_depth} (CaiT): " + "; ".join(conflicts)
            )

    # Derived sizes: the only place they are computed.
    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        """Stochastic depth per block (SPEC.md section 6): stochastic_depth * i / (depth - 1), 0 for one
        block ('linear'); stochastic_depth in each ('constant')."""
        if self.drop_path_schedule == "constant":
            return (self.stochastic_depth,) * self.depth
        if self.depth == 1:
            return (0.0,)
        return tuple(self.stochastic_depth * i / (self.depth - 1) for i in range(self.depth))

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in the self-attention blocks (CaiT's class token enters later)."""
        if self.class_attention_depth:
            return 0
        return int(self.class_token) + int(self.distilled) + self.num_registers

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def head_dim(self) -> int:
        return self.attention_dim // self.num_heads

    @property
    def posemb_length(self) -> int:
        """Rows of the learned position embedding."""
        return self.num_tokens if self.posemb_on_cls else self.num_patches

    @property
    def feature_dim(self) -> int:
        """Width of what the head sees (or what is returned when num_classes == 0)."""
        return self.representation_size or self.width

    def replace(self, **changes: Any) -> ViTConfig:
        # An attention as wide as the model follows the model's width: the default resolved, not chosen.
        if "width" in changes and "attention_dim" not in changes and self.attention_dim == self.width:
            changes["attention_dim"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        d["patch_size"] = list(self.patch_size)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s) {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        for k in ("image_size", "patch_size"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"ViTConfig JSON is not valid JSON: {e}") from None
        except RecursionError:  # the text may come from a file: any nesting, no config is that deep
            raise ValueError("ViTConfig JSON is nested too deeply to be a config") from None
        if not isinstance(d, dict):
            raise ValueError(f"ViTConfig JSON must be an object, got {type(d).__name__}")
        return cls.from_dict(d)
