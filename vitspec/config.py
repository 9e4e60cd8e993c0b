"""ViTConfig: every knob of the Vision Transformers in timm, big_vision, vision_transformer and HF.

The config is the single source of truth for shapes and math; `params.param_shapes` and the
reference forward read nothing else. It is frozen and validated on construction, so an invalid
model cannot exist.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any

POOLS = ("token", "gap", "map", "none")
POSEMBS = ("learned", "sincos2d", "none")
GELUS = ("exact", "tanh")


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
    `posemb_on_cls`: whether those prefix tokens get position embeddings too (timm, HF and
    vision_transformer: yes; big_vision: no, it adds the posemb to the patches before prepending).

    Numerics that differ across ecosystems: `ln_eps` (timm and big_vision 1e-6, torch default
    1e-5, HF 1e-12) and `gelu` ("exact" = erf form, timm/HF; "tanh" = the approximation, which is
    what flax's `nn.gelu` computes by default and so what big_vision checkpoints were trained with).
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
    posemb_on_cls: bool = True
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
        if self.width % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide width={self.width} "
                f"(width % num_heads = {self.width % self.num_heads})"
            )
        _choice("pool", self.pool, POOLS)
        _choice("posemb", self.posemb, POSEMBS)
        _choice("gelu", self.gelu, GELUS)
        if self.class_token is None:
            set_("class_token", self.pool == "token")
        for name in ("class_token", "posemb_on_cls", "fc_norm", "qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected True or False")
        if self.pool == "token" and not self.class_token:
            raise ValueError("pool='token' reads the class token, but class_token=False")
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
        if self.posemb == "sincos2d":
            if self.width % 4 or self.width < 8:
                raise ValueError(
                    f"posemb='sincos2d' needs width divisible by 4 and >= 8 (sin/cos of x and y), "
                    f"got width={self.width}"
                )
            if self.posemb_on_cls and self.num_prefix_tokens:
                raise ValueError(
                    "posemb='sincos2d' is defined on the patch grid only: set posemb_on_cls=False "
                    f"(the model has {self.num_prefix_tokens} class/register token(s))"
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
        """Stochastic depth per block (SPEC.md section 6): stochastic_depth * i / (depth - 1); 0 for one
        block."""
        if self.depth == 1:
            return (0.0,)
        return tuple(self.stochastic_depth * i / (self.depth - 1) for i in range(self.depth))

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_registers

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def posemb_length(self) -> int:
        """Rows of the learned position embedding."""
        return self.num_tokens if self.posemb_on_cls else self.num_patches

    @property
    def feature_dim(self) -> int:
        """Width of what the head sees (or what is returned when num_classes == 0)."""
        return self.representation_size or self.width

    def replace(self, **changes: Any) -> ViTConfig:
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


# Table 1 of Dosovitskiy et al. 2020 (arXiv:2010.11929) for B, L, H; Ti and S from Touvron et al.
# 2021 (DeiT, arXiv:2012.12877) and Steiner et al. 2021 (arXiv:2106.10270), as big_vision lists them.
VIT_SIZES: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
}

# Small models for 32x32 (CIFAR) and 28x28 (Fashion-MNIST) images, trained from scratch.
PRESETS: dict[str, dict[str, Any]] = {
    # The CIFAR-10 notebook model this project grew from: 6 layers, width 128, 8 heads, MLP 256.
    "cifar-notebook": dict(
        image_size=32,
        patch_size=4,
        width=128,
        depth=6,
        num_heads=8,
        mlp_dim=256,
        num_classes=10,
        pool="token",
    ),
    "cifar-s": dict(
        image_size=32,
        patch_size=4,
        width=192,
        depth=9,
        num_heads=3,
        mlp_dim=384,
        num_classes=10,
        pool="token",
    ),
    "fmnist-tiny": dict(
        image_size=28,
        patch_size=4,
        in_channels=1,
        width=64,
        depth=4,
        num_heads=4,
        mlp_dim=128,
        num_classes=10,
        pool="token",
    ),
    "fmnist-s": dict(
        image_size=28,
        patch_size=4,
        in_channels=1,
        width=128,
        depth=6,
        num_heads=8,
        mlp_dim=256,
        num_classes=10,
        pool="token",
    ),
}

_VARIANT_RE = re.compile(r"^(Ti|S|B|L|H)/(\d+)$")


def variant_names() -> list[str]:
    return [f"{s}/{{patch}}" for s in VIT_SIZES] + list(PRESETS)


def variant(name: str, **overrides: Any) -> ViTConfig:
    """A named model: a paper size with a patch size ("B/16", "Ti/4") or a preset ("cifar-notebook").

    Overrides replace any field, e.g. `variant("B/16", num_classes=10, image_size=384)`.
    """
    m = _VARIANT_RE.match(name)
    if m:
        fields: dict[str, Any] = dict(VIT_SIZES[m.group(1)], patch_size=int(m.group(2)))
    elif name in PRESETS:
        fields = dict(PRESETS[name])
    else:
        raise ValueError(
            f"unknown variant {name!r}: expected SIZE/PATCH with SIZE in {list(VIT_SIZES)} "
            f"(e.g. 'B/16') or a preset in {list(PRESETS)}"
        )
    return ViTConfig(**{**fields, **overrides})
