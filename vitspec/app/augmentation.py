"""Augmentation in NumPy: random crops with padding, flips, random resized crops, then RandAugment
(vitspec.app.randaugment, with Pillow); pure functions of a Generator, so the pipeline seeds each
batch's draws by (seed, epoch, step)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from vitspec.app.randaugment import RandAugment, rand_augment

INTERPOLATIONS = ("bilinear", "nearest")


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop:
    """Crop a random box, then resize it back to the input size (torchvision's RandomResizedCrop).

    Box area is a uniform fraction `scale` of the image, its aspect ratio log-uniform in `ratio`;
    up to 10 draws, else the whole image clamped to `ratio`, centered. Resampling has no
    antialiasing; "bilinear" uses half-pixel centers (align_corners=False) with edge clamping
    inside the box and rounds half to even.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale={self.scale}: expected 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio={self.ratio}: expected 0 < low <= high")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation={self.interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}"
            )


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training augmentation: a zero-padded random crop (or a random-resized crop), a flip, then
    RandAugment when `randaugment` is given (timm's order).

    crop_padding=0 turns the padded crop off; `random_resized_crop` replaces it (so needs
    crop_padding=0).
    """

    crop_padding: int = 4
    horizontal_flip: bool = True
    random_resized_crop: RandomResizedCrop | None = None
    randaugment: RandAugment | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.crop_padding, bool)
            or not isinstance(self.crop_padding, int)
            or self.crop_padding < 0
        ):
            raise ValueError(f"crop_padding={self.crop_padding!r}: expected an int >= 0")
        if self.random_resized_crop is not None and self.crop_padding:
            raise ValueError("random_resized_crop replaces the padded crop: set crop_padding=0")


NO_AUGMENTATION = Augmentation(crop_padding=0, horizontal_flip=False)

# Flips on for Fashion-MNIST too: every class (shirts, shoes, bags...) keeps its label in a
# mirror, and the items are centered at the same scale as CIFAR objects, so the same 4-pixel
# shift applies.
DEFAULT_AUGMENTATION = {
    "cifar10": Augmentation(crop_padding=4, horizontal_flip=True),
    "cifar100": Augmentation(crop_padding=4, horizontal_flip=True),
    # No random crop: a ViT learns shift invariance from shifted copies only over far longer
    # schedules than the minutes the main job trains; the crop cost it ~6 points at 5-6 epochs
    # (SPEC.md section 6, "The main job's recipe").
    "fashion_mnist": Augmentation(crop_padding=0, horizontal_flip=True),
}


def check_batch(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images: expected uint8 [N, H, W, C], got {images.dtype} {images.shape}")


def random_crop(images: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
    """Each image zero-padded by `padding` on every side, then cropped back to its size at a
    uniformly random offset (one draw of shape [N, 2]: rows, then columns)."""
    n, height, width, channels = images.shape
    offsets = rng.integers(0, 2 * padding + 1, size=(n, 2))
    padded = np.zeros((n, height + 2 * padding, width + 2 * padding, channels), dtype=np.uint8)
    padded[:, padding : padding + height, padding : padding + width] = images
    windows = sliding_window_view(padded, (height, width), axis=(1, 2))  # [N, dy, dx, C, H, W], no copy
    crops = windows[np.arange(n), offsets[:, 0], offsets[:, 1]]
    return np.ascontiguousarray(crops.transpose(0, 2, 3, 1))


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image mirrored left-right with probability 1/2 (one draw of shape [N])."""
    flip = rng.random(images.shape[0]) < 0.5
    out = images.copy()
    out[flip] = images[flip, :, ::-1]
    return out


def _resized_crop_boxes(
    rng: np.random.Generator, n: int, height: int, width: int, params: RandomResizedCrop
) -> tuple[np.ndarray, ...]:
    """(top, left, box_h, box_w) per image, each int [N]; always the same number of draws."""
    attempts = 10
    target_area = height * width * rng.uniform(params.scale[0], params.scale[1], size=(n, attempts))
    aspect = np.exp(rng.uniform(math.log(params.ratio[0]), math.log(params.ratio[1]), size=(n, attempts)))
    box_w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
    box_h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (box_w >= 1) & (box_w <= width) & (box_h >= 1) & (box_h <= height)
    first_fit = np.argmax(fits, axis=1)
    box_h, box_w = box_h[np.arange(n), first_fit], box_w[np.arange(n), first_fit]
    position = rng.random((n, 2))
    top = np.floor(position[:, 0] * (height - box_h + 1)).astype(np.int64)
    left = np.floor(position[:, 1] * (width - box_w + 1)).astype(np.int64)

    no_fit = ~fits.any(axis=1)
    fallback_h, fallback_w = _whole_image_box(height, width, params.ratio)
    box_h[no_fit], box_w[no_fit] = fallback_h, fallback_w
    top[no_fit], left[no_fit] = (height - fallback_h) // 2, (width - fallback_w) // 2
    return top, left, box_h, box_w


def _whole_image_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    aspect = width / height
    if aspect < ratio[0]:
        return round(width / ratio[0]), width
    if aspect > ratio[1]:
        return height, round(height * ratio[1])
    return height, width


def _sample_positions(start: np.ndarray, extent: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """Source coordinates [N, size] of `size` output pixels spread over [start, start + extent)."""
    centers = (np.arange(size) + 0.5) * (extent[:, None] / size)
    if interpolation == "nearest":
        return start[:, None] + np.minimum(np.floor(centers).astype(np.int64), extent[:, None] - 1)
    return start[:, None] + np.clip(centers - 0.5, 0, (extent - 1)[:, None])


def _bilinear(
    images: np.ndarray, ys: np.ndarray, xs: np.ndarray, y_end: np.ndarray, x_end: np.ndarray
) -> np.ndarray:
    """Sample images[b] at rows ys[b] x columns xs[b]: columns first, then rows, in float32;
    the far neighbours are clamped to the box end."""
    n, height, width, channels = images.shape
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, y_end[:, None] - 1), np.minimum(x0 + 1, x_end[:, None] - 1)
    wy = (ys - y0).astype(np.float32)[:, :, None, None]
    wx = (xs - x0).astype(np.float32)[:, None, :, None]
    pixels = images.reshape(-1, channels)
    first_row = (np.arange(n) * height)[:, None]

    def at(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        # One flat gather of whole pixels is several times faster than images[b, rows, cols].
        flat_index = ((first_row + rows) * width)[:, :, None] + cols[:, None, :]
        return pixels.take(flat_index, axis=0).astype(np.float32)

    upper = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    lower = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return np.rint(upper * (1 - wy) + lower * wy).astype(np.uint8)


def random_resized_crop(
    images: np.ndarray, rng: np.random.Generator, params: RandomResizedCrop
) -> np.ndarray:
    """Per image a random box (see RandomResizedCrop), resampled to the input size."""
    n, height, width, _ = images.shape
    top, left, box_h, box_w = _resized_crop_boxes(rng, n, height, width, params)
    ys = _sample_positions(top, box_h, height, params.interpolation)
    xs = _sample_positions(left, box_w, width, params.interpolation)
    if params.interpolation == "nearest":
        return images[np.arange(n)[:, None, None], ys[:, :, None], xs[:, None, :]]
    return _bilinear(images, ys, xs, top + box_h, left + box_w)


def augment(images: np.ndarray, rng: np.random.Generator, augmentation: Augmentation) -> np.ndarray:
    """Apply `augmentation` to a uint8 NHWC batch; draws crop parameters first, then flips, then
    RandAugment's (so turning RandAugment on leaves the crops and flips as they were)."""
    check_batch(images)
    if augmentation.random_resized_crop is not None:
        images = random_resized_crop(images, rng, augmentation.random_resized_crop)
    elif augmentation.crop_padding:
        images = random_crop(images, rng, augmentation.crop_padding)
    if augmentation.horizontal_flip:
        images = random_flip(images, rng)
    if augmentation.randaugment is not None:
        images = rand_augment(images, rng, augmentation.randaugment)
    return images
