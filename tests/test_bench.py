"""bench.run --quick exercises every implementation once and writes the two result files.

No timing assertions: this checks the benchmark runs and reports, not how fast anything is.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("flax")
pytest.importorskip("optax")

from bench import loop, run
from bench.flops import forward_matmul_flops, train_matmul_flops
from bench.models import QUICK_CONFIGS
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
    table = (out / "bench_results.md").read_text()
    assert table.startswith("| model | implementation |")
    assert "GFLOP/s" in table and "Load average" in table


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
            assert set(row[mode]) >= {
                "median",
                "min",
                "max",
                "repeats",
                "batch",
                "gflops",
                "fraction_of_peak",
            }
            assert row[mode]["min"] <= row[mode]["median"] <= row[mode]["max"]
            assert len(row[mode]["rates"]) == row[mode]["repeats"]
        if row["implementation"] == "ours" and row["model"] == "tiny":
            ratios = row["ours_over_fastest_peer"]
            assert set(ratios) == set(MODES)
            for ratio in ratios.values():
                assert ratio["min"] <= ratio["ratio"] <= ratio["max"]


def test_quick_records_the_machine_and_peak(quick_results):
    _, results = quick_results
    assert results["sgemm"]["peak_gflops"] > 0
    assert {"cpu", "logical_cores", "versions"} <= set(results["machine"])
    assert {"torch", "flax"} <= set(results["machine"]["threads"])
    assert set(results["load_average"]) == {"before", "after"}


def test_rounds_interleave_the_implementations_in_rotated_order():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    rates = interleaved_rates(runs, batch=4, warmup=2, repeats=3)
    assert calls[:6] == list("aabbcc")  # warm-up: each in turn
    assert calls[6:] == list("abcbcacab")
    assert {name: len(r["rates"]) for name, r in rates.items()} == {"a": 3, "b": 3, "c": 3}


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
