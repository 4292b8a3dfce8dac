"""Whole-model benchmark: the packed engine vs the float twin and the simulated binary model in
PyTorch, same thread count, medians of interleaved repeats (used by ``bcnn bench MODEL`` and
``scripts/bench_model.py``)."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["bench_model"]


def _median_ms(fns: dict[str, Any], repeat: int, warmup: int) -> dict[str, float]:
    """Medians (ms) of interleaved runs, so that a noisy shared CPU hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append((time.perf_counter() - t0) * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in ts.items()}


# model options of the quantized model that its float twin does not take
_BINARY_ONLY = ("precisions", "precision_bn", "weight_bits", "act_bits")


def bench_model(
    spec: str,
    *,
    batch: int = 1,
    threads: int = 1,
    repeat: int = 30,
    warmup: int = 5,
    size: tuple[int, int] | None = None,
    concurrency: int | None = None,
    precision: tuple[Any, Any, Any] = (None, None, None),
) -> dict[str, Any]:
    """spec: a registered model name (random weights), a checkpoint, or a .bcnn file (then
    only the packed engine is timed unless its source config names a registered model).
    ``concurrency``: also the calls/s of that many threads sharing the packed model, next to
    one thread's (:func:`._bench_concurrency.bench_concurrency`). ``precision``: (weight_bits,
    act_bits, layers) set on the packed model and the torch one alike."""
    from pathlib import Path

    import numpy as np
    import torch

    from ..engine import load_any, pack, set_num_threads
    from ..models import create_model, list_models

    if batch < 1 or threads < 1 or repeat < 1:
        raise ValueError("batch, threads and repeat must be >= 1")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    binary: Any = None
    config: dict[str, Any]
    if spec in list_models():
        binary = create_model(spec).eval()
        packed = pack(binary)
        config = binary.bcnn_config  # type: ignore[attr-defined]
    else:
        packed = load_any(spec)
        config = packed.graph.get("source") or {}
        if Path(spec).suffix != ".bcnn":
            from ..models import load_checkpoint, pretrained_checkpoint

            # a pretrained name times its shipped torch checkpoint too, when there is one
            ckpt = spec if Path(spec).exists() else pretrained_checkpoint(spec)
            if ckpt is not None:
                binary, _ = load_checkpoint(ckpt)
    if any(v is not None for v in precision):
        packed.set_precision(*precision)
        if binary is not None:
            from ..quant import set_precision

            set_precision(binary, *precision)
    h, w = size or packed.input_size or (32, 32)
    x = np.random.default_rng(0).integers(0, 256, (batch, packed.in_channels, h, w), np.uint8)
    prev_torch = torch.get_num_threads()
    torch.set_num_threads(threads)
    prev_engine = set_num_threads(threads)
    try:
        res: dict[str, Any] = {
            "model": spec,
            "batch": batch,
            "threads": threads,
            "input": [packed.in_channels, h, w],
        }
        if any(v is not None for v in precision):  # what both engines run at
            now = packed.current_precision or {"weight_bits": precision[0]}
            res["precision"] = {k: list(v) if isinstance(v, tuple) else v for k, v in now.items()}
        xt = torch.from_numpy(x)
        fns: dict[str, Any] = {"packed_ms": lambda: packed(x)}
        if config.get("name") in list_models():
            kw = {k: v for k, v in config.get("kwargs", {}).items() if k not in _BINARY_ONLY}
            twin = create_model(
                config["name"], num_classes=config.get("num_classes", 10), binary=False, **kw
            ).eval()
            fns["float_ms"] = lambda: twin(xt)
        if binary is not None:
            fns["torch_binary_ms"] = lambda: binary(xt)
        with torch.no_grad():
            res.update(_median_ms(fns, repeat, warmup))
            if binary is not None:
                ref = binary(xt).numpy()
                res["argmax_agrees"] = bool((ref.argmax(1) == packed(x).argmax(1)).all())
        if "float_ms" in res:
            res["speedup_vs_float"] = round(res["float_ms"] / res["packed_ms"], 2)
        if "torch_binary_ms" in res:
            res["speedup_vs_torch_binary"] = round(res["torch_binary_ms"] / res["packed_ms"], 2)
        for k in ("packed_ms", "float_ms", "torch_binary_ms"):
            if k in res:
                res[k] = round(res[k], 4)
        if concurrency is not None:
            from ._bench_concurrency import bench_concurrency

            res.update(bench_concurrency(packed, x, concurrency))
    finally:
        torch.set_num_threads(prev_torch)
        set_num_threads(prev_engine)
    return res
