"""Mixup and CutMix: the weight and box math, the mixed uint8 pixels and labels, the stream a pure
function of (seed, epoch, step) split over shards like any batch, and the backends' loss the weighted sum."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import vitspec
from vitspec import reference
from vitspec.app import datasets, pipeline
from vitspec.app.augmentation import Augmentation
from vitspec.app.mixing import Mixing, cutmix_box, mix_batch
from vitspec.app.pipeline import LoaderState
from vitspec.app.randaugment import RandAugment
from vitspec.app.training import normalization_table
from vitspec.gradcheck import random_params
from vitspec.recipe import MixedLabels, Recipe

EVERYTHING = Augmentation(crop_padding=2, horizontal_flip=True, randaugment=RandAugment(2, 9, 0.5))
BOTH = Mixing(mixup_alpha=0.8, cutmix_alpha=1.0)


def _constant_batch(values, size: int = 10) -> np.ndarray:
    return np.broadcast_to(
        np.asarray(values, np.uint8)[:, None, None, None], (len(values), size, size, 3)
    ).copy()


def test_cutmix_box_sides_follow_the_weight_and_clip_to_the_image():
    # weight 0.75: sides sqrt(0.25) = 1/2 of 20 -> 10 px, so 5 each way from the center.
    class Center:
        def __init__(self, *values):
            self.values = iter(values)

        def integers(self, low, high):
            value = next(self.values)
            assert low <= value < high
            return value

    assert cutmix_box(0.75, 20, 20, Center(10, 10)) == (5, 15, 5, 15)
    assert cutmix_box(0.75, 20, 20, Center(2, 18)) == (0, 7, 13, 20)  # clipped at two sides
    assert cutmix_box(0.75, 20, 30, Center(10, 15)) == (5, 15, 8, 22)  # 15 px wide: 7 each way
    assert cutmix_box(1.0, 20, 20, Center(10, 10)) == (10, 10, 10, 10)  # empty


def test_mixup_blends_with_the_reversed_batch_and_rounds_half_to_even():
    images, labels = _constant_batch([0, 100, 255]), np.array([4, 1, 7])
    mixed, mix = mix_batch(images, labels, np.random.default_rng(3), Mixing(mixup_alpha=0.4))
    weight = float(np.random.default_rng(3).beta(0.4, 0.4))  # the one draw: no switch, no box
    assert mix.weight == weight
    np.testing.assert_array_equal(mix.partner_labels, [7, 1, 4])
    expected = np.rint(
        np.float32(weight) * np.float32([0, 100, 255]) + np.float32(1 - weight) * np.float32([255, 100, 0])
    )
    np.testing.assert_array_equal(mixed[:, 0, 0, 0], expected)
    assert mixed.dtype == np.uint8 and (mixed == mixed[:, :1, :1, :1]).all()


def test_cutmix_pastes_the_partners_box_and_weighs_the_area_it_covers():
    images, labels = _constant_batch([10, 20, 30, 40]), np.array([0, 1, 2, 3])
    for seed in range(30):
        mixed, mix = mix_batch(images, labels, np.random.default_rng(seed), Mixing(cutmix_alpha=1.0))
        replaced = mixed[:, :, :, 0] != images[:, :, :, 0]
        area = replaced[0].sum()
        rows, cols = np.nonzero(replaced[0])
        if area:  # a rectangle
            assert area == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert mix.weight == 1 - area / 100
        np.testing.assert_array_equal(mixed[0][replaced[0]], 40)  # row 0's partner is row 3
        np.testing.assert_array_equal(mixed[1][replaced[1]], 30)
        assert (replaced == replaced[0]).all()  # one box for the batch


def test_with_both_on_each_batch_is_one_or_the_other():
    images, labels = _constant_batch([0, 255]), np.array([0, 1])
    kinds = set()
    for seed in range(40):
        mixed, mix = mix_batch(images, labels, np.random.default_rng(seed), BOTH)
        values = set(np.unique(mixed[0]))
        kinds.add("cutmix" if values <= {0, 255} else "mixup")
        assert 0 <= mix.weight <= 1
    assert kinds == {"cutmix", "mixup"}


@pytest.mark.parametrize(
    "fields, message", [({"mixup_alpha": -1}, "mixup_alpha"), ({"switch_prob": 2}, "switch_prob")]
)
def test_bad_settings_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        Mixing(**fields)


def _stream(images, labels, state, shard=(0, 1)):
    return pipeline.train_batches(images, labels, 8, state, EVERYTHING, shard, mixing=BOTH)


def _dataset():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(40, 12, 12, 3), dtype=np.uint8), rng.integers(0, 10, size=40)


def test_the_mixed_stream_is_a_pure_function_of_seed_epoch_and_step():
    images, labels = _dataset()
    first = list(itertools.islice(_stream(images, labels, LoaderState(5)), 12))
    again = list(itertools.islice(_stream(images, labels, LoaderState(5)), 12))
    resumed = list(itertools.islice(_stream(images, labels, first[6].next_state), 5))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.mix.partner_labels, b.mix.partner_labels)
        assert a.mix.weight == b.mix.weight
    for a, b in zip(first[7:], resumed, strict=True):
        np.testing.assert_array_equal(a.images, b.images)
        assert a.mix.weight == b.mix.weight
    other = next(_stream(images, labels, LoaderState(6)))
    assert not np.array_equal(other.images, first[0].images)
    assert len({b.mix.weight for b in first}) == len(first) and all(b.mix.weight < 1 for b in first)


def test_mixing_leaves_the_augmentation_draws_as_they_were():
    images, labels = _dataset()
    plain = next(pipeline.train_batches(images, labels, 8, LoaderState(2), EVERYTHING))
    mixed = next(_stream(images, labels, LoaderState(2)))
    assert plain.mix is None
    np.testing.assert_array_equal(plain.labels, mixed.labels)
    np.testing.assert_array_equal(mixed.mix.partner_labels, plain.labels[::-1])
    redone, _ = mix_batch(
        plain.images, plain.labels, pipeline._generator(2, pipeline._MIXING_STREAM, 0, 0), BOTH
    )
    np.testing.assert_array_equal(redone, mixed.images)


def test_shards_are_the_mixed_global_batchs_rows():
    images, labels = _dataset()
    whole = next(_stream(images, labels, LoaderState(1)))
    shards = [next(_stream(images, labels, LoaderState(1), (i, 4))) for i in range(4)]
    np.testing.assert_array_equal(np.concatenate([s.images for s in shards]), whole.images)
    np.testing.assert_array_equal(
        np.concatenate([s.mix.partner_labels for s in shards]), whole.mix.partner_labels
    )
    assert {s.mix.weight for s in shards} == {whole.mix.weight}


CFG = vitspec.ViTConfig(
    image_size=8, patch_size=4, in_channels=3, width=16, depth=1, num_heads=2, mlp_dim=32, num_classes=5
)


STATS = datasets.ChannelStats(mean=(0.5, 0.45, 0.4), std=(0.25, 0.24, 0.26))


def _backend(name: str, params):
    table = normalization_table(STATS)
    recipe = Recipe(label_smoothing=0.1)
    if name == "torch":
        from backends.torch_vit.train import TorchBackend

        return TorchBackend(CFG, params, recipe, table, "fp64", 0, device="cpu")
    from backends.flax_vit.train import FlaxBackend

    return FlaxBackend(CFG, params, recipe, table, "fp64", 0)


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_the_backends_loss_is_the_weighted_sum_of_the_two_cross_entropies(backend):
    params = random_params(CFG, 0)  # a random head: init's zero head gives every class the same logit
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    labels, partners = np.array([0, 1, 2, 3, 4, 0]), np.array([4, 3, 2, 1, 0, 1])
    normalized = datasets.normalize(images, STATS.mean, STATS.std).astype(
        np.float64
    )  # the backends' float32 table
    logits = vitspec.forward(CFG, params, normalized)
    weight = 0.3
    expected = weight * reference.cross_entropy(logits, labels, 0.1) + (1 - weight) * reference.cross_entropy(
        logits, partners, 0.1
    )
    # The same number as soft targets: weight * smoothed(labels) + (1 - weight) * smoothed(partners).
    soft = weight * reference.smoothed_targets(labels, 5, 0.1, np.float64) + (
        1 - weight
    ) * reference.smoothed_targets(partners, 5, 0.1, np.float64)
    assert -(soft * reference.log_softmax(logits)).sum(-1).mean() == pytest.approx(expected, rel=1e-13)
    loss, correct = _backend(backend, params).train_step(images, labels, 0.0, MixedLabels(partners, weight))
    assert float(loss) == pytest.approx(expected, rel=1e-9)
    assert int(correct) == int((logits.argmax(-1) == labels).sum())  # top-1 against the own labels
    unmixed, _ = _backend(backend, params).train_step(images, labels, 0.0)
    assert float(unmixed) == pytest.approx(reference.cross_entropy(logits, labels, 0.1), rel=1e-9)
    assert not math.isclose(float(unmixed), float(loss), rel_tol=1e-3)
