"""The measurements behind the low-precision rows of the tolerance table.

    python -m parity_tests.sweep run torch --examples 2000 --out runs/sweep/torch-native.jsonl
    XLA_FLAGS=--xla_cpu_max_isa=AVX2 python -m parity_tests.sweep run flax --out runs/sweep/flax-avx2.jsonl
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python -m parity_tests.sweep run torch --out runs/sweep/torch-avx2.jsonl
    python -m parity_tests.sweep run torch --cait --examples 200 --out runs/sweep/torch-cait.jsonl
    python -m parity_tests.sweep summary runs/sweep/*.jsonl

`run` draws cases from the tests' strategy with its own Hypothesis seed (SWEEP_SEED, not the
tests' derandomized one, so the tests check k on draws that did not set it) and writes, per case
and per tensor, the backend's float32 and bfloat16 errors against float64 and the errors of the
reference's own roundings. `summary` turns them into the per-case worst ratios (median, p99,
p99.9, max) that SPEC.md reports, CaiT records (`run --cait`, drawn from `cait_cases`) in
rows of their own; `--roundings 1` scores against the reference as written only.
Storing the raw errors lets a yardstick be judged on data that was not drawn to fit it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
from hypothesis import given, seed, settings

from parity_tests.cases import Case, as_float64, cait_cases, cases, head_propagated_error
from parity_tests.tolerances import TOLERANCES, tree_rel_errs

SWEEP_SEED = 20261129
KINDS = [("float32", "forward"), ("float32", "grad"), ("bfloat16", "forward"), ("bfloat16", "grad")]


def backend_functions(name: str):
    """(named_and_grads(case, dtype), bf16_named_and_grads(case)) of a backend's parity test."""
    if name == "torch":
        from parity_tests.test_torch_parity import bf16_autocast_named_and_grads, torch_named_and_grads

        return torch_named_and_grads, bf16_autocast_named_and_grads
    from parity_tests.test_flax_parity import bfloat16_named_and_grads, flax_named_and_grads

    return flax_named_and_grads, bfloat16_named_and_grads


def propagated_errors(case: Case) -> dict[str, dict[str, float]]:
    """The reference-only part of the yardstick: cases.head_propagated_error per dtype."""
    ref64_named = case.reference(np.float64)[0]
    float32_own = [r[0] for r in case.float32_roundings()]
    bf16_own = case.reference(np.float64, round_inputs_to_bfloat16=True)[0]
    return {
        "float32/forward": head_propagated_error(case, ref64_named, float32_own),
        "bfloat16/forward": head_propagated_error(case, ref64_named, [bf16_own]),
    }


def case_errors(case: Case, named_and_grads, bf16_named_and_grads) -> dict[str, dict[str, list[float]]]:
    """{'float32/forward': {tensor: [backend error, own error of each rounding...]}, ...}."""
    ref64_named, ref64_grads = case.reference(np.float64)
    roundings = case.float32_roundings()
    bf16_own = case.reference(np.float64, round_inputs_to_bfloat16=True)
    named32, grads32 = (as_float64(t) for t in named_and_grads(case, np.float32))
    bf16_named, bf16_grads = bf16_named_and_grads(case)
    measured = {
        ("float32", "forward"): (named32, ref64_named, [r[0] for r in roundings]),
        ("float32", "grad"): (grads32, ref64_grads, [r[1] for r in roundings]),
        ("bfloat16", "forward"): (
            bf16_named,
            {k: ref64_named[k] for k in bf16_named},
            [{k: bf16_own[0][k] for k in bf16_named}],
        ),
        ("bfloat16", "grad"): (bf16_grads, ref64_grads, [bf16_own[1]]),
    }
    out = {}
    for (dtype, kind), (got, ref64, owns) in measured.items():
        errs = tree_rel_errs(got, ref64, kind)
        own_errs = [tree_rel_errs(o, ref64, kind) for o in owns]
        out[f"{dtype}/{kind}"] = {k: [errs[k]] + [o[k] for o in own_errs] for k in errs}
    return out


