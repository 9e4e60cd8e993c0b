"""What every implementation hands the timer: a forward pass and, unless inference-only, a full
training step, each a no-argument callable that returns only once the work is done."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

import vitspec
from vitspec.app.datasets import STATS
from vitspec.app.training.backend import normalization_table
from vitspec.config import ViTConfig
from vitspec.recipe import Recipe

LEARNING_RATE = Recipe().base_lr  # every implementation's AdamW runs at the recipe's lr


@dataclasses.dataclass
class Runner:
    forward: Callable[[], object]
    train_step: Callable[[], object] | None  # None: inference only


def random_batch(cfg: ViTConfig, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images (the pipeline's form) and int64 labels (the pipeline's dtypes)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, *cfg.image_size, cfg.in_channels), dtype=np.uint8)
    return images, rng.integers(0, cfg.num_classes, batch).astype(np.int64)


def float_batch(images: np.ndarray) -> np.ndarray:
    """Peers get float32 images already scaled: the normalization ours does on device is left out."""
    return (images.astype(np.float32) / 255.0 - 0.5) / 0.25


def make_backend(backend_class, cfg: ViTConfig, precision: str = "fp32", **placement):
    """Ours: the training Backend itself (uint8 in, on-device normalization, the recipe's clipped AdamW);
    placement: the backend's own keywords (the PyTorch backend's device)."""
    table = normalization_table(STATS["cifar10"])
    return backend_class(
        cfg, vitspec.init_params(cfg, seed=0), Recipe(), table, precision, seed=0, **placement
    )


def backend_runner(backend_class, cfg: ViTConfig, batch: int) -> Runner:
    backend = make_backend(backend_class, cfg)
    images, labels = random_batch(cfg, batch)
    return Runner(
        forward=lambda: backend.eval_logits(images),
        train_step=lambda: float(backend.train_step(images, labels, LEARNING_RATE)[0]),
    )


def sgemm_burst(framework: str, size: int, count: int = 2) -> Callable[[], float]:
    """A short fp32 matmul burst on the framework's own thread pool (torch's intra-op pool, XLA's
    Eigen pool, NumPy's BLAS), for bench.timing to run between the implementations it times: returns
    the GFLOP/s of the fastest of `count` size x size matmuls."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    if framework == "torch":
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)

        def matmul():
            return torch.mm(ta, tb)

    elif framework == "flax":
        import jax
        import jax.numpy as jnp

        ja, jb, dot = jnp.asarray(a), jnp.asarray(b), jax.jit(jnp.dot)

        def matmul():
            return jax.block_until_ready(dot(ja, jb))

    elif framework == "numpy":

        def matmul():
            return a @ b

    else:
        raise ValueError(f"no sgemm burst for {framework!r}")

    def burst() -> float:
        fastest = float("inf")
        for _ in range(count):
            start = time.perf_counter()
            matmul()
            fastest = min(fastest, time.perf_counter() - start)
        return 2 * size**3 / fastest / 1e9

    return burst
