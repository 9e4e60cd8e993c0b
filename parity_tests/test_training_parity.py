"""Training parity: the same 20 steps of the recipe in NumPy, PyTorch and Flax, in float64.

Same reference init, same uint8 batches (from vitspec.app.pipeline), no dropout; every part of the
recipe is exercised: linear warmup then cosine decay, clipping that clips on some steps and not
on others, weight decay on kernels only, label smoothing. The reference trajectory is a NumPy loop
of `vitspec.loss_and_grad` and `recipe.adamw_step` on `datasets.normalize`d batches; each
backend must follow it (per-step losses to 1e-9 relative, final parameters to 1e-8 of each
tensor's scale), so they follow each other. The same holds with RandAugment, Mixup and CutMix on
(the pipeline mixes the uint8 batch; the backends weigh the loss over its two labels).
"""

from __future__ import annotations

import functools

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
from vitspec.app.mixing import Mixing
from vitspec.app.randaugment import RandAugment
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


def backend_trajectory(backend, stream=batches) -> tuple[list[float], dict[str, np.ndarray]]:
    losses = []
    for step, batch in enumerate(stream()):
        loss, _ = backend.train_step(batch.images, batch.labels, learning_rate(step, RECIPE), batch.mix)
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
# (the reference is the eval-mode map), but both backends draw their masks from vitspec.masks' counter
# hash of (seed, step, site, example, element), bit for bit alike (tests/test_data_parallel.py), so
# torch and flax must follow each other to the bounds above, unpatched.
CAIT_CFG = CFG.replace(
    talking_heads=True,
    class_attention_depth=2,
    class_attention_mlp_dim=24,
    posemb_on_cls=False,
    layer_scale=0.1,
    drop_path_schedule="constant",
)
CAIT_RATES = dict(dropout=0.1, attention_dropout=0.1, stochastic_depth=0.25)


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


def cait_trajectory(backend: str):
    cfg = CAIT_CFG.replace(**CAIT_RATES)
    params = vitspec.init_params(cfg, SEED, dtype=np.float64)
    table = normalization_table(STATS)
    if backend == "torch":
        return backend_trajectory(TorchBackend(cfg, params, RECIPE, table, "fp64", SEED, device="cpu"))
    with jax.enable_x64(True):
        return backend_trajectory(FlaxBackend(cfg, params, RECIPE, table, "fp64", SEED))


def test_cait_with_every_rate_torch_and_flax_follow_each_other():
    torch_losses, torch_params = cait_trajectory("torch")
    flax_losses, flax_params = cait_trajectory("flax")
    assert max_loss_rel(torch_losses, flax_losses) <= LOSS_REL
    assert max_param_rel(torch_params, flax_params) <= PARAM_REL
    # The masks matter: the trajectory is not the eval-mode one.
    ref_losses, _ = cait_reference_trajectory()
    assert max_loss_rel(torch_losses, ref_losses) > 1e-3


# RandAugment, Mixup and CutMix on, with both kinds of mixing among the 20 batches (checked below).
# The reference takes the mixed batches' gradient as weight * grad(labels) + (1 - weight) *
# grad(partner labels): the gradient of the weighted loss.
MIXED_AUGMENTATION = pipeline.Augmentation(
    crop_padding=1, horizontal_flip=True, randaugment=RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5)
)
MIXING = Mixing(mixup_alpha=0.8, cutmix_alpha=1.0)


@functools.cache
def mixed_batches() -> list[pipeline.TrainBatch]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, CFG.num_classes, size=64)
    state = pipeline.LoaderState(seed=SEED)
    stream = pipeline.train_batches(images, labels, 8, state, MIXED_AUGMENTATION, mixing=MIXING)
    return [next(stream) for _ in range(STEPS)]


@functools.cache
def mixed_reference_trajectory() -> tuple[list[float], dict[str, np.ndarray]]:
    params = vitspec.init_params(CFG, SEED, dtype=np.float64)
    state = AdamState.zeros_like(params)
    losses = []
    for batch in mixed_batches():
        images = datasets.normalize(batch.images, STATS.mean, STATS.std).astype(np.float64)
        weight = batch.mix.weight
        own, own_grads = vitspec.loss_and_grad(CFG, params, images, batch.labels, RECIPE.label_smoothing)
        partner, partner_grads = vitspec.loss_and_grad(
            CFG, params, images, batch.mix.partner_labels, RECIPE.label_smoothing
        )
        grads = {k: weight * own_grads[k] + (1 - weight) * partner_grads[k] for k in params}
        losses.append(weight * float(own) + (1 - weight) * float(partner))
        params, state = adamw_step(params, grads, state, RECIPE)
    return losses, params


@functools.cache
def mixed_trajectory(backend: str):
    params = vitspec.init_params(CFG, SEED, dtype=np.float64)
    table = normalization_table(STATS)
    if backend == "torch":
        return backend_trajectory(
            TorchBackend(CFG, params, RECIPE, table, "fp64", SEED, device="cpu"), mixed_batches
        )
    with jax.enable_x64(True):
        return backend_trajectory(FlaxBackend(CFG, params, RECIPE, table, "fp64", SEED), mixed_batches)


def test_mixed_batches_hold_both_kinds_of_mixing():
    # A CutMix weight is a whole number of 64ths (the box's share of 8x8 pixels); a Mixup weight
    # almost never is.
    weights = [batch.mix.weight for batch in mixed_batches()]
    box_like = [w * 64 == round(w * 64) for w in weights]
    assert any(box_like) and not all(box_like)
    plain = batches()
    assert not np.array_equal(mixed_batches()[0].images, plain[0].images)


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_with_randaugment_mixup_and_cutmix_each_backend_follows_the_reference(backend):
    ref_losses, ref_params = mixed_reference_trajectory()
    losses, params = mixed_trajectory(backend)
    assert max_loss_rel(losses, ref_losses) <= LOSS_REL
    assert max_param_rel(params, ref_params) <= PARAM_REL
    assert max_loss_rel(losses, reference_trajectory()[0]) > 1e-3  # another trajectory than unmixed


def test_with_randaugment_mixup_and_cutmix_torch_and_flax_follow_each_other():
    torch_losses, torch_params = mixed_trajectory("torch")
    flax_losses, flax_params = mixed_trajectory("flax")
    assert max_loss_rel(torch_losses, flax_losses) <= LOSS_REL
    assert max_param_rel(torch_params, flax_params) <= PARAM_REL
