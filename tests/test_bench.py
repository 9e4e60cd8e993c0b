"""bench.run --quick exercises every implementation once and writes the two result files.

No timing assertions: this checks the benchmark runs and reports, not how fast anything is.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("flax")
pytest.importorskip("optax")

from bench import loop, machine, run
from bench.flops import forward_matmul_flops, train_matmul_flops
from bench.models import QUICK_CONFIGS
from bench.report import (
    NOISE_THRESHOLD,
    fraction_of_peak,
    paired_ratio,
    percent_text,
    ratio_text,
    spread,
    too_noisy,
)
from bench.timing import interleaved_rates
from bench.torch_impls import has_transformers
from tests.test_training import write_fashion_mnist
from vitspec import variant

MODES = ("forward", "train")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, run.main(["--quick", "--out", str(out)])


def expected_implementations() -> set[tuple[str, str]]:
    torch_impls = {"ours", "notebook-per-head"} | ({"hf-transformers"} if has_transformers() else set())
    return (
        {("torch", name) for name in torch_impls}
        | {("flax", "ours"), ("flax", "flax-stock")}
        | {("numpy", "reference")}
    )


def test_quick_writes_both_files(quick_results):
    out, results = quick_results
    assert json.loads((out / "bench_results.json").read_text()) == results
    report = (out / "bench_results.md").read_text()
    head, table = report.split("\n| model | implementation |", 1)
    assert head.startswith("# bench.run --quick")
    for line in ("- Machine:", "- ISA:", "- Threads: torch intra-op", "- Load average (1/5/15 min): before"):
        assert f"\n{line}" in head
    assert "XLA/Eigen intra-op" in head and "OMP_NUM_THREADS" in head and "ATEN_CPU_CAPABILITY" in head
    for framework in ("torch", "flax", "numpy"):
        assert f"- fp32 sgemm peak, {framework} (measured in the rounds" in head
    assert "% of peak (rounds)" in table and "too noisy to rank" in table


def test_quick_has_one_row_per_implementation(quick_results):
    _, results = quick_results
    found = {(row["framework"], row["implementation"]) for row in results["rows"] if row["model"] == "tiny"}
    assert found == expected_implementations()
    assert {row["model"] for row in results["rows"]} == {"tiny", "cait-tiny"}
    if not has_transformers():
        assert any("hf-transformers" in note for note in results["notes"])


def test_quick_has_a_cait_row_per_backend_and_no_vit_peer_on_it(quick_results):
    out, results = quick_results
    assert results["models"]["cait-tiny"]["class_attention_depth"] > 0
    assert results["models"]["cait-tiny"]["talking_heads"]
    cait = {
        (row["framework"], row["implementation"]): row
        for row in results["rows"]
        if row["model"] == "cait-tiny"
    }
    assert set(cait) == {("torch", "ours"), ("flax", "ours"), ("numpy", "reference")}
    for framework in ("torch", "flax"):
        row = cait[framework, "ours"]
        assert row["forward"]["median"] > 0 and row["train"]["median"] > 0
        assert row["ours_over_fastest_peer"] == {"forward": None, "train": None}
    assert any(note.startswith("cait-tiny is a CaiT: flax/flax-stock not run") for note in results["notes"])
    table = (out / "bench_results.md").read_text()
    assert "| cait-tiny | torch: ours | 2 |" in table and "| cait-tiny | flax: ours | 2 |" in table


def test_quick_rows_carry_rates_and_peak_fractions(quick_results):
    _, results = quick_results
    for row in results["rows"]:
        trains = row["framework"] != "numpy"
        assert (row["train"] is not None) == trains
        for mode in MODES[: 1 + trains]:
            measured = row[mode]
            assert set(measured) >= {
                "median",
                "min",
                "max",
                "repeats",
                "batch",
                "gflops",
                "peak_gflops",
                "fraction_of_peak",
                "fraction_of_peak_rounds",
                "exceeds_peak",
            }
            assert measured["min"] <= measured["median"] <= measured["max"]
            # one rate, one bracketing in-round peak and one fraction per round
            assert len(measured["rates"]) == len(measured["peak_gflops"]) == measured["repeats"]
            assert len(measured["fraction_of_peak_rounds"]) == measured["repeats"]
            assert all(peak > 0 for peak in measured["peak_gflops"])
            assert measured["exceeds_peak"] == (measured["fraction_of_peak"] > 1)
        if row["implementation"] == "ours" and row["model"] == "tiny":
            ratios = row["ours_over_fastest_peer"]
            assert set(ratios) == set(MODES)
            for ratio in ratios.values():
                assert ratio["min"] <= ratio["ratio"] <= ratio["max"]
                assert len(ratio["rounds"]) == row["train"]["repeats"]
                assert ratio["too_noisy"] == (ratio["spread"] > NOISE_THRESHOLD)


def test_quick_records_the_machine_and_peak(quick_results):
    _, results = quick_results
    assert set(results["sgemm"]) == {"torch", "flax", "numpy"}
    for sgemm in results["sgemm"].values():  # every burst run inside the rounds, in the worker
        assert sgemm["n"] == len(sgemm["bursts_gflops"]) > 0
        assert 0 < sgemm["min"] <= sgemm["median"] <= sgemm["max"]
    m = results["machine"]
    assert {"cpu", "logical_cores", "versions", "isa", "isa_env", "thread_env"} <= set(m)
    assert {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "XLA_FLAGS"} <= set(
        m["isa_env"]
    )
    assert {"OMP_NUM_THREADS", "MKL_NUM_THREADS"} <= set(m["thread_env"])
    assert {"torch", "flax", "numpy"} <= set(m["threads"])
    assert m["threads"]["torch"]["torch_intra_op"] >= 1 and m["threads"]["torch"]["torch_cpu_capability"]
    assert m["threads"]["flax"]["xla_eigen_intra_op"] >= 1
    assert set(results["load_average"]) == {"before", "after"}


def test_rounds_interleave_the_implementations_in_rotated_order():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    rates = interleaved_rates(runs, batch=4, warmup=2, repeats=3)
    assert calls[:6] == list("aabbcc")  # warm-up: each in turn
    assert calls[6:] == list("abcbcacab")
    assert {name: len(r["rates"]) for name, r in rates.items()} == {"a": 3, "b": 3, "c": 3}


def test_a_peak_burst_brackets_every_turn_of_every_round():
    calls, bursts = [], iter(range(100, 200))

    def peak():
        calls.append("P")
        return float(next(bursts))

    runs = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    rates = interleaved_rates(runs, batch=1, warmup=1, repeats=2, peak=peak)
    assert "".join(calls) == "abP" + "PaPbP" + "PbPaP"  # warm-ups, the burst's warm-up, two rounds
    # the burst values were 100 (warm-up), then 101-103 in round 1 and 104-106 in round 2: each
    # turn gets the higher of the bursts just before and after it
    assert rates["a"]["peak_gflops"] == [102.0, 106.0]
    assert rates["b"]["peak_gflops"] == [103.0, 105.0]
    assert "peak_gflops" not in interleaved_rates(runs, batch=1, warmup=0, repeats=1)["a"]


def test_spread_flags_the_issue_rounds_and_passes_steady_ones():
    # The issue's S/16 row: per-round ratios from 0.58x to 1.27x around ~1.
    wide = [0.58, 0.93, 1.05, 1.27, 0.99]
    assert spread(wide) == pytest.approx((1.27 - 0.58) / 0.99)
    assert too_noisy(wide)
    steady = [0.97, 1.0, 1.02, 0.99, 1.01]
    assert spread(steady) == pytest.approx(0.05)
    assert not too_noisy(steady)
    assert too_noisy(steady, threshold=0.04)
    assert spread([2.0, 2.0]) == 0.0


def test_paired_ratio_is_the_median_of_per_round_ratios_with_the_flag():
    ours, peer = [10.0, 20.0, 30.0], [10.0, 10.0, 40.0]  # round ratios 1, 2, 0.75
    ratio = paired_ratio(ours, peer)
    assert ratio["rounds"] == [1.0, 2.0, 0.75]
    assert (ratio["ratio"], ratio["min"], ratio["max"]) == (1.0, 0.75, 2.0)
    assert ratio["spread"] == pytest.approx(1.25) and ratio["too_noisy"]
    assert ratio_text(ratio | {"peer": "p"}).startswith("TOO NOISY TO RANK: 1.00x (0.75–2.00")
    calm = paired_ratio([10.0, 10.0], [10.0, 10.5])
    assert not calm["too_noisy"] and not ratio_text(calm | {"peer": "p"}).startswith("TOO NOISY")


def test_fraction_of_peak_is_per_round_and_flags_more_than_the_peak():
    # 1 GFLOP an image: rounds at 40 and 60 img/s against in-round peaks of 80 and 50 GFLOP/s.
    fraction = fraction_of_peak([40.0, 60.0], [80.0, 50.0], flops_per_image=10**9)
    assert fraction["fraction_of_peak_rounds"] == [0.5, 1.2]
    assert fraction["fraction_of_peak"] == pytest.approx(0.85) and not fraction["exceeds_peak"]
    assert percent_text(fraction) == "85.0% (50–120)"
    # the issue's case: 107% of a peak measured once, up front
    impossible = fraction_of_peak([107.0, 107.0], [100.0, 100.0], flops_per_image=10**9)
    assert impossible["exceeds_peak"]
    assert percent_text(impossible).startswith("IMPOSSIBLE: 107% > peak")


def test_isa_and_thread_settings_from_synthetic_flags():
    assert machine.isa({"sse4_2", "avx", "avx2", "fma"}) == {
        "level": "avx2",
        "flags": ["avx2", "avx", "sse4_2", "fma"],
    }
    assert machine.isa({"avx512f", "avx2", "avx512_bf16"})["level"] == "avx512f"
    assert machine.isa(set())["level"] is None
    assert machine.eigen_threads(None, 8) == 8
    assert machine.eigen_threads("--xla_cpu_multi_thread_eigen=false", 8) == 1
    assert machine.eigen_threads("--xla_foo=1 intra_op_parallelism_threads=3", 8) == 3


def test_matmul_flops_of_b16_match_the_published_count():
    # ViT-B/16 at 224 is 17.6 GMACs (the ViT paper's 55.4 GFLOPs counts more than matmuls).
    cfg = variant("B/16")
    assert forward_matmul_flops(cfg) / 2e9 == pytest.approx(17.56, abs=0.01)
    assert train_matmul_flops(cfg) == 3 * forward_matmul_flops(cfg)


def test_matmul_flops_of_cait_xxs24_match_the_published_count():
    # CaiT-XXS-24 at 224: 2.5 GFLOPs in Table 1 of Touvron et al. 2021 (multiply-adds, as the ViT's).
    assert forward_matmul_flops(variant("cait-xxs24-224")) / 2e9 == pytest.approx(2.52, abs=0.01)


@pytest.mark.parametrize("name", ["tiny", "cait-tiny"])
def test_matmul_flops_match_what_torch_counts_in_our_module(name):
    """torch's FlopCounterMode over one forward of backends.torch_vit (attention in its math form, so
    that its matmuls are counted) finds exactly the analytic count: talking heads and class attention
    included. The quick configs, with a pre-logits layer and a narrower class-block MLP added."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from backends.torch_vit import model_for

    cfg = QUICK_CONFIGS[name]
    cfg = (
        cfg.replace(class_attention_mlp_dim=48)
        if cfg.class_attention_depth
        else cfg.replace(representation_size=24)
    )
    model = model_for(cfg).eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.zeros(3, cfg.in_channels, *cfg.image_size))
    assert counter.get_total_flops() == 3 * forward_matmul_flops(cfg)


def test_loop_bench_runs_the_training_loop_and_the_bare_step(tmp_path):
    write_fashion_mnist(tmp_path / "fashion-mnist", train=80, test=20)
    results = loop.main(
        [
            "--model",
            "fmnist-tiny",
            "--batch-size",
            "16",
            "--steps",
            "2",
            "--rounds",
            "2",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--validation-size",
            "16",
            "--model-overrides",
            '{"depth": 1, "width": 16, "num_heads": 2, "mlp_dim": 32}',
        ]
    )
    assert [r["backend"] for r in results] == ["torch", "flax"]
    for r in results:
        assert len(r["loop_images_per_second"]) == len(r["bare_images_per_second"]) == 2
        assert r["loop_over_bare"]["min"] <= r["loop_over_bare"]["median"] <= r["loop_over_bare"]["max"]
    assert json.loads((tmp_path / "out" / "loop_results.json").read_text()) == results
