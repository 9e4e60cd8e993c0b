"""Train with JAX/Flax: `python -m backends.flax_vit.train --dataset fashion-mnist --model fmnist-tiny`.

The flags, data, schedule and checkpoints are `vitspec.app.training`'s; this module is the Flax
`Backend`: one jitted step (normalize, forward, backward, clip, AdamW) with the parameters and
moments donated, so they are updated in place on the device. The update is the recipe's written
out by hand (vitspec/recipe.py): optax's pieces compute the same expression, but a hand-written
tree keeps the moments in big_vision's layout for the checkpoint converters and the bias
corrections in host float64 like the reference. bf16 runs the module in bfloat16 with float32
parameters, moments and loss.

The training step's loss is `backends.flax_vit.loss.cross_entropy`, the one the parity tests
hold equal to `vitspec.loss_and_grad`, weighted over a Mixup/CutMix batch's two labels
(`mixed_cross_entropy`; weight 1 and the labels themselves as partners when a batch is not mixed,
so one compiled step serves both). Dropout and stochastic-depth masks come from
`vitspec.masks`' hash of (seed, step, site, global example, element) (backends/flax_vit/masks.py),
the PyTorch backend's masks bit for bit.

Every device of every process trains (backends/flax_vit/sharding.py): the batch is sharded over a
`data` mesh axis, parameters and moments replicated, so the step's gradient is the global batch's
mean; one device or eight, the run is the same up to the order of the gradient's sums.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from backends.flax_vit import sharding
from backends.flax_vit.cait import module_for
from backends.flax_vit.convert import from_reference, mapping, to_reference
from backends.flax_vit.loss import mixed_cross_entropy
from backends.flax_vit.masks import counter_masks
from backends.flax_vit.model import VisionTransformer
from vitspec import masks
from vitspec.config import ViTConfig
from vitspec.recipe import AdamState, MixedLabels, Recipe, clip_scale, decays

# Steps dispatched and unfinished that train_step lets stand before it waits for the oldest. XLA's
# CPU client admits 32 computations per device, and a launch past that waits for a slot on a
# thread of the pool that also runs the devices' computations: queued further ahead, one device's
# part of a step can sit in the step's all-reduce while the other's waits for a thread held by such
# a launch, and XLA aborts the process after 40 s. Seen with 2 devices on 2 cores: a 2-device jit
# with one all-reduce hung in every run dispatched 40 or more steps ahead, never at 31 or fewer
# (tests/test_data_parallel.py holds a training run's case). 4 lose nothing: the main job's model
# ran 1.03x as many images a second as with 31, in each of 3 interleaved rounds.
MAX_STEPS_IN_FLIGHT = 4

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
    """A reference-named tree as the module's big_vision tree of `dtype` host arrays."""
    return jax.tree.map(lambda a: np.asarray(a, dtype), from_reference(dict(reference), cfg)["params"])


