"""Batches and augmentation in NumPy, identical for every backend given the same seed.

Randomness is a pure function of (seed, epoch, step): the order of an epoch comes from one
Generator seeded by (seed, epoch), and each batch's augmentation from one seeded by
(seed, epoch, step). So a run resumed from a saved `LoaderState` continues with exactly the
batches it would have seen, without replaying earlier steps, and the PyTorch and JAX trainers
are fed bit-identical uint8 batches. Normalization to float happens on the device
(`vitspec.app.datasets.normalize` is the reference).

Training batches have a fixed size (the last partial batch of an epoch is dropped); evaluation
visits every example in order, the last batch smaller.

Data parallelism: `train_batches(..., shard=(i, n))` yields process i's rows of each global batch,
the i-th of n equal contiguous blocks. The global batch, its order and its augmentation are the
same for every n: each process augments the whole batch and keeps its rows (augmentation draws
per batch, not per example, so a block cannot be drawn alone; it costs each process what one
process spends, small beside a training step).

Augmentation is `vitspec.app.augmentation`'s; Mixup and CutMix (`vitspec.app.mixing`) mix the
augmented global batch with draws from their own Generator seeded by (seed, epoch, step), before it
is split into shards, and the batch carries the mixed targets (`TrainBatch.mix`).
`python -m vitspec.app.pipeline` measures the augmented-batch throughput on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np

from vitspec.app.augmentation import NO_AUGMENTATION, Augmentation, RandomResizedCrop, augment, check_batch
from vitspec.app.mixing import NO_MIXING, Mixing, mix_batch
from vitspec.app.randaugment import RandAugment
from vitspec.recipe import MixedLabels

# Stream tags keep the order, augmentation and mixing draws independent of each other and of
# `datasets.split_indices`, though all are seeded by the same small integers.
_ORDER_STREAM = 1
_AUGMENT_STREAM = 2
_MIXING_STREAM = 3


def _generator(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


@dataclasses.dataclass(frozen=True)
class LoaderState:
    """Where the training stream is: the next batch is step `step` of epoch `epoch`.

    Save `to_dict()` with a checkpoint; `train_batches(..., state=LoaderState.from_dict(d))`
    resumes exactly there.
    """

    seed: int
    epoch: int = 0
    step: int = 0

    def __post_init__(self) -> None:
        for name in ("seed", "epoch", "step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LoaderState.{name}={value!r}: expected an int >= 0")

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> LoaderState:
        expected = {f.name for f in dataclasses.fields(cls)}
        if set(fields) != expected:
            raise ValueError(f"LoaderState: expected keys {sorted(expected)}, got {sorted(fields)}")
        return cls(**fields)


class TrainBatch(NamedTuple):
    images: np.ndarray  # uint8 [B, H, W, C] (B / n of them in shard i of n)
    labels: np.ndarray  # int64 [B]
    next_state: LoaderState  # save this to resume after this batch
    mix: MixedLabels | None = None  # with Mixup/CutMix: the mixed targets (this shard's rows)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training batches per epoch (the last partial batch is dropped)."""
    return num_examples // batch_size


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of range(num_examples) that epoch `epoch` visits."""
    return _generator(seed, _ORDER_STREAM, epoch).permutation(num_examples)


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    state: LoaderState,
    augmentation: Augmentation = NO_AUGMENTATION,
    shard: tuple[int, int] = (0, 1),
    mixing: Mixing = NO_MIXING,
) -> Iterator[TrainBatch]:
    """Endless augmented (and with `mixing`, mixed) training batches from `state` on, epoch after epoch
    (islice it); with `shard` (i, n), block i of n of each."""
    check_batch(images)
    index, count = shard
    if not 0 <= index < count or batch_size % count:
        raise ValueError(f"shard {shard}: expected block i of n with 0 <= i < n, n dividing {batch_size}")
    rows = slice(index * batch_size // count, (index + 1) * batch_size // count)
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels {labels.shape} do not match {images.shape[0]} images")
    steps = steps_per_epoch(len(images), batch_size)
    if steps == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {len(images)} training examples")
    if state.step >= steps:
        raise ValueError(
            f"state.step={state.step}, but an epoch has {steps} steps at batch_size={batch_size}"
        )
    epoch, first_step = state.epoch, state.step
    while True:
        order = epoch_order(len(images), state.seed, epoch)
        for step in range(first_step, steps):
            indices = order[step * batch_size : (step + 1) * batch_size]
            rng = _generator(state.seed, _AUGMENT_STREAM, epoch, step)
            next_state = LoaderState(state.seed, epoch + (step + 1) // steps, (step + 1) % steps)
            augmented, batch_labels = augment(images[indices], rng, augmentation), labels[indices]
            if not mixing.enabled:
                yield TrainBatch(augmented[rows], batch_labels[rows], next_state)
                continue
            mixing_rng = _generator(state.seed, _MIXING_STREAM, epoch, step)
            mixed, mix = mix_batch(augmented, batch_labels, mixing_rng, mixing)
            shard_mix = MixedLabels(mix.partner_labels[rows], mix.weight)
            yield TrainBatch(mixed[rows], batch_labels[rows], next_state, shard_mix)
        epoch, first_step = epoch + 1, 0


def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every example once, in order, unaugmented; the last batch holds the remainder."""
    check_batch(images)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size], labels[start : start + batch_size]


