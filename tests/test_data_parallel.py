"""Data parallelism equals one device: torchrun with 2 processes, JAX with 2 devices, in float64.

Each run is the training command in a subprocess, on a tiny Fashion-MNIST-format set, with the
whole recipe on: linear warmup then cosine decay, a clip norm every step exceeds, label smoothing,
dropout, attention dropout and stochastic depth. The batch is the whole training set (32 images),
so each epoch is one step and metrics.jsonl holds every step's loss. Compared: the per-step losses
(within LOSS_REL), the validation loss and accuracy of every epoch and the test accuracy (sharded
evaluation: equal), the final parameters (within PARAM_REL of the tree's scale; see
parity_tests/tolerances.py for why a tree's scale). Measured: losses agree to 4e-16 and parameters
to 1.1e-14 between every pair of runs (1 vs 2 torch processes, 1 vs 2 JAX devices or processes,
torch vs flax, resumed across world sizes).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vitspec
from backends.flax_vit import masks as flax_masks
from backends.torch_vit import masks as torch_masks
from backends.torch_vit.train import TorchBackend
from parity_tests.tolerances import tree_rel_errs
from tests.test_training import write_fashion_mnist
from vitspec import masks
from vitspec.app import datasets, pipeline
from vitspec.app.training import normalization_table
from vitspec.app.training.state import LAST
from vitspec.recipe import Recipe

LOSS_REL = 1e-12
PARAM_REL = 1e-10
REPO = Path(__file__).resolve().parents[1]
MODEL = {"depth": 2, "width": 16, "num_heads": 2, "mlp_dim": 32, "attention_dropout": 0.1}
EPOCHS, CLIP_NORM = 6, 0.1
FLAGS = (
    *("--dataset", "fashion-mnist", "--model", "fmnist-tiny", "--model-overrides", json.dumps(MODEL)),
    *("--validation-size", "16", "--batch-size", "32", "--epochs", str(EPOCHS), "--warmup-epochs", "2"),
    *("--clip-norm", str(CLIP_NORM), "--label-smoothing", "0.1", "--dropout", "0.1"),
    *("--stochastic-depth", "0.2", "--eval-batch-size", "7", "--precision", "fp64", "--seed", "5"),
)
TORCH = (sys.executable, "-m", "backends.torch_vit.train")
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m")
TORCHRUN += ("backends.torch_vit.train",)
FLAX = (sys.executable, "-m", "backends.flax_vit.train")
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def launch(command, data_dir: Path, workdir: Path, *extra: str, env=None) -> subprocess.Popen:
    """The training command in the background; its output in <workdir>.log (shared by a run's processes)."""
    environment = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    # Plots are not what is compared: a matplotlib that fails to import skips them (a note on stderr).
    environment["PYTHONPATH"] = os.pathsep.join([str(data_dir.parent / "no-plots"), str(REPO)])
    log = open(f"{workdir}.log", "ab")  # noqa: SIM115 - closed when the process is waited for
    args = [*command, *FLAGS, "--data-dir", str(data_dir), "--workdir", str(workdir), *extra]
    process = subprocess.Popen(args, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
    process.log = log
    return process


def wait(*processes: subprocess.Popen) -> None:
    for process in processes:
        process.wait(timeout=300)
        process.log.close()
        assert process.returncode == 0, Path(process.log.name).read_text()[-3000:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """48 training images (16 held out: 32 train), 20 test images; a matplotlib that does not import."""
    root = tmp_path_factory.mktemp("dp")
    write_fashion_mnist(root / "data" / "fashion-mnist", train=48, test=20)
    stub = root / "no-plots" / "matplotlib"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('no plots in tests/test_data_parallel.py')\n")
    return root / "data"


@pytest.fixture(scope="module")
def runs(data_dir) -> dict[str, Path]:
    """The runs by name, two waves of concurrent subprocesses: straight runs on 1 and 2 processes
    (torch) and devices (flax), and runs stopped halfway on one world size, resumed on the other."""
    work = data_dir.parent
    straight = {
        "torch-1": launch(TORCH, data_dir, work / "torch-1"),
        "torch-2": launch(TORCHRUN, data_dir, work / "torch-2"),
        "flax-1": launch(FLAX, data_dir, work / "flax-1"),
        "flax-2": launch(FLAX, data_dir, work / "flax-2", env=TWO_DEVICES),
        **jax_processes(data_dir, work / "flax-2-processes"),
        "torch-2-then-1": launch(TORCHRUN, data_dir, work / "torch-2-then-1", "--max-steps", "3"),
        "torch-1-then-2": launch(TORCH, data_dir, work / "torch-1-then-2", "--max-steps", "3"),
    }
    wait(*straight.values())
    resumed = [
        launch(TORCH, data_dir, work / "torch-2-then-1", "--resume"),
        launch(TORCHRUN, data_dir, work / "torch-1-then-2", "--resume"),
    ]
    wait(*resumed)
    return {name: work / name for name in straight if not name.endswith("-worker")}


def jax_processes(data_dir: Path, workdir: Path) -> dict[str, subprocess.Popen]:
    """Two JAX processes of one device each, meeting through jax.distributed (as two hosts would)."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2"}
    return {
        workdir.name: launch(FLAX, data_dir, workdir, env=env | {"JAX_PROCESS_ID": "0"}),
        f"{workdir.name}-worker": launch(FLAX, data_dir, workdir, env=env | {"JAX_PROCESS_ID": "1"}),
    }


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(workdir: Path, other: Path) -> None:
    """Per-step (= per-epoch) losses, every evaluation, and the final parameters agree."""
    ours, theirs = metrics(workdir), metrics(other)
    assert len(ours) == len(theirs) == EPOCHS
    for name in ("train_loss", "val_loss"):
        worst = max(abs(a[name] - b[name]) / abs(b[name]) for a, b in zip(ours, theirs, strict=True))
        assert worst <= LOSS_REL, (name, worst)
    for name in ("train_accuracy", "val_accuracy"):
        assert [r[name] for r in ours] == [r[name] for r in theirs], name
    summaries = [json.loads((w / "summary.json").read_text()) for w in (workdir, other)]
    assert summaries[0]["test_top1"] == summaries[1]["test_top1"]
    params, reference = (vitspec.load(w / LAST)[1] for w in (workdir, other))
    assert next(iter(params.values())).dtype == np.float64
    assert max(tree_rel_errs(params, reference, kind="grad").values()) <= PARAM_REL
    assert ours[-1]["train_loss"] < ours[0]["train_loss"]  # it trained


@pytest.mark.parametrize(
    "run, other",
    [
        ("torch-2", "torch-1"),  # torchrun, 2 processes == 1 process
        ("flax-2", "flax-1"),  # 2 devices == 1 device
        ("flax-2-processes", "flax-1"),  # 2 processes (jax.distributed) == 1 device
        ("torch-2", "flax-2"),  # torch 2-way == flax 2-way
        ("torch-2-then-1", "torch-1"),  # resumed on 1 process from a 2-process checkpoint
        ("torch-1-then-2", "torch-1"),  # resumed on 2 processes from a 1-process checkpoint
    ],
)
def test_data_parallel_runs_follow_one_device(runs, run, other):
    assert_same_run(runs[run], runs[other])


def test_only_rank_0_writes_and_speaks(runs):
    for run in ("torch-2", "flax-2-processes"):
        log = Path(f"{runs[run]}.log").read_text()
        assert log.count("test top-1") == 1 and log.count("epoch 6 | train loss") == 1, log
    assert "2 devices" in Path(f"{runs['flax-2']}.log").read_text()


def test_the_recipe_is_exercised_and_the_masks_matter():
    """At the runs' settings the first step's gradient norm exceeds the clip norm (so clipping acts),
    and the rates change the gradient."""
    cfg = vitspec.variant("fmnist-tiny", **MODEL, num_classes=10)
    recipe = Recipe(base_lr=1e-3, weight_decay=0.05, warmup_steps=2, total_steps=6, label_smoothing=0.1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 8)
    table = normalization_table(datasets.ChannelStats(mean=(0.3,), std=(0.35,)))
    norms = []
    for rates in ({"attention_dropout": 0.0}, {"dropout": 0.1, "stochastic_depth": 0.2}):
        step_cfg = cfg.replace(**rates)
        params = vitspec.init_params(step_cfg, 5, dtype=np.float64)
        backend = TorchBackend(step_cfg, params, recipe, table, "fp64", 5, device="cpu")
        backend.apply_update = lambda grads, lr: norms.append(
            float(torch.sqrt(sum(torch.sum(g * g) for g in grads.values())))
        )
        backend.train_step(images, labels, 1e-3)
    assert min(norms) > CLIP_NORM
    assert abs(norms[0] - norms[1]) > 1e-3 * norms[0], norms


def test_masks_are_the_counter_hash_in_both_frameworks_for_every_split():
    """Each framework's mask is vitspec.masks' bit for bit, and a shard's rows are the global batch's."""
    seed, step, shape, keep = 5, 17, (3, 4, 5), 0.8
    whole = masks.keep_mask(seed, step, 2, np.arange(8), shape, keep)
    assert 0.7 < whole.mean() < 0.9
    jax_mask = flax_masks.keep_mask(np.uint32(masks.step_key(seed, step)), 2, (8, *shape), keep)
    np.testing.assert_array_equal(np.asarray(jax_mask), whole)
    for first in (0, 4):  # rank 0 and rank 1 of 2, each 4 examples
        mode = torch_masks.CounterMasks(seed, step, first_example=first)
        mode.sites = 2
        torch_mask = mode.keep_mask(torch.Size([4, *shape]), keep, torch.device("cpu"))
        np.testing.assert_array_equal(torch_mask.numpy(), whole[first : first + 4])
    assert not np.array_equal(whole[0], whole[1])  # examples draw apart
    assert not np.array_equal(whole, masks.keep_mask(seed, step + 1, 2, np.arange(8), shape, keep))


def test_shards_of_the_pipeline_are_blocks_of_the_global_batch():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 40)
    augmentation = pipeline.Augmentation(crop_padding=1, horizontal_flip=True)
    state = pipeline.LoaderState(seed=3, epoch=1, step=1)
    whole = next(pipeline.train_batches(images, labels, 12, state, augmentation))
    shards = [next(pipeline.train_batches(images, labels, 12, state, augmentation, (i, 3))) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate([s.images for s in shards]), whole.images)
    np.testing.assert_array_equal(np.concatenate([s.labels for s in shards]), whole.labels)
    with pytest.raises(ValueError, match="shard"):
        next(pipeline.train_batches(images, labels, 12, state, augmentation, (0, 5)))


def test_a_batch_that_does_not_split_over_the_devices_is_refused(data_dir, tmp_path):
    process = launch(FLAX, data_dir, tmp_path / "run", "--batch-size", "31", env=TWO_DEVICES)
    process.wait(timeout=120)
    process.log.close()
    output = Path(process.log.name).read_text()
    assert process.returncode == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--batch-size 31" in errors[0] and "2 devices" in errors[0], output


def test_jax_steps_queued_past_the_cpu_clients_limit_do_not_deadlock(data_dir):
    """300 fp32 steps of a model whose step takes far longer than its dispatch, on 2 XLA devices:
    without the flax backend's bound on steps in flight (backends/flax_vit/train.py) the
    steps queue up past XLA's 32 per device and this run aborted in XLA's all-reduce rendezvous
    in each of 2 tries (as a 160-epoch fmnist-fast run did twice in its first minute); with the bound
    it finishes."""
    many = data_dir.parent / "many"
    write_fashion_mnist(many / "fashion-mnist", train=19_208, test=8)
    model = {"depth": 2, "width": 128, "num_heads": 4, "mlp_dim": 256}
    process = launch(
        FLAX,
        many,
        data_dir.parent / "queued",
        *("--model-overrides", json.dumps(model), "--precision", "fp32", "--batch-size", "64"),
        *("--epochs", "1", "--warmup-epochs", "0", "--validation-size", "8", "--eval-batch-size", "8"),
        env=TWO_DEVICES,
    )
    wait(process)
