"""Training parity: the same 20 steps of the recipe in NumPy, PyTorch and Flax, in float64.

Same reference init, same uint8 batches (from vitspec.app.pipeline), no dropout; every part of the
recipe is exercised: linear warmup then cosine decay, clipping that clips on some steps and not
on others, weight decay on kernels only, label smoothing. The reference trajectory is a NumPy loop
of `vitspec.loss_and_grad` and `recipe.adamw_step` on `datasets.normalize`d batches; each
backend must follow it (per-step losses to 1e-9 relative, final parameters to 1e-8 of each
tensor's scale), so they follow each other.
"""

from __future__ import annotations

import functools
from unittest import mock

import jax
import numpy as np
import pytest
import torch

import vitspec
from backends.flax_vit import convert as flax_convert
from backends.flax_vit import train as flax_train
from backends.flax_vit.train import FlaxBackend
from backends.torch_vit import convert as torch_convert
from backends.torch_vit import train as torch_train
from backends.torch_vit.train import TorchBackend
from parity_tests.tolerances import tree_rel_errs
from vitspec.app import datasets, pipeline
from vitspec.app.training import normalization_table
from vitspec.recipe import AdamState, Recipe, adamw_step, clip_scale, global_norm, learning_rate

STEPS = 20
LOSS_REL = 1e-9
PARAM_REL = 1e-8
CFG = vitspec.ViTConfig(
    image_size=8, patch_size=4, in_channels=3, width=16, depth=2, num_heads=2, mlp_dim=32, num_classes=5
)
STATS = datasets.ChannelStats(mean=(0.5, 0.45, 0.4), std=(0.25, 0.24, 0.26))
# Clip norm between the step's gradient norms, so some steps clip and some do not (checked below).
RECIPE = Recipe(
    base_lr=3e-3, weight_decay=0.05, warmup_steps=5, total_steps=STEPS, label_smoothing=0.1, clip_norm=1.0
)
SEED = 3


@functools.cache
def batches() -> list[pipeline.TrainBatch]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, CFG.num_classes, size=64)
    stream = pipeline.train_batches(
        images,
        labels,
        8,
        pipeline.LoaderState(seed=SEED),
        pipeline.Augmentation(crop_padding=1, horizontal_flip=True),
    )
    return [next(stream) for _ in range(STEPS)]


@functools.cache
def reference_trajectory() -> tuple[list[float], list[float], dict[str, np.ndarray]]:
    """(losses, gradient norms, final parameters) of the NumPy recipe in float64."""
    params = vitspec.init_params(CFG, SEED, dtype=np.float64)
    state = AdamState.zeros_like(params)
    losses, norms = [], []
    for batch in batches():
        images = datasets.normalize(batch.images, STATS.mean, STATS.std).astype(np.float64)
        loss, grads = vitspec.loss_and_grad(CFG, params, images, batch.labels, RECIPE.label_smoothing)
        grads.pop("images")
        losses.append(float(loss))
        norms.append(global_norm(grads))
        params, state = adamw_step(params, grads, state, RECIPE)
    return losses, norms, params


def backend_trajectory(backend) -> tuple[list[float], dict[str, np.ndarray]]:
    losses = []
    for step, batch in enumerate(batches()):
        loss, _ = backend.train_step(batch.images, batch.labels, learning_rate(step, RECIPE))
        losses.append(float(loss))
    return losses, backend.reference_params()


@functools.cache
def torch_trajectory():
    params = vitspec.init_params(CFG, SEED, dtype=np.float64)
    return backend_trajectory(
        TorchBackend(CFG, params, RECIPE, normalization_table(STATS), "fp64", SEED, device="cpu")
    )


@functools.cache
def flax_trajectory():
    params = vitspec.init_params(CFG, SEED, dtype=np.float64)
    with jax.enable_x64(True):
        return backend_trajectory(FlaxBackend(CFG, params, RECIPE, normalization_table(STATS), "fp64", SEED))


TRAJECTORIES = {"torch": torch_trajectory, "flax": flax_trajectory}


def max_loss_rel(losses, ref_losses) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))


def max_param_rel(params, ref_params) -> float:
    # The key biases get exactly-zero gradients (SPEC.md section 5): they start at 0 and move only by
    # rounding noise (~1e-13), so, like exact-zero gradients, they are measured against the tree's scale.
    return max(tree_rel_errs(params, ref_params, kind="grad").values())


