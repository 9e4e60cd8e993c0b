"""The PyTorch backend: a timm-compatible VisionTransformer that computes vitspec's math."""

from backends.torch_vit.checkpoint import from_checkpoint
from backends.torch_vit.convert import ConversionError, from_reference, mapping_table, to_reference
from backends.torch_vit.model import VisionTransformer

__all__ = [
    "ConversionError",
    "VisionTransformer",
    "from_checkpoint",
    "from_reference",
    "mapping_table",
    "to_reference",
]
