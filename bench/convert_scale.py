"""Memory and time of `vitspec convert` at scale: every format as target and as source.

    python -m bench.convert_scale                       # ViT-H/14 (~2.5 GB float32), 3 repeats
    python -m bench.convert_scale --variant B/16 --repeats 5
    python -m bench.convert_scale --pairs all           # every (source, target) pair, not only via ref

Writes a random float32 reference .safetensors of the variant; converts it to each format
(`ref -> X`), then each of those back to a reference file (`X -> ref`), each conversion in a fresh
Python process. For each it reports the peak RSS above the RSS after imports, over the source
file's size (the goal: <= 1.5x), and the conversion's time over the time of copying (goal: <= 3x).

The copy is the floor a conversion is held to: the source's weights file (model.safetensors of a
directory) copied by shutil.copyfile, which copies in the kernel (sendfile: no pass through user
memory), then fsynced, as a conversion's atomic write fsyncs; in a fresh process of its own, run
just before each conversion so both see the same host, the file in the page cache for both.
Imports (torch, flax) are excluded from both.

Repeats are interleaved (every step once, then again). The time ratio is the fastest conversion
over the fastest copy: on a shared host, other work only ever adds time (on a 2-core machine shared
with other jobs, one 2.4 GB copy took 1.3 to 4.8 s and one conversion 3.6 to 7.3 s, minutes
apart), so the minimum of each is the best estimate of its cost; a ratio of medians or of each
run's pair swings with whatever ran beside it. The seconds columns give the median and the spread
(min-max). --check is not measured: it runs float64 models on the whole tree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import vitspec
from vitspec.formats.inference import reading_flags

ROOT = Path(__file__).resolve().parents[1]
# Format name: (--to, file or directory name, framework imported before the measurement).
FORMATS = {
    "ref": ("ref", "ref.safetensors", ""),
    "ref-npz": ("ref", "ref.npz", ""),
    "torch": ("torch", "timm.pt", "torch"),
    "flax": ("flax", "big_vision.npz", ""),
    "flax-msgpack": ("flax", "big_vision.msgpack", "flax.serialization"),
    "vit_jax": ("vit_jax", "vit_jax.npz", ""),
    "hf": ("hf", "hf.safetensors", ""),
    "hf-dir": ("hf", "hf_dir", ""),
}
# Linux only: VmHWM is this process's own peak; writing 5 to clear_refs restarts it after imports.
CHILD = """
import json, os, shutil, sys, time
import vitspec
from vitspec.formats.inference import reading_flags
from vitspec.app.convert import convert
{imports}
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
def copy(src, dst):
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
start = time.perf_counter()
{step}
seconds = time.perf_counter() - start
print(json.dumps([base, status("VmHWM:"), seconds]))
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.convert_scale", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--variant", default="H/14")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", nargs="*", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("--pairs", choices=("via-ref", "all"), default="via-ref")
    parser.add_argument("--dir", help="where to write the files (default: a temporary directory)")
    parser.add_argument("--json", help="write the rows here")
    return parser.parse_args(argv)


def write_reference(path: Path, variant: str) -> None:
    cfg = vitspec.variant(variant)
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in vitspec.param_shapes(cfg).items():
        params[name] = rng.standard_normal(shape, dtype=np.float32)
        params[name] *= 0.02
    vitspec.save(path, cfg, params)


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


def weights_of(path: Path) -> Path:
    return path / "model.safetensors" if path.is_dir() else path


def run(step: str, imports: str) -> tuple[int, int, float]:
    """(RSS after the imports, peak RSS, seconds of the step) of a fresh process running `step`."""
    code = CHILD.format(imports=imports, step=step)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"step failed: {step}\n{done.stderr}")
    base, peak, seconds = json.loads(done.stdout.strip().splitlines()[-1])
    return base, peak, seconds


def remove(path: Path) -> None:
    if path.is_dir():
        for p in path.iterdir():
            p.unlink()
        path.rmdir()
    elif path.exists():
        path.unlink()


