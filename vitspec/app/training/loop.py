"""`train_and_evaluate(config, workdir, backend)`: the training run both backends share.

NumPy only: the batches (seeded, uint8, identical for both backends), the learning rate of every
step (computed on the host) and what a checkpoint holds are decided here and in `vitspec.recipe` /
`vitspec.app.pipeline`, so the same config gives the same run in either framework, and a resumed
run reaches exactly what the uninterrupted run reaches. Dropout randomness is a function of
(seed, step) in each backend, so it needs no saved state.

Workdir: config.json (model, recipe, settings), the `last` checkpoint (vitspec.app.training.state),
best.safetensors (best validation accuracy so far), metrics.jsonl (a line per epoch), and after the
test-set evaluation summary.json, curves.png, confusion.png.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import vitspec
from vitspec.app import augmentation, datasets, pipeline
from vitspec.app.training.backend import Backend, create_backend, default_precision, normalization_table
from vitspec.app.training.config import TrainConfig
from vitspec.app.training.evaluation import evaluate
from vitspec.app.training.init import fine_tuning_start
from vitspec.app.training.progress import ProgressLine
from vitspec.app.training.reports import describe, plot_reports
from vitspec.app.training.state import (
    BEST,
    DATA_KEY,
    LAST,
    LAST_STATE_JSON,
    LAST_STATE_NPZ,
    EpochProgress,
    RunState,
    load_last,
    save_last,
    write_json,
    write_metrics,
)
from vitspec.config import ViTConfig
from vitspec.formats.checkpoint import nonfinite_names
from vitspec.recipe import Recipe, learning_rate


@dataclasses.dataclass
class Run:
    """Everything a run needs, set up from its config."""

    config: TrainConfig  # with the precision resolved
    backend_name: str
    workdir: Path
    dataset: datasets.Dataset
    cfg: ViTConfig
    recipe: Recipe
    steps_per_epoch: int
    augmentation: pipeline.Augmentation
    normalization: np.ndarray

    @functools.cached_property
    def data_identity(self) -> str:
        return data_identity(self.dataset)

    def trajectory(self) -> dict[str, Any]:
        """What decides the run's numbers: the trajectory settings and the data they train on."""
        return self.config.trajectory() | {DATA_KEY: self.data_identity}

    def create_backend(self, params: dict[str, np.ndarray]) -> Backend:
        return create_backend(
            self.backend_name,
            self.cfg,
            params,
            self.recipe,
            self.normalization,
            self.config.precision,
            self.config.seed,
        )


def data_identity(dataset: datasets.Dataset) -> str:
    """Sizes and CRC-32 of the training and validation images and labels."""
    crc = 0
    for part in (dataset.train, dataset.validation):
        for array in (part.images, part.labels):
            crc = zlib.crc32(np.ascontiguousarray(array).data, crc)
    return f"{len(dataset.train)} train + {len(dataset.validation)} validation images, crc32 {crc:08x}"


def model_config(config: TrainConfig, dataset: datasets.Dataset) -> ViTConfig:
    """The named model with the dataset's classes, and the config's overrides."""
    overrides = dict(config.model_overrides)
    overrides.setdefault("num_classes", dataset.num_classes)
    for field in ("dropout", "stochastic_depth"):
        if getattr(config, field) is not None:
            overrides[field] = getattr(config, field)
    cfg = vitspec.variant(config.model, **overrides)
    height, width, channels = dataset.image_shape
    if cfg.image_size != (height, width) or cfg.in_channels != channels:
        raise ValueError(
            f"--model {config.model} takes {cfg.image_size[0]}x{cfg.image_size[1]}x{cfg.in_channels} images;"
            f" {config.dataset} has {height}x{width}x{channels}"
        )
    return cfg


def make_recipe(config: TrainConfig, steps_per_epoch: int) -> Recipe:
    total_steps = config.epochs * steps_per_epoch
    return Recipe(
        base_lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=min(total_steps, round(config.warmup_epochs * steps_per_epoch)),
        total_steps=total_steps,
        label_smoothing=config.label_smoothing,
        clip_norm=config.clip_norm or None,
    )


