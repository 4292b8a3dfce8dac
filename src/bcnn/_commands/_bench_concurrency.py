"""Throughput of one shared :class:`~bcnn.engine.PackedModel` called from T Python threads, next
to one calling thread, measured in the same run (``bcnn bench MODEL --concurrency T``)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

__all__ = ["bench_concurrency"]


def _calls_per_s(model: Any, xs: list[np.ndarray], callers: int, seconds: float) -> float:
    """``callers`` threads calling the shared model back to back for ``seconds`` (a steady
    load, as a server sees it: no thread waits for a straggler); calls per second."""
    start = threading.Barrier(callers + 1)
    stop = threading.Event()
    counts = [0] * callers
    errors: list[BaseException] = []

    def work(i: int) -> None:
        start.wait()
        try:
            j = 0
            while not stop.is_set():
                model(xs[(i + j) % len(xs)])
                j += 1
            counts[i] = j
        except BaseException as e:  # reported below, in the calling thread
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def bench_concurrency(
    model: Any,
    x: np.ndarray,
    callers: int,
    *,
    seconds: float = 1.0,
    rounds: int = 5,
) -> dict[str, Any]:
    """Calls/s of ``callers`` threads sharing ``model`` vs one thread, in ``rounds`` interleaved
    rounds of ``seconds`` each (medians). Kernel threads: whatever the caller set (use 1 with
    several callers: see docs/serving.md)."""
    if callers < 1 or rounds < 1 or seconds <= 0:
        raise ValueError("concurrency and rounds must be >= 1, seconds > 0")
    rng = np.random.default_rng(1)
    xs = [x] + [rng.integers(0, 256, x.shape, np.uint8) for _ in range(3)]
    _calls_per_s(model, xs, callers, 0.2)  # warm: every caller thread's plan exists
    serial: list[float] = []
    shared: list[float] = []
    for _ in range(rounds):
        serial.append(_calls_per_s(model, xs, 1, seconds))
        shared.append(_calls_per_s(model, xs, callers, seconds))
    s, c = float(np.median(serial)), float(np.median(shared))
    return {
        "concurrency": callers,
        "serial_calls_per_s": round(s, 1),
        "concurrent_calls_per_s": round(c, 1),
        "concurrency_speedup": round(c / s, 3),
    }
