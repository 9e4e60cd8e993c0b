"""The Flax implementations on a GPU, in bfloat16 with float32 parameters (the training backend's
precision there): ours with `jax.nn.dot_product_attention` left to its default implementation and
held to cuDNN's fused kernel, and the stock flax.linen ViT (its einsum + softmax attention). A forward
returns the logits on the host, as an evaluation does; a training step returns its loss without
waiting for it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from backends.flax_vit.train import DTYPES, FlaxBackend
from bench.accelerator import DeviceRunner, Placement
from bench.flax_impls import stock_steps
from bench.runners import LEARNING_RATE, make_backend, random_batch
from vitspec.config import ViTConfig

EXPLICIT = "explicit: einsum + softmax"
CUDNN_CALL = "__cudnn$fmha"  # the custom call of cuDNN's fused attention in compiled HLO


class AttentionChoice:
    """Holds `jax.nn.dot_product_attention` to one implementation (None: jax's default) while our
    module is traced, and records the shapes each mode called it with: the backend calls the
    library function by name, and this benchmark must not edit the backend to choose its kernel."""

    def __init__(self, implementation: str | None):
        self.implementation = implementation
        self.calls: dict[str, set[tuple]] = {"forward": set(), "train": set()}

    @contextlib.contextmanager
    def held(self, mode: str) -> Iterator[None]:
        library = jax.nn.dot_product_attention

        def chosen(query, key, value, *args, **kwargs):
            self.calls[mode].add((query.shape, key.shape, jnp.dtype(query.dtype).name))
            return library(query, key, value, *args, implementation=self.implementation, **kwargs)

        jax.nn.dot_product_attention = chosen
        try:
            yield
        finally:
            jax.nn.dot_product_attention = library

    def kernels(self) -> dict[str, str]:
        """Per mode: what XLA compiles the calls it saw to (cuDNN's fused kernel or its own fusions),
        or EXPLICIT where the module took its explicit path (CPU training, probabilities wanted)."""
        found = {}
        for mode, calls in self.calls.items():
            kinds = {compiled_attention(*call, self.implementation) for call in calls}
            found[mode] = ", ".join(sorted(kinds)) or EXPLICIT
        return found


def compiled_attention(query_shape, key_shape, dtype: str, implementation: str | None) -> str:
    """'cudnn' if XLA compiles dot_product_attention on these shapes to cuDNN's fused kernel, else 'xla'."""
    query, key = (jax.ShapeDtypeStruct(shape, dtype) for shape in (query_shape, key_shape))
    attend = jax.jit(partial(jax.nn.dot_product_attention, implementation=implementation))
    compiled = attend.lower(query, key, key).compile().as_text()
    return "cudnn" if CUDNN_CALL in compiled else "xla"


def ours(cfg: ViTConfig, batch: int, placement: Placement, implementation: str | None = None) -> DeviceRunner:
    backend = make_backend(FlaxBackend, cfg, placement.precision)
    images, labels = random_batch(cfg, batch)
    choice = AttentionChoice(implementation)

    def forward():
        with choice.held("forward"):
            return backend.eval_logits(images)

    def train_step():
        with choice.held("train"):
            return backend.train_step(images, labels, LEARNING_RATE)[0]

    return DeviceRunner(forward, train_step, attention=choice.kernels)


def stock(cfg: ViTConfig, batch: int, placement: Placement) -> DeviceRunner:
    forward, train_step = stock_steps(cfg, batch, dtype=DTYPES[placement.precision][0])
    return DeviceRunner(
        forward=lambda: np.asarray(forward()),
        train_step=train_step,
        attention=lambda: {"forward": EXPLICIT, "train": EXPLICIT},
    )


IMPLEMENTATIONS: dict[tuple[str, str], Callable[..., DeviceRunner]] = {
    ("ours", "dot_product_attention default"): ours,
    ("ours", "dot_product_attention cudnn"): partial(ours, implementation="cudnn"),
    ("flax-stock", "flax.linen attention"): stock,
}