def conversion(tmp: Path, src: Path, dst_name: str, to_fmt: str, variant: str) -> tuple[Path, str]:
    """The call converting `src`; a foreign source gets the flags that settle what it cannot show."""
    dst = tmp / dst_name
    quiet = "out=open(os.devnull, 'w')"
    flags = ""
    if src.name != "source.safetensors" and not src.name.startswith("src_ref"):
        given = reading_flags(vitspec.variant(variant))
        given["source_image_size"] = given.pop("image_size")
        flags = ", " + ", ".join(f"{k}={v!r}" for k, v in given.items())
    call = f"convert({str(src)!r}, {str(dst)!r}, to_fmt={to_fmt!r}, overwrite=True, {quiet}{flags})"
    return dst, call


def measure_pair(tmp: Path, src: Path, dst_name: str, to_fmt: str, imports: str, variant: str) -> dict:
    copy_to = tmp / "copy.tmp"
    _, _, copy_s = run(f"copy({str(weights_of(src))!r}, {str(copy_to)!r})", "")
    copy_to.unlink()
    dst, call = conversion(tmp, src, dst_name, to_fmt, variant)
    base, peak, seconds = run(call, imports)
    return dict(
        file_bytes=size_of(src),
        out_bytes=size_of(dst),
        imports_rss=base,
        peak_rss=peak,
        memory=(peak - base) / size_of(src),
        seconds=seconds,
        copy_seconds=copy_s,
    )


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        ref = tmp / "source.safetensors"
        write_reference(ref, args.variant)
        print(f"ViT-{args.variant} reference file: {ref.stat().st_size / 2**20:.0f} MiB", flush=True)
        names = list(args.formats)
        # The files of each format, written once (untimed) to serve as sources.
        sources = {}
        for name in names:
            to_fmt, file_name, _ = FORMATS[name]
            dst, call = conversion(tmp, ref, "src_" + file_name, to_fmt, args.variant)
            run(call, "")
            sources[name] = dst
        steps = []
        for name in names:
            steps.append((f"ref -> {name}", ref, FORMATS[name]))
        if args.pairs == "all":
            for a in names:
                for b in names:
                    if a != b:
                        steps.append((f"{a} -> {b}", sources[a], FORMATS[b]))
        else:
            for name in names:
                if name != "ref":
                    steps.append((f"{name} -> ref", sources[name], FORMATS["ref"]))
        samples: dict[str, list[dict]] = {label: [] for label, _, _ in steps}
        for _ in range(args.repeats):
            for label, src, (to_fmt, file_name, framework) in steps:
                # The frameworks the writer and the reader import count as imports, not as the step.
                reader = {".pt": "torch", ".msgpack": "flax.serialization"}.get(src.suffix, "")
                imports = "\n".join(f"import {m}" for m in sorted({framework, reader} - {""}))
                samples[label].append(
                    measure_pair(tmp, src, "out_" + file_name, to_fmt, imports, args.variant)
                )
                remove(tmp / ("out_" + file_name))
        rows = []
        print(
            f"{'conversion':26s} {'file MiB':>8s} {'imports MiB':>11s} {'peak-imports / file':>22s} "
            f"{'seconds':>18s} {'copy s':>18s} {'min / min copy':>14s}"
        )
        for label, runs in samples.items():
            sec = [r["seconds"] for r in runs]
            cpy = [r["copy_seconds"] for r in runs]
            row = dict(step=label, variant=args.variant, time=min(sec) / min(cpy), runs=runs)
            rows.append(row)
            mem = [r["memory"] for r in runs]
            print(
                f"{label:26s} {runs[0]['file_bytes'] / 2**20:8.0f} {runs[0]['imports_rss'] / 2**20:11.0f} "
                f"{_spread(mem, 'x'):>22s} {_spread(sec, 's'):>18s} {_spread(cpy, 's'):>18s} "
                f"{row['time']:13.2f}x",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def _spread(values: list[float], unit: str) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.2f}{unit}"
    return f"{med:.2f}{unit} ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    main()
