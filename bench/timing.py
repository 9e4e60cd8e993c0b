"""Images/s of competing callables, measured in interleaved rounds.

Each round times every implementation once, in an order rotated from round to round, so that a
change in the machine's load (a shared host's neighbours, turbo, thermal) lands on all of them
alike; the per-round ratios between implementations are then paired measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np


def interleaved_rates(
    runs: Mapping[str, Callable[[], object]], batch: int, warmup: int, repeats: int
) -> dict[str, dict]:
    """name -> {median, min, max, rates (one per round, in round order), repeats, warmup, batch}.

    Each call runs one batch and returns only once the work is done.
    """
    for run in runs.values():
        for _ in range(warmup):  # jit compiles, allocator and thread pool warm-up
            run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runs[name]()
            rates[name].append(batch / (time.perf_counter() - start))
    return {
        name: {
            "median": float(np.median(r)),
            "min": float(min(r)),
            "max": float(max(r)),
            "rates": r,
            "repeats": repeats,
            "warmup": warmup,
            "batch": batch,
        }
        for name, r in rates.items()
    }
