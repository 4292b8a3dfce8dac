"""Throughput of one shared :class:`~bcnn.engine.PackedModel` called from T Python threads, next
to one calling thread, measured in the same run (``bcnn bench MODEL --concurrency T``)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

__all__ = ["bench_concurrency"]


def _calls_per_s(model: Any, xs: list[np.ndarray], callers: int, calls: int) -> float:
    """callers threads, each making ``calls`` calls on the shared model, started together."""
    start = threading.Barrier(callers + 1)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        start.wait()
        try:
            for j in range(calls):
                model(xs[(i + j) % len(xs)])
        except BaseException as e:  # reported below, in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return callers * calls / elapsed


def bench_concurrency(
    model: Any,
    x: np.ndarray,
    callers: int,
    *,
    seconds: float = 1.0,
    rounds: int = 5,
) -> dict[str, Any]:
    """Calls/s of ``callers`` threads sharing ``model`` vs one thread, in ``rounds`` interleaved
    rounds of about ``seconds`` each (medians). Kernel threads: whatever the caller set (use 1
    with several callers: see docs/serving.md)."""
    if callers < 1 or rounds < 1 or seconds <= 0:
        raise ValueError("concurrency and rounds must be >= 1, seconds > 0")
    rng = np.random.default_rng(1)
    xs = [x] + [rng.integers(0, 256, x.shape, np.uint8) for _ in range(3)]
    for _ in range(2):  # warm: every caller thread builds its plan
        _calls_per_s(model, xs, callers, 3)
    t0 = time.perf_counter()
    _calls_per_s(model, xs, 1, 20)
    per_call = (time.perf_counter() - t0) / 20
    calls = max(5, int(seconds / per_call))
    serial: list[float] = []
    shared: list[float] = []
    for _ in range(rounds):
        serial.append(_calls_per_s(model, xs, 1, calls))
        shared.append(_calls_per_s(model, xs, callers, max(1, calls // callers)))
    s, c = float(np.median(serial)), float(np.median(shared))
    return {
        "concurrency": callers,
        "serial_calls_per_s": round(s, 1),
        "concurrent_calls_per_s": round(c, 1),
        "concurrency_speedup": round(c / s, 3),
    }
