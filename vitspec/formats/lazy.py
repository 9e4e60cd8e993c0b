"""Trees whose tensors are read or computed when asked for, one at a time, and not kept.

A conversion streams: each target tensor is computed from the source tensors its table row names,
written, and dropped, so memory holds one or a few tensors rather than two whole trees. Names,
shapes and dtypes are known up front (from a file's header, or a table), so checks of names and
shapes, and writers that need every shape first (a safetensors header), read no data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

Spec = tuple[tuple[int, ...], np.dtype]


class LazyTensors(Mapping):
    """{name: array}, each value produced by `get(name)` on every access (never cached here)."""

    def __init__(self, specs: Mapping[str, Spec], get: Callable[[str], np.ndarray]):
        self._specs = {k: (tuple(int(d) for d in s), np.dtype(t)) for k, (s, t) in specs.items()}
        self._get = get

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._specs:
            raise KeyError(name)
        return self._get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, name: str) -> Spec:
        return self._specs[name]

    def replace(self, updates: Mapping[str, np.ndarray]) -> LazyTensors:
        """This tree with some values given (in memory); the others still read on access."""
        specs = dict(self._specs)
        specs.update({k: (np.shape(v), np.asarray(v).dtype) for k, v in updates.items()})
        return LazyTensors(specs, lambda k: updates[k] if k in updates else self._get(k))

    def checked(self, check: Callable[[str, np.ndarray], None]) -> LazyTensors:
        """This tree with `check(name, value)` run on each value as it is produced."""

        def get(name: str) -> np.ndarray:
            value = self._get(name)
            check(name, value)
            return value

        return LazyTensors(self._specs, get)


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
    value = np.asarray(value)
    if value.dtype.kind in "fc":
        return bool(np.isfinite(value).all())
    return bool(np.isfinite(np.asarray(value, dtype=np.float64)).all())
