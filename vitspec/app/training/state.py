"""A run's state and its files in the workdir: the `last` checkpoint that `--resume` trusts.

checkpoints/<n>/model.safetensors   generation n of the model, reference format
checkpoints/<n>/optimizer.npz       its AdamW moments (reference names)
last.state.json                     the manifest: which generation is the run's, the CRC-32 of its two
                                    files, step, LoaderState, history, best so far, trajectory settings
last.safetensors                    a hard link to the current generation's model, for users

A checkpoint is one atomic step: a new generation is written beside the old one and becomes the
run's when last.state.json is renamed over its predecessor; the old generation is removed only
after that. A kill at any instant leaves a manifest naming a complete generation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from zlib_ng.zlib_ng import crc32

from vitspec.app import pipeline
from vitspec.config import ViTConfig
from vitspec.formats.checkpoint import atomic_write, load, save
from vitspec.formats.npz_file import write_npz

LAST, BEST = "last.safetensors", "best.safetensors"
# The run's data, as sizes and a checksum, beside the trajectory settings: a resume on other data
# (another --data-dir) is another run.
DATA_KEY, DATA_KEY_LABEL = "data", "the training data (--data-dir)"
LAST_STATE_JSON = "last.state.json"
CHECKPOINTS, MODEL, OPTIMIZER = "checkpoints", "model.safetensors", "optimizer.npz"
# The layout before generations (model and optimizer state beside the manifest), still resumable.
LEGACY_OPTIMIZER = "last.state.npz"


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

    @classmethod
    def fresh(cls, seed: int) -> RunState:
        return cls(
            step=0,
            loader=pipeline.LoaderState(seed=seed),
            history=[],
            best_accuracy=None,
            progress=EpochProgress(),
        )


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = crc32(chunk, crc)
    return crc


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: write_npz(f, arrays))


def write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=2, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def save_last(
    workdir: Path,
    cfg: ViTConfig,
    params: dict[str, np.ndarray],
    optimizer: dict[str, np.ndarray],
    state: RunState,
    trajectory: dict[str, Any],
) -> None:
    """Write the next generation, then publish it by renaming last.state.json over the old one."""
    previous = read_manifest(workdir)
    generation = (previous.get("generation", 0) if previous else 0) + 1
    directory = workdir / CHECKPOINTS / f"{generation:06d}"
    if directory.exists():  # an earlier attempt at this generation, killed before it was published
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    save(directory / MODEL, cfg, params)
    save_npz(directory / OPTIMIZER, optimizer)
    fsync_directory(directory)
    write_json(
        workdir / LAST_STATE_JSON,
        {
            "generation": generation,
            "directory": directory.relative_to(workdir).as_posix(),
            "step": state.step,
            "loader": state.loader.to_dict(),
            "history": state.history,
            "best_accuracy": state.best_accuracy,
            "progress": dataclasses.asdict(state.progress),
            "flags": trajectory,
            "crc32": {MODEL: file_crc32(directory / MODEL), OPTIMIZER: file_crc32(directory / OPTIMIZER)},
        },
    )
    fsync_directory(workdir)
    tidy_last(workdir, directory)


def read_manifest(workdir: Path) -> dict[str, Any] | None:
    path = workdir / LAST_STATE_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def generation_files(workdir: Path, manifest: Mapping[str, Any]) -> tuple[Path, Path]:
    """(model, optimizer state) of the generation the manifest names."""
    if "directory" in manifest:
        directory = workdir / manifest["directory"]
        return directory / MODEL, directory / OPTIMIZER
    return workdir / LAST, workdir / LEGACY_OPTIMIZER


def tidy_last(workdir: Path, directory: Path) -> None:
    """Point last.safetensors at the published generation and remove every other one: the steps after
    the publishing rename, redone on resume when a kill came first."""
    model, last = directory / MODEL, workdir / LAST
    if not (last.is_file() and os.path.samefile(model, last)):
        link = workdir / f".{LAST}.link.tmp"
        link.unlink(missing_ok=True)
        try:
            os.link(model, link)
        except OSError:  # a file system without hard links: a copy
            shutil.copyfile(model, link)
        os.replace(link, last)
    for other in (workdir / CHECKPOINTS).iterdir():
        if other == directory:
            continue
        if other.is_dir():
            shutil.rmtree(other)
        else:
            other.unlink()


def fsync_directory(path: Path) -> None:
    """Make the renames and new entries in `path` durable (a rename is atomic, not yet on disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_last(
    workdir: Path, trajectory: dict[str, Any], tidy: bool = True, defaults: Mapping[str, Any] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], RunState]:
    """(reference params, optimizer state, run state) of workdir's last checkpoint, checked whole and
    against the trajectory settings it was written under; a setting the run did not save (one added
    after it was written) counts as its value in `defaults`, what the run then trained with. With
    `tidy` (the writing process only), finishes the publishing steps a kill interrupted."""
    state_path = workdir / LAST_STATE_JSON
    saved = read_manifest(workdir)
    if saved is None:
        started = " (the run there stopped before its first checkpoint)" if workdir.is_dir() else ""
        raise FileNotFoundError(
            f"--resume: {state_path} does not exist: nothing to resume in {workdir}{started}; "
            "start the run without --resume (with --overwrite where a run was begun)"
        )
    model, optimizer_file = generation_files(workdir, saved)
    for path in (model, optimizer_file):
        if not path.is_file() or file_crc32(path) != saved["crc32"][path.name]:
            raise ValueError(
                f"--resume: {path} is missing or not the file {state_path} was written with "
                "(damaged or edited after the checkpoint was written)"
            )
    now = json.loads(json.dumps(trajectory, default=str))  # as saved: JSON types
    flags = json.loads(json.dumps(dict(defaults or {}), default=str)) | saved["flags"]
    changed = {k: (flags.get(k), v) for k, v in now.items() if flags.get(k) != v}
    if changed:
        described = ", ".join(
            f"{DATA_KEY_LABEL if k == DATA_KEY else '--' + k.replace('_', '-')}: saved {old!r}, now {new!r}"
            for k, (old, new) in changed.items()
        )
        raise ValueError(f"--resume: {workdir} was trained with other flags ({described})")
    _, params = load(model)
    with np.load(optimizer_file) as npz:
        optimizer = {k: npz[k] for k in npz.files}
    state = RunState(
        step=saved["step"],
        loader=pipeline.LoaderState.from_dict(saved["loader"]),
        history=saved["history"],
        best_accuracy=saved["best_accuracy"],
        progress=EpochProgress(**saved["progress"]),
    )
    if tidy and "directory" in saved:
        tidy_last(workdir, model.parent)
    return params, optimizer, state


