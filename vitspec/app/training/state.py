"""A run's state and its files in the workdir: the `last` checkpoint that `--resume` trusts.

last.safetensors      the model after the latest epoch (or the --max-steps stop), reference format
last.state.npz        AdamW moments (reference names) beside it
last.state.json       step, LoaderState, history, best so far, the trajectory settings; the
                      CRC-32 of the two files above, so a kill between writes is caught
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitspec.app import pipeline
from vitspec.config import ViTConfig
from vitspec.formats.checkpoint import atomic_write, load, save

LAST, BEST = "last.safetensors", "best.safetensors"
# The run's data, as sizes and a checksum, beside the trajectory settings: a resume on other data
# (another --data-dir) is another run.
DATA_KEY, DATA_KEY_LABEL = "data", "the training data (--data-dir)"
LAST_STATE_NPZ, LAST_STATE_JSON = "last.state.npz", "last.state.json"


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
            crc = zlib.crc32(chunk, crc)
    return crc


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


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
    """last.safetensors and last.state.npz, then last.state.json naming both by CRC (written last:
    it is what --resume trusts)."""
    save(workdir / LAST, cfg, params)
    save_npz(workdir / LAST_STATE_NPZ, optimizer)
    write_json(
        workdir / LAST_STATE_JSON,
        {
            "step": state.step,
            "loader": state.loader.to_dict(),
            "history": state.history,
            "best_accuracy": state.best_accuracy,
            "progress": dataclasses.asdict(state.progress),
            "flags": trajectory,
            "crc32": {LAST: file_crc32(workdir / LAST), LAST_STATE_NPZ: file_crc32(workdir / LAST_STATE_NPZ)},
        },
    )


def load_last(
    workdir: Path, trajectory: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], RunState]:
    """(reference params, optimizer state, run state) of workdir's last checkpoint, checked whole and
    against the trajectory settings it was written under."""
    state_path = workdir / LAST_STATE_JSON
    if not state_path.is_file():
        raise FileNotFoundError(f"--resume: {state_path} does not exist (nothing to resume in {workdir})")
    saved = json.loads(state_path.read_text())
    for name, crc in saved["crc32"].items():
        if not (workdir / name).is_file() or file_crc32(workdir / name) != crc:
            raise ValueError(
                f"--resume: {workdir / name} is missing or not the file {state_path} was "
                "written with (interrupted while checkpointing?)"
            )
    now = json.loads(json.dumps(trajectory, default=str))  # as saved: JSON types
    changed = {k: (saved["flags"].get(k), v) for k, v in now.items() if saved["flags"].get(k) != v}
    if changed:
        described = ", ".join(
            f"{DATA_KEY_LABEL if k == DATA_KEY else '--' + k.replace('_', '-')}: saved {old!r}, now {new!r}"
            for k, (old, new) in changed.items()
        )
        raise ValueError(f"--resume: {workdir} was trained with other flags ({described})")
    _, params = load(workdir / LAST)
    with np.load(workdir / LAST_STATE_NPZ) as npz:
        optimizer = {k: npz[k] for k in npz.files}
    state = RunState(
        step=saved["step"],
        loader=pipeline.LoaderState.from_dict(saved["loader"]),
        history=saved["history"],
        best_accuracy=saved["best_accuracy"],
        progress=EpochProgress(**saved["progress"]),
    )
    return params, optimizer, state


def write_metrics(workdir: Path, history: list[dict]) -> None:
    """metrics.jsonl from the history (rewritten whole, so a resumed run's file has no duplicates)."""
    text = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write(workdir / "metrics.jsonl", lambda f: f.write(text.encode()))


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
