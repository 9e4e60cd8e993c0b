"""What the numbers were measured on: CPU, instruction set, cores, thread settings, library versions, load."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata

# Widest first: the first of these in /proc/cpuinfo's flags names the host's vector ISA.
ISA_LEVELS = ("avx512f", "avx2", "avx", "sse4_2")
# Flags that change what the fp32 / bf16 kernels can use, reported when present.
ISA_FLAGS = ISA_LEVELS + ("fma", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "neon", "asimd")
# Environment variables that cap the ISA the libraries dispatch to (torch/ATen, oneDNN, MKL, XLA).
ISA_ENV = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "XLA_FLAGS",
)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "XLA_FLAGS")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """The first processor's flags in /proc/cpuinfo ('Features' on ARM); empty where there is none."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa(flags: set[str]) -> dict:
    """{"level": the widest x86 vector ISA in flags (or None), "flags": the kernel-relevant ones present}."""
    level = next((name for name in ISA_LEVELS if name in flags), None)
    return {"level": level, "flags": [name for name in ISA_FLAGS if name in flags]}


def eigen_threads(xla_flags: str | None, usable_cores: int) -> int:
    """XLA's CPU intra-op (Eigen) pool size: one thread per usable core unless XLA_FLAGS turns
    multi-threaded Eigen off or sets intra_op_parallelism_threads."""
    flags = xla_flags or ""
    if re.search(r"--xla_cpu_multi_thread_eigen=(false|0)\b", flags):
        return 1
    found = re.search(r"intra_op_parallelism_threads=(\d+)", flags)
    return int(found.group(1)) if found else usable_cores


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other processes on the CPU skew every number here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str | None]:
    found = {}
    for package in ("numpy", "torch", "jax", "jaxlib", "flax", "optax", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def describe() -> dict:
    return {
        "cpu": cpu_model(),
        "isa": isa(cpu_flags()),
        "isa_env": {name: os.environ.get(name) for name in ISA_ENV},
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "python": platform.python_version(),
        "versions": versions(),
        "thread_env": {name: os.environ.get(name) for name in THREAD_ENV},
    }
