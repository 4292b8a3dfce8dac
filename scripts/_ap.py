"""Shared by the any-precision scripts (results, shipped model card): top-1 in torch, batch-1
latency of several models interleaved round by round, and per-layer mixes searched for latency
budgets on the packed engine."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

__all__ = ["searched_mixes", "time_all", "top1"]


@torch.no_grad()
def top1(model: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 500):
        correct += int((model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum())
    return correct / len(x)


def time_all(targets: list[Any], x: Any, repeat: int) -> list[float]:
    """Median ms of every target at batch 1, one thread, interleaved round by round.
    ``targets``: ("torch", model) or ("packed", packed model, set_precision kwargs)."""
    from bcnn.engine import num_threads

    xi = np.ascontiguousarray(x[:1].numpy())
    xt = x[:1]
    calls = []
    for kind, obj, cfg in ((*t, None) if len(t) == 2 else t for t in targets):
        if kind == "torch":
            calls.append(lambda obj=obj: obj(xt))
        else:
            calls.append(lambda obj=obj, cfg=cfg: run_at(obj, cfg, xi))
    times: list[list[float]] = [[] for _ in calls]
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), num_threads(1):
            for r in range(repeat + 2):
                for i, call in enumerate(calls):
                    t0 = time.perf_counter()
                    call()
                    if r >= 2:  # two warm rounds
                        times[i].append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(prev)
    return [float(np.median(t)) for t in times]


def run_at(packed: Any, cfg: dict[str, Any], x: Any) -> Any:
    with packed.precision(**cfg):
        return packed(x)


def searched_mixes(
    model: Any,
    packed: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    n_search: int,
    repeat: int,
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75),
) -> list[dict[str, Any]]:
    """Per-layer mixes of an any-precision model for latency budgets at ``fractions`` (1/4,
    1/2, 3/4) of the way from its lowest to its highest uniform precision (as the packed engine's
    ``latency_model`` predicts them, 1 thread), chosen greedily on ``n_search`` images
    drawn at random (seed 0) from ``x``; top-1 on all of ``x``. Leaves the model at its default
    precision."""
    from bcnn.engine import latency_model, num_threads
    from bcnn.quant import average_bits, search_precision, set_precision

    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # no idle torch threads spinning beside the engine's timing
    try:
        with num_threads(1):
            lat = latency_model(packed, repeat=repeat)
    finally:
        torch.set_num_threads(prev)
    names = list(packed.precision_layers)
    ps = sorted(set(packed.precision_layers[names[0]][0]))
    lo, hi = (lat({n: (k, k) for n in names}) for k in (ps[0], ps[-1]))
    # a seeded random sample: the split is stored in class order, its first images one class
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n_search]
    xs, ys = x[pick], y[pick]
    out = []
    for f in fractions:
        budget = lo + f * (hi - lo)
        set_precision(model)
        plan, _ = search_precision(
            model, lambda m, _d: top1(m, xs, ys), None, cost=lat, budget=budget
        )
        out.append({
            "bits": f"<= {budget:.3f} ms", "val_top1": top1(model, x, y),
            "layers": {n: list(v) for n, v in plan.items()},
            "average_weight_bits": round(average_bits(model), 3),
            "predicted_ms": round(lat(plan), 4),
        })  # fmt: skip
    set_precision(model)
    return out