class FlaxBackend:
    """vitspec.app.training.Backend in JAX/Flax over every device; `precision` 'fp64' turns on JAX's
    float64 (jax_enable_x64) for the process: the verification mode."""

    def __init__(
        self,
        cfg: ViTConfig,
        params: Mapping[str, np.ndarray],
        recipe: Recipe,
        normalization: np.ndarray,
        precision: str,
        seed: int,
    ):
        if precision == "fp64" and not jax.config.jax_enable_x64:
            jax.config.update("jax_enable_x64", True)
        self.cfg, self.recipe, self.seed = cfg, recipe, seed
        self.dtype, param_dtype = DTYPES[precision]
        self.module = module_for(cfg, dtype=self.dtype, param_dtype=param_dtype)
        self.parallel = sharding.DataParallel()
        tree = as_tree(params, cfg, param_dtype)
        self.params = self.parallel.replicate(tree)
        self.mu, self.nu = (self.parallel.replicate(jax.tree.map(np.zeros_like, tree)) for _ in range(2))
        self.step = 0
        self._in_flight: collections.deque = collections.deque()  # each dispatched step's loss
        self.table = self.parallel.replicate(np.asarray(normalization))
        replicated, batch = self.parallel.replicated, self.parallel.batch
        self._train_step = jax.jit(
            partial(train_step, self.module, recipe, decay_mask(cfg)),
            in_shardings=(replicated,) * 3 + (batch,) * 3 + (replicated,) * 3,
            out_shardings=(replicated,) * 5,
            donate_argnums=(0, 1, 2),
        )
        self._logits = jax.jit(
            self._eval_logits, in_shardings=(replicated, batch, replicated), out_shardings=batch
        )

    def train_step(self, images: np.ndarray, labels: np.ndarray, lr: float, mix: MixedLabels | None = None):
        """One step on this process's rows of the global batch; the loss and count are the global batch's.
        With `mix` (Mixup/CutMix) the loss weighs the two labels; top-1 counts `labels`. Returns once
        the step is dispatched and at most MAX_STEPS_IN_FLIGHT stand unfinished, whether or not the
        caller reads the results."""
        self.step += 1
        recipe, t = self.recipe, self.step
        partner_labels, mix_weight = (labels, 1.0) if mix is None else mix
        hyper = {
            name: np.asarray(value, self.params_dtype)
            for name, value in {
                "lr": lr,
                "bias1": 1 - recipe.beta1**t,
                "bias2": 1 - recipe.beta2**t,
                "mix_weight": mix_weight,
            }.items()
        }
        # The masks of step t - 1: a function of (seed, step), so resuming needs no RNG state.
        hyper, key = self.parallel.replicate((hyper, np.uint32(masks.step_key(self.seed, t - 1))))
        images, labels, partner_labels = (
            self.parallel.global_batch(a) for a in (images, labels, partner_labels)
        )
        self.params, self.mu, self.nu, loss, correct = self._train_step(
            self.params, self.mu, self.nu, images, labels, partner_labels, self.table, hyper, key
        )
        self._in_flight.append(loss)
        if len(self._in_flight) > MAX_STEPS_IN_FLIGHT:
            self._in_flight.popleft().block_until_ready()
        return loss, correct

    @property
    def params_dtype(self):
        return jax.tree.leaves(self.params)[0].dtype

    def _eval_logits(self, params, images, table):
        logits = self.module.apply({"params": params}, normalize(images, table, self.dtype))
        return logits.astype(jnp.float32)

    def eval_logits(self, images: np.ndarray) -> np.ndarray:
        """Logits of the whole batch `images` (every process passes all of it), computed sharded: the
        batch padded to a multiple of the device count, each process feeding its devices' rows."""
        n, processes = len(images), jax.process_count()
        padded = -(-n // self.parallel.devices) * self.parallel.devices
        images = np.concatenate([images, np.repeat(images[-1:], padded - n, axis=0)])
        rows = padded // processes
        local = images[jax.process_index() * rows : (jax.process_index() + 1) * rows]
        logits = self._logits(self.params, self.parallel.global_batch(local), self.table)
        return self.parallel.to_host(logits)[:n]

    def reference_params(self) -> dict[str, np.ndarray]:
        return to_reference(jax.device_get(self.params), self.cfg)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        mu, nu = (to_reference(jax.device_get(m), self.cfg) for m in (self.mu, self.nu))
        return AdamState(self.step, mu, nu).to_arrays()

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        adam = AdamState.from_arrays(state)
        self.step = adam.step
        self.mu, self.nu = (
            self.parallel.replicate(as_tree(m, self.cfg, self.params_dtype)) for m in (adam.mu, adam.nu)
        )


def train_step(
    module: VisionTransformer,
    recipe: Recipe,
    decay: dict,
    params,
    mu,
    nu,
    images,
    labels,
    partner_labels,
    table,
    hyper: dict,
    step_key,
):
    """One step of the recipe: (params, mu, nu, loss, correct) after vitspec.recipe.adamw_step; the
    dropout masks are vitspec.masks' at `step_key` (no PRNG key is given: a draw that escaped them fails)."""

    def loss_fn(p):
        x = normalize(images, table, module.dtype)
        with counter_masks(step_key):
            logits = module.apply({"params": p}, x, train=True)
        loss = mixed_cross_entropy(
            logits, labels, partner_labels, hyper["mix_weight"], recipe.label_smoothing
        )
        return loss, logits

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


def topology() -> tuple[int, int, int, Callable[[], None]]:
    """(process index, process count, device count, barrier), after joining the other processes."""
    sharding.init()
    return jax.process_index(), jax.process_count(), jax.device_count(), sharding.barrier


if __name__ == "__main__":  # the training command with this backend; the app layer, entered from here
    import sys

    from vitspec.app.cli import run

    sys.exit(run("train", sys.argv[1:], "python -m backends.flax_vit.train", backend="flax"))
