"""The batch stream is a pure function of (seed, epoch, step); augmentations stay in bounds and in uint8."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vitspec.app import augmentation as aug
from vitspec.app import pipeline
from vitspec.app.augmentation import Augmentation, RandomResizedCrop
from vitspec.app.pipeline import LoaderState, Prefetcher

CROP_FLIP = Augmentation(crop_padding=4, horizontal_flip=True)
RRC = Augmentation(crop_padding=0, horizontal_flip=True, random_resized_crop=RandomResizedCrop())


def _dataset(n: int = 50, shape: tuple[int, ...] = (8, 8, 3)) -> tuple[np.ndarray, np.ndarray]:
    """Image i is filled with the value i so a batch's labels can be read off its pixels."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, *shape)).copy()
    return images, np.arange(n, dtype=np.int64)


def _take(stream, count: int) -> list:
    return list(itertools.islice(stream, count))


def _assert_same(batches_a, batches_b) -> None:
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.next_state == b.next_state


@pytest.mark.parametrize(
    "augmentation", [pipeline.NO_AUGMENTATION, CROP_FLIP, RRC], ids=["none", "crop", "rrc"]
)
def test_same_seed_same_batches_other_seed_other_batches(augmentation):
    images = np.random.default_rng(0).integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(40)

    def run(seed):
        return _take(pipeline.train_batches(images, labels, 8, LoaderState(seed), augmentation), 12)

    _assert_same(run(5), run(5))
    other = run(6)
    assert any(not np.array_equal(a.images, b.images) for a, b in zip(run(5), other, strict=True))


def test_epoch_is_a_permutation_with_drop_last():
    images, labels = _dataset(50)
    batches = _take(pipeline.train_batches(images, labels, 16, LoaderState(seed=1)), 3)
    seen = np.concatenate([b.labels for b in batches])
    assert len(seen) == 48 == pipeline.steps_per_epoch(50, 16) * 16
    assert len(set(seen.tolist())) == 48
    np.testing.assert_array_equal(seen, pipeline.epoch_order(50, seed=1, epoch=0)[:48])
    for batch in batches:  # images travel with their labels
        np.testing.assert_array_equal(batch.images[:, 0, 0, 0], batch.labels)


def test_epochs_reshuffle_and_state_rolls_over():
    images, labels = _dataset(32)
    batches = _take(pipeline.train_batches(images, labels, 8, LoaderState(seed=1)), 8)
    assert [b.next_state for b in batches[3:5]] == [LoaderState(1, 1, 0), LoaderState(1, 1, 1)]
    first = np.concatenate([b.labels for b in batches[:4]])
    second = np.concatenate([b.labels for b in batches[4:]])
    assert sorted(first) == sorted(second) == list(range(32))
    assert not np.array_equal(first, second)


@given(st.integers(0, 2**32), st.integers(0, 20))
def test_resume_from_any_saved_state_matches_uninterrupted(seed, stop_after):
    images = np.random.default_rng(1).integers(0, 256, size=(30, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(30)
    uninterrupted = _take(pipeline.train_batches(images, labels, 7, LoaderState(seed), CROP_FLIP), 25)
    saved = uninterrupted[stop_after - 1].next_state if stop_after else LoaderState(seed)
    restored = LoaderState.from_dict(json.loads(json.dumps(saved.to_dict())))
    resumed = _take(pipeline.train_batches(images, labels, 7, restored, CROP_FLIP), 25 - stop_after)
    _assert_same(resumed, uninterrupted[stop_after:])


def test_state_round_trips_and_validates():
    state = LoaderState(seed=3, epoch=2, step=9)
    assert LoaderState.from_dict(state.to_dict()) == state
    assert state.to_dict() == {"seed": 3, "epoch": 2, "step": 9}
    with pytest.raises(ValueError, match="expected keys"):
        LoaderState.from_dict({"seed": 3, "epoch": 2})
    with pytest.raises(ValueError, match=r"LoaderState.step=-1"):
        LoaderState(seed=0, step=-1)


def test_state_past_the_epoch_is_refused():
    images, labels = _dataset(20)
    with pytest.raises(ValueError, match=r"state.step=5, but an epoch has 2 steps at batch_size=8"):
        next(pipeline.train_batches(images, labels, 8, LoaderState(seed=0, step=5)))


def test_eval_visits_everything_in_order_last_batch_smaller():
    images, labels = _dataset(23)
    batches = list(pipeline.eval_batches(images, labels, 10))
    assert [len(b[1]) for b in batches] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), images)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), labels)


# ----------------------------------------------------------------------------------------------
# Augmentation


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
    images = np.random.default_rng(0).integers(1, 256, size=(64, 6, 5, 2), dtype=np.uint8)
    crops = aug.random_crop(images, np.random.default_rng(1), padding=2)
    assert crops.dtype == np.uint8 and crops.shape == images.shape and crops.flags.c_contiguous
    offsets = np.random.default_rng(1).integers(0, 5, size=(64, 2))
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    for image, crop, (dy, dx) in zip(padded, crops, offsets, strict=True):
        np.testing.assert_array_equal(crop, image[dy : dy + 6, dx : dx + 5])
    assert len({tuple(o) for o in offsets}) > 10  # offsets really vary, corners included
    assert (crops == 0).any() and (crops != 0).any()


def test_random_crop_zero_shift_is_identity_at_padding_zero():
    images = np.random.default_rng(0).integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(aug.random_crop(images, np.random.default_rng(0), padding=0), images)


