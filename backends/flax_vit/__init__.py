"""JAX/Flax backend: vitspec's ViT (and CaiT) as flax.linen modules with big_vision's parameter tree."""

from backends.flax_vit.cait import CaiT, module_for
from backends.flax_vit.checkpoint import from_checkpoint
from backends.flax_vit.convert import from_reference, mapping, to_reference
from backends.flax_vit.loss import cross_entropy, make_loss_and_grad
from backends.flax_vit.model import VisionTransformer

__all__ = [
    "CaiT",
    "VisionTransformer",
    "cross_entropy",
    "from_checkpoint",
    "from_reference",
    "make_loss_and_grad",
    "mapping",
    "module_for",
    "to_reference",
]
