"""vitspec: a Vision Transformer defined once, in NumPy, as the reference for every backend."""

from vitspec import formats
from vitspec.checkpoint import CheckpointError, load, save
from vitspec.config import PRESETS, VIT_SIZES, ViTConfig, variant, variant_names
from vitspec.conversion import convert
from vitspec.formats import load_any
from vitspec.grad import loss_and_grad, vjp
from vitspec.params import ParamTreeError, init_params, num_params, param_shapes, validate_params
from vitspec.reference import cross_entropy, forward

__all__ = [
    "CheckpointError",
    "PRESETS",
    "ParamTreeError",
    "VIT_SIZES",
    "ViTConfig",
    "convert",
    "cross_entropy",
    "formats",
    "forward",
    "init_params",
    "load",
    "load_any",
    "loss_and_grad",
    "num_params",
    "param_shapes",
    "save",
    "validate_params",
    "variant",
    "variant_names",
    "vjp",
]
