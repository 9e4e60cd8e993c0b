"""The GPU half of bench.run, on a machine without a GPU: `--device gpu` is one `error:` and exit 2,
and `--device gpu --dry-run` runs the same workers, runners, bursts, synchronization and report on
the CPU (float32, a tiny ViT). No timing assertions: this checks the machinery, not the speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("flax")
pytest.importorskip("optax")

from bench import gpu_flax, gpu_torch, run
from bench.accelerator import DRY_RUN, PEAK_DTYPES, matmul_burst, missing_gpu, synchronizer
from bench.models import TINY, specs
from bench.report import NOISE_THRESHOLD
from bench.timing import interleaved_rates
from bench.torch_impls import has_transformers

REPOSITORY = Path(__file__).resolve().parents[1]
NO_GPU = {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu")
    return out, run.main(["--device", "gpu", "--dry-run", "--out", str(out)])


@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_device_gpu_without_a_gpu_is_one_error_and_exit_2(framework):
    finished = subprocess.run(
        [sys.executable, "-m", "bench.run", "--device", "gpu", "--frameworks", framework],
        cwd=REPOSITORY,
        env=os.environ | NO_GPU,
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 2
    errors = [line for line in finished.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{'torch' if framework == 'torch' else 'jax'} " in errors[0]
    assert "sees no GPU" in errors[0] and "--dry-run" in errors[0]
    assert "Traceback" not in finished.stderr and finished.stdout == ""


def test_dry_run_and_numpy_go_with_the_gpu_half_only():
    with pytest.raises(SystemExit) as raised:
        run.parse_args(["--dry-run"])
    assert raised.value.code == 2
    with pytest.raises(SystemExit) as raised:
        run.parse_args(["--device", "gpu", "--frameworks", "numpy"])
    assert raised.value.code == 2
    assert run.parse_args(["--device", "gpu"]).frameworks == ["torch", "flax"]
    assert run.parse_args([]).frameworks == ["torch", "flax", "numpy"]


def test_gpu_models_are_the_three_vits_at_gpu_sized_batches():
    table = {spec.name: spec for spec in specs(None, False, "gpu")}
    assert {name: spec.batch for name, spec in table.items()} == {
        "cifar-notebook": 256,
        "S/16": 128,
        "B/16": 64,
    }
    assert all(spec.calls > 1 for spec in table.values())
    assert [spec.calls for spec in specs(None, False)] == [1, 1, 1, 1]  # the CPU half: one call a turn
    with pytest.raises(ValueError, match="unknown model"):
        specs(["tiny"], False, "gpu")


def test_a_turn_is_its_calls_then_one_wait_inside_the_clock():
    events = []

    def call(name):
        events.append(name)
        return f"{name}{len(events)}"

    def synchronize(result):
        events.append(f"wait {result}")
        time.sleep(0.05)

    runs = {name: (lambda name=name: call(name)) for name in "ab"}
    rates = interleaved_rates(runs, batch=4, warmup=2, repeats=2, synchronize=synchronize, calls=3)
    # warm-up: each one's calls, then a wait on the last call's result; then the rotated rounds
    assert events == (
        ["a", "a", "wait a2", "b", "b", "wait b5"]
        + ["a", "a", "a", "wait a9", "b", "b", "b", "wait b13"]
        + ["b", "b", "b", "wait b17", "a", "a", "a", "wait a21"]
    )
    # the wait is timed: 4 images x 3 calls in no less than the 0.05 s wait
    assert all(rate <= 4 * 3 / 0.05 for r in rates.values() for rate in r["rates"])
    assert rates["a"]["batch"] == 4 and len(rates["a"]["rates"]) == 2


def test_without_a_gpu_the_frameworks_say_so():
    import jax
    import torch

    if not torch.cuda.is_available():
        assert "torch" in missing_gpu("torch") and "sees no GPU" in missing_gpu("torch")
    if jax.default_backend() == "cpu":
        assert "sees no GPU" in missing_gpu("flax")


@pytest.mark.parametrize("framework", ["torch", "flax"])
@pytest.mark.parametrize("dtype", PEAK_DTYPES)
def test_matmul_burst_runs_in_each_dtype_and_waits_for_its_products(framework, dtype):
    assert matmul_burst(framework, dtype, DRY_RUN)() > 0
    synchronizer(framework, DRY_RUN)(None)  # no device to wait for on the CPU: returns at once


def test_attention_choice_holds_the_library_function_only_while_held():
    import jax
    import jax.numpy as jnp

    library = jax.nn.dot_product_attention
    choice = gpu_flax.AttentionChoice("xla")
    q = jnp.ones((2, 5, 2, 8), jnp.float32)
    with choice.held("forward"):
        assert jax.nn.dot_product_attention is not library
        out = jax.nn.dot_product_attention(q, q, q)
    assert jax.nn.dot_product_attention is library
    assert out.shape == q.shape
    assert choice.calls == {"forward": {((2, 5, 2, 8), (2, 5, 2, 8), "float32")}, "train": set()}
    assert choice.kernels() == {"forward": "xla", "train": gpu_flax.EXPLICIT}
    with pytest.raises(Exception, match="cuDNN"), gpu_flax.AttentionChoice("cudnn").held("train"):
        jax.jit(jax.nn.dot_product_attention).lower(q, q, q).compile()
    assert jax.nn.dot_product_attention is library


def expected_rows() -> set[tuple[str, str, str]]:
    found = {("torch", *key) for key in gpu_torch.IMPLEMENTATIONS} | {
        ("flax", *key) for key in gpu_flax.IMPLEMENTATIONS
    }
    return found if has_transformers() else {row for row in found if row[1] != "hf-transformers"}


def test_dry_run_writes_both_files_with_the_gpu_header(dry_run):
    out, results = dry_run
    assert json.loads((out / "bench_gpu_results.json").read_text()) == results
    report = (out / "bench_gpu_results.md").read_text()
    assert report.startswith("# bench.run --device gpu --dry-run\n\nDry run:")
    for framework in ("torch", "flax"):
        assert f"- Device, {framework}: cpu" in report
        for dtype in PEAK_DTYPES:
            assert f"- {dtype} matmul peak, {framework} (in the rounds:" in report
    assert "torch float32_matmul_precision 'highest'" in report
    assert "| attention kernel (fwd; train) | batch x calls a turn | first forward + step, s |" in report
    assert "| tiny | torch: ours (torch.compile) | flash_attention_for_cpu | 2 x 2 | " in report
    assert "| tiny | torch: notebook-per-head (eager) | no SDPA: explicit matmul + softmax |" in report
    assert not (out / "bench_results.json").exists()  # the CPU half's files are its own


def test_dry_run_runs_every_variant_or_says_why_not(dry_run):
    _, results = dry_run
    assert results["dry_run"] and results["measured_against"] == "fp32"
    assert results["placement"]["compile_backend"] == "aot_eager"
    found = {(row["framework"], row["implementation"], row["variant"]) for row in results["rows"]}
    not_run = {
        (framework, implementation, variant)
        for framework, implementation, variant in expected_rows()
        if any(
            note.startswith(f"tiny: {framework}/{implementation} ({variant}) not run:")
            for note in results["notes"]
        )
    }
    assert found | not_run == expected_rows() and not found & not_run
    # the CPU has neither cuDNN's kernels; eager, compiled and the peers run everywhere
    assert ("torch", "ours", "eager, sdpa_kernel cudnn") in not_run
    assert ("flax", "ours", "dot_product_attention cudnn") in not_run
    assert {
        ("torch", "ours", "eager"),
        ("torch", "ours", "torch.compile"),
        ("flax", "flax-stock", "flax.linen attention"),
    } <= found


def test_dry_run_reports_the_attention_each_row_ran(dry_run):
    _, results = dry_run
    attention = {
        (row["framework"], row["implementation"], row["variant"]): row["attention"] for row in results["rows"]
    }
    assert attention["torch", "ours", "eager"] == {
        "forward": "flash_attention_for_cpu",
        "train": "flash_attention_for_cpu",
    }
    no_sdpa = gpu_torch.NO_SDPA
    assert attention["torch", "notebook-per-head", "eager"] == {"forward": no_sdpa, "train": no_sdpa}
    # ours in flax: the library function in eval, the explicit form when training on the CPU
    assert attention["flax", "ours", "dot_product_attention default"] == {
        "forward": "xla",
        "train": gpu_flax.EXPLICIT,
    }
    assert attention["flax", "flax-stock", "flax.linen attention"]["train"] == gpu_flax.EXPLICIT


def test_dry_run_rows_carry_rates_peaks_and_ratios(dry_run):
    _, results = dry_run
    (spec,) = specs(None, True, "gpu")
    for row in results["rows"]:
        assert row["calls_per_turn"] == spec.calls and row["model"] == "tiny"
        assert row["first_call_seconds"] > 0
        for mode in ("forward", "train"):
            measured = row[mode]
            assert measured["batch"] == spec.batch and measured["repeats"] == spec.repeats
            assert len(measured["rates"]) == len(measured["peak_gflops"]) == spec.repeats
            assert len(measured["fraction_of_peak_rounds"]) == spec.repeats
            assert measured["exceeds_peak"] == (measured["fraction_of_peak"] > 1)
        if row["implementation"] == "ours":  # every variant of ours against the fastest real peer
            for ratio in row["ours_over_fastest_peer"].values():
                assert ratio["peer"] != "ours" and len(ratio["rounds"]) == spec.repeats
                assert ratio["too_noisy"] == (ratio["spread"] > NOISE_THRESHOLD)
    for framework, peaks in results["peaks"].items():
        timed = sum(row["framework"] == framework for row in results["rows"])
        # per mode: one warm-up burst, then one before each round and one after each turn
        bursts = 2 * (1 + spec.repeats * (timed + 1))
        assert {dtype: peak["n"] for dtype, peak in peaks.items()} == dict.fromkeys(PEAK_DTYPES, bursts)


def test_tiny_config_is_what_the_dry_run_measures(dry_run):
    _, results = dry_run
    assert results["models"] == {"tiny": TINY.to_dict()}
