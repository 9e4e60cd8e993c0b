"""The `vitspec` command and the `python -m` forms the README shows: each reaches its command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_training import TINY_MODEL, write_fashion_mnist
from vitspec.app import cli

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


@pytest.mark.parametrize(
    "module, argv",
    [
        ("vitspec", ["summary", "Ti/16"]),
        ("vitspec.convert", ["--help"]),
        ("vitspec.evaluate", ["--help"]),
        ("vitspec.datasets", ["download", "--help"]),
        ("backends.torch_vit.train", ["--help"]),
        ("backends.flax_vit.train", ["--help"]),
    ],
)
def test_python_dash_m_forms_still_work(module, argv):
    result = subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_convert_stays_a_function_after_its_module_is_imported():
    import vitspec.convert  # noqa: F401  (the module that `python -m vitspec.convert` runs)

    assert callable(vitspec.convert) and vitspec.convert.__module__ == "vitspec.app.convert"


def test_train_command_builds_the_config_and_trains(tmp_path):
    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", train=40, test=8)
    cli.main(
        [
            "train",
            "--backend",
            "flax",
            "--dataset",
            "fashion-mnist",
            "--model",
            "fmnist-tiny",
            "--model-overrides",
            json.dumps(TINY_MODEL),
            "--data-dir",
            str(tmp_path / "data"),
            "--validation-size",
            "8",
            "--batch-size",
            "16",
            "--epochs",
            "1",
            "--max-steps",
            "1",
            "--workdir",
            str(tmp_path / "run"),
        ]
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps_done"] == 1
    settings = json.loads((tmp_path / "run" / "config.json").read_text())["settings"]
    assert settings["batch_size"] == 16 and settings["model_overrides"] == TINY_MODEL


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-1"], "--lr -1.0: must be positive"),
        (["--label-smoothing", "1.5"], "--label-smoothing 1.5: expected a rate in [0, 1)"),
        (["--model-overrides", "[1]"], "expected a JSON object of config fields"),
    ],
)
def test_a_bad_training_flag_is_one_error_line_and_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--backend", "torch", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
