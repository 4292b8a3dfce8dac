"""Thread count of the packed engine's kernels (numba ``prange``; torch is not touched).

The engine runs single-threaded unless asked: ``set_num_threads(n)`` sets the count (process
wide), ``num_threads(n)`` is a context manager that restores the previous value. ``n`` is
clamped to ``1..max_threads()`` (numba's pool size, fixed at start-up: set
``NUMBA_NUM_THREADS`` in the environment to change it). With one thread the kernels run their
serial variants (no parallel-region overhead); with more, large layers are split into chunks
that idle threads take in turn. On a machine whose cores are busy with other work, a
fork-join region waits for a descheduled thread (a scheduler time slice, milliseconds):
use one thread there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numba

__all__ = ["get_num_threads", "max_threads", "num_threads", "set_num_threads"]

_count = [1]


def max_threads() -> int:
    """The size of numba's thread pool (the most threads a kernel can use)."""
    return int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]


def get_num_threads() -> int:
    """The number of threads the kernels use now (default 1)."""
    return _count[0]


def set_num_threads(n: int) -> int:
    """Use ``n`` threads (clamped to 1..max_threads()); returns the previous count."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"number of threads must be an int, got {n!r}")
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    prev = _count[0]
    _count[0] = min(n, max_threads())
    return prev


@contextmanager
def num_threads(n: int) -> Iterator[int]:
    """``with num_threads(2): ...`` runs the block with ``n`` kernel threads, then restores."""
    prev = set_num_threads(n)
    try:
        yield get_num_threads()
    finally:
        _count[0] = prev