def write_metrics(workdir: Path, history: list[dict]) -> None:
    """metrics.jsonl from the history (rewritten whole, so a resumed run's file has no duplicates)."""
    text = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write(workdir / "metrics.jsonl", lambda f: f.write(text.encode()))


RUN_FILES = (
    "config.json",
    LAST,
    LAST_STATE_JSON,
    CHECKPOINTS,
    LEGACY_OPTIMIZER,
    BEST,
    "metrics.jsonl",
    "summary.json",
    "curves.png",
    "confusion.png",
)


def claim_workdir(workdir: Path, overwrite: bool, remove: bool = True) -> None:
    """A fresh run's workdir: refused if a run is already there, unless `overwrite` (which removes it;
    only where `remove`: the writing process, the others just refuse alike).

    A run killed before its first checkpoint was published (config.json, a checkpoints/ directory and
    no manifest) holds nothing to lose, so it is not refused."""
    existing = [name for name in RUN_FILES if (workdir / name).exists()]
    if set(existing) - {"config.json", CHECKPOINTS} and not overwrite:
        raise ValueError(
            f"{workdir} already holds a run ({', '.join(existing)}): pass --resume to continue it, "
            "--overwrite to replace it, or another --workdir"
        )
    if not remove:
        return
    for name in existing:
        path = workdir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
