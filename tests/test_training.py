"""The training library end to end on a tiny Fashion-MNIST-format dataset written by the tests.

The data is four IDX files in the official format under <tmp>/fashion-mnist/, which `data_dir`
finds exactly as it finds the real download. Each run trains a one-block model for a few steps,
through `train_and_evaluate(TrainConfig(...), workdir, backend)`; tests/test_cli.py drives the
commands.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import vitspec
from backends.flax_vit import train as flax_train
from backends.torch_vit import train as torch_train
from parity_tests.strategies import random_params
from vitspec.app import datasets, evaluate
from vitspec.app.training import TrainConfig, normalization_table, train_and_evaluate
from vitspec.app.training.backend import BACKEND_CLASSES, backend_module
from vitspec.app.training.state import BEST, LAST, LAST_STATE_JSON, generation_files, read_manifest
from vitspec.recipe import Recipe

BACKENDS = ("flax", "torch")
TINY_MODEL = {"depth": 1, "width": 16, "num_heads": 2, "mlp_dim": 32}
STEPS_PER_EPOCH = 4  # 64 training images / batch 16


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """80 training and 20 test images."""
    root = tmp_path_factory.mktemp("data")
    write_fashion_mnist(root / "fashion-mnist", train=80, test=20)
    return root


def write_fashion_mnist(directory: Path, train: int, test: int, seed: int = 0) -> None:
    """The four official IDX files; brightness depends on the label, so there is signal to learn."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 60, (count, 28, 28)) + 19 * labels[:, None, None]
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)


def config(data_dir: Path, **changes) -> TrainConfig:
    settings = dict(
        dataset="fashion-mnist",
        model="fmnist-tiny",
        model_overrides=TINY_MODEL,
        data_dir=data_dir,
        validation_size=16,
        batch_size=16,
        epochs=2,
        warmup_epochs=1,
        eval_batch_size=8,
    )
    return TrainConfig(**(settings | changes))


def params_of(path: Path) -> dict[str, np.ndarray]:
    return vitspec.load(path)[1]


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        np.testing.assert_array_equal(value, b[name], err_msg=name)


