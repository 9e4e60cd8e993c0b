"""Images/s of a callable after warm-up: median and spread over the repeats."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def images_per_second(run: Callable[[], object], batch: int, warmup: int, repeats: int) -> dict:
    """Each repeat is one call on one batch; the callable returns only once the work is done."""
    for _ in range(warmup):  # jit compiles, allocator and thread pool warm-up
        run()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(batch / (time.perf_counter() - start))
    return {"median": float(np.median(rates)), "min": float(min(rates)), "max": float(max(rates)),
            "repeats": repeats, "warmup": warmup, "batch": batch}
