"""Progress while an epoch runs: a live line on a terminal, a log line at an interval elsewhere.

On a terminal the line overwrites itself (\\r) at most every `redraw` seconds; into a file or pipe
(logs, CI, nohup) a full line is written every `log_every` seconds and at the end of the epoch,
so a log shows the run moving without thousands of carriage returns. Each line has the step of
the epoch and of the run, the running loss and accuracy, images/s and the time left.
(tqdm draws the same bar, but into a file it writes its carriage-return updates, not log lines.)
"""

from __future__ import annotations

import math
import sys
import time

from vitspec.app.training.state import EpochProgress

REDRAW_SECONDS = 0.5


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressLine:
    def __init__(
        self,
        epoch: int,
        epochs: int,
        steps: int,
        total_steps: int,
        batch_size: int,
        log_every: float,
        stream=None,
        enabled: bool = True,
    ):
        """`enabled` False: draws nothing (the processes of a run other than the one that prints)."""
        self.enabled = enabled
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.total_steps, self.batch_size = total_steps, batch_size
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.interval = REDRAW_SECONDS if self.live else log_every
        self.last_draw = time.perf_counter()
        self.drawn = False

    def due(self) -> bool:
        return time.perf_counter() - self.last_draw >= self.interval

    def update(self, step_in_epoch: int, run_step: int, progress: EpochProgress, force: bool = False) -> None:
        """Draw (if due, or forced at the epoch's end) the line for `step_in_epoch` of this epoch."""
        if not self.enabled or not (force or self.due()):
            return
        self.last_draw = time.perf_counter()
        seen = max(progress.seen, 1)
        rate = progress.seen / progress.seconds if progress.seconds else 0.0
        left = (self.total_steps - run_step) * self.batch_size / rate if rate else math.inf
        eta = format_duration(left) if math.isfinite(left) else "?"
        filled = int(20 * step_in_epoch / self.steps)
        bar = f" [{'#' * filled}{'.' * (20 - filled)}]" if self.live else ""
        text = (
            f"epoch {self.epoch + 1}/{self.epochs}{bar} {step_in_epoch}/{self.steps} (step {run_step}/"
            f"{self.total_steps}) loss {progress.loss_sum / seen:.4f} "
            f"acc {100 * progress.correct / seen:5.2f}% {rate:,.0f} img/s, {eta} left"
        )
        self.stream.write(f"\r{text}" if self.live else f"{text}\n")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.live and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
