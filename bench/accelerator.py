"""The GPU half's device: whether a framework sees a GPU, what it is, how to wait for it, and the
matmul bursts whose rate is the peak each round is measured against."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from bench.runners import Runner

# The bursts' dtypes: the rows' precision is the peak they are measured against, the other is context.
PEAK_DTYPES = ("bf16", "fp32")


@dataclasses.dataclass
class DeviceRunner(Runner):
    """A Runner whose calls may return before their work is done (bench.timing waits for the device),
    and which says which attention kernels its forward and training step ran, {"forward": ...,
    "train": ...}, when asked after both have run."""

    attention: Callable[[], dict[str, str]] = dict


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where and how the GPU half runs: the GPU itself, or the dry run that exercises the same code
    on the CPU: in float32 (bfloat16 matmuls are ~100x slower on a CPU without bf16 units, and JAX's
    CPU attention does not compile every bfloat16 case), with torch.compile's aot_eager backend, which
    traces and differentiates as inductor does but compiles no C++ (inductor: 40 s for the tiny ViT)."""

    device: str  # torch's device; JAX takes its default device, the GPU when it sees one
    precision: str  # the backends' precision name: "bf16" is their default on a GPU
    compile_backend: str
    burst_sizes: dict[str, int]  # dtype -> the products' size
    burst_matmuls: int


# bf16 8192: the size at which an H200 was measured at 769-798 TFLOP/s on this workplace's machines,
# ~1.4 ms a product. fp32 4096: ~2 ms at the H200's ~67 TFLOP/s of plain fp32 (8192 would take
# ~16 ms, and a burst runs around every turn); it is the second number, not what rows are held to.
GPU = Placement("cuda", "bf16", "inductor", burst_sizes={"bf16": 8192, "fp32": 4096}, burst_matmuls=4)
DRY_RUN = Placement("cpu", "fp32", "aot_eager", burst_sizes={"bf16": 256, "fp32": 256}, burst_matmuls=2)


def missing_gpu(framework: str) -> str | None:
    """Why `framework` cannot run on a GPU here (None: it sees one)."""
    if framework == "torch":
        import torch

        if torch.cuda.is_available():
            return None
        return f"torch {torch.__version__} sees no GPU (torch.cuda.is_available() is False)"
    if framework == "flax":
        import jax

        if jax.default_backend() == "gpu":
            return None
        return f"jax {jax.__version__} sees no GPU (its default backend is {jax.default_backend()!r})"
    return f"{framework} has no GPU path"


def describe(framework: str, placement: Placement) -> dict:
    """The device and the settings that decide its matmul precision."""
    if framework == "torch":
        import torch

        gpu = torch.device(placement.device).type == "cuda"
        return {
            "device": torch.cuda.get_device_name() if gpu else placement.device,
            "capability": list(torch.cuda.get_device_capability()) if gpu else None,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if gpu else None,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        }
    import jax

    return {
        "device": jax.devices()[0].device_kind,
        "devices": [str(d) for d in jax.devices()],
        "default_matmul_precision": jax.config.jax_default_matmul_precision,
    }


def synchronizer(framework: str, placement: Placement) -> Callable[[object], object]:
    """Waits until the device has done the work that produced a call's result."""
    if framework == "torch":
        import torch

        device = torch.device(placement.device)
        if device.type == "cuda":
            return lambda _result: torch.cuda.synchronize(device)
        return lambda _result: None  # the CPU's ops have finished when they return
    import jax

    return jax.block_until_ready


def matmul_burst(framework: str, dtype: str, placement: Placement) -> Callable[[], float]:
    """GFLOP/s of `burst_matmuls` back-to-back size x size products in `dtype` on the device, timed
    from their launch to the wait for the last of them (launches are asynchronous). The device is
    idle when a burst starts: bench.timing ends every turn with a wait, and every burst ends with one."""
    size, count = placement.burst_sizes[dtype], placement.burst_matmuls
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    synchronize = synchronizer(framework, placement)
    if framework == "torch":
        import torch

        torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        ta, tb = (torch.from_numpy(m).to(placement.device, torch_dtype) for m in (a, b))

        def products():
            return [torch.mm(ta, tb) for _ in range(count)]

    else:
        import jax
        import jax.numpy as jnp

        jax_dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[dtype]
        ja, jb, dot = jnp.asarray(a, jax_dtype), jnp.asarray(b, jax_dtype), jax.jit(jnp.dot)

        def products():
            return [dot(ja, jb) for _ in range(count)]

    def burst() -> float:
        start = time.perf_counter()
        synchronize(products())
        return count * 2 * size**3 / (time.perf_counter() - start) / 1e9

    return burst
