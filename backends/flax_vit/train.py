"""Train with JAX/Flax: `python -m backends.flax_vit.train --dataset fashion-mnist --model fmnist-tiny`.

The flags, data, schedule and checkpoints are `vitspec.app.training`'s; this module is the Flax
`Backend`: one jitted step (normalize, forward, backward, clip, AdamW) with the parameters and
moments donated, so they are updated in place on the device. The update is the recipe's written
out by hand (vitspec/recipe.py): optax's pieces compute the same expression, but a hand-written
tree keeps the moments in big_vision's layout for the checkpoint converters and the bias
corrections in host float64 like the reference. bf16 runs the module in bfloat16 with float32
parameters, moments and loss.

The training step's loss is `backends.flax_vit.loss.cross_entropy`, the one the parity tests
hold equal to `vitspec.loss_and_grad`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from backends.flax_vit.cait import module_for
from backends.flax_vit.convert import from_reference, mapping, to_reference
from backends.flax_vit.loss import cross_entropy
from backends.flax_vit.model import VisionTransformer
from vitspec.config import ViTConfig
from vitspec.recipe import AdamState, Recipe, clip_scale, decays

# precision -> (computation dtype, parameter dtype)
DTYPES = {
    "fp64": (jnp.float64, jnp.float64),
    "fp32": (jnp.float32, jnp.float32),
    "bf16": (jnp.bfloat16, jnp.float32),
}


def decay_mask(cfg: ViTConfig) -> dict:
    """The big_vision tree of booleans: does the recipe decay this parameter (by its reference name)."""
    flat = {tuple(rule.native.split("/")): decays(rule.reference[0]) for rule in mapping(cfg)}
    return traverse_util.unflatten_dict(flat)


def normalize(images, table, dtype):
    """uint8 NHWC -> `dtype`: datasets.normalize's float32 values (the normalization table), then cast."""
    return table[images, jnp.arange(table.shape[1])].astype(dtype)


def as_tree(reference: Mapping[str, np.ndarray], cfg: ViTConfig, dtype) -> dict:
    """A reference-named tree as the module's big_vision tree of `dtype` device arrays."""
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), from_reference(dict(reference), cfg)["params"])


class FlaxBackend:
    """vitspec.app.training.Backend in JAX/Flax; `precision` 'fp64' (x64 enabled) is for the parity tests."""

    def __init__(
        self,
        cfg: ViTConfig,
        params: Mapping[str, np.ndarray],
        recipe: Recipe,
        normalization: np.ndarray,
        precision: str,
        seed: int,
    ):
        self.cfg, self.recipe = cfg, recipe
        self.dtype, param_dtype = DTYPES[precision]
        self.module = module_for(cfg, dtype=self.dtype, param_dtype=param_dtype)
        self.params = as_tree(params, cfg, param_dtype)
        self.mu = jax.tree.map(jnp.zeros_like, self.params)
        self.nu = jax.tree.map(jnp.zeros_like, self.params)
        self.step = 0
        self.dropout_key = jax.random.key(seed)
        self.table = jnp.asarray(normalization)
        self._train_step = jax.jit(
            partial(train_step, self.module, recipe, decay_mask(cfg)), donate_argnums=(0, 1, 2)
        )
        self._logits = jax.jit(self._eval_logits)

    def train_step(self, images: np.ndarray, labels: np.ndarray, lr: float):
        self.step += 1
        recipe, t = self.recipe, self.step
        hyper = {
            name: jnp.asarray(value, self.params_dtype)
            for name, value in {"lr": lr, "bias1": 1 - recipe.beta1**t, "bias2": 1 - recipe.beta2**t}.items()
        }
        # The dropout key of step t - 1: a function of (seed, step), so resuming needs no RNG state.
        key = jax.random.fold_in(self.dropout_key, t - 1)
        self.params, self.mu, self.nu, loss, correct = self._train_step(
            self.params, self.mu, self.nu, images, labels, self.table, hyper, key
        )
        return loss, correct

    @property
    def params_dtype(self):
        return jax.tree.leaves(self.params)[0].dtype

    def _eval_logits(self, params, images):
        logits = self.module.apply({"params": params}, normalize(images, self.table, self.dtype))
        return logits.astype(jnp.float32)

    def eval_logits(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._logits(self.params, images))

    def reference_params(self) -> dict[str, np.ndarray]:
        return to_reference(jax.device_get(self.params), self.cfg)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        mu, nu = (to_reference(jax.device_get(m), self.cfg) for m in (self.mu, self.nu))
        return AdamState(self.step, mu, nu).to_arrays()

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        adam = AdamState.from_arrays(state)
        self.step = adam.step
        self.mu, self.nu = (as_tree(m, self.cfg, self.params_dtype) for m in (adam.mu, adam.nu))


def train_step(
    module: VisionTransformer,
    recipe: Recipe,
    decay: dict,
    params,
    mu,
    nu,
    images,
    labels,
    table,
    hyper: dict,
    dropout_key,
):
    """One step of the recipe: (params, mu, nu, loss, correct) after vitspec.recipe.adamw_step."""

    def loss_fn(p):
        x = normalize(images, table, module.dtype)
        logits = module.apply({"params": p}, x, train=True, rngs={"dropout": dropout_key})
        return cross_entropy(logits, labels, recipe.label_smoothing), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    scale = clip_scale(norm, recipe.clip_norm, jnp.where)

    def update(p, g, m, v, decayed: bool):
        g = g * scale
        m = recipe.beta1 * m + (1 - recipe.beta1) * g
        v = recipe.beta2 * v + (1 - recipe.beta2) * g * g
        step = (m / hyper["bias1"]) / (jnp.sqrt(v / hyper["bias2"]) + recipe.eps)
        if decayed:
            step = step + recipe.weight_decay * p
        return p - hyper["lr"] * step, m, v

    updated = jax.tree.map(update, params, grads, mu, nu, decay)
    new_params, new_mu, new_nu = (
        jax.tree.map(lambda triple, i=i: triple[i], updated, is_leaf=lambda x: isinstance(x, tuple))
        for i in range(3)
    )
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return new_params, new_mu, new_nu, loss, correct


def default_precision() -> str:
    return "fp32" if jax.default_backend() == "cpu" else "bf16"


if __name__ == "__main__":  # the training command with this backend; the app layer, entered from here
    import sys

    from vitspec.app.cli import run

    sys.exit(run("train", sys.argv[1:], "python -m backends.flax_vit.train", backend="flax"))
