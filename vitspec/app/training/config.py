"""`TrainConfig`: everything a training run is, as data; the flags of both training commands derive from it.

A field whose metadata says `trajectory=True` decides the numbers the run produces: `--resume`
refuses to continue a run under a different value of any of them. The others (where the data
lives, how often to print or evaluate in batches, when to stop) do not change the trajectory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vitspec.app import datasets, randaugment
from vitspec.posemb import RESAMPLE_METHODS
from vitspec.variants import PRESETS

# The command line says fashion-mnist (the dataset's own spelling); vitspec.app.datasets says fashion_mnist.
DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "fashion-mnist": "fashion_mnist"}
PRECISIONS = ("fp32", "bf16", "fp64")


def _field(default: Any, help: str, group: str, trajectory: bool = False, **argparse: Any) -> Any:
    return dataclasses.field(
        default=default,
        metadata={"help": help, "group": group, "trajectory": trajectory, "argparse": argparse},
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run's settings, validated on construction (a bad value names its flag)."""

    dataset: str = _field("cifar10", "the data set", "data", True, choices=list(DATASETS))
    data_dir: Path | None = _field(
        None, "where data sets live (default: $VITSPEC_DATA_DIR or ./data)", "data", show_default=False
    )
    download: bool = _field(False, "fetch missing official files first", "data")
    validation_size: int = _field(
        datasets.DEFAULT_VALIDATION_SIZE,
        "training images held out for validation (picks best.safetensors)",
        "data",
        True,
    )
    model: str = _field(
        "cifar-notebook", f"a preset ({', '.join(PRESETS)}) or SIZE/PATCH, e.g. Ti/4", "model", True
    )
    model_overrides: dict = _field(
        None,
        "config fields as JSON, e.g. '{\"depth\": 2}' (default: none)",
        "model",
        True,
        show_default=False,
    )
    init: Path | None = _field(
        None,
        "start from this checkpoint (any format `vitspec convert` reads): fine-tuning; the head is "
        "re-initialized for another class count and the position embedding resampled for another image size",
        "model",
        True,
        show_default=False,
    )
    resample: str | None = _field(
        None,
        "how --init's position embedding is resampled for another image size (default: the file "
        "format's own: timm's for torch files, hf's for transformers, big_vision's otherwise)",
        "model",
        True,
        show_default=False,
        choices=list(RESAMPLE_METHODS),
    )
    dropout: float | None = _field(
        None, "dropout rate (default: the model's)", "model", True, show_default=False
    )
    stochastic_depth: float | None = _field(
        None, "stochastic depth rate (default: the model's)", "model", True, show_default=False
    )
    epochs: int = _field(100, "epochs; the schedule spans them", "recipe", True)
    batch_size: int = _field(128, "images per step", "recipe", True)
    lr: float = _field(1e-3, "AdamW peak learning rate", "recipe", True)
    weight_decay: float = _field(0.05, "AdamW weight decay, on kernels only", "recipe", True)
    warmup_epochs: float = _field(5.0, "linear warmup, then cosine decay", "recipe", True)
    label_smoothing: float = _field(0.1, "label smoothing of the cross-entropy", "recipe", True)
    randaugment: str | None = _field(
        None,
        "RandAugment after the crop and flip, timm's spelling: rand-m<magnitude 0-10>[-n<ops per image, "
        "default 2>][-mstd<magnitude std>][-inc1], e.g. rand-m9-n2-mstd0.5 (default: off; needs Pillow)",
        "recipe",
        True,
        show_default=False,
    )
    mixup: float = _field(0.0, "Mixup's Beta(alpha, alpha) per batch; 0 turns it off", "recipe", True)
    cutmix: float = _field(
        0.0,
        "CutMix's Beta(alpha, alpha) per batch; 0 turns it off (with --mixup: either, half the batches each)",
        "recipe",
        True,
    )
    clip_norm: float = _field(
        1.0, "clip the global gradient norm to this; 0 turns clipping off", "recipe", True
    )
    seed: int = _field(0, "init, data order, augmentation, dropout", "recipe", True)
    precision: str | None = _field(
        None,
        "fp32, bf16 or fp64 (default: bf16 on a GPU, fp32 on the CPU); fp64 is the verification mode: "
        "float64 throughout, where runs on any number of devices or in either framework agree to rounding",
        "run",
        True,
        choices=list(PRECISIONS),
        show_default=False,
    )
    max_steps: int | None = _field(
        None,
        "stop after this many steps in all (the schedule still spans --epochs)",
        "run",
        show_default=False,
    )
    eval_batch_size: int = _field(512, "images per evaluation batch", "run")
    checkpoint_every: float = _field(
        5.0, "minutes between mid-epoch saves of last.* (--resume loses at most this)", "run"
    )
    progress_every: float = _field(
        30.0, "seconds between progress lines when stderr is not a terminal", "run"
    )

    def __post_init__(self) -> None:
        if self.model_overrides is None:
            object.__setattr__(self, "model_overrides", {})
        problems = []
        if self.dataset not in DATASETS:
            problems.append(f"--dataset {self.dataset!r}: expected one of {', '.join(DATASETS)}")
        if not isinstance(self.model_overrides, dict):
            problems.append(f"--model-overrides must be a JSON object, got {self.model_overrides!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{flag(name)} {getattr(self, name)}: must be at least 1")
        for name in ("validation_size", "seed"):
            if getattr(self, name) < 0:
                problems.append(f"--{flag(name)} {getattr(self, name)}: must not be negative")
        for name in ("checkpoint_every", "progress_every"):
            if not getattr(self, name) > 0:
                problems.append(f"--{flag(name)} {getattr(self, name)}: must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"--max-steps {self.max_steps}: must be at least 1")
        if not self.lr > 0:
            problems.append(f"--lr {self.lr}: must be positive")
        for name in ("weight_decay", "warmup_epochs", "clip_norm", "mixup", "cutmix"):
            if not getattr(self, name) >= 0:
                problems.append(f"--{flag(name)} {getattr(self, name)}: must not be negative")
        for name in ("label_smoothing", "dropout", "stochastic_depth"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                problems.append(f"--{flag(name)} {value}: expected a rate in [0, 1)")
        if self.precision is not None and self.precision not in PRECISIONS:
            problems.append(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.randaugment is not None:
            try:
                randaugment.parse(self.randaugment)
            except ValueError as error:
                problems.append(str(error))
        if self.resample is not None and self.init is None:
            problems.append(f"--resample {self.resample}: it resamples --init's posemb; no --init is given")
        if problems:
            raise ValueError("; ".join(problems))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def trajectory(self) -> dict[str, Any]:
        """The fields that decide the run's numbers, by name (what --resume compares)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["trajectory"]}

    @classmethod
    def trajectory_defaults(cls) -> dict[str, Any]:
        """The trajectory fields' defaults: what a run saved before a field existed trained with."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.metadata["trajectory"]}

    @property
    def dataset_name(self) -> str:
        """The dataset's name in vitspec.app.datasets."""
        return DATASETS[self.dataset]


def flag(field_name: str) -> str:
    return field_name.replace("_", "-")
