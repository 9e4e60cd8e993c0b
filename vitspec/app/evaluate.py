"""Evaluate a reference checkpoint with any of the three implementations.

    vitspec evaluate runs/torch-fashion-mnist-fmnist-tiny/best.safetensors \\
        --backend flax --dataset fashion-mnist

prints top-1 (top-5 with 100 classes) and the confusion matrix of the test set (or --split
validation). `numpy` is `vitspec.forward` itself; `torch` and `flax` are the training backends'
eval paths (normalization on the device, as in training). The checkpoint holds the model only;
the dataset names the normalization statistics.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import vitspec
from vitspec.app import datasets
from vitspec.app.training.backend import create_backend, normalization_table
from vitspec.app.training.config import DATASETS, PRECISIONS
from vitspec.app.training.evaluation import Evaluation, evaluate
from vitspec.app.training.state import write_json
from vitspec.config import ViTConfig
from vitspec.recipe import Recipe

BACKENDS = ("numpy", "torch", "flax")


def numpy_predictor(
    cfg: ViTConfig, params: dict, stats: datasets.ChannelStats
) -> Callable[[np.ndarray], np.ndarray]:
    params32 = {k: np.asarray(v, np.float32) for k, v in params.items()}
    return lambda images: vitspec.forward(cfg, params32, datasets.normalize(images, stats.mean, stats.std))


def predictor(
    backend: str, cfg: ViTConfig, params: dict, stats: datasets.ChannelStats, precision: str = "fp32"
) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 NHWC images -> float32 logits, by `backend` (imported only when asked for)."""
    if backend == "numpy":
        return numpy_predictor(cfg, params, stats)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    return create_backend(
        backend, cfg, params, Recipe(), normalization_table(stats), precision, 0
    ).eval_logits


def format_confusion(confusion: np.ndarray, class_names: Sequence[str]) -> str:
    width = max(6, len(str(confusion.max())) + 1)
    labels = [name[:12] for name in class_names]
    label_width = max(map(len, labels))
    header = " " * (label_width + 1) + "".join(f"{i:>{width}d}" for i in range(len(labels)))
    rows = [
        f"{label:>{label_width}} " + "".join(f"{c:>{width}d}" for c in row)
        for label, row in zip(labels, confusion, strict=True)
    ]
    return "\n".join(["rows: true class, columns: predicted (class index)", header, *rows])


def main(argv: Sequence[str] | None = None, prog: str = "vitspec evaluate") -> Evaluation:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a reference checkpoint (.safetensors or .npz)")
    parser.add_argument("--backend", choices=BACKENDS, default="numpy")
    parser.add_argument("--dataset", choices=list(DATASETS), required=True)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument(
        "--validation-size",
        type=int,
        default=datasets.DEFAULT_VALIDATION_SIZE,
        help="as in training (only --split validation depends on it)",
    )
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="torch and flax only")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)

    cfg, params = vitspec.load(args.checkpoint)
    dataset = datasets.load(DATASETS[args.dataset], args.data_dir, validation_size=args.validation_size)
    if cfg.num_classes != dataset.num_classes:
        raise ValueError(
            f"{args.checkpoint} has {cfg.num_classes} classes; {args.dataset} has {dataset.num_classes}: "
            "its accuracy there would mean nothing"
        )
    images = getattr(dataset, args.split)
    predict = predictor(args.backend, cfg, params, dataset.stats, args.precision)
    result = evaluate(predict, images, cfg.num_classes, args.batch_size)
    top5 = f", top-5 {100 * result.top5:.2f}%" if result.top5 is not None else ""
    print(
        f"{args.backend}: {args.checkpoint} on {args.dataset} {args.split} ({len(images)} images): "
        f"top-1 {100 * result.top1:.2f}%{top5}"
    )
    if cfg.num_classes <= 20:
        print(format_confusion(result.confusion, dataset.class_names))
    if args.json:
        write_json(
            args.json,
            {
                "backend": args.backend,
                "checkpoint": str(args.checkpoint),
                "split": args.split,
                "top1": result.top1,
                "top5": result.top5,
                "confusion": result.confusion.tolist(),
            },
        )
    return result
