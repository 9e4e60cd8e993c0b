"""What a framework provides to training: the `Backend` protocol, and the two backends by name.

A backend (PyTorch or Flax) implements one optimizer step on a uint8 batch, logits for
evaluation, and its state as NumPy trees under reference names; everything that decides the
trajectory (batches, learning rate of every step, what a checkpoint holds) is the library's.
A backend's module also says where it computes (`topology()`: its processes and devices), which
data parallelism needs: each process is fed its rows of every global batch.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from vitspec.app import datasets
from vitspec.config import ViTConfig
from vitspec.recipe import MixedLabels, Recipe

BACKENDS = ("torch", "flax")


class Backend(Protocol):
    """One framework's side of training. Images are uint8 NHWC exactly as the pipeline yields
    them; the backend normalizes them on its device by looking them up in `normalization_table`."""

    def train_step(
        self, images: np.ndarray, labels: np.ndarray, lr: float, mix: MixedLabels | None = None
    ) -> tuple[Any, Any]:
        """One recipe update at learning rate `lr` on this process's rows of the global batch (all of
        it in one process): (mean loss, number of correct top-1 predictions) over the global batch,
        each anything `float()` accepts (device scalars are read lazily). With `mix` (Mixup/CutMix,
        vitspec.app.mixing) the loss is mix.weight * CE(labels) + (1 - mix.weight) *
        CE(mix.partner_labels), each label-smoothed; top-1 counts `labels`."""

    def eval_logits(self, images: np.ndarray) -> np.ndarray:
        """Eval-mode logits [N, K] as float32 NumPy; every process passes the same images and gets
        all the logits (the work is split over the devices)."""

    def reference_params(self) -> dict[str, np.ndarray]:
        """The parameters as a reference tree (vitspec names and layouts)."""

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """'step' and the AdamW moments as 'mu/<reference name>', 'nu/<reference name>'."""

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what `optimizer_state` returned."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where a run computes: this process among the run's processes, and all their devices. Every
    process runs the same loop on the same numbers; process 0 alone writes files and prints."""

    process_index: int = 0
    process_count: int = 1
    device_count: int = 1  # over all processes: the global batch is split over them
    barrier: Callable[[], None] = lambda: None
    leave: Callable[[], None] = lambda: None  # after the run's last collective: the processes part

    @property
    def writer(self) -> bool:
        return self.process_index == 0


def topology(name: str) -> Topology:
    """The processes and devices backend `name` trains on (joining the other processes, if launched so)."""
    return Topology(*backend_module(name).topology())


# The backends: the module of each framework's training step and its Backend class, which is
# created as Class(cfg, reference params, recipe, normalization table [256, C], precision, seed).
BACKEND_CLASSES = {
    "torch": ("backends.torch_vit.train", "TorchBackend"),
    "flax": ("backends.flax_vit.train", "FlaxBackend"),
}


def backend_module(name: str):
    """`backends.<name>_vit.train`, imported when asked for (each needs its framework installed)."""
    if name not in BACKEND_CLASSES:
        raise ValueError(f"backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKEND_CLASSES[name][0])


def create_backend(
    name: str,
    cfg: ViTConfig,
    params: dict,
    recipe: Recipe,
    normalization: np.ndarray,
    precision: str,
    seed: int,
) -> Backend:
    """Backend `name` ('torch' or 'flax') at `params`."""
    cls = getattr(backend_module(name), BACKEND_CLASSES[name][1])
    return cls(cfg, params, recipe, normalization, precision, seed)


def default_precision(name: str) -> str:
    """bf16 where the backend's framework sees an accelerator, else fp32."""
    return backend_module(name).default_precision()


def normalization_table(stats: datasets.ChannelStats) -> np.ndarray:
    """float32 [256, C]: `datasets.normalize` of every uint8 value in every channel.

    Backends normalize on the device by looking pixels up here (table[pixel, channel]) rather than
    redoing the arithmetic: XLA's CPU float32 division is not correctly rounded (measured up to
    2.4e-7 off NumPy's), and a lookup is the reference's numbers by construction.
    """
    levels = np.arange(256, dtype=np.uint8)[:, None, None, None]
    channels = np.broadcast_to(levels, (256, 1, 1, len(stats.mean)))
    return datasets.normalize(np.ascontiguousarray(channels), stats.mean, stats.std).reshape(256, -1)
