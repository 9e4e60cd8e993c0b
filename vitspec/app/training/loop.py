"""`train_and_evaluate(config, workdir, backend)`: the training run both backends share.

NumPy only: the batches (seeded, uint8, identical for both backends), the learning rate of every
step (computed on the host) and what a checkpoint holds are decided here and in `vitspec.recipe` /
`vitspec.app.pipeline`, so the same config gives the same run in either framework, and a resumed
run reaches exactly what the uninterrupted run reaches. Dropout randomness is `vitspec.masks`: a
function of (seed, step, global example), so it needs no saved state.

Several devices (data parallelism): every process runs this loop on the same numbers, fed its
rows of each global batch (the global batch and its order do not depend on the device count);
process 0 alone prints and writes, and every process resumes from what it wrote.

Workdir: config.json (model, recipe, settings), the `last` checkpoint (vitspec.app.training.state),
best.safetensors (best validation accuracy so far), metrics.jsonl (a line per epoch), and after the
test-set evaluation summary.json, curves.png, confusion.png.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import vitspec
from vitspec.app import pipeline
from vitspec.app.training.backend import Backend
from vitspec.app.training.config import TrainConfig
from vitspec.app.training.evaluation import evaluate
from vitspec.app.training.progress import ProgressLine
from vitspec.app.training.reports import describe, final_report
from vitspec.app.training.setup import Run, say, setup, start
from vitspec.app.training.state import (
    BEST,
    LAST_STATE_JSON,
    EpochProgress,
    RunState,
    claim_workdir,
    save_last,
    write_json,
    write_metrics,
)
from vitspec.formats.checkpoint import nonfinite_names
from vitspec.recipe import learning_rate


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
        epoch,
        config.epochs,
        run.steps_per_epoch,
        stop_step,
        config.batch_size,
        config.progress_every,
        enabled=run.topology.writer,
    )
    # (step, device scalars, images): read at each redraw and save
    pending: collections.deque[tuple[int, Any, Any, int]] = collections.deque()
    last_checkpoint = time.perf_counter()

    def read_pending() -> None:
        while pending:
            step, loss, correct, n = pending.popleft()
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

    started = time.perf_counter()
    while state.step < stop_step and state.loader.epoch == epoch:
        batch = next(batches)
        loss, correct = backend.train_step(
            batch.images, batch.labels, learning_rate(state.step, run.recipe), batch.mix
        )
        pending.append((state.step + 1, loss, correct, config.batch_size))  # the global batch's
        state.step, state.loader = state.step + 1, batch.next_state
        checkpoint_due = checkpoint and time.perf_counter() - last_checkpoint >= 60 * config.checkpoint_every
        # Reading a step's scalars waits for it: they are read only when something is drawn or saved,
        # so an asynchronous backend keeps steps queued while one computes (as many as it allows:
        # backends/flax_vit/train.py, MAX_STEPS_IN_FLIGHT).
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
        # With Mixup/CutMix: top-1 against each image's own label (TrainBatch.labels), not its partner's.
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
            if run.topology.writer:
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
    where = run.topology
    stream = pipeline.train_batches(
        train_set.images,
        train_set.labels,
        run.config.batch_size,
        state.loader,
        run.augmentation,
        shard=(where.process_index, where.process_count),
        mixing=run.mixing,
    )
    checkpoint = (lambda: save_last_of(run, backend, state)) if where.writer else None
    with pipeline.Prefetcher(stream) as batches:
        while state.step < stop_step:
            epoch = state.loader.epoch
            train_epoch_steps(run, backend, batches, state, stop_step, checkpoint)
            if state.loader.epoch != epoch:
                record = finish_epoch(run, backend, state)
                if where.writer:
                    print(describe(record), flush=True)
                    write_metrics(run.workdir, state.history)
            if where.writer:
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
    writer = run.topology.writer
    if not resume:
        claim_workdir(run.workdir, overwrite, remove=writer)  # every process refuses alike
    backend_state = start(run, resume)
    run.topology.barrier()  # the workdir claimed and read by all before process 0 writes in it
    if writer:
        write_json(
            run.workdir / "config.json",
            {
                "backend": backend,
                "model": json.loads(run.cfg.to_json()),
                "recipe": dataclasses.asdict(run.recipe),
                "augmentation": dataclasses.asdict(run.augmentation),
                "mixing": dataclasses.asdict(run.mixing),
                "settings": dataclasses.asdict(run.config),
            },
        )
    devices = run.topology.device_count
    say(
        run,
        f"{backend}: {run.config.model} ({vitspec.num_params(run.cfg):,} params) on {run.config.dataset} "
        f"({len(run.dataset.train)} train / {len(run.dataset.validation)} val / "
        f"{len(run.dataset.test)} test), "
        f"{run.steps_per_epoch} steps/epoch, {run.config.precision}"
        + (f", {devices} devices" if devices > 1 else "")
        + f", workdir {run.workdir}",
    )
    state = train(run, *backend_state)
    run.topology.barrier()  # the best model written before every process reads it for the test
    summary = final_report(run, state, time.perf_counter() - started)
    run.topology.leave()
    return summary