@pytest.fixture(scope="module")
def straight_runs(data_dir, tmp_path_factory) -> dict[str, Path]:
    """Each backend's uninterrupted 2-epoch run; its workdir."""
    workdirs = {}
    for backend in BACKENDS:
        workdirs[backend] = tmp_path_factory.mktemp(f"straight-{backend}")
        train_and_evaluate(config(data_dir), workdirs[backend], backend)
    return workdirs


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_smoke(backend, data_dir, tmp_path):
    summary = train_and_evaluate(config(data_dir, max_steps=1), tmp_path, backend)
    assert summary["steps_done"] == 1 and summary["epochs_done"] == 0
    assert summary["checkpoint"].endswith(LAST)  # nothing validated yet: the test uses last
    for name in ("config.json", LAST, LAST_STATE_JSON, "summary.json"):
        assert (tmp_path / name).is_file(), name
    model, optimizer = generation_files(tmp_path, read_manifest(tmp_path))
    assert optimizer.is_file() and os.path.samefile(model, tmp_path / LAST)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_run_writes_metrics_checkpoints_and_reports(backend, straight_runs):
    workdir = straight_runs[backend]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["step"] for r in records] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert all(
        {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"} <= r.keys() for r in records
    )
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["test_images"] == 20 and summary["test_top5"] is None
    assert 0 <= summary["test_top1"] <= 1
    for name in (LAST, BEST):
        vitspec.load(workdir / name)  # a valid reference checkpoint
    pytest.importorskip("matplotlib")
    assert (workdir / "curves.png").stat().st_size > 0 and (workdir / "confusion.png").stat().st_size > 0


def test_both_backends_train_the_same_run(straight_runs):
    """Same flags, same batches, same recipe: float32 trajectories that agree to float32 rounding."""
    torch_run, flax_run = (straight_runs[b] for b in ("torch", "flax"))
    torch_records = [json.loads(x) for x in (torch_run / "metrics.jsonl").read_text().splitlines()]
    flax_records = [json.loads(x) for x in (flax_run / "metrics.jsonl").read_text().splitlines()]
    for t, f in zip(torch_records, flax_records, strict=True):
        assert t["train_loss"] == pytest.approx(f["train_loss"], rel=1e-5)
        assert t["val_loss"] == pytest.approx(f["val_loss"], rel=1e-5)
    torch_params, flax_params = params_of(torch_run / LAST), params_of(flax_run / LAST)
    for name in torch_params:
        # The key bias's gradient is exactly zero in math (SPEC.md section 5): in float32 it is
        # rounding noise that AdamW scales up to ~1e-5, differently in each framework.
        atol = 5e-5 if name.endswith("attn/key/bias") else 2e-6
        np.testing.assert_allclose(torch_params[name], flax_params[name], rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_reaches_the_uninterrupted_run_bit_exactly(
    backend, data_dir, straight_runs, tmp_path
):
    stop_at = STEPS_PER_EPOCH + 2  # in the middle of the second epoch
    train_and_evaluate(config(data_dir, max_steps=stop_at), tmp_path, backend)
    state = json.loads((tmp_path / LAST_STATE_JSON).read_text())
    assert state["step"] == stop_at and state["loader"]["step"] == 2
    train_and_evaluate(config(data_dir), tmp_path, backend, resume=True)
    assert_same_run(tmp_path, straight_runs[backend])


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, so the run stops where it is."""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_killed_mid_epoch_resumes_from_its_last_periodic_save(
    backend, data_dir, straight_runs, tmp_path, monkeypatch
):
    # A tiny checkpoint interval saves last.* after every step; the run dies inside step 7 (the
    # third of epoch 2), after step 6's save: resuming redoes step 7 and reaches the same run.
    cls = getattr(backend_module(backend), BACKEND_CLASSES[backend][1])
    original, steps = cls.train_step, []

    def dies_in_step_7(self, *args):
        steps.append(1)
        if len(steps) == STEPS_PER_EPOCH + 3:
            raise Killed
        return original(self, *args)

    monkeypatch.setattr(cls, "train_step", dies_in_step_7)
    with pytest.raises(Killed):
        train_and_evaluate(config(data_dir, checkpoint_every=1e-9), tmp_path, backend)
    state = json.loads((tmp_path / LAST_STATE_JSON).read_text())
    assert state["step"] == STEPS_PER_EPOCH + 2 and state["loader"] == {"seed": 0, "epoch": 1, "step": 2}
    monkeypatch.setattr(cls, "train_step", original)
    train_and_evaluate(config(data_dir), tmp_path, backend, resume=True)
    assert_same_run(tmp_path, straight_runs[backend])


def assert_same_run(workdir: Path, straight: Path) -> None:
    """last, best, the optimizer state and the metric history of `workdir` equal the straight run's."""
    for name in (LAST, BEST):
        assert_same_params(params_of(workdir / name), params_of(straight / name))
    resumed_optimizer = generation_files(workdir, read_manifest(workdir))[1]
    straight_optimizer = generation_files(straight, read_manifest(straight))[1]
    with np.load(resumed_optimizer) as resumed, np.load(straight_optimizer) as full:
        assert sorted(resumed.files) == sorted(full.files)
        for key in full.files:
            np.testing.assert_array_equal(resumed[key], full[key], err_msg=key)
    keys = ("epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy")
    resumed_records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    straight_records = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]

    def trajectory(records):
        return [{k: r[k] for k in keys} for r in records]

    assert trajectory(resumed_records) == trajectory(straight_records)


def test_resume_refuses_other_flags_and_damaged_checkpoints(data_dir, tmp_path):
    train_and_evaluate(config(data_dir, max_steps=1), tmp_path, "torch")
    written = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match="--lr: saved 0.001, now 0.002"):
        train_and_evaluate(config(data_dir, lr=2e-3), tmp_path, "torch", resume=True)
    assert (tmp_path / "config.json").read_text() == written  # a refused resume rewrites nothing
    with open(generation_files(tmp_path, read_manifest(tmp_path))[1], "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="optimizer.npz is missing or not the file"):
        train_and_evaluate(config(data_dir), tmp_path, "torch", resume=True)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_and_evaluate(config(data_dir), tmp_path / "empty", "torch", resume=True)


@pytest.mark.parametrize("trained_by", BACKENDS)
def test_a_checkpoint_predicts_the_same_in_every_implementation(trained_by, data_dir, straight_runs):
    cfg, params = vitspec.load(straight_runs[trained_by] / BEST)
    dataset = datasets.load("fashion_mnist", data_dir, validation_size=16)
    logits = {
        name: evaluate.predictor(name, cfg, params, dataset.stats)(dataset.test.images)
        for name in evaluate.BACKENDS
    }
    for name in ("torch", "flax"):
        np.testing.assert_array_equal(logits[name].argmax(-1), logits["numpy"].argmax(-1), err_msg=name)
        scale = np.abs(logits["numpy"]).max()
        np.testing.assert_allclose(logits[name], logits["numpy"], atol=1e-5 * scale, rtol=0, err_msg=name)


def test_evaluate_command_gives_one_accuracy_for_all_backends(data_dir, straight_runs, tmp_path, capsys):
    checkpoint = straight_runs["torch"] / BEST
    results = {}
    for backend in evaluate.BACKENDS:
        output = tmp_path / f"{backend}.json"
        evaluate.main(
            [
                str(checkpoint),
                "--backend",
                backend,
                "--dataset",
                "fashion-mnist",
                "--data-dir",
                str(data_dir),
                "--validation-size",
                "16",
                "--json",
                str(output),
            ]
        )
        results[backend] = json.loads(output.read_text())
    assert len({r["top1"] for r in results.values()}) == 1
    assert len({json.dumps(r["confusion"]) for r in results.values()}) == 1
    assert "top-1" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_backends_normalize_exactly_like_the_reference(backend):
    stats = datasets.STATS["cifar10"]
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    expected = datasets.normalize(images, stats.mean, stats.std)
    if backend == "torch":
        cfg = vitspec.variant("cifar-notebook", depth=1)
        model = torch_train.TorchBackend(
            cfg, vitspec.init_params(cfg), Recipe(), normalization_table(stats), "fp32", 0, device="cpu"
        )
        got = model.normalize(images).permute(0, 2, 3, 1).numpy()
    else:
        got = np.asarray(flax_train.normalize(images, normalization_table(stats), np.float32))
    np.testing.assert_array_equal(got, expected)


def test_model_must_fit_the_dataset(data_dir, tmp_path):
    with pytest.raises(ValueError, match="takes 32x32x3 images; fashion-mnist has 28x28x1"):
        train_and_evaluate(config(data_dir, model="cifar-notebook", model_overrides={}), tmp_path, "torch")


def test_progress_into_a_log_is_whole_lines_at_the_interval(data_dir, tmp_path, capsys):
    train_and_evaluate(config(data_dir, max_steps=3, progress_every=1e-9), tmp_path, "torch")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("epoch 1/2")]
    assert [line.split(" (")[0] for line in lines] == [
        "epoch 1/2 1/4",
        "epoch 1/2 2/4",
        "epoch 1/2 3/4",
        "epoch 1/2 3/4",
    ]
    assert all(
        f"(step {i}/3)" in line and " left" in line and "img/s" in line
        for i, line in zip([1, 2, 3, 3], lines, strict=True)
    )


