"""Throughput of our backends and their peers: `python -m bench.run [--quick] [--models ...] [--out DIR]`.

Starts one worker process per framework (torch, flax, numpy; each on the CPU only) that times every
implementation's forward and full training step in interleaved rounds, with an fp32 sgemm burst on
the same thread pool around every implementation's turn (the peak each round is measured against),
and writes bench_results.json and bench_results.md to --out (default runs/bench/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench import machine
from bench.models import specs
from bench.report import add_derived, markdown
from bench.worker import FRAMEWORKS

REPOSITORY = Path(__file__).resolve().parents[1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny ViT and a tiny CaiT at batch 2, 2 repeats: checks every implementation runs (< 60 s)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="default: cifar-notebook S/16 B/16 cait-xxs24-224 (tiny cait-tiny with --quick)",
    )
    parser.add_argument("--frameworks", nargs="+", choices=list(FRAMEWORKS), default=list(FRAMEWORKS))
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    return parser.parse_args(argv)


def run_worker(framework: str, args: argparse.Namespace) -> dict:
    """The framework's measurements from a fresh process (its own thread pools, nothing else loaded)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / f"{framework}.json"
        command = [sys.executable, "-m", "bench.worker", framework, "--out", str(out)]
        command += ["--quick"] * args.quick + (["--models", *args.models] if args.models else [])
        # CPU only, every implementation alike: the GPU half of the benchmark (bf16, the GPU's peak)
        # is not written yet, and a backend on a GPU beside peers on the CPU would be no comparison.
        cpu_only = os.environ | {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
        subprocess.run(command, cwd=REPOSITORY, check=True, env=cpu_only)
        return json.loads(out.read_text())


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    model_specs = specs(args.models, args.quick)  # fail on a bad name before measuring anything
    load_before = machine.load_average()
    workers = []
    for framework in args.frameworks:
        print(f"{framework}:", file=sys.stderr, flush=True)
        workers.append(run_worker(framework, args))
    rows = [row for worker in workers for row in worker["rows"]]
    add_derived(rows, model_specs)
    results = {
        "quick": args.quick,
        "machine": machine.describe() | {"threads": {w["framework"]: w["threads"] for w in workers}},
        "sgemm": {w["framework"]: peak_summary(w["sgemm"]) for w in workers},
        "load_average": {"before": load_before, "after": machine.load_average()},
        "models": {spec.name: spec.config.to_dict() for spec in model_specs},
        "rows": rows,
        "notes": [note for worker in workers for note in worker["notes"]],
    }
    write(results, args.out)
    return results


def peak_summary(sgemm: dict) -> dict:
    """A worker's sgemm bursts (every one it ran inside the rounds) with their median, min and max."""
    bursts = sgemm["bursts_gflops"]
    return sgemm | {
        "median": float(np.median(bursts)),
        "min": float(min(bursts)),
        "max": float(max(bursts)),
        "n": len(bursts),
    }


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / "bench_results.md").write_text(table)
    for note in results["notes"]:
        print(f"note: {note}")
    print(table)


if __name__ == "__main__":
    main()
