"""RandAugment (Cubuk et al. 2019, arXiv:1909.13719) on uint8 batches, as timm's `rand-m9-n2-mstd0.5`
transforms do it, with Pillow's image operations.

Each image gets `num_ops` operations drawn uniformly, with replacement, from OPERATIONS (timm's list;
with `increasing` its variants whose severity grows with the magnitude), each applied with
probability 1/2 at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10]. Every draw
is taken from the pipeline's Generator as four arrays before any image is touched, the same number
for every batch, so a batch stays a pure function of (seed, epoch, step).

Geometric operations resample bilinearly (timm draws bilinear or bicubic per call when its
interpolation is 'random'; a fixed one costs no draw) and fill the uncovered pixels with `fill`: the
dataset's mean pixel in training runs, as timm's create_transform passes it, 128 when not given.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

try:
    from PIL import Image, ImageEnhance, ImageOps
except ImportError:  # an optional dependency: only --randaugment needs it (require_pillow says so)
    Image = None

MAX_MAGNITUDE = 10.0
SPEC_FORMAT = "rand-m<magnitude>[-n<ops per image>][-mstd<magnitude std>][-inc<0|1>], e.g. rand-m9-n2-mstd0.5"


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """RandAugment's settings; `fill` is the geometric operations' fill, one value per channel."""

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.0
    increasing: bool = False
    fill: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_ops, bool) or not isinstance(self.num_ops, int) or self.num_ops < 1:
            raise ValueError(f"num_ops={self.num_ops!r}: expected an int >= 1")
        if not 0 <= self.magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"magnitude={self.magnitude!r}: expected a value in [0, {MAX_MAGNITUDE:g}]")
        if not self.magnitude_std >= 0:
            raise ValueError(f"magnitude_std={self.magnitude_std!r}: expected a value >= 0")
        if self.fill is not None and not all(0 <= v <= 255 for v in self.fill):
            raise ValueError(f"fill={self.fill!r}: expected pixel values in [0, 255]")


def parse(spec: str) -> RandAugment:
    """timm's RandAugment string, e.g. 'rand-m9-n2-mstd0.5-inc1' (n defaults to 2, mstd and inc to 0).

    Unlike timm, 'inc0' turns the increasing variants off (timm reads any 'inc' as on).
    """
    # section key -> (RandAugment field, reader of its number)
    keys = {"m": ("magnitude", float), "n": ("num_ops", int), "mstd": ("magnitude_std", float)}
    keys["inc"] = ("increasing", {"0": False, "1": True}.__getitem__)
    sections = spec.split("-")
    fields = {}
    for section in sections[1:]:
        match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d+)?)", section)
        if sections[0] != "rand" or not match or match.group(1) not in keys:
            raise ValueError(f"--randaugment {spec!r}: expected {SPEC_FORMAT}")
        name, read = keys[match.group(1)]
        try:
            fields[name] = read(match.group(2))
        except (ValueError, KeyError):
            raise ValueError(
                f"--randaugment {spec!r}: {section!r} is not a value {match.group(1)} takes"
            ) from None
    if sections[0] != "rand" or "magnitude" not in fields:
        raise ValueError(f"--randaugment {spec!r}: expected {SPEC_FORMAT}")
    try:
        return RandAugment(**fields)
    except ValueError as error:
        raise ValueError(f"--randaugment {spec!r}: {error}") from None


def require_pillow() -> None:
    if Image is None:
        raise ValueError(
            "--randaugment needs Pillow, which is not installed: pip install 'vitspec[augment]' (or pillow)"
        )


# An operation: (image, level in [0, 1] = magnitude / 10, sign +-1 drawn per use, fill) -> image.
Operation = Callable[["Image.Image", float, float, "int | tuple[int, ...]"], "Image.Image"]


def _affine(image, coefficients, fill):
    # Pillow maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
    return image.transform(
        image.size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR, fillcolor=fill
    )


def _solarize_add(image, level, sign, fill):
    add = int(level * 110)
    table = [min(255, v + add) if v < 128 else v for v in range(256)]
    return image.point(table * len(image.getbands()))


def _posterize(image, bits: int):
    """ImageOps.posterize, but 0 bits too (a black image): timm's TF-derived level keeps 0 to 4 bits,
    and Pillow's posterize refuses 0 (Pillow 13)."""
    mask = (0xFF << (8 - bits)) & 0xFF
    return image.point([v & mask for v in range(256)] * len(image.getbands()))