def test_the_recipe_is_fully_exercised():
    _, norms, _ = reference_trajectory()
    clipped = sum(clip_scale(n, RECIPE.clip_norm) < 1 for n in norms)
    assert 0 < clipped < STEPS, f"clip_norm {RECIPE.clip_norm} must clip some steps, not all: norms {norms}"
    lrs = [learning_rate(s, RECIPE) for s in range(STEPS)]
    assert lrs[RECIPE.warmup_steps - 1] == RECIPE.base_lr and lrs[0] < lrs[1] and lrs[-1] < lrs[-2]
    params = vitspec.init_params(CFG, SEED)
    assert any(vitspec.recipe.decays(k) for k in params) and not all(vitspec.recipe.decays(k) for k in params)
    assert RECIPE.label_smoothing > 0


@pytest.mark.parametrize("backend", sorted(TRAJECTORIES))
def test_backend_follows_the_reference_trajectory(backend):
    ref_losses, _, ref_params = reference_trajectory()
    losses, params = TRAJECTORIES[backend]()
    assert max_loss_rel(losses, ref_losses) <= LOSS_REL
    assert max_param_rel(params, ref_params) <= PARAM_REL
    assert ref_losses[-1] < ref_losses[0]  # it trained


def test_torch_and_flax_follow_each_other():
    torch_losses, torch_params = torch_trajectory()
    flax_losses, flax_params = flax_trajectory()
    assert max_loss_rel(torch_losses, flax_losses) <= LOSS_REL
    assert max_param_rel(torch_params, flax_params) <= PARAM_REL


def test_backends_decay_exactly_the_reference_names_that_decay():
    """Each backend's mask, mapped back through its converter, is `recipe.decays` on every knob's
    parameters."""
    cfg = CFG.replace(
        pool="map", class_token=True, num_registers=2, qk_norm=True, layer_scale=0.1, representation_size=8
    )
    params = vitspec.init_params(cfg, SEED)
    expected = {k: np.full(v.shape, float(vitspec.recipe.decays(k))) for k, v in params.items()}
    torch_mask = {
        k: torch.full(shape, float(flag))
        for (k, flag), shape in zip(
            torch_train.decay_mask(cfg).items(), torch_convert.timm_shapes(cfg).values(), strict=True
        )
    }
    flax_mask = jax.tree.map(
        lambda flag, p: np.full(np.shape(p), float(flag)),
        flax_train.decay_mask(cfg),
        flax_convert.from_reference(params, cfg)["params"],
    )
    for mapped in (torch_convert.to_reference(torch_mask, cfg), flax_convert.to_reference(flax_mask, cfg)):
        assert mapped.keys() == expected.keys()
        for name, flags in expected.items():
            np.testing.assert_array_equal(mapped[name], flags, err_msg=name)


# CaiT (talking heads, two class blocks, LayerScale) trained with every rate on and a constant
# stochastic-depth schedule, so the masks matter. With the rates there is no reference trajectory
# (the reference is the eval-mode map), and each backend draws its masks from its own RNG, so both
# take them from one source (`SharedMasks`): torch and flax must then follow each other to the
# bounds above. (Without rates, CaiT's float64 gradients are the reference's: tests/test_*_cait.py.)
CAIT_CFG = CFG.replace(
    talking_heads=True,
    class_attention_depth=2,
    class_attention_mlp_dim=24,
    posemb_on_cls=False,
    layer_scale=0.1,
    drop_path_schedule="constant",
)
CAIT_RATES = dict(dropout=0.1, attention_dropout=0.1, stochastic_depth=0.25)


class SharedMasks:
    """Dropout and stochastic-depth keep-masks as a function of (step, site): the site is the order
    in which a forward pass draws (both backends draw in timm's order: tokens, then per block the
    attention weights, the projection, the attention branch's drop-path, the MLP's hidden units,
    fc2's output, the MLP branch's drop-path). Each backend is patched to draw from here; `drawn`
    records (step, site, shape, keep probability) per backend, so the two can be checked to draw alike."""

    def __init__(self):
        self.drawn: dict[str, list[tuple]] = {"torch": [], "flax": []}
        self.site = 0

    @staticmethod
    def mask(step: int, site: int, shape: tuple[int, ...], keep: float) -> np.ndarray:
        return np.random.default_rng([SEED, step, site]).random(shape) < keep

    def torch_mask(self, step: int, shape, keep: float) -> torch.Tensor:
        site, self.site = self.site, self.site + 1
        self.drawn["torch"].append((step, site, tuple(shape), keep))
        return torch.from_numpy(self.mask(step, site, tuple(shape), keep))

    def flax_mask(self, step, shape, keep: float):
        """At trace time: a site number, and a host callback that draws at run time for the step."""
        site, self.site = self.site, self.site + 1
        shape = tuple(shape)

        def draw(step_value):
            self.drawn["flax"].append((int(step_value), site, shape, keep))
            return self.mask(int(step_value), site, shape, keep)

        return jax.pure_callback(draw, jax.ShapeDtypeStruct(shape, np.bool_), step)