def setup(config: TrainConfig, workdir: str | Path, backend: str) -> Run:
    """Load the data, build the model config and recipe, resolve the precision for `backend`."""
    config = config.replace(precision=config.precision or default_precision(backend))
    dataset = datasets.load(
        config.dataset_name,
        config.data_dir,
        validation_size=config.validation_size,
        download_missing=config.download,
    )
    cfg = model_config(config, dataset)
    steps_per_epoch = pipeline.steps_per_epoch(len(dataset.train), config.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {config.batch_size} exceeds the {len(dataset.train)} training images")
    return Run(
        config=config,
        backend_name=backend,
        workdir=Path(workdir),
        dataset=dataset,
        cfg=cfg,
        recipe=make_recipe(config, steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        augmentation=augmentation.DEFAULT_AUGMENTATION[config.dataset_name],
        normalization=normalization_table(dataset.stats),
    )


def start(run: Run, resume: bool) -> tuple[Backend, RunState]:
    """A fresh backend at `init_params(cfg, seed)`, or the workdir's last checkpoint when resuming."""
    if resume:
        params, optimizer, state = load_last(run.workdir, run.trajectory())
        backend = run.create_backend(params)
        backend.load_optimizer_state(optimizer)
        print(
            f"resumed {run.workdir} at step {state.step}/{run.recipe.total_steps}: epoch "
            f"{state.loader.epoch + 1}/{run.config.epochs}, step {state.loader.step}/{run.steps_per_epoch} "
            "of it",
            flush=True,
        )
        return backend, state
    if run.config.init is None:
        params = vitspec.init_params(run.cfg, run.config.seed)
    else:
        params, notes = fine_tuning_start(run.cfg, run.config.init)
        print("\n".join(notes), flush=True)
    return run.create_backend(params), RunState.fresh(run.config.seed)


def train_epoch_steps(
    run: Run,
    backend: Backend,
    batches: Iterator[pipeline.TrainBatch],
    state: RunState,
    stop_step: int,
    checkpoint: Callable[[], None] | None = None,
) -> None:
    """Steps until the epoch ends or `stop_step`; updates `state` (step, loader, progress), and calls
    `checkpoint` whenever checkpoint_every minutes have passed since the last one."""
    epoch = state.loader.epoch
    config = run.config
    line = ProgressLine(
        epoch, config.epochs, run.steps_per_epoch, stop_step, config.batch_size, config.progress_every
    )
    pending: list[tuple[int, Any, Any, int]] = []  # (step, device scalars, images), read at each redraw
    last_checkpoint = time.perf_counter()

    def read_pending() -> None:
        for step, loss, correct, n in pending:
            loss = float(loss)
            if not math.isfinite(loss):
                raise ValueError(
                    f"training diverged: the loss of step {step} is {loss}; nothing after the last save is "
                    f"written (last.* holds step {state_saved_step(run)}). Lower --lr (it is {config.lr}) "
                    "and start the run again"
                )
            state.progress.loss_sum += loss * n
            state.progress.correct += int(correct)
            state.progress.seen += n
        pending.clear()

    started = time.perf_counter()
    while state.step < stop_step and state.loader.epoch == epoch:
        batch = next(batches)
        loss, correct = backend.train_step(batch.images, batch.labels, learning_rate(state.step, run.recipe))
        pending.append((state.step + 1, loss, correct, len(batch.labels)))
        state.step, state.loader = state.step + 1, batch.next_state
        checkpoint_due = checkpoint and time.perf_counter() - last_checkpoint >= 60 * config.checkpoint_every
        # Reading the scalars waits for the device: only when something is drawn or saved, so an
        # asynchronous backend (JAX) keeps dispatching steps while the previous ones compute.
        if line.due() or checkpoint_due:
            read_pending()
            state.progress.seconds += time.perf_counter() - started
            started = time.perf_counter()
            line.update(state.loader.step or run.steps_per_epoch, state.step, state.progress)
        if checkpoint_due and state.loader.epoch == epoch:  # an epoch's end is saved after validation
            checkpoint()
            last_checkpoint = started = time.perf_counter()
    read_pending()
    state.progress.seconds += time.perf_counter() - started
    in_epoch = state.loader.step if state.loader.epoch == epoch else run.steps_per_epoch
    line.update(in_epoch, state.step, state.progress, force=True)
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
        validation = evaluate(
            backend.eval_logits,
            run.dataset.validation,
            run.cfg.num_classes,
            run.config.eval_batch_size,
            run.recipe.label_smoothing,
        )
        record |= {"val_loss": validation.loss, "val_accuracy": validation.top1}
        if state.best_accuracy is None or validation.top1 > state.best_accuracy:
            state.best_accuracy = validation.top1
            vitspec.save(run.workdir / BEST, run.cfg, finite_params(run, backend, state))
            record["best"] = True
    state.history.append(record)
    state.progress = EpochProgress()
    return record


def train(run: Run, backend: Backend, state: RunState) -> RunState:
    """The epoch loop from `state` to the end of the schedule or max_steps."""
    stop_step = run.recipe.total_steps
    if run.config.max_steps is not None:
        stop_step = min(stop_step, run.config.max_steps)
    train_set = run.dataset.train
    stream = pipeline.train_batches(
        train_set.images, train_set.labels, run.config.batch_size, state.loader, run.augmentation
    )
    with pipeline.Prefetcher(stream) as batches:
        while state.step < stop_step:
            epoch = state.loader.epoch
            train_epoch_steps(
                run, backend, batches, state, stop_step, lambda: save_last_of(run, backend, state)
            )
            if state.loader.epoch != epoch:
                record = finish_epoch(run, backend, state)
                print(describe(record), flush=True)
                write_metrics(run.workdir, state.history)
            save_last_of(run, backend, state)
    return state


def state_saved_step(run: Run) -> int | str:
    """The step the workdir's last checkpoint holds, for messages."""
    path = run.workdir / LAST_STATE_JSON
    return json.loads(path.read_text())["step"] if path.is_file() else "none"


def finite_params(run: Run, backend: Backend, state: RunState) -> dict[str, np.ndarray]:
    """The backend's parameters, or the named error of a run that diverged (nothing non-finite is saved)."""
    params = backend.reference_params()
    bad = nonfinite_names(params)
    if bad:
        raise ValueError(
            f"training diverged: after step {state.step} the parameters hold NaN or infinite values "
            f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); nothing of it is written (last.* holds "
            f"step {state_saved_step(run)}). Lower --lr (it is {run.config.lr}) and start the run again"
        )
    return params


def save_last_of(run: Run, backend: Backend, state: RunState) -> None:
    params = finite_params(run, backend, state)
    save_last(run.workdir, run.cfg, params, backend.optimizer_state(), state, run.trajectory())


def final_report(run: Run, state: RunState, wall_seconds: float) -> dict[str, Any]:
    """Test-set evaluation of the best model (the last if none was validated); summary and plots."""
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
    write_json(run.workdir / "summary.json", summary)
    plot_reports(run.workdir, state.history, test.confusion, run.dataset.class_names)
    top5 = f", top-5 {100 * test.top5:.2f}%" if test.top5 is not None else ""
    print(f"test top-1 {100 * test.top1:.2f}%{top5} ({best_path.name}, {len(run.dataset.test)} images)")
    return summary


RUN_FILES = (
    "config.json",
    LAST,
    LAST_STATE_NPZ,
    LAST_STATE_JSON,
    BEST,
    "metrics.jsonl",
    "summary.json",
    "curves.png",
    "confusion.png",
)


def claim_workdir(workdir: Path, overwrite: bool) -> None:
    """A fresh run's workdir: refused if a run is already there, unless `overwrite` (which removes it)."""
    existing = [name for name in RUN_FILES if (workdir / name).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{workdir} already holds a run ({', '.join(existing)}): pass --resume to continue it, "
            "--overwrite to replace it, or another --workdir"
        )
    for name in existing:
        (workdir / name).unlink()
    workdir.mkdir(parents=True, exist_ok=True)


def train_and_evaluate(
    config: TrainConfig, workdir: str | Path, backend: str, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Train `config` with `backend` ('torch' or 'flax') in `workdir`, then test the best model.

    Returns the summary (also in <workdir>/summary.json). With `resume`, continues from the
    workdir's last checkpoint, refusing one written under other trajectory settings; without it, a
    workdir that holds a run is refused unless `overwrite`.
    """
    started = time.perf_counter()
    run = setup(config, workdir, backend)
    if not resume:
        claim_workdir(run.workdir, overwrite)
    backend_state = start(run, resume)
    write_json(
        run.workdir / "config.json",
        {
            "backend": backend,
            "model": json.loads(run.cfg.to_json()),
            "recipe": dataclasses.asdict(run.recipe),
            "augmentation": dataclasses.asdict(run.augmentation),
            "settings": dataclasses.asdict(run.config),
        },
    )
    print(
        f"{backend}: {run.config.model} ({vitspec.num_params(run.cfg):,} params) on {run.config.dataset} "
        f"({len(run.dataset.train)} train / {len(run.dataset.validation)} val / "
        f"{len(run.dataset.test)} test), "
        f"{run.steps_per_epoch} steps/epoch, {run.config.precision}, workdir {run.workdir}",
        flush=True,
    )
    state = train(run, *backend_state)
    return final_report(run, state, time.perf_counter() - started)
