"""Setting a run up: the data, the model config, the recipe, the backend at its first step.

`setup(config, workdir, backend)` loads the data and builds the model config and recipe from a
TrainConfig; `start(run, resume)` creates the backend at `init_params(cfg, seed)`, at a fine-tuning
checkpoint (`--init`), or at the workdir's last checkpoint when resuming.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from pathlib import Path
from typing import Any

import numpy as np

import vitspec
from vitspec.app import augmentation, datasets, pipeline, randaugment
from vitspec.app.mixing import Mixing
from vitspec.app.training.backend import (
    Backend,
    Topology,
    create_backend,
    default_precision,
    normalization_table,
    topology,
)
from vitspec.app.training.config import TrainConfig
from vitspec.app.training.init import fine_tuning_start
from vitspec.app.training.state import (
    DATA_KEY,
    RunState,
    load_last,
)
from vitspec.config import ViTConfig
from vitspec.recipe import Recipe


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
    topology: Topology = dataclasses.field(default_factory=Topology)
    mixing: Mixing = dataclasses.field(default_factory=Mixing)

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


def training_augmentation(config: TrainConfig, stats: datasets.ChannelStats) -> augmentation.Augmentation:
    """The dataset's default crop and flip, then --randaugment's, filling with the mean pixel (timm's)."""
    default = augmentation.DEFAULT_AUGMENTATION[config.dataset_name]
    if config.randaugment is None:
        return default
    randaugment.require_pillow()
    fill = tuple(min(255, round(255 * mean)) for mean in stats.mean)
    settings = dataclasses.replace(randaugment.parse(config.randaugment), fill=fill)
    return dataclasses.replace(default, randaugment=settings)


def setup(config: TrainConfig, workdir: str | Path, backend: str) -> Run:
    """Join the run's other processes, load the data, build the model config and recipe, resolve the
    precision for `backend`."""
    where = topology(backend)  # first: JAX's processes must meet before JAX computes anything
    if config.batch_size % where.device_count:
        raise ValueError(
            f"--batch-size {config.batch_size} does not split evenly over the {where.device_count} devices "
            f"this run trains on: pass a multiple of {where.device_count} (every device takes an equal share "
            "of each batch)"
        )
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
        augmentation=training_augmentation(config, dataset.stats),
        normalization=normalization_table(dataset.stats),
        topology=where,
        mixing=Mixing(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix),
    )


def start(run: Run, resume: bool) -> tuple[Backend, RunState]:
    """A fresh backend at `init_params(cfg, seed)`, or the workdir's last checkpoint when resuming."""
    if resume:
        defaults = TrainConfig.trajectory_defaults()
        params, optimizer, state = load_last(
            run.workdir, run.trajectory(), tidy=run.topology.writer, defaults=defaults
        )
        backend = run.create_backend(params)
        backend.load_optimizer_state(optimizer)
        say(
            run,
            f"resumed {run.workdir} at step {state.step}/{run.recipe.total_steps}: epoch "
            f"{state.loader.epoch + 1}/{run.config.epochs}, step {state.loader.step}/{run.steps_per_epoch} "
            "of it",
        )
        return backend, state
    if run.config.init is None:
        params = vitspec.init_params(run.cfg, run.config.seed)
    else:
        params, notes = fine_tuning_start(run.cfg, run.config.init, run.config.resample)
        say(run, "\n".join(notes))
    return run.create_backend(params), RunState.fresh(run.config.seed)


def say(run: Run, text: str) -> None:
    """Print `text` from the process that writes (one line per run, not one per process)."""
    if run.topology.writer:
        print(text, flush=True)