def torch_shared_trajectory(cfg, masks: SharedMasks):
    """The torch backend's 20 steps with F.dropout and DropPath drawing from `masks`."""
    from backends.torch_vit import model as torch_model

    step = 0

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return x
        return torch.where(masks.torch_mask(step, x.shape, 1 - p), x / (1 - p), torch.zeros_like(x))

    def drop_path(self, x):
        if not self.training or self.rate == 0.0:
            return x
        keep = masks.torch_mask(step, (x.shape[0],) + (1,) * (x.ndim - 1), 1 - self.rate)
        return torch.where(keep, x / (1 - self.rate), torch.zeros_like(x))

    params = vitspec.init_params(cfg, SEED, dtype=np.float64)
    backend = TorchBackend(cfg, params, RECIPE, normalization_table(STATS), "fp64", SEED, device="cpu")
    losses = []
    with (
        mock.patch.object(torch.nn.functional, "dropout", dropout),
        mock.patch.object(torch_model.DropPath, "forward", drop_path),
    ):
        for step, batch in enumerate(batches()):
            masks.site = 0
            loss, _ = backend.train_step(batch.images, batch.labels, learning_rate(step, RECIPE))
            losses.append(float(loss))
    return losses, backend.reference_params()


def flax_shared_trajectory(cfg, masks: SharedMasks):
    """The flax backend's 20 steps (one compile) with flax's Dropout drawing from `masks`: the step
    reaches the host callback through the step's dropout key, `fold_in(key(seed), step)`."""
    import flax.linen.stochastic as stochastic

    key_steps = {
        jax.random.key_data(jax.random.fold_in(jax.random.key(SEED), s)).tobytes(): s for s in range(STEPS)
    }
    traced_step = []

    def bernoulli(rng, p, shape):
        return masks.flax_mask(traced_step[-1], shape, float(p))

    original = flax_train.train_step

    def train_step(module, recipe, decay, params, mu, nu, images, labels, table, hyper, dropout_key):
        def step_of(data):
            return np.int32(key_steps[np.asarray(data).tobytes()])

        data = jax.random.key_data(dropout_key)
        traced_step.append(jax.pure_callback(step_of, jax.ShapeDtypeStruct((), np.int32), data))
        masks.site = 0
        return original(module, recipe, decay, params, mu, nu, images, labels, table, hyper, dropout_key)

    fake_random = mock.Mock(wraps=stochastic.random, bernoulli=bernoulli)
    params = vitspec.init_params(cfg, SEED, dtype=np.float64)
    with (
        jax.enable_x64(True),
        mock.patch.object(flax_train, "train_step", train_step),
        mock.patch.object(stochastic, "random", fake_random),
    ):
        return backend_trajectory(FlaxBackend(cfg, params, RECIPE, normalization_table(STATS), "fp64", SEED))


@functools.cache
def cait_reference_trajectory():
    params = vitspec.init_params(CAIT_CFG, SEED, dtype=np.float64)
    state = AdamState.zeros_like(params)
    losses = []
    for batch in batches():
        images = datasets.normalize(batch.images, STATS.mean, STATS.std).astype(np.float64)
        loss, grads = vitspec.loss_and_grad(CAIT_CFG, params, images, batch.labels, RECIPE.label_smoothing)
        grads.pop("images")
        losses.append(float(loss))
        params, state = adamw_step(params, grads, state, RECIPE)
    return losses, params


@functools.cache
def cait_shared_trajectories():
    masks = SharedMasks()
    cfg = CAIT_CFG.replace(**CAIT_RATES)
    return torch_shared_trajectory(cfg, masks), flax_shared_trajectory(cfg, masks), masks


def test_cait_with_shared_masks_torch_and_flax_follow_each_other():
    (torch_losses, torch_params), (flax_losses, flax_params), masks = cait_shared_trajectories()
    # The same sites, shapes and rates, drawn in the same order, at every step.
    assert masks.drawn["torch"] == sorted(masks.drawn["flax"])
    sites = len(masks.drawn["torch"]) // STEPS
    assert sites == 1 + CAIT_CFG.depth * 6, masks.drawn["torch"][:sites]  # tokens; 6 per block
    assert max_loss_rel(torch_losses, flax_losses) <= LOSS_REL
    assert max_param_rel(torch_params, flax_params) <= PARAM_REL
    # The masks matter: the trajectory is not the eval-mode one.
    ref_losses, _ = cait_reference_trajectory()
    assert max_loss_rel(torch_losses, ref_losses) > 1e-3
