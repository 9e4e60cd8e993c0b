"""Where a training step's time goes, by kind of work: matmuls against what runs between them.

    python -m bench.step_profile --framework flax --model cifar-notebook
    python -m bench.step_profile --framework torch --model S/16 --steps 5

Runs each implementation of the framework (ours and the peers `bench.run` times) for a few warm-up
steps, then `--steps` training steps under the framework's own profiler, and sums the time of every
kernel by kind: matmul, attention (torch's fused kernel), layer norm, GELU, softmax / exp, reductions,
copies and transposes, the optimizer, everything else. Times are summed over the threads that ran
them, so on 2 cores they can add up to twice the wall time; the shares are what compare. XLA's kinds
come from the optimized HLO (dumped by this process: a fusion counts as a matmul when it contains a
dot, as a copy when it transposes or copies, and so on); torch's from the ATen operator names.
The wall time per step is measured outside the profiler, after it.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import importlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from bench.models import specs

FRAMEWORKS = {"torch": "bench.torch_impls", "flax": "bench.flax_impls"}
# ATen operator -> kind; the first pattern that matches the name wins.
TORCH_KINDS = (
    ("matmul", r"addmm|::mm$|bmm|matmul|linear|convolution"),
    ("attention", r"scaled_dot_product|flash_attention|_efficient_attention"),
    ("layer norm", r"layer_norm"),
    ("GELU", r"gelu"),
    ("softmax / exp", r"softmax|::exp"),
    ("optimizer", r"adam"),
    ("reductions", r"::sum|::mean|::norm|::max|::amax|::argmax"),
    ("copies / transposes", r"copy_|contiguous|clone|::to$|_to_copy|transpose|permute|cat|stack"),
)
# An HLO instruction's ops (its fusion's included) -> kind, in this order.
XLA_KINDS = (
    ("matmul", {"dot", "convolution"}),
    ("softmax / exp", {"exponential"}),
    ("GELU", {"erf"}),
    ("reductions", {"reduce"}),
    ("copies / transposes", {"transpose", "copy"}),
)


def torch_kinds(runner, steps: int) -> collections.Counter:
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(steps):
            runner.train_step()
    kinds: collections.Counter = collections.Counter()
    for event in profile.key_averages():
        if event.self_cpu_time_total <= 0:
            continue
        kind = next((k for k, pattern in TORCH_KINDS if re.search(pattern, event.key)), "other")
        kinds[kind] += event.self_cpu_time_total / 1e3
    return kinds


INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")


def called_ops(computations: dict[str, list[str]], name: str, seen: frozenset = frozenset()) -> set[str]:
    """The ops computation `name` runs, those of the computations it calls included."""
    found = set()
    for line in computations.get(name, []):
        instruction = INSTRUCTION.match(line)
        if instruction:
            found.add(instruction.group(2))
        for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
            if called not in seen:
                found |= called_ops(computations, called, seen | {called})
    return found


def hlo_instructions(dump_dir: Path) -> dict[tuple[str, str], set[str]]:
    """(module name, instruction name) -> the ops it runs, its called computations' included."""
    table = {}
    for path in dump_dir.glob("*.cpu_after_optimizations.txt"):
        module = re.search(r"module_\d+\.(.+)\.cpu_after_optimizations", path.name).group(1)
        computations: dict[str, list[str]] = {}
        current = None
        for line in path.read_text().splitlines():
            header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
            if header:
                current = computations.setdefault(header.group(1), [])
            elif current is not None:
                current.append(line)
        for lines in computations.values():
            for line in lines:
                instruction = INSTRUCTION.match(line)
                if instruction:
                    called = re.findall(r"calls=%?([\w.\-]+)", line)
                    ops = {instruction.group(2)}.union(*(called_ops(computations, c) for c in called))
                    table[module, instruction.group(1)] = ops
    return table


def xla_kinds(runner, steps: int, dump_dir: Path) -> collections.Counter:
    import jax

    instructions = hlo_instructions(dump_dir)
    if not instructions:
        raise RuntimeError(f"XLA dumped no optimized HLO to {dump_dir}: was jax started before this script?")
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                runner.train_step()
        (trace,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace))["traceEvents"]
    kinds: collections.Counter = collections.Counter()
    for event in events:
        args = event.get("args", {})
        key = (args.get("hlo_module"), args.get("hlo_op"))
        if event.get("ph") != "X" or key not in instructions:
            continue
        ops = instructions[key]
        kind = next((k for k, wanted in XLA_KINDS if ops & wanted), "elementwise / other")
        kinds[kind] += event["dur"] / 1e3
    return kinds


def wall_ms(runner, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        runner.train_step()
    return (time.perf_counter() - start) / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--framework", choices=list(FRAMEWORKS), required=True)
    parser.add_argument("--model", default="cifar-notebook", help="a bench.run model (default: %(default)s)")
    parser.add_argument("--implementations", help="comma-separated (default: all of the framework's)")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="the tiny model of `bench.run --quick`")
    args = parser.parse_args(argv)
    try:
        (spec,) = specs([args.model], args.quick)
    except (KeyError, ValueError) as error:
        print(f"error: --model {args.model!r}: {error}", file=sys.stderr)
        return 2
    dump_dir = Path(tempfile.mkdtemp(prefix="step_profile_hlo_"))
    if args.framework == "flax":  # before jax starts: XLA reads its flags once
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir}".strip()
    implementations = importlib.import_module(FRAMEWORKS[args.framework]).IMPLEMENTATIONS
    names = args.implementations.split(",") if args.implementations else list(implementations)
    unknown = [name for name in names if name not in implementations]
    if unknown:
        print(
            f"error: --implementations {','.join(unknown)}: expected some of {', '.join(implementations)}",
            file=sys.stderr,
        )
        return 2
    print(f"{args.framework}, {spec.name}, batch {spec.batch}: ms per step summed over threads (share)")
    for name in names:
        runner = implementations[name](spec.config, spec.batch)
        for _ in range(spec.warmup + 1):
            runner.train_step()
        if args.framework == "torch":
            kinds = torch_kinds(runner, args.steps)
        else:
            kinds = xla_kinds(runner, args.steps, dump_dir)
        wall = wall_ms(runner, args.steps)
        total = sum(kinds.values())
        shares = ", ".join(
            f"{kind} {ms / args.steps:.1f} ({ms / total:.0%})" for kind, ms in kinds.most_common()
        )
        print(f"{name}: wall {wall:.1f} ms/step, kernels {total / args.steps:.1f} ms/step: {shares}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