def _enhance(enhancer: str, increasing: bool) -> Operation:
    """Pillow's ImageEnhance blend: factor 0.1 + 1.8 level, or with `increasing` 1 +- 0.9 level (>= 0.1)."""

    def operation(image, level, sign, fill):
        factor = max(0.1, 1.0 + sign * 0.9 * level) if increasing else level * 1.8 + 0.1
        return getattr(ImageEnhance, enhancer)(image).enhance(factor)

    return operation


def _operations(increasing: bool) -> dict[str, Operation]:
    """timm's RandAugment list (`_RAND_TRANSFORMS`, or `_RAND_INCREASING_TRANSFORMS`), in its order."""
    if increasing:
        posterize_bits, solarize_threshold = (
            (lambda level: 4 - int(level * 4)),
            (lambda level: 256 - int(level * 256)),
        )
    else:
        posterize_bits, solarize_threshold = (lambda level: int(level * 4)), (lambda level: int(level * 256))
    return {
        "AutoContrast": lambda image, level, sign, fill: ImageOps.autocontrast(image),
        "Equalize": lambda image, level, sign, fill: ImageOps.equalize(image),
        "Invert": lambda image, level, sign, fill: ImageOps.invert(image),
        "Rotate": lambda image, level, sign, fill: image.rotate(
            sign * 30 * level, resample=Image.Resampling.BILINEAR, fillcolor=fill
        ),
        "Posterize": lambda image, level, sign, fill: _posterize(image, posterize_bits(level)),
        "Solarize": lambda image, level, sign, fill: ImageOps.solarize(image, solarize_threshold(level)),
        "SolarizeAdd": _solarize_add,
        "Color": _enhance("Color", increasing),
        "Contrast": _enhance("Contrast", increasing),
        "Brightness": _enhance("Brightness", increasing),
        "Sharpness": _enhance("Sharpness", increasing),
        "ShearX": lambda image, level, sign, fill: _affine(image, (1, sign * 0.3 * level, 0, 0, 1, 0), fill),
        "ShearY": lambda image, level, sign, fill: _affine(image, (1, 0, 0, sign * 0.3 * level, 1, 0), fill),
        "TranslateXRel": lambda image, level, sign, fill: _affine(
            image, (1, 0, sign * 0.45 * level * image.size[0], 0, 1, 0), fill
        ),
        "TranslateYRel": lambda image, level, sign, fill: _affine(
            image, (1, 0, 0, 0, 1, sign * 0.45 * level * image.size[1]), fill
        ),
    }


OPERATION_NAMES = tuple(_operations(increasing=False))


@dataclasses.dataclass(frozen=True)
class Draws:
    """One batch's draws, each [N, num_ops]: which operation, whether applied, magnitude, sign."""

    operation: np.ndarray
    applied: np.ndarray
    magnitude: np.ndarray
    sign: np.ndarray


def draw(rng: np.random.Generator, n: int, settings: RandAugment) -> Draws:
    shape = (n, settings.num_ops)
    operation = rng.integers(0, len(OPERATION_NAMES), size=shape)
    applied = rng.random(shape) < 0.5
    noise = rng.standard_normal(shape)  # drawn at mstd 0 too: the same draws for every setting
    magnitude = np.clip(settings.magnitude + settings.magnitude_std * noise, 0.0, MAX_MAGNITUDE)
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    return Draws(operation, applied, magnitude, sign)


def rand_augment(images: np.ndarray, rng: np.random.Generator, settings: RandAugment) -> np.ndarray:
    """RandAugment of a uint8 [N, H, W, C] batch, C 1 (grayscale) or 3 (RGB)."""
    require_pillow()
    n, height, width, channels = images.shape
    if channels not in (1, 3):
        raise ValueError(f"RandAugment takes 1- or 3-channel images, got {channels} channels")
    fill = settings.fill or (128,) * channels
    if len(fill) != channels:
        raise ValueError(f"RandAugment fill {fill} has {len(fill)} values for {channels}-channel images")
    pil_fill = fill[0] if channels == 1 else tuple(fill)
    operations = list(_operations(settings.increasing).values())
    draws = draw(rng, n, settings)
    out = images.copy()
    for i in np.flatnonzero(draws.applied.any(axis=1)):
        image = Image.fromarray(images[i, :, :, 0] if channels == 1 else images[i])
        for j in np.flatnonzero(draws.applied[i]):
            operation = operations[draws.operation[i, j]]
            image = operation(image, draws.magnitude[i, j] / MAX_MAGNITUDE, draws.sign[i, j], pil_fill)
        out[i] = np.asarray(image).reshape(height, width, channels)
    return out
