"""Peak memory of loading and converting a reference checkpoint, against the file's size.

    python -m bench.load_memory                  # ViT-B/16: load, and convert to each format
    python -m bench.load_memory --variant Ti/16 --targets torch flax

Writes a random float32 reference file of the variant, then runs each step in a fresh Python
process and reports the RSS after its imports, its peak RSS, and the step's own cost,
(peak - imports) / file size. Reading each tensor into its own array costs the tensors once (1x);
a second full copy of the tree shows as 2x. Converting writes the target's tensors too, so a
layout that reshapes or transposes (torch's qkv, flax's heads) holds them on top.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import vitspec

ROOT = Path(__file__).resolve().parents[1]
# Target: (format, suffix, the framework its writer imports, counted with the imports).
TARGETS = {
    "ref-npz": ("ref", ".npz", ""),
    "torch": ("torch", ".pt", "torch"),
    "flax": ("flax", ".npz", ""),
    "flax-msgpack": ("flax", ".msgpack", "flax.serialization"),
    "vit_jax": ("vit_jax", ".npz", ""),
    "hf": ("hf", ".safetensors", ""),
}
# Linux only: VmHWM is this process's own peak (ru_maxrss would include the parent's, from
# before the exec), and writing 5 to clear_refs restarts it after the imports.
CHILD = """
import json, sys
import vitspec
from vitspec.app.convert import convert
{imports}
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
{step}
print(json.dumps([base, status("VmHWM:")]))
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--targets", nargs="*", choices=list(TARGETS), default=list(TARGETS))
    return parser.parse_args(argv)


def write_reference(path: Path, variant: str) -> None:
    cfg = vitspec.variant(variant)
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s, dtype=np.float32) for k, s in vitspec.param_shapes(cfg).items()}
    vitspec.save(path, cfg, params)


def measure(step: str, imports: str = "") -> tuple[int, int]:
    """(RSS after the imports, peak RSS) of a fresh process running `step`."""
    code = CHILD.format(imports=imports, step=step)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"step failed: {step}\n{done.stderr}")
    base, peak = json.loads(done.stdout.strip().splitlines()[-1])
    return base, peak


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.safetensors"
        write_reference(src, args.variant)
        size = src.stat().st_size
        steps = {"load": (f"vitspec.load({str(src)!r})", "")}
        for name in args.targets:
            fmt, suffix, framework = TARGETS[name]
            dst = Path(tmp) / f"{name}{suffix}"
            call = f"convert({str(src)!r}, {str(dst)!r}, to_fmt={fmt!r}, out=open('/dev/null', 'w'))"
            steps[f"convert to {name}"] = (call, f"import {framework}" if framework else "")
        print(f"ViT-{args.variant} reference file: {size / 2**20:.0f} MiB")
        print(f"{'step':22s} {'imports MiB':>12s} {'peak MiB':>9s} {'(peak-imports)/file':>20s}")
        for name, (step, imports) in steps.items():
            base, peak = measure(step, imports)
            row = dict(step=name, file_bytes=size, imports_rss=base, peak_rss=peak, cost=(peak - base) / size)
            rows.append(row)
            print(f"{name:22s} {base / 2**20:12.0f} {peak / 2**20:9.0f} {row['cost']:19.2f}x")
    return rows


if __name__ == "__main__":
    main()
