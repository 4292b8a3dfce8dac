"""Measured latency of an any-precision packed model at any per-layer mix (torch-free).

A layer's cost depends on its own weight and activation bits (a bit-serial layer makes one
binary GEMM per (weight plane, activation plane) pair), so :func:`latency_model` times the
whole model once at its highest precision and once per (layer, w, a) with every other layer at
its highest, and predicts a mix as the base plus each changed layer's difference. The timings
are interleaved round by round (every configuration once per round, medians over rounds), so
drift on a busy machine hits all of them alike. :func:`measure_ms` times a mix directly, to
check the prediction.

Timing a layer at (w, a) may need a batch-norm set that training never visited (its
neighbours stay at their highest precision); the timing then folds the op's own set: the
arithmetic, and so the time, is the same.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LatencyModel", "latency_model", "measure_ms"]

Config = Mapping[str, tuple[int, int]]


@dataclass
class LatencyModel:
    """``model(config) -> ms``: ``base_ms`` (every layer at its highest) plus, per changed
    layer, ``deltas[layer][(w, a)]`` (ms, measured; may be slightly negative by noise)."""

    base_ms: float
    deltas: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)
    batch: int = 1
    size: tuple[int, int] = (32, 32)

    def __call__(self, config: Config) -> float:
        total = self.base_ms
        for name, wa in config.items():
            total += self.deltas[name].get(tuple(wa), 0.0)  # type: ignore[arg-type]
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_ms": round(self.base_ms, 4),
            "batch": self.batch,
            "size": list(self.size),
            "deltas": {
                n: {f"W{w}A{a}": round(v, 4) for (w, a), v in d.items()}
                for n, d in self.deltas.items()
            },
        }


def _images(packed: Any, batch: int, size: tuple[int, int] | None) -> np.ndarray:
    h, w = size or packed.input_size or (32, 32)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (batch, packed.in_channels, h, w), dtype=np.uint8)


def _time_configs(packed: Any, configs: list[Config], x: np.ndarray, repeat: int) -> list[float]:
    """Median ms of each config, timed round-robin (``repeat`` rounds after one warm round)."""
    settings = [
        {"weight_bits": None, "layers": dict(c), "sel": packed._table.select(c, strict=False)}
        for c in configs
    ]
    saved = packed._precision
    times: list[list[float]] = [[] for _ in configs]
    try:
        for r in range(repeat + 1):
            for i, s in enumerate(settings):
                packed._precision = s
                t0 = time.perf_counter()
                packed(x)
                if r:
                    times[i].append((time.perf_counter() - t0) * 1e3)
    finally:
        packed._precision = saved
    return [float(np.median(t)) for t in times]


def latency_model(
    packed: Any, *, batch: int = 1, size: tuple[int, int] | None = None, repeat: int = 20
) -> LatencyModel:
    """Time ``packed`` (an any-precision :class:`~bcnn.engine.PackedModel`) at its highest
    precision and at every (layer, w, a) it allows (see the module docstring)."""
    table = packed._table
    if not table:
        raise ValueError("latency_model: the model has no precision sets (not any-precision)")
    if batch < 1 or repeat < 1:
        raise ValueError("batch and repeat must be >= 1")
    top = table.default()
    configs: list[Config] = [top]
    keys: list[tuple[str, tuple[int, int]]] = []
    for name, (ws, as_) in table.layers.items():
        for w in ws:
            for a in as_:
                if (w, a) != top[name]:
                    configs.append({**top, name: (w, a)})
                    keys.append((name, (w, a)))
    x = _images(packed, batch, size)
    ms = _time_configs(packed, configs, x, repeat)
    model = LatencyModel(base_ms=ms[0], batch=batch, size=(x.shape[2], x.shape[3]))
    for (name, wa), t in zip(keys, ms[1:], strict=True):
        model.deltas.setdefault(name, {})[wa] = t - ms[0]
    return model


def measure_ms(
    packed: Any,
    config: Config | None = None,
    *,
    batch: int = 1,
    size: tuple[int, int] | None = None,
    repeat: int = 50,
) -> float:
    """Median ms of ``packed`` at ``config`` (None: its current setting), after a warm call."""
    x = _images(packed, batch, size)
    with packed.precision(layers=config) if config is not None else nullcontext():
        packed(x)
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            packed(x)
            ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))