T = TypeVar("T")


class Prefetcher(Generic[T]):
    """Runs an iterator on a background thread up to `depth` items ahead; yields in the same order.

    NumPy releases the GIL while copying, so the next batch is assembled while the trainer
    works. An exception in the producer is re-raised by `next`. Use as a context manager (or call
    `close`) to stop the thread when abandoning an endless iterator.
    """

    _END = object()

    def __init__(self, items: Iterable[T], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, args=(iter(items),), daemon=True)
        self._thread.start()

    def _produce(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put((self._END, error))

    def _put(self, entry: tuple[Any, BaseException | None]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item, error = self._queue.get()
        if item is self._END:
            self._finished = True
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._finished = True
        self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def measure_throughput(
    augmentation: Augmentation,
    mixing: Mixing = NO_MIXING,
    *,
    batch_size: int = 128,
    image_shape: Sequence[int] = (32, 32, 3),
    num_examples: int = 50_000,
    steps: int = 200,
) -> float:
    """Images per second that `train_batches` delivers on a random training set (CIFAR-sized by default)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(num_examples, *image_shape), dtype=np.uint8)
    labels = rng.integers(0, 10, size=num_examples)
    batches = train_batches(images, labels, batch_size, LoaderState(seed=0), augmentation, mixing=mixing)
    next(batches)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vitspec.app.pipeline", description="measure pipeline throughput"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    crop_flip = Augmentation(crop_padding=4, horizontal_flip=True)
    randaugment = dataclasses.replace(
        crop_flip, randaugment=RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5)
    )
    settings = {
        "none": (NO_AUGMENTATION, NO_MIXING),
        "crop+flip": (crop_flip, NO_MIXING),
        "rrc-bilinear+flip": (
            Augmentation(crop_padding=0, random_resized_crop=RandomResizedCrop()),
            NO_MIXING,
        ),
        "rrc-nearest+flip": (
            Augmentation(crop_padding=0, random_resized_crop=RandomResizedCrop(interpolation="nearest")),
            NO_MIXING,
        ),
        "crop+flip+mixup/cutmix": (crop_flip, Mixing(mixup_alpha=0.8, cutmix_alpha=1.0)),
        "crop+flip+rand-m9-n2-mstd0.5": (randaugment, NO_MIXING),
        "...+mixup/cutmix": (randaugment, Mixing(mixup_alpha=0.8, cutmix_alpha=1.0)),
    }
    for name, (augmentation, mixing) in settings.items():
        rate = measure_throughput(augmentation, mixing, batch_size=args.batch_size, steps=args.steps)
        print(
            f"{name:>28}: {rate:9.0f} images/s = {rate / args.batch_size:7.1f} batches/s of {args.batch_size}"
            f" = {1000 * args.batch_size / rate:6.2f} ms/batch"
        )


if __name__ == "__main__":
    main()
