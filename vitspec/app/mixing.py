"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) per batch, as timm's Mixup in its default
'batch' mode: one weight per batch, every image mixed with its mirror in the batch (row i with row
B - 1 - i), CutMix's weight corrected to the area its box actually covers.

The mixing is done on the uint8 batch in the pipeline, as timm's FastCollateMixup does: Mixup's blend
is rounded to whole pixel levels (half to even), a CutMix box is pasted exactly. So a mixed batch is
still uint8, fed to every backend (and, in data parallelism, split over the processes) like any
other, and the backends only weigh the loss: weight * CE(labels) + (1 - weight) * CE(partner_labels),
each with the recipe's label smoothing.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from vitspec.recipe import MixedLabels


@dataclasses.dataclass(frozen=True)
class Mixing:
    """Beta(alpha, alpha) weights for Mixup and CutMix (0 turns one off); with both on, each batch is
    CutMix with probability `switch_prob`, else Mixup."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5

    def __post_init__(self) -> None:
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a value >= 0 (0 turns it off)")
        if not 0 <= self.switch_prob <= 1:
            raise ValueError(f"switch_prob={self.switch_prob!r}: expected a probability")

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


NO_MIXING = Mixing()


def cutmix_box(weight: float, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): a box of about (1 - weight) of the image, sides sqrt(1 - weight)
    of the image's, centered at a uniform pixel and clipped to the image (so it may cover less)."""
    ratio = math.sqrt(1.0 - weight)
    half_h, half_w = int(height * ratio) // 2, int(width * ratio) // 2
    center_y, center_x = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = max(center_y - half_h, 0), min(center_y + half_h, height)
    left, right = max(center_x - half_w, 0), min(center_x + half_w, width)
    return top, bottom, left, right


def mix_batch(
    images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, mixing: Mixing
) -> tuple[np.ndarray, MixedLabels]:
    """The batch mixed with its reverse (uint8 [B, H, W, C]) and its targets."""
    partner = images[::-1]
    use_cutmix = mixing.cutmix_alpha > 0
    if mixing.mixup_alpha > 0 and mixing.cutmix_alpha > 0:
        use_cutmix = bool(rng.random() < mixing.switch_prob)
    alpha = mixing.cutmix_alpha if use_cutmix else mixing.mixup_alpha
    weight = float(rng.beta(alpha, alpha))
    if use_cutmix:
        _, height, width, _ = images.shape
        top, bottom, left, right = cutmix_box(weight, height, width, rng)
        mixed = images.copy()
        mixed[:, top:bottom, left:right] = partner[:, top:bottom, left:right]
        weight = 1.0 - (bottom - top) * (right - left) / (height * width)
    else:
        # float32 is exact enough: the blend is rounded to whole levels.
        blend = images.astype(np.float32) * np.float32(weight) + partner.astype(np.float32) * np.float32(
            1 - weight
        )
        mixed = np.rint(blend).astype(np.uint8)
    return mixed, MixedLabels(labels[::-1].copy(), weight)
