"""Which resampling a checkpoint's position embedding gets at another image size: `--resample`, else
the source format's own ecosystem's (vitspec.posemb), as its users would get it there.

timm files resample as timm's `resample_abs_pos_embed`, transformers' as their
`interpolate_pos_encoding`, big_vision / vision_transformer / Scenic trees as their
`scipy.ndimage.zoom(order=1)`. vitspec's own files (and the flax backend's tree) keep
big_vision's, vitspec's default before --resample. A format whose code has no resampling
(vit-flax, the tutorial ViT) names none: --resample is then required.
"""

from __future__ import annotations

from vitspec.posemb import RESAMPLE_METHODS, check_method, describe

# Format name (vitspec.formats) -> its ecosystem's method.
SOURCE_METHOD = {
    "ref": "big_vision",
    "torch": "timm",
    "flax": "big_vision",
    "big_vision": "big_vision",
    "big_vision_scan": "big_vision",
    "vit_jax": "big_vision",
    "scenic": "big_vision",
    "hf": "hf",
    "hf4": "hf",
    "hf_deit": "hf",
    "hf_clip": "hf",
    "hf_siglip": "hf",
    "hf_dinov2": "hf",
}
CHOICES = tuple(RESAMPLE_METHODS)


def resample_method(source_fmt: str, chosen: str | None, compute_dtype: str = "float64") -> tuple[str, str]:
    """(method, "(how it resizes), why this one" to print) for a `source_fmt` file."""
    if chosen is None and source_fmt not in SOURCE_METHOD:
        raise ValueError(
            f"a {source_fmt} checkpoint's ecosystem has no position-embedding resampling to follow: "
            f"pass --resample ({' or '.join(CHOICES)})"
        )
    method = chosen or SOURCE_METHOD[source_fmt]
    check_method(method, compute_dtype)
    if chosen:
        why = f"as --resample {method} asks"
    elif source_fmt == "ref":
        why = "the default for vitspec's own files (--resample to choose)"
    else:
        why = f"a {source_fmt} source's own (--resample to choose)"
    return method, f"({describe(method, compute_dtype)}), {why}"
