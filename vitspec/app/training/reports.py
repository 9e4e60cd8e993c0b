"""What a run reports: the epoch line, the test-set summary, and the curves and confusion plots."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import vitspec
from vitspec.app.training.evaluation import evaluate
from vitspec.app.training.setup import Run
from vitspec.app.training.state import BEST, LAST, RunState, write_json
from vitspec.formats.checkpoint import atomic_write


def describe(record: dict[str, Any]) -> str:
    parts = [
        f"epoch {record['epoch']}",
        f"train loss {record['train_loss']:.4f}",
        f"acc {100 * record['train_accuracy']:.2f}%",
    ]
    if "val_accuracy" in record:
        parts += [f"val loss {record['val_loss']:.4f}", f"acc {100 * record['val_accuracy']:.2f}%"]
    if record.get("best"):
        parts.append("(best)")
    return " | ".join(parts)


def save_figure(figure, path: Path) -> None:
    """As a checkpoint is written (temp file, rename): a kill never leaves half a PNG."""
    atomic_write(path, lambda f: figure.savefig(f, dpi=120, format="png"))


def plot_reports(
    workdir: Path, history: Sequence[dict], confusion: np.ndarray, class_names: Sequence[str]
) -> None:
    """curves.png (once an epoch has finished) and confusion.png; skipped with a note when matplotlib
    is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed: no curves.png / confusion.png (pip install 'vitspec[plots]')",
            file=sys.stderr,
        )
        return
    if history:
        plot_curves(plt, workdir / "curves.png", history)
    plot_confusion(plt, workdir / "confusion.png", confusion, class_names)


def plot_curves(plt, path: Path, history: Sequence[dict]) -> None:
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in history]
    for split in ("train", "val"):
        if f"{split}_loss" in history[0]:
            loss_axes.plot(epochs, [r[f"{split}_loss"] for r in history], marker="o", label=split)
            accuracy_axes.plot(
                epochs, [100 * r[f"{split}_accuracy"] for r in history], marker="o", label=split
            )
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy (smoothed targets)", title="loss")
    accuracy_axes.set(xlabel="epoch", ylabel="top-1 %", title="accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def plot_confusion(plt, path: Path, confusion: np.ndarray, class_names: Sequence[str]) -> None:
    k = len(confusion)
    figure, axes = plt.subplots(figsize=(max(5, 0.45 * k), max(4.5, 0.4 * k)))
    image = axes.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axes)
    if k <= 20:  # 100 labels per axis would be unreadable
        axes.set_xticks(range(k), class_names, rotation=60, ha="right")
        axes.set_yticks(range(k), class_names)
        for (row, col), count in np.ndenumerate(confusion):
            axes.text(
                col,
                row,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > confusion.max() / 2 else "black",
            )
    axes.set(xlabel="predicted", ylabel="true", title="test confusion matrix")
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def final_report(run: Run, state: RunState, wall_seconds: float) -> dict[str, Any]:
    """Test-set evaluation of the best model (the last if none was validated), by every process; the
    summary and plots written by process 0."""
    best_path = run.workdir / BEST if (run.workdir / BEST).is_file() else run.workdir / LAST
    _, params = vitspec.load(best_path)
    tester = run.create_backend(params)
    test = evaluate(tester.eval_logits, run.dataset.test, run.cfg.num_classes, run.config.eval_batch_size)
    rates = [r["images_per_second"] for r in state.history if r.get("images_per_second")]
    summary = {
        "checkpoint": str(best_path),
        "dataset": run.config.dataset,
        "model": run.config.model,
        "num_params": vitspec.num_params(run.cfg),
        "precision": run.config.precision,
        "epochs_done": len(state.history),
        "steps_done": state.step,
        "test_top1": test.top1,
        "test_top5": test.top5,
        "test_images": len(run.dataset.test),
        "best_val_accuracy": state.best_accuracy,
        "train_images_per_second": float(np.median(rates)) if rates else None,
        "wall_seconds_this_invocation": wall_seconds,
    }
    if not run.topology.writer:
        return summary
    write_json(run.workdir / "summary.json", summary)
    plot_reports(run.workdir, state.history, test.confusion, run.dataset.class_names)
    top5 = f", top-5 {100 * test.top5:.2f}%" if test.top5 is not None else ""
    print(f"test top-1 {100 * test.top1:.2f}%{top5} ({best_path.name}, {len(run.dataset.test)} images)")
    return summary
