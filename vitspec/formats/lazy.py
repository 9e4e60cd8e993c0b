"""Trees whose tensors are read or computed when asked for, one at a time, and not kept.

A conversion streams: each target tensor is computed from the source tensors its table row names,
written, and dropped, so memory holds one or a few tensors rather than two whole trees. Names,
shapes and dtypes are known up front (from a file's header, or a table), so checks of names and
shapes, and writers that need every shape first (a safetensors header), read no data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

Spec = tuple[tuple[int, ...], np.dtype]
T = TypeVar("T")


class LazyTensors(Mapping):
    """{name: array}, each value produced by `get(name)` on every access (never cached here)."""

    def __init__(
        self,
        specs: Mapping[str, Spec],
        get: Callable[[str], np.ndarray],
        refuses_nonfinite: bool = False,
        get_transposed: Callable[[str], np.ndarray | None] | None = None,
    ):
        self._specs = {k: (tuple(int(d) for d in s), np.dtype(t)) for k, (s, t) in specs.items()}
        self._get = get
        # Every value is checked for NaN and infinity as it is produced: a writer need not read it again.
        self.refuses_nonfinite = refuses_nonfinite
        self._get_transposed = get_transposed

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._specs:
            raise KeyError(name)
        return self._get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._specs  # Mapping's own would produce the value to find out

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, name: str) -> Spec:
        return self._specs[name]

    def transposed(self, name: str) -> np.ndarray | None:
        """The value's transpose where the source holds it so (a reference view of a file that
        stores kernels [out, in]: the file's array as it is), else None. A writer that wants the
        transpose takes it from here instead of transposing a value that was transposed to be read."""
        if name not in self._specs:
            raise KeyError(name)
        return None if self._get_transposed is None else self._get_transposed(name)

    def replace(self, updates: Mapping[str, np.ndarray]) -> LazyTensors:
        """This tree with some values given (in memory); the others still read on access."""
        specs = dict(self._specs)
        specs.update({k: (np.shape(v), np.asarray(v).dtype) for k, v in updates.items()})
        return LazyTensors(
            specs,
            lambda k: updates[k] if k in updates else self._get(k),
            get_transposed=lambda k: None if k in updates else self.transposed(k),
        )

    def checked(
        self, check: Callable[[str, np.ndarray], None], refuses_nonfinite: bool = False
    ) -> LazyTensors:
        """This tree with `check(name, value)` run on each value as it is produced; `refuses_nonfinite`:
        the check raises on any NaN or infinity."""

        def get(name: str) -> np.ndarray:
            value = self._get(name)
            check(name, value)
            return value

        def get_transposed(name: str) -> np.ndarray | None:
            value = self.transposed(name)
            if value is not None:
                check(name, value.T)
            return value

        return LazyTensors(self._specs, get, refuses_nonfinite or self.refuses_nonfinite, get_transposed)


def spec_of(arrays: Mapping[str, object], name: str) -> Spec:
    if isinstance(arrays, LazyTensors):
        return arrays.spec(name)
    value = np.asarray(arrays[name])
    return value.shape, value.dtype


def stand_ins(arrays: Mapping[str, object]) -> Mapping[str, np.ndarray]:
    """Zero-memory arrays of each tensor's shape and dtype, for checks that read no values."""
    if not isinstance(arrays, LazyTensors):
        return arrays
    return {k: np.broadcast_to(np.zeros((), t), s) for k, (s, t) in arrays._specs.items()}


def finite(value: np.ndarray) -> bool:
    """Whether every value is finite, in one read of the array and no temporary array: a NaN or an
    infinity makes any sum it enters NaN or infinite, so a finite sum settles it; only a sum that is
    not finite (a bad value, or finite values overflowing) is checked value by value. float16 sums
    in float32, where its values cannot overflow."""
    value = np.asarray(value)
    if value.dtype.kind not in "fc":
        return bool(np.isfinite(np.asarray(value, dtype=np.float64)).all())
    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf is NaN, as wanted: no warning
        total = value.sum(dtype=np.result_type(value.dtype, np.float32))
    return bool(np.isfinite(total) or np.isfinite(value).all())


def prefetched(produce: Callable[[str], T], names: Iterable[str]) -> Iterator[tuple[str, T]]:
    """(name, produce(name)) for each name in turn, the next value produced by a background thread
    while the caller uses this one: a streamed write reads and converts one tensor while it writes
    the one before (file reads and writes, NumPy's copies and zlib's CRC let the other thread run).
    Memory holds one tensor more than a plain loop. An error producing a value is raised here at
    its turn; when the caller stops early (an error writing), the thread stops after the tensor
    it is producing, which is dropped."""
    names = list(names)
    if not names:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitspec-prefetch") as thread:
        ahead = thread.submit(produce, names[0])
        for i, name in enumerate(names):
            value = ahead.result()
            if i + 1 < len(names):
                ahead = thread.submit(produce, names[i + 1])
            yield name, value
