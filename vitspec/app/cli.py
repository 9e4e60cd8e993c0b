"""`vitspec COMMAND ...` (also `python -m vitspec COMMAND ...`): every command of the project.

Each command is a module's `main(argv, prog)`, imported only when it runs, so `vitspec convert`
does not load a deep learning framework it does not need.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

# command -> (module, function, one line of help)
COMMANDS = {
    "train": ("vitspec.app.training.cli", "main", "train a model with --backend torch or flax"),
    "evaluate": ("vitspec.app.evaluate", "main", "test accuracy of a checkpoint with numpy, torch or flax"),
    "convert": ("vitspec.app.convert", "main", "convert a checkpoint between the ecosystems' layouts"),
    "attention": (
        "vitspec.app.attention",
        "main",
        "pictures of where a model looks: rollout and last-block heads",
    ),
    "download": ("vitspec.app.cli", "download_main", "fetch and verify a dataset's official files"),
    "summary": ("vitspec.app.inspect_model", "summary_main", "parameter table of a variant or preset"),
    "gradcheck": (
        "vitspec.app.inspect_model",
        "gradcheck_main",
        "the reference's gradients vs finite differences",
    ),
}


def download_main(argv: Sequence[str] | None = None, prog: str = "vitspec download") -> int:
    from vitspec.app import datasets

    parser = argparse.ArgumentParser(
        prog=prog, description="Fetch a dataset's official files, checking their MD5s."
    )
    parser.add_argument("name", choices=datasets.DATASET_NAMES)
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="where (default: $VITSPEC_DATA_DIR or ./data)"
    )
    args = parser.parse_args(argv)
    try:
        paths = datasets.download(args.name, args.data_dir)
    except datasets.DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(map(str, paths)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:10} {help_text}" for name, (_, _, help_text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="vitspec",
        description="A Vision Transformer defined once and proven identical in NumPy, PyTorch, JAX.",
        epilog=f"commands:\n{commands}\n\n`vitspec COMMAND --help` for a command's flags; "
        "--debug shows a traceback.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(command: str, argv: Sequence[str], prog: str, **kwargs) -> int:
    """Run one command; a user error (a bad flag value, a missing or broken file, a refused resume)
    ends as one `error: ...` paragraph on stderr and exit status 2. `--debug` anywhere in argv, or
    VITSPEC_DEBUG=1, shows the traceback instead."""
    debug = "--debug" in argv or os.environ.get("VITSPEC_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    module, function, _ = COMMANDS[command]
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # kill -TERM acts as Ctrl-C
    try:
        result = getattr(importlib.import_module(module), function)(argv, prog=prog, **kwargs)
    except (ValueError, OSError) as error:  # the library's named errors are ValueErrors
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted (a file being written was left as it was before)", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return result if isinstance(result, int) else 0  # commands that return results (train) succeeded


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run(args.command, args.args, f"vitspec {args.command}")
