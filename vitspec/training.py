"""The training driver both backends share: flags, data, schedule, checkpoints, metrics, reports.

NumPy only. A backend (PyTorch or Flax) implements `Backend` and nothing else: one optimizer
step on a uint8 batch, logits for evaluation, and its state as NumPy trees under reference names.
Everything that decides the trajectory lives here or in `vitspec.recipe` / `vitspec.pipeline`:
the batches (seeded, uint8, identical for both backends), the learning rate of every step
(computed on the host), and what a checkpoint holds. So the same flags give the same run in
either framework, and `--resume` after a kill reaches exactly what the uninterrupted run reaches.

Workdir:
    config.json           the model config, the recipe and the flags of the run
    last.safetensors      the model after the latest epoch (or the --max-steps stop), reference format
    last.state.npz        AdamW moments (reference names) beside it
    last.state.json       step, LoaderState, history, best so far, the flags; the CRC-32 of the two
                          files above, so a kill between writes is caught on --resume
    best.safetensors      the model with the best validation accuracy so far
    metrics.jsonl         one JSON line per epoch
    summary.json, curves.png, confusion.png   after the final test-set evaluation

Dropout randomness is a function of (seed, step) in each backend, so it needs no saved state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import vitspec
from vitspec import datasets, pipeline
from vitspec.checkpoint import atomic_write
from vitspec.config import ViTConfig
from vitspec.recipe import Recipe, learning_rate

# The command line says fashion-mnist (the dataset's own spelling); vitspec.datasets says fashion_mnist.
DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "fashion-mnist": "fashion_mnist"}
PRECISIONS = ("fp32", "bf16")

# Flags that define the trajectory: --resume refuses to continue a run under different ones.
TRAJECTORY_FLAGS = (
    "dataset", "model", "model_overrides", "epochs", "batch_size", "lr", "weight_decay",
    "warmup_epochs", "label_smoothing", "clip_norm", "seed", "precision", "dropout",
    "stochastic_depth", "validation_size",
)

LAST, BEST = "last.safetensors", "best.safetensors"
LAST_STATE_NPZ, LAST_STATE_JSON = "last.state.npz", "last.state.json"


class Backend(Protocol):
    """One framework's side of training. Images are uint8 NHWC exactly as the pipeline yields
    them; the backend normalizes them on its device as `vitspec.datasets.normalize` does."""

    def train_step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> tuple[Any, Any]:
        """One recipe update at learning rate `lr`: (mean loss, number of correct top-1
        predictions), each anything `float()` accepts (device scalars are read lazily)."""

    def eval_logits(self, images: np.ndarray) -> np.ndarray:
        """Eval-mode logits [N, K] as float32 NumPy."""

    def reference_params(self) -> dict[str, np.ndarray]:
        """The parameters as a reference tree (vitspec names and layouts)."""

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """'step' and the AdamW moments as 'mu/<reference name>', 'nu/<reference name>'."""

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what `optimizer_state` returned."""


# create(cfg, reference params, recipe, normalization stats, precision, seed) -> Backend
BackendFactory = Callable[[ViTConfig, dict, Recipe, datasets.ChannelStats, str, int], Backend]


def normalization_table(stats: datasets.ChannelStats) -> np.ndarray:
    """float32 [256, C]: `datasets.normalize` of every uint8 value in every channel.

    Backends normalize on the device by looking pixels up here (table[pixel, channel]) rather than
    redoing the arithmetic: XLA's CPU float32 division is not correctly rounded (measured up to
    2.4e-7 off NumPy's), and a lookup is the reference's numbers by construction.
    """
    levels = np.arange(256, dtype=np.uint8)[:, None, None, None]
    channels = np.broadcast_to(levels, (256, 1, 1, len(stats.mean)))
    return datasets.normalize(np.ascontiguousarray(channels), stats.mean, stats.std).reshape(256, -1)


# ---------------------------------------------------------------------------------------------
# Flags


