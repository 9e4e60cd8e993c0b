"""The progress line: one self-overwriting line per epoch on a terminal."""

from __future__ import annotations

import math
import sys
import time

from vitspec.app.training.state import EpochProgress


class ProgressLine:
    """One self-overwriting line per epoch (\\r), redrawn at most every `interval` seconds; into a
    file or pipe (not a terminal) only the forced end-of-epoch draw is written, so logs stay readable."""

    def __init__(self, epoch: int, epochs: int, steps: int, stream=sys.stderr, interval: float = 0.5):
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.stream, self.interval = stream, interval
        self.last_draw = -math.inf

    def update(self, step_in_epoch: int, progress: EpochProgress, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and (not self.stream.isatty() or now - self.last_draw < self.interval):
            return
        self.last_draw = now
        filled = int(20 * step_in_epoch / self.steps)
        seen = max(progress.seen, 1)
        rate = progress.seen / progress.seconds if progress.seconds else 0.0
        self.stream.write(
            f"\repoch {self.epoch + 1}/{self.epochs} [{'#' * filled}{'.' * (20 - filled)}] "
            f"{step_in_epoch}/{self.steps} loss {progress.loss_sum / seen:.4f} "
            f"acc {100 * progress.correct / seen:5.2f}% {rate:,.0f} img/s"
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
