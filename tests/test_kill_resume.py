"""A run killed at any instant resumes to the uninterrupted run, bit for bit, losing at most one step.

The instants: every step the run takes on the file system in its workdir (making a directory,
writing out a file, renaming, linking, removing), every training step and every evaluation batch.
A child process is killed with SIGKILL just before instant k, for every k the run has; no
`finally` or `except` of ours runs, as with a real kill. Then `--resume` (or, when nothing was
saved yet, a fresh start) runs to the end, and the workdir must equal the uninterrupted run's.

The children come from a fork server that imported the libraries but never computed with them, so
each child starts its own thread pools (forking a process that has run PyTorch's can hang).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_training import (
    TINY_MODEL,
    assert_same_params,
    assert_same_run,
    config,
    params_of,
    write_fashion_mnist,
)
from vitspec.app.training import reports, train_and_evaluate
from vitspec.app.training.backend import BACKEND_CLASSES, backend_module
from vitspec.app.training.state import LAST, read_manifest
from vitspec.formats.checkpoint import atomic_write

BACKEND = "torch"  # the boundaries are the library's, the same for both backends; torch is faster here
FILE_STEPS = ("replace", "rename", "link", "fsync", "unlink", "mkdir", "rmdir")
# Two epochs of two steps, saved after every step: every kind of boundary, in a run short enough
# to kill at each of its instants.
RUN = {"batch_size": 32, "checkpoint_every": 1e-9, "epochs": 2, "warmup_epochs": 1}


def run_until(data_dir: Path, workdir: Path, kill_at: int | None, resume: bool, counters) -> None:
    """The run in this (child) process, killed before instant `kill_at` (None: never). counters[0]
    counts instants, counters[1] training steps finished."""
    workdir_text = str(workdir)

    def instant() -> None:
        if counters[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        counters[0] += 1

    def counted(function, in_workdir):
        def wrapper(*args, **kwargs):
            if in_workdir(args, kwargs):
                instant()
            return function(*args, **kwargs)

        return wrapper

    def names_workdir(args, kwargs):
        # shutil.rmtree removes by names relative to an open directory (dir_fd): only ours do that
        return "dir_fd" in kwargs or any(workdir_text in str(a) for a in args if isinstance(a, str | Path))

    for name in FILE_STEPS:
        setattr(os, name, counted(getattr(os, name), names_workdir))
    module = backend_module(BACKEND)
    cls = getattr(module, BACKEND_CLASSES[BACKEND][1])
    train_step, eval_logits = cls.train_step, cls.eval_logits

    def counted_train_step(self, *args):
        instant()
        result = train_step(self, *args)
        counters[1] += 1
        return result

    cls.train_step = counted_train_step
    cls.eval_logits = counted(eval_logits, lambda args, kwargs: True)
    reports.plot_reports = write_placeholder_plots
    train_and_evaluate(config(data_dir, **RUN), workdir, BACKEND, resume=resume)


def write_placeholder_plots(workdir: Path, *args) -> None:
    """The plots' two writes without drawing them (drawing is most of a tiny run's time; the writes
    are what a kill can interrupt)."""
    for name in ("curves.png", "confusion.png"):
        atomic_write(workdir / name, lambda f: f.write(b"plot"))


def child(data_dir, workdir, kill_at, resume, counters) -> None:
    try:
        run_until(data_dir, workdir, kill_at, resume, counters)
    except FileNotFoundError as e:  # --resume before the first checkpoint: the user starts afresh
        assert "nothing to resume" in str(e), e
        os._exit(3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fashion_mnist(root / "fashion-mnist", train=80, test=20)
    return root


@pytest.fixture(scope="module")
def fork_server():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch._dynamo", "tests.test_kill_resume"])
    return context


def run_child(context, data_dir, workdir, kill_at, resume) -> tuple[int, int, int]:
    counters = context.Array("q", 2, lock=False)
    process = context.Process(target=child, args=(data_dir, workdir, kill_at, resume, counters))
    process.start()
    process.join()
    return process.exitcode, counters[0], counters[1]


@pytest.mark.slow
def test_a_kill_at_any_instant_resumes_to_the_same_run(fork_server, data_dir, tmp_path):
    straight = tmp_path / "straight"
    code, instants, steps = run_child(fork_server, data_dir, straight, None, False)
    assert code == 0 and steps == 4
    assert instants > 50, instants  # what the run does, counted: 58 instants today
    for kill_at in range(instants):
        workdir = tmp_path / f"killed-at-{kill_at}"
        code, reached, steps_done = run_child(fork_server, data_dir, workdir, kill_at, False)
        assert code == -signal.SIGKILL and reached == kill_at
        saved = read_manifest(workdir)
        assert steps_done - (saved["step"] if saved else 0) <= 1, (kill_at, steps_done, saved)
        code, _, _ = run_child(fork_server, data_dir, workdir, None, True)
        if code == 3:
            code, _, _ = run_child(fork_server, data_dir, workdir, None, False)
        assert code == 0, kill_at
        assert_same_run(workdir, straight)
        assert_same_params(params_of(workdir / LAST), params_of(straight / LAST))
        assert sorted(p.name for p in workdir.iterdir()) == sorted(p.name for p in straight.iterdir())
        assert len(list((workdir / "checkpoints").iterdir())) == 1  # the killed generation is gone


def train_command(data_dir: Path, workdir: Path, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "vitspec", "train", "--backend", BACKEND, "--dataset", "fashion-mnist"),
        *("--model", "fmnist-tiny", "--model-overrides", json.dumps(TINY_MODEL)),
        *("--data-dir", str(data_dir), "--validation-size", "16", "--batch-size", "16"),
        *("--epochs", "3", "--warmup-epochs", "1", "--eval-batch-size", "8", "--checkpoint-every", "1e-9"),
        *("--workdir", str(workdir), *extra),
    ]


def start_and_kill(command: list[str], log: Path, delay: float) -> int:
    """Run `command`; SIGKILL it `delay` seconds after it prints its first line (its imports done,
    the run under way), unless it ended first. Its exit status."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    while process.poll() is None and not log.read_text():
        time.sleep(0.01)
    try:
        return process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        return process.wait()


@pytest.mark.slow
def test_kill_9_at_random_moments_through_the_command(data_dir, tmp_path):
    """The real thing, at moments nobody chose: kill -9 of `vitspec train`, then the same command
    with --resume, until a run ends; the result is the uninterrupted run's."""
    straight, workdir = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(train_command(data_dir, straight), check=True, capture_output=True)
    delays = random.Random(0)
    kills = 0
    while True:
        resume = ["--resume"] if read_manifest(workdir) else ["--overwrite"] if workdir.exists() else []
        delay = delays.uniform(0, 1.5) if kills < 4 else 600.0
        code = start_and_kill(train_command(data_dir, workdir, *resume), tmp_path / f"log{kills}", delay)
        if code == 0:
            break
        assert code == -signal.SIGKILL, (tmp_path / f"log{kills}").read_text()
        kills += 1
    assert kills == 4
    assert_same_run(workdir, straight)
