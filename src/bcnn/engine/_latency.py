"""Measured latency of an any-precision packed model at any per-layer mix (torch-free).

A layer's cost depends on its own weight and activation bits only (a bit-serial layer makes
one binary GEMM per (weight plane, activation plane) pair). :func:`latency_model` times the
whole model once at its highest precision (``base_ms``), then each layer's op *alone* at every
(w, a) it allows, on buffers filled by a full run, and predicts a mix as the base plus each
changed op's measured difference. Timing single ops keeps the differences out of the noise of
the rest of the model; the op timings are interleaved round by round (medians over rounds), so
drift on a busy machine hits all of them alike. :func:`measure_ms` times a mix end to end, to
check the prediction.

An op timed alone runs from warm caches and without its neighbours' fused work, so the sum
of its differences can miss the whole model's by a common factor (2x was seen). The model is
therefore calibrated end to end: every uniform setting the layers share is timed whole,
interleaved with the highest, and the differences are scaled by the least-squares factor
that maps the predicted onto the measured uniform differences (``scale``; the measured
times are kept in ``uniform_ms``, and a uniform setting is predicted by its own measurement).

Timing an op at (w, a) may need a batch-norm set that training never visited; the timing then
folds the op's own set: the arithmetic, and so the time, is the same.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LatencyModel", "fit_scale", "latency_model", "measure_ms"]

Config = Mapping[str, tuple[int, int]]


@dataclass
class LatencyModel:
    """``model(config) -> ms``: ``base_ms`` (every layer at its highest) plus ``scale`` times
    the sum, over changed layers, of ``deltas[layer][(w, a)]`` (ms, each op timed alone; may
    be slightly negative by noise). ``uniform_ms[(w, a)]``: the whole model measured at each
    uniform setting, which ``scale`` was fitted to and which a uniform ``config`` returns."""

    base_ms: float
    deltas: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)
    batch: int = 1
    size: tuple[int, int] = (32, 32)
    scale: float = 1.0
    uniform_ms: dict[tuple[int, int], float] = field(default_factory=dict)

    def delta(self, config: Config) -> float:
        """The summed op differences of ``config`` (unscaled)."""
        total = 0.0
        for name, wa in config.items():
            total += self.deltas[name].get((wa[0], wa[1]), 0.0)
        return total

    def __call__(self, config: Config) -> float:
        """Predicted ms of ``config``; a uniform setting over every layer that was timed whole
        returns its measured ``uniform_ms`` (the scaled sum is a least-squares fit over all the
        uniform settings, so it can miss any one of them by several percent)."""
        settings = set(config.values())
        if len(settings) == 1 and set(config) >= set(self.deltas):
            (wa,) = settings
            measured = self.uniform_ms.get((wa[0], wa[1]))
            if measured is not None:
                return measured
        return self.base_ms + self.scale * self.delta(config)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_ms": round(self.base_ms, 4),
            "batch": self.batch,
            "size": list(self.size),
            "scale": round(self.scale, 4),
            "uniform_ms": {f"W{w}A{a}": round(v, 4) for (w, a), v in self.uniform_ms.items()},
            "deltas": {
                n: {f"W{w}A{a}": round(v, 4) for (w, a), v in d.items()}
                for n, d in self.deltas.items()
            },
        }


def _images(packed: Any, batch: int, size: tuple[int, int] | None) -> np.ndarray:
    h, w = size or packed.input_size or (32, 32)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (batch, packed.in_channels, h, w), dtype=np.uint8)


def fit_scale(predicted: list[float], measured: list[float]) -> float:
    """The least-squares factor f minimising sum (f * p - m)^2 over pairs of predicted and
    measured differences from the base; 1.0 when the predictions are all zero, and never
    below 0.1 (a noisy fit must not flatten every difference)."""
    p, m = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
    den = float(p @ p)
    if den <= 0:
        return 1.0
    return max(0.1, float(p @ m) / den)


def _median_ms(packed: Any, x: np.ndarray, repeat: int) -> float:
    packed(x)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        packed(x)
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))


def latency_model(
    packed: Any, *, batch: int = 1, size: tuple[int, int] | None = None, repeat: int = 20
) -> LatencyModel:
    """Time ``packed`` (an any-precision :class:`~bcnn.engine.PackedModel`) at its highest
    precision, and each layer's op at every (w, a) it allows (see the module docstring)."""
    from ._plan import _Plan

    table = packed._table
    if not table:
        raise ValueError("latency_model: the model has no precision sets (not any-precision)")
    if batch < 1 or repeat < 1:
        raise ValueError("batch and repeat must be >= 1")
    x = _images(packed, batch, size)
    top = table.default()
    shared_w = set.intersection(*(set(w) for w, _ in table.layers.values()))
    shared_a = set.intersection(*(set(a) for _, a in table.layers.values()))
    uniform = [(w, w) for w in sorted(shared_w & shared_a)]
    uniform = [wa for wa in uniform if any(top[n] != wa for n in top)]
    settings = [None, *uniform]  # None: the highest; interleaved round by round
    ends: dict[Any, list[float]] = {s: [] for s in settings}
    with packed.precision():
        for r in range(repeat + 1):
            for wa in settings:
                packed.set_precision(*(wa or (None, None)))
                t0 = time.perf_counter()
                packed(x)
                if r:  # round 0 warms each setting
                    ends[wa].append((time.perf_counter() - t0) * 1e3)
    base = float(np.median(ends[None]))
    plan = _Plan(packed, tuple(int(d) for d in x.shape))  # type: ignore[arg-type]

    def use(config: Config) -> None:
        plan.precision.clear()
        plan.precision.update({"weight_bits": None, "sel": table.select(config, strict=False)})

    use(top)
    for step in plan.steps:  # fill every buffer: each op then reruns on real inputs
        step(x)
    index = {op["precision"]["layer"]: i for i, op in enumerate(packed.graph["ops"])
             if "precision" in op}  # fmt: skip
    trials = [(n, (w, a)) for n, (ws, as_) in table.layers.items() for w in ws for a in as_]
    times: dict[tuple[str, tuple[int, int]], list[float]] = {t: [] for t in trials}
    for r in range(repeat + 1):
        for name, wa in trials:
            use({**top, name: wa})
            step = plan.steps[index[name]]
            t0 = time.perf_counter()
            step(x)
            if r:  # round 0 warms each variant (weight layouts, epilogues)
                times[(name, wa)].append((time.perf_counter() - t0) * 1e3)
    model = LatencyModel(base_ms=base, batch=batch, size=(x.shape[2], x.shape[3]))
    for name in table.layers:
        t_top = float(np.median(times[(name, top[name])]))
        model.deltas[name] = {
            wa: float(np.median(times[(n, wa)])) - t_top for n, wa in trials if n == name
        }
    model.uniform_ms = {wa: float(np.median(ends[wa])) for wa in uniform}
    cfgs = [dict.fromkeys(top, wa) for wa in uniform]
    model.scale = fit_scale(
        [model.delta(c) for c in cfgs], [model.uniform_ms[wa] - base for wa in uniform]
    )
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
        return _median_ms(packed, x, repeat)
