"""The training command: `vitspec train --backend torch|flax`, `python -m backends.<torch|flax>_vit.train`.

A thin layer: the flags are `TrainConfig`'s fields (name, default, help, group), plus where the
run lives; it builds the config and calls `train_and_evaluate`. Under `torchrun` (or JAX's several
processes) every process runs this command; an error is printed by process 0 alone, and every
process exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from vitspec.app.training.backend import BACKENDS, topology
from vitspec.app.training.config import TrainConfig, flag
from vitspec.app.training.loop import train_and_evaluate

GROUPS = ("data", "model", "recipe", "run")
ERROR_GRACE_SECONDS = 10.0


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object of config fields")
    return value


# TrainConfig's annotations (strings: postponed evaluation) -> how a flag's text is read.
_READERS = {
    "int": int,
    "float": float,
    "str": str,
    "int | None": int,
    "float | None": float,
    "str | None": str,
    "Path | None": Path,
    "dict": _json_object,
}


def add_config_flags(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One flag per TrainConfig field, in its group, its default shown once; returns the groups."""
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for field in dataclasses.fields(TrainConfig):
        meta = dict(field.metadata["argparse"])
        group, name = groups[field.metadata["group"]], f"--{flag(field.name)}"
        if field.type == "bool":
            group.add_argument(name, action="store_true", help=field.metadata["help"])
            continue
        shown = f" (default: {field.default})" if meta.pop("show_default", True) else ""
        group.add_argument(
            name,
            type=_READERS[field.type],
            default=field.default,
            help=field.metadata["help"] + shown,
            **meta,
        )
    return groups


def build_parser(prog: str, backend: str | None = None) -> argparse.ArgumentParser:
    """The flags of the training command; with `backend` given (the backends' own modules) no --backend."""
    description = "Train a vitspec ViT" + (f" with the {backend} backend." if backend else ".")
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if backend is None:
        parser.add_argument("--backend", choices=BACKENDS, required=True, help="the framework that trains")
    run = add_config_flags(parser)["run"]
    run.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the run's files go (default: runs/<backend>-<dataset>-<model>)",
    )
    run.add_argument("--resume", action="store_true", help="continue from <workdir>/last.*")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --workdir")
    return parser


def config_of(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def default_workdir(config: TrainConfig, backend: str) -> Path:
    return Path("runs") / f"{backend}-{config.dataset}-{config.model.replace('/', '-')}"


def main(
    argv: Sequence[str] | None = None, *, backend: str | None = None, prog: str = "vitspec train"
) -> dict[str, Any]:
    """Parse the flags, train, test; returns the summary (also in <workdir>/summary.json)."""
    parser = build_parser(prog, backend)
    args = parser.parse_args(argv)
    backend = backend or args.backend
    where = topology(backend)  # joins the run's other processes when launched as several
    try:
        # A bad value is a ValueError naming its flag: `vitspec.app.cli.run` reports it.
        config = config_of(args)
        return train_and_evaluate(
            config,
            args.workdir or default_workdir(config, backend),
            backend,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError):
        if where.writer:
            raise
        leave_the_error_to_process_0()


def leave_the_error_to_process_0() -> NoReturn:
    """Every process meets the same user error; process 0 says it once. The others exit with status 2
    after a grace period, quietly even when a launcher (torchrun) stops them first when process 0 exits:
    had they exited first, torchrun could stop process 0 before its message is out."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(ERROR_GRACE_SECONDS)
    raise SystemExit(2)