def test_flip_mirrors_exactly_the_drawn_half():
    images = np.random.default_rng(0).integers(0, 256, size=(200, 4, 5, 3), dtype=np.uint8)
    flipped = aug.random_flip(images, np.random.default_rng(7))
    mask = np.random.default_rng(7).random(200) < 0.5
    np.testing.assert_array_equal(flipped[mask], images[mask][:, :, ::-1])
    np.testing.assert_array_equal(flipped[~mask], images[~mask])
    assert 60 < mask.sum() < 140


@pytest.mark.parametrize("interpolation", aug.INTERPOLATIONS)
def test_random_resized_crop_shape_dtype_and_values(interpolation):
    images = np.random.default_rng(0).integers(0, 256, size=(32, 12, 10, 3), dtype=np.uint8)
    params = RandomResizedCrop(interpolation=interpolation)
    out = aug.random_resized_crop(images, np.random.default_rng(2), params)
    assert out.dtype == np.uint8 and out.shape == images.shape
    if interpolation == "nearest":  # every output pixel is some input pixel of the same image
        for image, crop in zip(images, out, strict=True):
            assert {tuple(p) for p in crop.reshape(-1, 3)} <= {tuple(p) for p in image.reshape(-1, 3)}


@pytest.mark.parametrize("interpolation", aug.INTERPOLATIONS)
def test_random_resized_crop_full_box_is_identity(interpolation):
    images = np.random.default_rng(0).integers(0, 256, size=(8, 9, 7, 1), dtype=np.uint8)
    whole = RandomResizedCrop(scale=(1.0, 1.0), ratio=(7 / 9, 7 / 9), interpolation=interpolation)
    np.testing.assert_array_equal(aug.random_resized_crop(images, np.random.default_rng(0), whole), images)


def test_random_resized_crop_boxes_are_inside_and_follow_scale():
    params = RandomResizedCrop(scale=(0.25, 0.5))
    top, left, box_h, box_w = aug._resized_crop_boxes(np.random.default_rng(0), 500, 32, 32, params)
    assert (top >= 0).all() and (left >= 0).all() and (box_h >= 1).all() and (box_w >= 1).all()
    assert (top + box_h <= 32).all() and (left + box_w <= 32).all()
    area = box_h * box_w / 1024
    assert 0.2 < area.min() and area.max() < 0.56  # rounding widens the interval a little
    assert len(set(zip(top.tolist(), left.tolist(), strict=True))) > 100


def test_random_resized_crop_falls_back_to_centered_whole_image():
    impossible = RandomResizedCrop(
        scale=(1.0, 1.0), ratio=(2.0, 3.0)
    )  # area 1 cannot have ratio 2 in a square
    top, left, box_h, box_w = aug._resized_crop_boxes(np.random.default_rng(0), 4, 30, 30, impossible)
    assert (box_w == 30).all() and (box_h == 15).all() and (top == 7).all() and (left == 0).all()


def test_bilinear_upsampling_interpolates_between_pixels():
    image = np.array([0, 100], dtype=np.uint8).reshape(1, 1, 2, 1)
    ys, xs = np.zeros((1, 1)), np.array([[0.0, 0.25, 0.5, 1.0]])
    out = aug._bilinear(image, ys, xs, np.array([1]), np.array([2]))
    np.testing.assert_array_equal(out.ravel(), [0, 25, 50, 100])


def test_augment_output_is_uint8_of_the_input_shape():
    images = np.random.default_rng(0).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    for augmentation in (CROP_FLIP, RRC, aug.DEFAULT_AUGMENTATION["fashion_mnist"]):
        out = aug.augment(images, np.random.default_rng(0), augmentation)
        assert out.dtype == np.uint8 and out.shape == images.shape
    with pytest.raises(ValueError, match="expected uint8"):
        aug.augment(images.astype(np.float32), np.random.default_rng(0), CROP_FLIP)


def test_augmentation_settings_are_validated():
    with pytest.raises(ValueError, match="set crop_padding=0"):
        Augmentation(crop_padding=4, random_resized_crop=RandomResizedCrop())
    with pytest.raises(ValueError, match="crop_padding=-1"):
        Augmentation(crop_padding=-1)
    with pytest.raises(ValueError, match="scale="):
        RandomResizedCrop(scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="interpolation="):
        RandomResizedCrop(interpolation="bicubic")


# ----------------------------------------------------------------------------------------------
# Prefetching


def test_prefetcher_preserves_order_and_stops():
    images, labels = _dataset(40)
    direct = _take(pipeline.train_batches(images, labels, 8, LoaderState(2), CROP_FLIP), 15)
    with Prefetcher(pipeline.train_batches(images, labels, 8, LoaderState(2), CROP_FLIP), depth=3) as ahead:
        _assert_same(_take(ahead, 15), direct)
    assert not ahead._thread.is_alive()


def test_prefetcher_ends_and_reraises():
    assert list(Prefetcher(iter(range(5)))) == list(range(5))

    def broken():
        yield 1
        raise RuntimeError("corrupt batch")

    ahead = Prefetcher(broken())
    assert next(ahead) == 1
    with pytest.raises(RuntimeError, match="corrupt batch"):
        next(ahead)
    with pytest.raises(StopIteration):
        next(ahead)


def test_throughput_is_far_above_training_needs():
    rate = pipeline.measure_throughput(CROP_FLIP, num_examples=5_000, steps=20)
    assert rate > 5_000  # images/s; a GPU ViT step on 128 CIFAR images takes milliseconds
