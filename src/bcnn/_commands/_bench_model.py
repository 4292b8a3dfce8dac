"""Whole-model benchmark: the packed engine vs the float twin and the simulated binary model in
PyTorch, same thread count, medians of interleaved repeats (used by ``bcnn bench MODEL`` and
``scripts/bench_model.py``)."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["bench_model"]


def _median_ms(fn: Any, repeat: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def bench_model(
    spec: str,
    *,
    batch: int = 1,
    threads: int = 1,
    repeat: int = 30,
    warmup: int = 5,
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """spec: a registered model name (random weights), a checkpoint, or a .bcnn file (then
    only the packed engine is timed unless its source config names a registered model)."""
    from pathlib import Path

    import numpy as np
    import torch

    from ..engine import load_any, pack, set_num_threads
    from ..models import create_model, list_models

    if batch < 1 or threads < 1 or repeat < 1:
        raise ValueError("batch, threads and repeat must be >= 1")
    binary = None
    if spec in list_models():
        binary = create_model(spec).eval()
        packed = pack(binary)
        config = binary.bcnn_config  # type: ignore[attr-defined]
    else:
        packed = load_any(spec)
        config = packed.graph.get("source") or {}
        if Path(spec).suffix != ".bcnn":
            from ..models import load_checkpoint

            binary, _ = load_checkpoint(spec)
    h, w = size or packed.input_size or (32, 32)
    x = np.random.default_rng(0).integers(0, 256, (batch, packed.in_channels, h, w), np.uint8)
    prev_torch = torch.get_num_threads()
    torch.set_num_threads(threads)
    set_num_threads(threads)
    try:
        res: dict[str, Any] = {
            "model": spec,
            "batch": batch,
            "threads": threads,
            "input": [packed.in_channels, h, w],
        }
        res["packed_ms"] = _median_ms(lambda: packed(x), repeat, warmup)
        xt = torch.from_numpy(x)
        if config.get("name") in list_models():
            twin = create_model(
                config["name"],
                num_classes=config.get("num_classes", 10),
                binary=False,
                **config.get("kwargs", {}),
            ).eval()
            with torch.no_grad():
                res["float_ms"] = _median_ms(lambda: twin(xt), repeat, warmup)
            res["speedup_vs_float"] = round(res["float_ms"] / res["packed_ms"], 2)
        if binary is not None:
            with torch.no_grad():
                res["torch_binary_ms"] = _median_ms(lambda: binary(xt), repeat, warmup)
            res["speedup_vs_torch_binary"] = round(res["torch_binary_ms"] / res["packed_ms"], 2)
            with torch.no_grad():
                ref = binary(xt).numpy()
            res["argmax_agrees"] = bool((ref.argmax(1) == packed(x).argmax(1)).all())
        for k in ("packed_ms", "float_ms", "torch_binary_ms"):
            if k in res:
                res[k] = round(res[k], 4)
    finally:
        torch.set_num_threads(prev_torch)
    return res
