"""One framework's implementations on a GPU, measured in this one process: `python -m bench.gpu_worker
torch --out rows.json [--quick] [--dry-run] [--models ...]`. bench.run --device gpu starts one per
framework; --dry-run runs the same code on the CPU, in float32, for the tests of a machine without one;
--check only exits 2 with an `error:` if the framework sees no GPU.

Every implementation runs its forward and its training step once before the rounds (the compiles,
and the check that a forced attention kernel takes these inputs: one that does not is a note, not a
row), then the rounds of bench.timing, each turn `calls` calls ended by a wait for the device, with
a bf16 and an fp32 matmul burst around every turn: the rows are measured against the burst in their
own precision."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import sys
import time
from pathlib import Path

from bench.accelerator import (
    DRY_RUN,
    GPU,
    PEAK_DTYPES,
    Placement,
    describe,
    matmul_burst,
    missing_gpu,
    synchronizer,
)
from bench.models import ModelSpec, specs
from bench.timing import interleaved_rates
from bench.worker import applies, skipped

FRAMEWORKS = {"torch": "bench.gpu_torch", "flax": "bench.gpu_flax"}
MODE_CALLS = {"forward": "forward", "train": "train_step"}  # a row's mode -> the Runner's callable


def measure(
    framework: str, runners: dict, first_calls: dict, spec: ModelSpec, peak, placement: Placement
) -> list[dict]:
    """One row per (implementation, variant); forward passes of all interleaved, then training steps."""
    synchronize = synchronizer(framework, placement)
    timed = {mode: {key: getattr(r, call) for key, r in runners.items()} for mode, call in MODE_CALLS.items()}
    rates = {
        mode: interleaved_rates(calls, spec.batch, spec.warmup, spec.repeats, peak, synchronize, spec.calls)
        for mode, calls in timed.items()
    }
    return [
        {
            "model": spec.name,
            "framework": framework,
            "implementation": implementation,
            "variant": variant,
            "attention": runner.attention(),
            "calls_per_turn": spec.calls,
            "first_call_seconds": first_calls[implementation, variant],
            "forward": rates["forward"][implementation, variant],
            "train": rates["train"][implementation, variant],
        }
        for (implementation, variant), runner in runners.items()
    ]


def ready_runners(
    framework: str, builds: dict, spec: ModelSpec, placement: Placement, notes: list, first_calls: dict
) -> dict:
    """The implementations that build and run one forward and one training step on this model;
    first_calls gets each one's seconds for those two calls (the compiles: torch.compile's, XLA's)."""
    synchronize = synchronizer(framework, placement)
    runners = {}
    for (implementation, variant), build in builds.items():
        if not applies(implementation, spec):
            continue
        try:
            runner = build(spec.config, spec.batch, placement)
            start = time.perf_counter()
            synchronize(runner.forward())
            synchronize(runner.train_step())
            first_calls[implementation, variant] = time.perf_counter() - start
        # Broad on purpose: a kernel that refuses these inputs, or memory, fails in each framework's
        # own way (torch's "No available kernel", XLA's cuDNN checks), and the rest must still run.
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            notes.append(f"{spec.name}: {framework}/{implementation} ({variant}) not run: {reason}")
            continue
        runners[implementation, variant] = runner
        seconds = first_calls[implementation, variant]
        print(f"    {implementation} ({variant}): first forward and step {seconds:.1f} s", file=sys.stderr)
    return runners


def run(framework: str, model_names: list[str] | None, quick: bool, placement: Placement) -> dict:
    device = describe(framework, placement)  # first: a fault in the GPU's own calls shows at once
    implementations = importlib.import_module(FRAMEWORKS[framework]).IMPLEMENTATIONS
    bursts = {dtype: matmul_burst(framework, dtype, placement) for dtype in PEAK_DTYPES}
    measured: dict[str, list[float]] = {dtype: [] for dtype in PEAK_DTYPES}

    def peak() -> float:
        for dtype, burst in bursts.items():
            measured[dtype].append(burst())
        return measured[placement.precision][-1]

    rows, notes, builds = [], [], {}
    for key, build in implementations.items():
        reason = skipped(framework, key[0])
        if reason:
            notes.append(f"{framework}/{key[0]} skipped: {reason}")
        else:
            builds[key] = build
    for spec in specs(model_names, quick, "gpu"):
        print(f"  {spec.name:>14}  {framework}", file=sys.stderr, flush=True)
        first_calls: dict[tuple[str, str], float] = {}
        runners = ready_runners(framework, builds, spec, placement, notes, first_calls)
        measured_rows = measure(framework, runners, first_calls, spec, peak, placement)
        for row in measured_rows:  # on stderr as they come: a run cut short still shows its rows
            rates = ", ".join(f"{mode} {row[mode]['median']:.1f} img/s" for mode in MODE_CALLS)
            print(f"    {row['implementation']} ({row['variant']}): {rates}", file=sys.stderr, flush=True)
        rows += measured_rows
        del runners
        gc.collect()  # the next model's runners get the device memory
    return {
        "framework": framework,
        "device": device,
        "placement": dataclasses.asdict(placement),
        "rows": rows,
        "notes": notes,
        "peaks": {
            dtype: {
                "size": placement.burst_sizes[dtype],
                "matmuls_per_burst": placement.burst_matmuls,
                "bursts_gflops": b,
            }
            for dtype, b in measured.items()
        },
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_worker")
    parser.add_argument("framework", choices=list(FRAMEWORKS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--check", action="store_true", help="only check that the framework sees a GPU")
    args = parser.parse_args(argv)
    if not args.dry_run:
        reason = missing_gpu(args.framework)
        if reason:
            print(f"error: --device gpu: {reason}; `--dry-run` runs this path on the CPU", file=sys.stderr)
            sys.exit(2)
    if args.check:
        return
    placement = DRY_RUN if args.dry_run else GPU
    results = run(args.framework, args.models, args.quick or args.dry_run, placement)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
