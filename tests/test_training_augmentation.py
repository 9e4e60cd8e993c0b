"""--randaugment, --mixup and --cutmix through the training command: bad values are one `error:`, the
run records what it applied, and a resumed run reaches the uninterrupted one bit for bit."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import train_flags, user_error
from tests.test_training import assert_same_run, config, write_fashion_mnist
from vitspec.app import datasets, randaugment
from vitspec.app.training import train_and_evaluate
from vitspec.app.training.state import LAST_STATE_JSON

FLAGS = {"randaugment": "rand-m9-n2-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0}
STOP_AT = 6  # mid second epoch: 4 steps per epoch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fashion_mnist(root / "fashion-mnist", train=80, test=20)
    return root


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--randaugment", "rand-x9"], "error: --randaugment 'rand-x9': expected rand-m<magnitude>"),
        (["--randaugment", "rand-m12"], "magnitude=12.0: expected a value in [0, 10]"),
        (["--mixup", "-1"], "--mixup -1.0: must not be negative"),
        (["--cutmix", "nan"], "--cutmix nan: must not be negative"),
    ],
)
def test_a_bad_value_is_one_error(flags, message, capsys, data_dir, tmp_path):
    assert message in user_error(capsys, train_flags(data_dir, tmp_path / "run", *flags))


def test_randaugment_without_pillow_is_one_error_saying_what_to_install(
    capsys, data_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(randaugment, "Image", None)
    err = user_error(capsys, train_flags(data_dir, tmp_path / "run", "--randaugment", "rand-m9"))
    assert "--randaugment needs Pillow" in err and "pip install" in err


def test_the_run_records_the_augmentation_and_mixing_it_applied(data_dir, tmp_path):
    train_and_evaluate(config(data_dir, max_steps=1, **FLAGS), tmp_path, "torch")
    written = json.loads((tmp_path / "config.json").read_text())
    mean = datasets.load("fashion_mnist", data_dir, validation_size=16).stats.mean[0]
    assert written["augmentation"]["randaugment"] == {
        "num_ops": 2,
        "magnitude": 9.0,
        "magnitude_std": 0.5,
        "increasing": True,
        "fill": [round(255 * mean)],  # the dataset's mean pixel
    }
    assert written["mixing"] == {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5}
    assert {k: written["settings"][k] for k in FLAGS} == FLAGS


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_resume_mid_epoch_reaches_the_uninterrupted_run_bit_exactly(backend, data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_and_evaluate(config(data_dir, **FLAGS), straight, backend)
    train_and_evaluate(config(data_dir, max_steps=STOP_AT, **FLAGS), resumed, backend)
    assert json.loads((resumed / LAST_STATE_JSON).read_text())["step"] == STOP_AT
    train_and_evaluate(config(data_dir, **FLAGS), resumed, backend, resume=True)
    assert_same_run(resumed, straight)


def test_resume_refuses_other_augmentation(data_dir, tmp_path):
    train_and_evaluate(config(data_dir, max_steps=1, **FLAGS), tmp_path, "torch")
    with pytest.raises(ValueError, match="mixup"):
        train_and_evaluate(config(data_dir, **(FLAGS | {"mixup": 0.2})), tmp_path, "torch", resume=True)


def test_a_run_saved_before_these_flags_existed_resumes_as_one_without_them(data_dir, tmp_path):
    """A run written before --randaugment/--mixup/--cutmix saved no value for them: it trained without
    them, so it resumes under their defaults and is refused under any other value."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_and_evaluate(config(data_dir), straight, "torch")
    train_and_evaluate(config(data_dir, max_steps=STOP_AT), resumed, "torch")
    manifest = json.loads((resumed / LAST_STATE_JSON).read_text())
    for name in FLAGS:
        del manifest["flags"][name]
    (resumed / LAST_STATE_JSON).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="mixup: saved 0.0, now 0.8"):
        train_and_evaluate(config(data_dir, mixup=0.8), resumed, "torch", resume=True)
    train_and_evaluate(config(data_dir), resumed, "torch", resume=True)
    assert_same_run(resumed, straight)
