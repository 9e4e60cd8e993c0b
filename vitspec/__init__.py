"""vitspec: a Vision Transformer defined once, in NumPy, as the reference for every backend.

The package's layers, each importing only those before it (tests/test_layers.py checks):
1. the spec, this folder: config, params, reference, grad, posemb, recipe, gradcheck;
2. files and formats, `vitspec/formats/`: checkpoints and the ecosystems' layouts;
3. the implementations, `backends/` (outside this package);
4. the applications, `vitspec/app/`: training, evaluation, conversion, datasets and pipeline, the CLI.
This module exports layers 1-2; `convert` (an application: its check runs a backend) is imported
when first used.
"""

from vitspec import formats
from vitspec.config import ViTConfig
from vitspec.formats import load_any
from vitspec.formats.checkpoint import CheckpointError, load, save
from vitspec.grad import loss_and_grad, vjp
from vitspec.params import ParamTreeError, init_params, num_params, param_shapes, validate_params
from vitspec.reference import cross_entropy, forward
from vitspec.variants import CAIT_VARIANTS, PRESETS, VIT_SIZES, variant, variant_names

__all__ = [
    "CheckpointError",
    "CAIT_VARIANTS",
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


def __getattr__(name: str):
    if name == "convert":
        from vitspec.app.convert import convert

        return convert
    raise AttributeError(f"module 'vitspec' has no attribute {name!r}")
