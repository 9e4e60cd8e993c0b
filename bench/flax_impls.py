"""The Flax implementations: ours (backends.flax_vit's jitted, donated training step) and the
stock-layer flax.linen ViT trained with optax.adamw."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import optax

from backends.flax_vit.train import FlaxBackend
from bench.peers.flax_stock import StockViT
from bench.runners import LEARNING_RATE, Runner, backend_runner, float_batch, random_batch
from vitspec.config import ViTConfig


def ours(cfg: ViTConfig, batch: int) -> Runner:
    return backend_runner(FlaxBackend, cfg, batch)


def stock(cfg: ViTConfig, batch: int) -> Runner:
    forward, train_step = stock_steps(cfg, batch)
    return Runner(forward=lambda: jax.block_until_ready(forward()), train_step=lambda: float(train_step()))


def stock_steps(
    cfg: ViTConfig, batch: int, dtype=None
) -> tuple[Callable[[], jax.Array], Callable[[], jax.Array]]:
    """The stock ViT's jitted forward (-> logits) and donated training step (-> loss) on one batch, each
    returning as soon as its work is dispatched; dtype: the computation's (None: float32)."""
    module = StockViT(config=cfg, dtype=dtype)
    images, labels = random_batch(cfg, batch)
    x, y = jnp.asarray(float_batch(images)), jnp.asarray(labels)
    optimizer = optax.adamw(LEARNING_RATE, weight_decay=0.05)
    state = {"params": module.init(jax.random.key(0), x[:1])["params"]}
    state["opt"] = optimizer.init(state["params"])
    forward = jax.jit(lambda params, images: module.apply({"params": params}, images))
    step = jax.jit(partial(_stock_train_step, module, optimizer), donate_argnums=(0, 1))

    def train_step():
        state["params"], state["opt"], loss = step(state["params"], state["opt"], x, y)
        return loss

    return (lambda: forward(state["params"], x)), train_step


def _stock_train_step(module, optimizer, params, opt_state, images, labels):
    def loss_fn(p):
        logits = module.apply({"params": p}, images).astype(jnp.float32)  # bf16: the loss in float32
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), 0.1)
        return optax.softmax_cross_entropy(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


IMPLEMENTATIONS = {"ours": ours, "flax-stock": stock}
