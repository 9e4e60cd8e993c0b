"""Loss, top-1 (top-5) and the confusion matrix of a predictor on an image set: training's
validation and test, and `vitspec evaluate`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from vitspec.app import datasets, pipeline
from vitspec.reference import cross_entropy


@dataclasses.dataclass(frozen=True)
class Evaluation:
    loss: float
    top1: float
    top5: float | None  # with 100 or more classes
    confusion: np.ndarray  # int64 [K, K], rows true class, columns predicted


def evaluate(
    predict: Callable[[np.ndarray], np.ndarray],
    images: datasets.ImageSet,
    num_classes: int,
    batch_size: int,
    label_smoothing: float = 0.0,
) -> Evaluation:
    """Loss (cross-entropy with `label_smoothing`), top-1 (top-5), confusion matrix of `predict`'s logits."""
    if len(images) == 0:
        raise ValueError("evaluate: the image set is empty")
    loss_sum, top5_hits = 0.0, 0
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for batch, labels in pipeline.eval_batches(images.images, images.labels, batch_size):
        logits = np.asarray(predict(batch), dtype=np.float64)
        loss_sum += float(cross_entropy(logits, labels, label_smoothing)) * len(labels)
        np.add.at(confusion, (labels, logits.argmax(-1)), 1)
        top5_hits += int((np.argsort(-logits, axis=-1)[:, :5] == labels[:, None]).any(-1).sum())
    n = len(images)
    return Evaluation(
        loss=loss_sum / n,
        top1=float(np.trace(confusion)) / n,
        top5=top5_hits / n if num_classes >= 100 else None,
        confusion=confusion,
    )
