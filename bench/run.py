"""Throughput of our backends and their peers: `python -m bench.run [--quick] [--models ...] [--out DIR]`.

Starts one worker process per framework (torch, flax, numpy; each on the CPU only) that times every
implementation's forward and full training step in interleaved rounds, with an fp32 sgemm burst on
the same thread pool around every implementation's turn (the peak each round is measured against),
and writes bench_results.json and bench_results.md to --out (default runs/bench/).

`--device gpu` is the GPU half: one bench.gpu_worker per framework (torch, flax) times the same
models at GPU-sized batches in bf16, ours eager and torch.compile'd and with each attention kernel
beside the peers, against bf16 (and fp32) matmul bursts on the GPU, and writes bench_gpu_results.json
and .md. `--device gpu --dry-run` runs that path on the CPU (float32, tiny models), GPU or not.
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

from bench import gpu_report, gpu_worker, machine
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
        help="default: cifar-notebook S/16 B/16 cait-xxs24-224 (tiny cait-tiny with --quick); with "
        "--device gpu: cifar-notebook S/16 B/16 (tiny with --quick or --dry-run)",
    )
    parser.add_argument(
        "--frameworks",
        nargs="+",
        choices=list(FRAMEWORKS),
        help="default: torch flax numpy (gpu: torch flax)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="with --device gpu: its code on the CPU, float32, a tiny ViT (checks the machinery, < 2 min)",
    )
    args = parser.parse_args(argv)
    gpu_frameworks = list(gpu_worker.FRAMEWORKS)
    if args.dry_run and args.device != "gpu":
        parser.error("--dry-run runs the GPU half on the CPU: it goes with --device gpu")
    if args.device == "gpu" and set(args.frameworks or ()) - set(gpu_frameworks):
        parser.error(f"--device gpu runs {' and '.join(gpu_frameworks)} only")
    args.frameworks = args.frameworks or (gpu_frameworks if args.device == "gpu" else list(FRAMEWORKS))
    return args


def run_worker(framework: str, args: argparse.Namespace) -> dict:
    """The framework's measurements from a fresh process (its own thread pools, nothing else loaded)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / f"{framework}.json"
        command = [sys.executable, "-m", "bench.worker", framework, "--out", str(out)]
        command += ["--quick"] * args.quick + (["--models", *args.models] if args.models else [])
        # CPU only, every implementation alike, even on a machine with a GPU: a backend on the GPU
        # beside peers on the CPU would be no comparison. The GPU half is --device gpu (run_gpu_worker).
        cpu_only = os.environ | {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
        subprocess.run(command, cwd=REPOSITORY, check=True, env=cpu_only)
        return json.loads(out.read_text())


def run_gpu_worker(framework: str, args: argparse.Namespace, check: bool = False) -> dict | None:
    """As run_worker, on the GPU; a worker that finds no GPU prints an `error:` and exits 2, and so
    does this process. check: only that check, in a process of its own (each framework is asked
    before any is measured). The dry run hides the GPU, as the CPU half does."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / f"{framework}.json"
        command = [sys.executable, "-m", "bench.gpu_worker", framework, "--out", str(out)]
        command += ["--quick"] * args.quick + ["--dry-run"] * args.dry_run + ["--check"] * check
        command += ["--models", *args.models] if args.models else []
        env = os.environ | ({"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"} if args.dry_run else {})
        finished = subprocess.run(command, cwd=REPOSITORY, check=False, env=env)
        if finished.returncode == 2:
            sys.exit(2)
        finished.check_returncode()
        return None if check else json.loads(out.read_text())


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "gpu":
        return main_gpu(args)
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
    write(results, args.out, "bench_results", markdown(results))
    return results


def main_gpu(args: argparse.Namespace) -> dict:
    quick = args.quick or args.dry_run
    model_specs = specs(args.models, quick, "gpu")  # fail on a bad name before measuring anything
    if not args.dry_run:  # every framework sees the GPU, or nothing is measured
        for framework in args.frameworks:
            run_gpu_worker(framework, args, check=True)
    load_before = machine.load_average()
    workers = []
    where = "dry run, on the CPU" if args.dry_run else "GPU"
    for framework in args.frameworks:
        print(f"{framework} ({where}):", file=sys.stderr, flush=True)
        workers.append(run_gpu_worker(framework, args))
    rows = [row for worker in workers for row in worker["rows"]]
    add_derived(rows, model_specs)
    results = {
        "device": "gpu",
        "quick": args.quick,
        "dry_run": args.dry_run,
        "machine": machine.describe() | {"gpu": {w["framework"]: w["device"] for w in workers}},
        "measured_against": workers[0]["placement"]["precision"],
        "placement": workers[0]["placement"],
        "peaks": {w["framework"]: {d: peak_summary(p) for d, p in w["peaks"].items()} for w in workers},
        "load_average": {"before": load_before, "after": machine.load_average()},
        "models": {spec.name: spec.config.to_dict() for spec in model_specs},
        "rows": rows,
        "notes": [note for worker in workers for note in worker["notes"]],
    }
    write(results, args.out, "bench_gpu_results", gpu_report.markdown(results))
    return results


def peak_summary(sgemm: dict) -> dict:
    """A worker's matmul bursts (every one it ran inside the rounds) with their median, min and max."""
    bursts = sgemm["bursts_gflops"]
    return sgemm | {
        "median": float(np.median(bursts)),
        "min": float(min(bursts)),
        "max": float(max(bursts)),
        "n": len(bursts),
    }


def write(results: dict, out: Path, stem: str, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / f"{stem}.json", json.dumps(results, indent=1))
    write_atomically(out / f"{stem}.md", table)
    for note in results["notes"]:
        print(f"note: {note}")
    print(table)


def write_atomically(path: Path, text: str) -> None:
    """A temp file beside `path`, renamed over it: a reader never sees half a report."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as temp:
        temp.write(text)
    os.replace(temp.name, path)


if __name__ == "__main__":
    main()
