"""The PyTorch backend: timm-compatible VisionTransformer and Cait modules that compute vitspec's math."""

from backends.torch_vit.cait import Cait, model_for
from backends.torch_vit.checkpoint import from_checkpoint
from backends.torch_vit.convert import ConversionError, from_reference, mapping_table, to_reference
from backends.torch_vit.model import VisionTransformer

__all__ = [
    "Cait",
    "ConversionError",
    "VisionTransformer",
    "from_checkpoint",
    "from_reference",
    "mapping_table",
    "model_for",
    "to_reference",
]
