"""Thread count of the packed engine's kernels (numba ``prange``; torch is not touched).

The engine runs single-threaded unless asked: ``set_num_threads(n)`` sets the process-wide
default, ``num_threads(n)`` is a context manager that overrides it for the calling thread
only and restores it on exit. ``n`` is clamped to ``1..max_threads()`` (numba's pool size,
fixed at start-up: set ``NUMBA_NUM_THREADS`` in the environment to change it). With one thread
the kernels run their serial variants (no parallel-region overhead); with more, large layers
are split into chunks that idle threads take in turn. On a machine whose cores are busy with
other work, a fork-join region waits for a descheduled thread (a scheduler time slice,
milliseconds): use one thread there.

Serving from several Python threads (see docs/serving.md): the compiled kernels release the
GIL, so N caller threads that share one model use N cores at one kernel thread each (the
default). Kernel threads and caller threads multiply: keep ``callers x kernel threads`` at
most the core count. Parallel regions are launched one at a time (:func:`parallel_launch`),
because numba's default ``workqueue`` threading layer does not allow concurrent launches;
the results never depend on the thread count (the kernels are bit-exact either way).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numba

__all__ = ["get_num_threads", "max_threads", "num_threads", "parallel_launch", "set_num_threads"]

_default = [1]  # process-wide
_local = threading.local()  # .count: the calling thread's override (num_threads), if any
_launch = threading.Lock()


def max_threads() -> int:
    """The size of numba's thread pool (the most threads a kernel can use)."""
    return int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]


def get_num_threads() -> int:
    """The number of kernel threads for calls from this thread (default 1)."""
    n = getattr(_local, "count", None)
    return _default[0] if n is None else int(n)


def _check(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"number of threads must be an int, got {n!r}")
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    return min(n, max_threads())


def set_num_threads(n: int) -> int:
    """Use ``n`` kernel threads (clamped to 1..max_threads()) in every thread that has no
    :func:`num_threads` override; returns the previous process-wide count."""
    c = _check(n)
    prev = _default[0]
    _default[0] = c
    return prev


@contextmanager
def num_threads(n: int) -> Iterator[int]:
    """``with num_threads(2): ...`` runs the block's calls with ``n`` kernel threads, for the
    calling thread only (other threads keep theirs), then restores."""
    c = _check(n)
    prev = getattr(_local, "count", None)
    _local.count = c
    try:
        yield c
    finally:
        _local.count = prev


@contextmanager
def parallel_launch() -> Iterator[None]:
    """Held around every parallel (``prange``) kernel launch: one at a time per process."""
    with _launch:
        yield