def run(
    backend: str, examples: int, out_path: Path, sweep_seed: int = SWEEP_SEED, cait: bool = False
) -> None:
    named_and_grads, bf16_named_and_grads = backend_functions(backend)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "aten": os.environ.get("ATEN_CPU_CAPABILITY", ""),
        "onednn": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "mkl": os.environ.get("MKL_ENABLE_INSTRUCTIONS", ""),
        "machine": platform.processor() or platform.machine(),
    }
    with open(out_path, "a") as f:

        @seed(sweep_seed)
        @settings(max_examples=examples, database=None, deadline=None, derandomize=False)
        @given(cait_cases if cait else cases)
        def one(case):
            record = {
                "backend": backend,
                "model": "cait" if cait else "vit",
                "config": repr(case.cfg),
                "seed": case.seed,
                "batch": len(case.images),
                **machine,
                "errors": case_errors(case, named_and_grads, bf16_named_and_grads),
                "propagated": propagated_errors(case),
            }
            f.write(json.dumps(record) + "\n")
            f.flush()

        one()


def worst_ratio(
    errors: dict[str, list[float]], dtype: str, kind: str, roundings: int, propagated: dict[str, float]
) -> tuple[float, str]:
    floor = TOLERANCES[dtype][kind]["floor"]
    ratios = {
        k: v[0] / max(max(v[1 : 1 + roundings]), propagated.get(k, 0.0), floor) for k, v in errors.items()
    }
    name = max(ratios, key=ratios.get)
    return ratios[name], name


def summary(paths: list[Path], roundings: int, with_propagated: bool = True) -> None:
    groups: dict[tuple, list] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            isa = "avx2" if "AVX2" in rec["xla_flags"] or rec["aten"] == "avx2" else "native"
            for dtype, kind in KINDS:
                propagated = rec.get("propagated", {}).get(f"{dtype}/{kind}", {}) if with_propagated else {}
                ratio, name = worst_ratio(
                    rec["errors"][f"{dtype}/{kind}"], dtype, kind, roundings, propagated
                )
                backend = rec["backend"] + ("/cait" if rec.get("model") == "cait" else "")
                groups.setdefault((backend, isa, dtype, kind), []).append((ratio, name, rec))
    propagated = " and the head's propagated input error" if with_propagated else ""
    print(
        f"per-case worst ratio, the reference's own error the largest of {roundings} rounding(s){propagated}"
    )
    print(
        "| backend | ISA | dtype | kind | cases | median | p99 | p99.9 | max | k | above k | worst tensor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (backend, isa, dtype, kind), rows in sorted(groups.items()):
        values = np.array([r[0] for r in rows])
        worst = max(rows, key=lambda r: r[0])
        k = TOLERANCES[dtype][kind]["k"]
        print(
            f"| {backend} | {isa} | {dtype} | {kind} | {len(values)} | {np.median(values):.2f} | "
            f"{np.percentile(values, 99):.2f} | {np.percentile(values, 99.9):.2f} | {values.max():.2f} | "
            f"{k:g} | {int((values > k).sum())} | {worst[1]} |"
        )
    for (backend, isa, dtype, kind), rows in sorted(groups.items()):
        ratio, name, rec = max(rows, key=lambda r: r[0])
        e = rec["errors"][f"{dtype}/{kind}"][name]
        print(
            f"worst {backend} {isa} {dtype} {kind}: {ratio:.2f} on {name} (backend {e[0]:.3g}, own "
            f"{', '.join(f'{x:.3g}' for x in e[1:])}), seed {rec['seed']} batch {rec['batch']}: "
            f"{rec['config']}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m parity_tests.sweep", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="measure a backend over drawn cases, appending to a JSONL file")
    p.add_argument("backend", choices=["torch", "flax"])
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--seed", type=int, default=SWEEP_SEED, help="Hypothesis seed of the draw (not the tests')"
    )
    p.add_argument("--cait", action="store_true", help="draw CaiT configs (cases.cait_cases)")
    p = sub.add_parser("summary", help="the ratio distributions of JSONL files written by run")
    p.add_argument("paths", type=Path, nargs="+")
    p.add_argument("--roundings", type=int, default=4, help="how many of the reference's roundings to use")
    p.add_argument("--no-propagated", action="store_true", help="without cases.head_propagated_error")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.backend, args.examples, args.out, args.seed, args.cait)
    else:
        summary(args.paths, args.roundings, not args.no_propagated)


if __name__ == "__main__":
    sys.exit(main())
