"""A jitted loss-and-gradient step: the part of training that must equal vitspec.loss_and_grad."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from backends.flax_vit.model import VisionTransformer


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Softmax cross-entropy, mean over the batch; targets (1 - eps) * onehot + eps / classes."""
    # At least float32: a bfloat16 log-softmax would lose the loss to rounding.
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    targets = optax.smooth_labels(onehot, label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def mixed_cross_entropy(logits, labels, partner_labels, weight, label_smoothing: float = 0.0):
    """A Mixup/CutMix batch's loss (vitspec.recipe.MixedLabels): weight * CE(labels) + (1 - weight) *
    CE(partner_labels), each label-smoothed; at weight 1 exactly `cross_entropy(logits, labels)`."""
    own = cross_entropy(logits, labels, label_smoothing)
    return weight * own + (1 - weight) * cross_entropy(logits, partner_labels, label_smoothing)


def make_loss_and_grad(
    module: VisionTransformer, *, label_smoothing: float = 0.0, wrt_images: bool = False
) -> Callable:
    """A jitted `step(params, images, labels, dropout_rng=None) -> (loss, grads)`.

    `params` is the tree under variables['params']. With a `dropout_rng` the step runs in train
    mode (dropout, attention dropout, stochastic depth); without, in eval mode. `grads` is the
    parameter tree's gradient, or with `wrt_images` the pair (parameter grads, image grads).
    """

    def loss(params, images, labels, dropout_rng=None):
        train = dropout_rng is not None
        rngs = {"dropout": dropout_rng} if train else {}
        logits = module.apply({"params": params}, images, train=train, rngs=rngs)
        return cross_entropy(logits, labels, label_smoothing)

    argnums = (0, 1) if wrt_images else 0
    return jax.jit(jax.value_and_grad(loss, argnums=argnums))