def build_parser(prog: str, backend_name: str) -> argparse.ArgumentParser:
    """The flags of `python -m backends.<backend>.train`; both backends take exactly these."""
    parser = argparse.ArgumentParser(
        prog=prog, description=f"Train a vitspec ViT with the {backend_name} backend.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=list(DATASETS), default="cifar10")
    data.add_argument("--data-dir", type=Path, default=None, help="default: $VITSPEC_DATA_DIR or ./data")
    data.add_argument("--download", action="store_true", help="fetch missing official files first")
    data.add_argument("--validation-size", type=int, default=datasets.DEFAULT_VALIDATION_SIZE,
                      help="training images held out for validation (picks best.safetensors)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="cifar-notebook", help="a preset or SIZE/PATCH, e.g. Ti/4")
    model.add_argument("--model-overrides", type=json.loads, default={},
                       help='config fields as JSON, e.g. \'{"depth": 2}\'')
    model.add_argument("--dropout", type=float, default=None, help="default: the model's")
    model.add_argument("--stochastic-depth", type=float, default=None, help="default: the model's")
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--epochs", type=int, default=100)
    recipe.add_argument("--batch-size", type=int, default=128)
    recipe.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    recipe.add_argument("--weight-decay", type=float, default=0.05, help="on kernels only")
    recipe.add_argument("--warmup-epochs", type=float, default=5.0)
    recipe.add_argument("--label-smoothing", type=float, default=0.1)
    recipe.add_argument("--clip-norm", type=float, default=1.0, help="global norm; 0 turns clipping off")
    recipe.add_argument("--seed", type=int, default=0, help="init, data order, augmentation, dropout")
    run = parser.add_argument_group("run")
    run.add_argument("--workdir", type=Path, default=None, help="default: runs/<backend>-<dataset>-<model>")
    run.add_argument("--resume", action="store_true", help="continue from <workdir>/last.*")
    run.add_argument("--precision", choices=PRECISIONS, default=None,
                     help="default: bf16 on a GPU, fp32 on the CPU")
    run.add_argument("--max-steps", type=int, default=None,
                     help="stop after this many steps in all (the schedule still spans --epochs)")
    run.add_argument("--eval-batch-size", type=int, default=512)
    return parser


def default_workdir(args: argparse.Namespace, backend_name: str) -> Path:
    return Path("runs") / f"{backend_name}-{args.dataset}-{args.model.replace('/', '-')}"


def model_config(args: argparse.Namespace, dataset: datasets.Dataset) -> ViTConfig:
    """The named model with the dataset's classes, and the flags' overrides."""
    overrides = dict(args.model_overrides)
    overrides.setdefault("num_classes", dataset.num_classes)
    for field in ("dropout", "stochastic_depth"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    cfg = vitspec.variant(args.model, **overrides)
    height, width, channels = dataset.image_shape
    if cfg.image_size != (height, width) or cfg.in_channels != channels:
        raise ValueError(
            f"--model {args.model} takes {cfg.image_size[0]}x{cfg.image_size[1]}x{cfg.in_channels} images;"
            f" {args.dataset} has {height}x{width}x{channels}")
    return cfg


def make_recipe(args: argparse.Namespace, steps_per_epoch: int) -> Recipe:
    total_steps = args.epochs * steps_per_epoch
    return Recipe(
        base_lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=min(total_steps, round(args.warmup_epochs * steps_per_epoch)),
        total_steps=total_steps, label_smoothing=args.label_smoothing,
        clip_norm=args.clip_norm or None)


def trajectory_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in TRAJECTORY_FLAGS}


# ---------------------------------------------------------------------------------------------
# Evaluation (shared with `python -m vitspec.evaluate`)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    loss: float
    top1: float
    top5: float | None  # with 100 or more classes
    confusion: np.ndarray  # int64 [K, K], rows true class, columns predicted


def evaluate(predict: Callable[[np.ndarray], np.ndarray], images: datasets.ImageSet, num_classes: int,
             batch_size: int, label_smoothing: float = 0.0) -> Evaluation:
    """Loss (cross-entropy with `label_smoothing`), top-1 (top-5), confusion matrix of `predict`'s logits."""
    if len(images) == 0:
        raise ValueError("evaluate: the image set is empty")
    loss_sum, top5_hits = 0.0, 0
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for batch, labels in pipeline.eval_batches(images.images, images.labels, batch_size):
        logits = np.asarray(predict(batch), dtype=np.float64)
        loss_sum += float(vitspec.cross_entropy(logits, labels, label_smoothing)) * len(labels)
        np.add.at(confusion, (labels, logits.argmax(-1)), 1)
        top5_hits += int((np.argsort(-logits, axis=-1)[:, :5] == labels[:, None]).any(-1).sum())
    n = len(images)
    return Evaluation(loss=loss_sum / n, top1=float(np.trace(confusion)) / n,
                      top5=top5_hits / n if num_classes >= 100 else None, confusion=confusion)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=2, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


@dataclasses.dataclass
class EpochProgress:
    """Running sums of the epoch under way (saved at a --max-steps stop, so resuming mid-epoch
    reports the same epoch metrics)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0


@dataclasses.dataclass
class RunState:
    step: int  # updates done
    loader: pipeline.LoaderState
    history: list[dict[str, Any]]  # one entry per finished epoch
    best_accuracy: float | None
    progress: EpochProgress


def save_last(workdir: Path, cfg: ViTConfig, backend: Backend, state: RunState, flags: dict) -> None:
    """last.safetensors and last.state.npz, then last.state.json naming both by CRC (written last:
    it is what --resume trusts)."""
    vitspec.save(workdir / LAST, cfg, backend.reference_params())
    save_npz(workdir / LAST_STATE_NPZ, backend.optimizer_state())
    write_json(workdir / LAST_STATE_JSON, {
        "step": state.step,
        "loader": state.loader.to_dict(),
        "history": state.history,
        "best_accuracy": state.best_accuracy,
        "progress": dataclasses.asdict(state.progress),
        "flags": flags,
        "crc32": {LAST: file_crc32(workdir / LAST), LAST_STATE_NPZ: file_crc32(workdir / LAST_STATE_NPZ)},
    })


def load_last(workdir: Path, flags: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], RunState]:
    """(reference params, optimizer state, run state) of workdir's last checkpoint, checked whole."""
    state_path = workdir / LAST_STATE_JSON
    if not state_path.is_file():
        raise FileNotFoundError(f"--resume: {state_path} does not exist (nothing to resume in {workdir})")
    saved = json.loads(state_path.read_text())
    for name, crc in saved["crc32"].items():
        if not (workdir / name).is_file() or file_crc32(workdir / name) != crc:
            raise ValueError(f"--resume: {workdir / name} is missing or not the file {state_path} was "
                             "written with (interrupted while checkpointing?)")
    changed = {k: (saved["flags"].get(k), v) for k, v in flags.items() if saved["flags"].get(k) != v}
    if changed:
        described = ", ".join(f"--{k.replace('_', '-')}: saved {old!r}, now {new!r}"
                              for k, (old, new) in changed.items())
        raise ValueError(f"--resume: {workdir} was trained with other flags ({described})")
    _, params = vitspec.load(workdir / LAST)
    with np.load(workdir / LAST_STATE_NPZ) as npz:
        optimizer = {k: npz[k] for k in npz.files}
    state = RunState(step=saved["step"], loader=pipeline.LoaderState.from_dict(saved["loader"]),
                     history=saved["history"], best_accuracy=saved["best_accuracy"],
                     progress=EpochProgress(**saved["progress"]))
    return params, optimizer, state


# ---------------------------------------------------------------------------------------------
# Progress


class ProgressLine:
    """One self-overwriting line per epoch (\\r), redrawn at most every `interval` seconds; into a
    file or pipe (not a terminal) only the forced end-of-epoch draw is written, so logs stay readable."""

    def __init__(self, epoch: int, epochs: int, steps: int, stream=sys.stderr, interval: float = 0.5):
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.stream, self.interval = stream, interval
        self.last_draw = -math.inf

    def update(self, step_in_epoch: int, progress: EpochProgress, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and (not self.stream.isatty() or now - self.last_draw < self.interval):
            return
        self.last_draw = now
        filled = int(20 * step_in_epoch / self.steps)
        seen = max(progress.seen, 1)
        rate = progress.seen / progress.seconds if progress.seconds else 0.0
        self.stream.write(
            f"\repoch {self.epoch + 1}/{self.epochs} [{'#' * filled}{'.' * (20 - filled)}] "
            f"{step_in_epoch}/{self.steps} loss {progress.loss_sum / seen:.4f} "
            f"acc {100 * progress.correct / seen:5.2f}% {rate:,.0f} img/s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Run:
    """Everything a run needs, set up from the flags (and the workdir, when resuming)."""

    args: argparse.Namespace
    workdir: Path
    dataset: datasets.Dataset
    cfg: ViTConfig
    recipe: Recipe
    steps_per_epoch: int
    augmentation: pipeline.Augmentation
    create_backend: BackendFactory
    precision: str


def train_epoch_steps(run: Run, backend: Backend, batches: Iterator[pipeline.TrainBatch], state: RunState,
                      stop_step: int) -> None:
    """Steps until the epoch ends or `stop_step`; updates `state` (step, loader, progress)."""
    epoch = state.loader.epoch
    line = ProgressLine(epoch, run.args.epochs, run.steps_per_epoch)
    pending: list[tuple[Any, Any, int]] = []  # device scalars, read at each redraw

    def read_pending() -> None:
        for loss, correct, n in pending:
            state.progress.loss_sum += float(loss) * n
            state.progress.correct += int(correct)
            state.progress.seen += n
        pending.clear()

    started = last_read = time.perf_counter()
    while state.step < stop_step and state.loader.epoch == epoch:
        batch = next(batches)
        loss, correct = backend.train_step(batch.images, batch.labels, learning_rate(state.step, run.recipe))
        pending.append((loss, correct, len(batch.labels)))
        state.step, state.loader = state.step + 1, batch.next_state
        # Reading the scalars waits for the device: only at the redraw interval, so an asynchronous
        # backend (JAX) keeps dispatching steps while the previous ones compute.
        if time.perf_counter() - last_read >= line.interval:
            read_pending()
            state.progress.seconds += time.perf_counter() - started
            started = last_read = time.perf_counter()
            line.update(state.loader.step or run.steps_per_epoch, state.progress)
    read_pending()
    state.progress.seconds += time.perf_counter() - started
    line.update(state.loader.step if state.loader.epoch == epoch else run.steps_per_epoch, state.progress,
                force=True)
    line.close()


def finish_epoch(run: Run, backend: Backend, state: RunState) -> dict[str, Any]:
    """Validate, record the epoch, keep the best model; returns the epoch's metrics."""
    progress = state.progress
    record: dict[str, Any] = {
        "epoch": state.loader.epoch,  # epochs done
        "step": state.step,
        "lr": learning_rate(state.step - 1, run.recipe),
        "train_loss": progress.loss_sum / progress.seen,
        "train_accuracy": progress.correct / progress.seen,
        "images_per_second": progress.seen / progress.seconds if progress.seconds else None,
    }
    if len(run.dataset.validation):
        validation = evaluate(backend.eval_logits, run.dataset.validation, run.cfg.num_classes,
                              run.args.eval_batch_size, run.recipe.label_smoothing)
        record |= {"val_loss": validation.loss, "val_accuracy": validation.top1}
        if state.best_accuracy is None or validation.top1 > state.best_accuracy:
            state.best_accuracy = validation.top1
            vitspec.save(run.workdir / BEST, run.cfg, backend.reference_params())
            record["best"] = True
    state.history.append(record)
    state.progress = EpochProgress()
    return record


def write_metrics(workdir: Path, history: Sequence[dict]) -> None:
    """metrics.jsonl from the history (rewritten whole, so a resumed run's file has no duplicates)."""
    text = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write(workdir / "metrics.jsonl", lambda f: f.write(text.encode()))


def describe(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}", f"train loss {record['train_loss']:.4f}",
             f"acc {100 * record['train_accuracy']:.2f}%"]
    if "val_accuracy" in record:
        parts += [f"val loss {record['val_loss']:.4f}", f"acc {100 * record['val_accuracy']:.2f}%"]
    if record.get("best"):
        parts.append("(best)")
    return " | ".join(parts)


def train(run: Run, backend: Backend, state: RunState) -> RunState:
    """The epoch loop from `state` to the end of the schedule or --max-steps."""
    flags = trajectory_flags(run.args)
    stop_step = run.recipe.total_steps
    if run.args.max_steps is not None:
        stop_step = min(stop_step, run.args.max_steps)
    train_set = run.dataset.train
    stream = pipeline.train_batches(train_set.images, train_set.labels, run.args.batch_size, state.loader,
                                    run.augmentation)
    with pipeline.Prefetcher(stream) as batches:
        while state.step < stop_step:
            epoch = state.loader.epoch
            train_epoch_steps(run, backend, batches, state, stop_step)
            if state.loader.epoch != epoch:
                record = finish_epoch(run, backend, state)
                print(describe(record), flush=True)
                write_metrics(run.workdir, state.history)
            save_last(run.workdir, run.cfg, backend, state, flags)
    return state


def final_report(run: Run, state: RunState, wall_seconds: float) -> dict[str, Any]:
    """Test-set evaluation of the best model (the last if none was validated); summary and plots."""
    best_path = run.workdir / BEST if (run.workdir / BEST).is_file() else run.workdir / LAST
    _, params = vitspec.load(best_path)
    tester = run.create_backend(run.cfg, params, run.recipe, run.dataset.stats, run.precision, run.args.seed)
    test = evaluate(tester.eval_logits, run.dataset.test, run.cfg.num_classes, run.args.eval_batch_size)
    rates = [r["images_per_second"] for r in state.history if r.get("images_per_second")]
    summary = {
        "checkpoint": str(best_path), "dataset": run.args.dataset, "model": run.args.model,
        "num_params": vitspec.num_params(run.cfg), "precision": run.precision,
        "epochs_done": len(state.history), "steps_done": state.step,
        "test_top1": test.top1, "test_top5": test.top5, "test_images": len(run.dataset.test),
        "best_val_accuracy": state.best_accuracy,
        "train_images_per_second": float(np.median(rates)) if rates else None,
        "wall_seconds_this_invocation": wall_seconds,
    }
    write_json(run.workdir / "summary.json", summary)
    plot_reports(run.workdir, state.history, test.confusion, run.dataset.class_names)
    top5 = f", top-5 {100 * test.top5:.2f}%" if test.top5 is not None else ""
    print(f"test top-1 {100 * test.top1:.2f}%{top5} ({best_path.name}, {len(run.dataset.test)} images)")
    return summary


def plot_reports(workdir: Path, history: Sequence[dict], confusion: np.ndarray,
                 class_names: Sequence[str]) -> None:
    """curves.png (once an epoch has finished) and confusion.png; skipped with a note when matplotlib
    is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curves.png / confusion.png (pip install 'vitspec[plots]')",
              file=sys.stderr)
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
            accuracy_axes.plot(epochs, [100 * r[f"{split}_accuracy"] for r in history], marker="o", label=split)
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy (smoothed targets)", title="loss")
    accuracy_axes.set(xlabel="epoch", ylabel="top-1 %", title="accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
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
            axes.text(col, row, str(count), ha="center", va="center", fontsize=7,
                      color="white" if count > confusion.max() / 2 else "black")
    axes.set(xlabel="predicted", ylabel="true", title="test confusion matrix")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def setup(args: argparse.Namespace, backend_name: str, create_backend: BackendFactory,
          default_precision: str) -> Run:
    dataset = datasets.load(DATASETS[args.dataset], args.data_dir, validation_size=args.validation_size,
                            download_missing=args.download)
    cfg = model_config(args, dataset)
    steps_per_epoch = pipeline.steps_per_epoch(len(dataset.train), args.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(dataset.train)} training images")
    args.precision = args.precision or default_precision
    return Run(args=args, workdir=args.workdir or default_workdir(args, backend_name), dataset=dataset, cfg=cfg,
               recipe=make_recipe(args, steps_per_epoch), steps_per_epoch=steps_per_epoch,
               augmentation=pipeline.DEFAULT_AUGMENTATION[DATASETS[args.dataset]],
               create_backend=create_backend, precision=args.precision)


def start(run: Run) -> tuple[Backend, RunState]:
    """A fresh backend at `init_params(cfg, seed)`, or the workdir's last checkpoint with --resume."""
    if run.args.resume:
        params, optimizer, state = load_last(run.workdir, trajectory_flags(run.args))
        backend = run.create_backend(run.cfg, params, run.recipe, run.dataset.stats, run.precision, run.args.seed)
        backend.load_optimizer_state(optimizer)
        print(f"resumed {run.workdir} at step {state.step} (epoch {state.loader.epoch}, "
              f"step {state.loader.step} of it)", flush=True)
        return backend, state
    params = vitspec.init_params(run.cfg, run.args.seed)
    backend = run.create_backend(run.cfg, params, run.recipe, run.dataset.stats, run.precision, run.args.seed)
    state = RunState(step=0, loader=pipeline.LoaderState(seed=run.args.seed), history=[], best_accuracy=None,
                     progress=EpochProgress())
    return backend, state


def main(argv: Sequence[str] | None, *, prog: str, backend_name: str, create_backend: BackendFactory,
         default_precision: str) -> dict[str, Any]:
    """Parse the flags, train, test; returns the summary (also in <workdir>/summary.json)."""
    args = build_parser(prog, backend_name).parse_args(argv)
    started = time.perf_counter()
    run = setup(args, backend_name, create_backend, default_precision)
    run.workdir.mkdir(parents=True, exist_ok=True)
    write_json(run.workdir / "config.json", {
        "backend": backend_name, "model": json.loads(run.cfg.to_json()),
        "recipe": dataclasses.asdict(run.recipe), "augmentation": dataclasses.asdict(run.augmentation),
        "flags": vars(args)})
    print(f"{backend_name}: {args.model} ({vitspec.num_params(run.cfg):,} params) on {args.dataset} "
          f"({len(run.dataset.train)} train / {len(run.dataset.validation)} val / {len(run.dataset.test)} test), "
          f"{run.steps_per_epoch} steps/epoch, {args.precision}, workdir {run.workdir}", flush=True)
    backend, state = start(run)
    state = train(run, backend, state)
    return final_report(run, state, time.perf_counter() - started)