def test_the_flax_backend_waits_for_the_oldest_step_past_max_steps_in_flight():
    """A caller that never reads a step's results still cannot queue more than MAX_STEPS_IN_FLIGHT
    unfinished steps: past XLA's 32 per device its CPU client deadlocks (flax_vit/train.py)."""
    cfg = vitspec.variant("cifar-notebook", depth=1)
    table = normalization_table(datasets.STATS["cifar10"])
    backend = flax_train.FlaxBackend(cfg, vitspec.init_params(cfg), Recipe(), table, "fp32", 0)
    waited = []

    class Loss:
        def __init__(self, step):
            self.step = step

        def block_until_ready(self):
            waited.append(self.step)
            return self

    backend._train_step = lambda params, mu, nu, *batch: (params, mu, nu, Loss(backend.step), 0)
    images, labels = np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.int64)
    for _ in range(10):
        backend.train_step(images, labels, 1e-3)
    assert waited == list(range(1, 11 - flax_train.MAX_STEPS_IN_FLIGHT))  # the last 4 still in flight


def test_a_workdir_holding_a_run_is_refused_without_resume_or_overwrite(data_dir, straight_runs, tmp_path):
    workdir = tmp_path / "run"
    train_and_evaluate(config(data_dir, max_steps=1), workdir, "torch")
    before = (workdir / LAST).read_bytes()
    with pytest.raises(ValueError, match="already holds a run .*pass --resume to continue it, --overwrite"):
        train_and_evaluate(config(data_dir, max_steps=2), workdir, "torch")
    assert (workdir / LAST).read_bytes() == before
    summary = train_and_evaluate(config(data_dir, max_steps=2), workdir, "torch", overwrite=True)
    assert summary["steps_done"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_diverging_run_stops_with_a_named_error_and_writes_no_nan(backend, data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"training diverged: (the loss of step|after step) \d+"):
        train_and_evaluate(config(data_dir, lr=1e9, clip_norm=0, checkpoint_every=1e-9), tmp_path, backend)
    for name in (LAST, BEST):
        if (tmp_path / name).exists():
            params = vitspec.load(tmp_path / name)[1]  # refuses non-finite tensors
            assert all(np.isfinite(v).all() for v in params.values())


def test_resume_on_other_data_is_refused(data_dir, tmp_path):
    train_and_evaluate(config(data_dir, max_steps=1), tmp_path / "run", "torch")
    other = tmp_path / "other"
    write_fashion_mnist(other / "fashion-mnist", train=80, test=20, seed=1)
    with pytest.raises(
        ValueError, match=r"the training data \(--data-dir\): saved '64 train \+ 16 validation"
    ):
        train_and_evaluate(config(other), tmp_path / "run", "torch", resume=True)


def fine_tuning_source(tmp_path: Path, **overrides) -> tuple[Path, vitspec.ViTConfig, dict]:
    """A timm file of the tiny model at 20x20 images with 5 classes (Fashion-MNIST is 28x28, 10)."""
    from vitspec.formats import save_any

    model = vitspec.variant("fmnist-tiny", num_classes=10, **TINY_MODEL)
    source = model.replace(image_size=(20, 20), num_classes=5, **overrides)
    params = random_params(source, 3)
    save_any(tmp_path / "pretrained.pth", "torch", source, params)
    return tmp_path / "pretrained.pth", model, params


def test_init_loads_resamples_and_reinitializes_the_head(tmp_path, capsys):
    from vitspec.app.training.init import fine_tuning_start
    from vitspec.posemb import resample_model

    path, model, source_params = fine_tuning_source(tmp_path)
    params, notes = fine_tuning_start(model, path)
    assert "position embedding resampled 5x5 -> 7x7 patches (28x28 images)" in notes[1]
    assert "head re-initialized at zero: 5 -> 10 classes" in notes[2]
    assert params.keys() == vitspec.init_params(model).keys()
    # The source is a timm file: fine-tuning resamples as timm does.
    source_cfg = model.replace(image_size=(20, 20))
    resampled = resample_model(source_cfg, source_params, (28, 28), "timm")[1]["pos_embed"]
    np.testing.assert_array_equal(params["pos_embed"], resampled.astype(np.float32))
    assert not params["head/kernel"].any() and not params["head/bias"].any()
    for name, value in source_params.items():
        if not name.startswith(("head/", "pos_embed")):
            np.testing.assert_array_equal(params[name], value.astype(np.float32), err_msg=name)


def test_resample_flag_overrides_the_source_formats_own_method(tmp_path):
    from vitspec.app.training.init import fine_tuning_start
    from vitspec.posemb import resample_model

    path, model, source_params = fine_tuning_source(tmp_path)
    params, notes = fine_tuning_start(model, path, "big_vision")
    source_cfg = model.replace(image_size=(20, 20))
    for method, equal in (("big_vision", True), ("timm", False)):
        resampled = resample_model(source_cfg, source_params, (28, 28), method)[1]["pos_embed"]
        assert np.array_equal(params["pos_embed"], resampled.astype(np.float32)) == equal, method
    with pytest.raises(ValueError, match="--resample timm: it resamples --init's posemb; no --init is given"):
        TrainConfig(resample="timm")


def test_fine_tuning_from_a_converted_checkpoint_is_the_same_run_in_both_backends(data_dir, tmp_path):
    path, _, _ = fine_tuning_source(tmp_path)
    for backend in BACKENDS:
        train_and_evaluate(config(data_dir, init=path, max_steps=3), tmp_path / backend, backend)
    torch_params, flax_params = (params_of(tmp_path / b / LAST) for b in ("torch", "flax"))
    for name in torch_params:
        atol = 5e-5 if name.endswith("attn/key/bias") else 2e-6  # as in the from-scratch comparison above
        np.testing.assert_allclose(torch_params[name], flax_params[name], rtol=0, atol=atol, err_msg=name)


def test_init_compares_the_family_knobs_and_reinitializes_both_heads(tmp_path):
    from vitspec.app.training.init import fine_tuning_start

    clip_stem = dict(pre_norm=True, patch_bias=False)  # as timm builds it
    path, model, _ = fine_tuning_source(tmp_path, distilled=True, **clip_stem)
    differences = r"3 difference\(s\)\): pre_norm: file True, model False; patch_bias"
    with pytest.raises(ValueError, match=differences):
        fine_tuning_start(model, path)
    params, notes = fine_tuning_start(model.replace(distilled=True, **clip_stem), path)
    assert "head re-initialized at zero: 5 -> 10 classes" in notes[-1]
    for name in ("head/kernel", "head/bias", "head_dist/kernel", "head_dist/bias"):
        assert params[name].shape[-1] == 10 and not params[name].any(), name


def test_init_refuses_another_architecture_listing_every_difference(data_dir, tmp_path):
    path, _, _ = fine_tuning_source(tmp_path, depth=2, qkv_bias=False)
    with pytest.raises(
        ValueError, match=r"is not this model \(2 difference\(s\)\): depth: file 2, model 1; qkv_bias"
    ):
        train_and_evaluate(config(data_dir, init=path, max_steps=1), tmp_path / "run", "torch")
