"""Images/s of competing callables, measured in interleaved rounds, with the matmul peak measured
inside the same rounds.

Each round times every implementation once, in an order rotated from round to round, so that a
change in the machine's load (a shared host's neighbours, turbo, thermal) lands on all of them
alike; the per-round ratios between implementations are then paired measurements. With a `peak`
callable (a short sgemm burst on the same thread pool, bench.runners.sgemm_burst), a burst runs
before every implementation's turn and once at the end of the round, so that each turn is
bracketed by two peak measurements taken under the same load; its peak is the higher of the two.

On an accelerator a call returns once its work is queued, not done: `synchronize` (given the last
call's result) waits for the device inside the turn's clock, and `calls` turns several calls into one
turn, so that one wait ends a turn of many steps, as in a training loop that reads its loss seldom.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np


def interleaved_rates(
    runs: Mapping[str, Callable[[], object]],
    batch: int,
    warmup: int,
    repeats: int,
    peak: Callable[[], float] | None = None,
    synchronize: Callable[[object], object] | None = None,
    calls: int = 1,
) -> dict[str, dict]:
    """name -> {median, min, max, rates (one per round, in round order), repeats, warmup, batch}, and
    with `peak` (a callable returning GFLOP/s) also peak_gflops: the peak bracketing each round's turn.

    Each call runs one batch; without `synchronize` it returns only once the work is done. A turn is
    `calls` calls, then `synchronize` on the last one's result; its rate is batch * calls / its time.
    """

    def turn(run: Callable[[], object], count: int) -> None:
        for _ in range(count):
            result = run()
        if synchronize is not None and count:
            synchronize(result)

    for run in runs.values():
        turn(run, warmup)  # jit compiles, allocator and thread pool warm-up
    if peak is not None:
        peak()  # its own warm-up (a jit compile for XLA), not recorded
    rates: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(repeats):
        shift = round_index % len(names)
        before = peak() if peak is not None else None
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            turn(runs[name], calls)
            rates[name].append(batch * calls / (time.perf_counter() - start))
            if peak is not None:
                after = peak()
                peaks[name].append(max(before, after))
                before = after
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
        | ({"peak_gflops": peaks[name]} if peak is not None else {})
        for name, r in rates.items()
    }
