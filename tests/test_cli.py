"""The `vitspec` command and the `python -m` forms the README shows: each reaches its command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import vitspec
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


def test_train_command_builds_the_config_and_trains(tiny_data, tmp_path):
    cli.main(train_flags(tiny_data, tmp_path / "run", "--max-steps", "1"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps_done"] == 1
    settings = json.loads((tmp_path / "run" / "config.json").read_text())["settings"]
    assert settings["batch_size"] == 16 and settings["model_overrides"] == TINY_MODEL


@pytest.fixture
def tiny_data(tmp_path):
    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", train=40, test=8)
    return tmp_path / "data"


def train_flags(data_dir, workdir, *extra):
    return [
        "train",
        "--backend",
        "torch",
        "--dataset",
        "fashion-mnist",
        "--model",
        "fmnist-tiny",
        "--model-overrides",
        json.dumps(TINY_MODEL),
        "--data-dir",
        str(data_dir),
        "--validation-size",
        "8",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--workdir",
        str(workdir),
        *extra,
    ]


def user_error(capsys, argv) -> str:
    """stderr of a command that must fail as a user error: exit 2, one `error:` paragraph, no traceback."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-1"], "--lr -1.0: must be positive"),
        (["--label-smoothing", "1.5"], "--label-smoothing 1.5: expected a rate in [0, 1)"),
        (["--epochs", "0"], "--epochs 0: must be at least 1"),
    ],
)
def test_a_bad_training_flag_value_is_one_error(flags, message, capsys, tiny_data, tmp_path):
    assert message in user_error(capsys, train_flags(tiny_data, tmp_path / "run", *flags))


def test_a_malformed_flag_is_argparses_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--backend", "torch", "--model-overrides", "[1]"])
    assert exit_.value.code == 2
    assert "expected a JSON object of config fields" in capsys.readouterr().err


def test_a_missing_dataset_is_one_error_naming_the_files(capsys, tmp_path):
    err = user_error(
        capsys, ["train", "--backend", "torch", "--dataset", "cifar10", "--data-dir", str(tmp_path)]
    )
    assert "cifar10" in err and "vitspec download cifar10" in err


def test_a_failed_download_is_one_error(capsys, tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert "no network here" in user_error(capsys, ["download", "cifar10", "--data-dir", str(tmp_path)])


def test_resume_with_nothing_to_resume_is_one_error(capsys, tiny_data, tmp_path):
    err = user_error(capsys, train_flags(tiny_data, tmp_path / "empty", "--resume"))
    assert "nothing to resume" in err


def test_a_bad_checkpoint_is_one_error_and_debug_shows_the_traceback(capsys, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    argv = ["evaluate", str(tmp_path / "bad.safetensors"), "--dataset", "fashion-mnist"]
    assert "bad.safetensors" in user_error(capsys, argv)
    with pytest.raises(vitspec.CheckpointError):
        cli.main([*argv, "--debug"])


def test_sigterm_stops_training_like_ctrl_c_and_leaves_no_temp_files(tiny_data, tmp_path):
    import signal
    import time

    argv = train_flags(tiny_data, tmp_path / "run", "--epochs", "1000", "--progress-every", "0.01")
    process = subprocess.Popen(
        [sys.executable, "-m", "vitspec", *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    line = process.stderr.readline()  # the first progress line: training is under way
    assert line.startswith("epoch 1/1000"), line
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    err = process.stderr.read()
    assert process.wait(timeout=60) == 130
    assert "error: interrupted" in err and "Traceback" not in err
    assert not list((tmp_path / "run").glob(".*.tmp"))
