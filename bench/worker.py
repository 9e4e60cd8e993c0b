"""One framework's implementations, measured in this one process: `python -m bench.worker torch
--out rows.json [--quick] [--models ...]`. bench.run starts one per framework so that torch's and
XLA's thread pools never share a process."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from bench import machine
from bench.models import ModelSpec, specs
from bench.runners import sgemm_burst
from bench.timing import interleaved_rates

FRAMEWORKS = {"torch": "bench.torch_impls", "flax": "bench.flax_impls", "numpy": "bench.numpy_impls"}


# The sgemm bursts' matrix size: 2048 reaches the fp32 peak of torch, XLA and OpenBLAS on the 2-core
# development machine (1024 falls ~25% short) and takes ~0.1-0.4 s a matmul there; --quick only
# checks the machinery, so its tiny models get a small burst.
BURST_SIZE = {False: 2048, True: 512}


def measure(framework: str, builds: dict, spec: ModelSpec, peak=None) -> list[dict]:
    """One row per implementation; forward passes of all of them interleaved, then training steps.
    peak: the sgemm burst bench.timing runs around every implementation's turn (None: no peak)."""
    reference = framework == "numpy"
    batch = spec.reference_batch if reference else spec.batch
    repeats = spec.reference_repeats if reference else spec.repeats
    runners = {name: build(spec.config, batch) for name, build in builds.items()}
    forwards = {name: r.forward for name, r in runners.items()}
    forward = interleaved_rates(forwards, batch, spec.warmup, repeats, peak)
    trainable = {name: r.train_step for name, r in runners.items() if r.train_step is not None}
    train = interleaved_rates(trainable, batch, spec.warmup, repeats, peak) if trainable else {}
    return [
        {
            "model": spec.name,
            "framework": framework,
            "implementation": name,
            "forward": forward[name],
            "train": train.get(name),
        }
        for name in runners
    ]


def skipped(framework: str, implementation: str) -> str | None:
    """Why an implementation cannot run here, or None."""
    if implementation == "hf-transformers":
        from bench.torch_impls import has_transformers

        if not has_transformers():
            return "transformers is not importable (pip install transformers)"
    return None


# The peers are ViTs: a CaiT is measured by our backends and the NumPy reference only.
CAIT_IMPLEMENTATIONS = {"ours", "reference"}


def applies(implementation: str, spec: ModelSpec) -> bool:
    return not spec.is_cait or implementation in CAIT_IMPLEMENTATIONS


def run(framework: str, model_names: list[str] | None, quick: bool) -> dict:
    implementations = importlib.import_module(FRAMEWORKS[framework]).IMPLEMENTATIONS
    rows, notes = [], []
    size = BURST_SIZE[quick]
    burst, bursts = sgemm_burst(framework, size), []

    def peak() -> float:
        bursts.append(burst())
        return bursts[-1]

    builds = {}
    for name, build in implementations.items():
        reason = skipped(framework, name)
        if reason:
            notes.append(f"{framework}/{name} skipped: {reason}")
        else:
            builds[name] = build
    for spec in specs(model_names, quick):
        runs = {name: build for name, build in builds.items() if applies(name, spec)}
        if set(runs) != set(builds):
            left_out = ", ".join(f"{framework}/{name}" for name in builds if name not in runs)
            notes.append(f"{spec.name} is a CaiT: {left_out} not run (they build ViTs only)")
        print(f"  {spec.name:>14}  {framework}: {', '.join(runs)}", file=sys.stderr, flush=True)
        rows += measure(framework, runs, spec, peak)
    sgemm = {"size": size, "matmuls_per_burst": 2, "bursts_gflops": bursts}
    return {
        "framework": framework,
        "rows": rows,
        "notes": notes,
        "threads": thread_counts(framework),
        "sgemm": sgemm,
    }


def thread_counts(framework: str) -> dict:
    if framework == "torch":
        import torch

        return {
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        }
    if framework == "flax":
        import jax

        xla_flags = os.environ.get("XLA_FLAGS")
        return {
            "jax_devices": [str(d) for d in jax.devices()],
            "xla_eigen_intra_op": machine.eigen_threads(xla_flags, machine.usable_cores()),
            "xla_flags": xla_flags,
        }
    import numpy as np

    blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    return {"numpy_blas": blas.get("name"), "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("framework", choices=list(FRAMEWORKS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    args.out.write_text(json.dumps(run(args.framework, args.models, args.quick), indent=1))


if __name__ == "__main__":
    main()
