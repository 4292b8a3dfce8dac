"""The packed CPU engine: ``pack`` a trained binary model, ``save``/``load`` .bcnn files, run them.

>>> import numpy as np
>>> from bcnn.models import create_model
>>> from bcnn.engine import pack
>>> packed = pack(create_model("bcnn_cifar", width=8, depth=1))
>>> packed(np.zeros((1, 3, 32, 32), np.uint8)).shape
(1, 10)

Weights are stored as sign bits (bit 1 = -1), channels-last, packed along the reduction axis
into uint64 words; batch norm + sign fold into per-channel thresholds; see docs/format.md.
Importing this package does not import torch (only :func:`pack` does) nor compile kernels.
:func:`kernel_path` names the kernels' instruction-set path (``BCNN_KERNEL_PATH`` forces one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._executor import PackedModel
from ._paths import apply_kernel_path_env, kernel_path

apply_kernel_path_env()  # BCNN_KERNEL_PATH, before numba compiles anything

__all__ = [
    "PackedModel",
    "get_num_threads",
    "kernel_path",
    "latency_model",
    "load",
    "load_any",
    "measure_ms",
    "num_threads",
    "pack",
    "pbatch",
    "pretrained_path",
    "set_num_threads",
]


# Checkpoint meta entries that travel into a .bcnn file (so `bcnn eval` finds the same split).
META_KEYS = ("data", "val_split", "seed", "image_size")


def pack(
    model: Any, *, classes: list[str] | None = None, meta: dict[str, Any] | None = None
) -> PackedModel:
    """Convert a torch model (the BCNN family, or an ``nn.Sequential`` chain of bcnn binary
    layers) into a :class:`PackedModel`. The model is read in eval mode; unsupported modules
    raise ``ValueError`` naming them. ``classes``: class names stored with the model;
    ``meta``: a checkpoint's meta, of which the entries in ``META_KEYS`` are kept."""
    from ._pack_models import pack_model

    kept = {k: meta[k] for k in META_KEYS if meta and meta.get(k) is not None}
    graph, tensors = pack_model(model, classes=classes, meta=kept)
    return PackedModel(graph, tensors)


def pbatch(
    model: Any,
    weight_bits: int = 8,
    act_bits: int = 8,
    layers: Any = None,
    skip: Any = (),
) -> Any:
    """PrecisionBatching for any torch model: swap its ``nn.Linear``, ``nn.Conv2d``,
    ``nn.LSTM`` and ``nn.GRU`` layers (or those in ``layers``) for bit-serial CPU modules,
    post-training, no calibration data; ``bcnn.quant.set_precision(model, weight_bits=k)`` then
    keeps the top k weight planes at run time. See docs/pbatch.md and :mod:`._pbatch`."""
    from ._pbatch import pbatch as _pbatch

    if layers is None:
        return _pbatch(model, weight_bits, act_bits, skip=skip)
    return _pbatch(model, weight_bits, act_bits, layers, skip)


def latency_model(packed: PackedModel, **kw: Any) -> Any:
    """Measured batch-1 latency of an any-precision packed model at any per-layer mix:
    ``lat = latency_model(packed); lat({layer: (w, a), ...}) -> ms`` (see :mod:`._latency`)."""
    from ._latency import latency_model as _lm

    return _lm(packed, **kw)


def measure_ms(packed: PackedModel, config: Any = None, **kw: Any) -> float:
    """Median ms of ``packed`` at ``config`` ({layer: (w, a)}; None: its current setting)."""
    from ._latency import measure_ms as _m

    return _m(packed, config, **kw)


def pretrained_path(name: str) -> Path | None:
    """``src/bcnn/pretrained/<name>.bcnn`` if it ships with the package, else None."""
    from .._pretrained import pretrained_file  # torch-free

    return pretrained_file(name, ".bcnn")


def load(path_or_name: str | os.PathLike[str]) -> PackedModel:
    """Load a .bcnn file (validated before anything runs), or a shipped pretrained name."""
    p = Path(path_or_name)
    if not p.exists():
        pre = pretrained_path(str(path_or_name))
        if pre is not None:
            p = pre
    return PackedModel.load(p)


def load_any(spec: str | os.PathLike[str]) -> PackedModel:
    """A ``.bcnn`` file, a pretrained name, or a checkpoint (loaded and packed; its class
    names are kept) -> :class:`PackedModel`. This is what ``bcnn eval --engine packed``,
    ``bcnn predict`` and ``bcnn bench`` use."""
    s = str(spec)
    p = Path(s)
    if p.suffix == ".bcnn" or (not p.exists() and pretrained_path(s) is not None):
        return load(s)
    if p.is_file():
        if _is_bcnn(p):
            return load(p)
        from ..models import load_checkpoint

        model, meta = load_checkpoint(p)
        classes = meta.get("classes")
        return pack(
            model, classes=list(classes) if isinstance(classes, list | tuple) else None, meta=meta
        )
    raise FileNotFoundError(f"{s!r} is neither a .bcnn file, a checkpoint nor a pretrained name")


def _is_bcnn(p: Path) -> bool:
    """Whether a file carries the .bcnn magic (whatever its name)."""
    import json

    try:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > (64 << 20):
                return False
            header = json.loads(f.read(n))
        return bool(header.get("__metadata__", {}).get("format") == "bcnn")
    except (OSError, ValueError, AttributeError):
        return False


def set_num_threads(n: int) -> int:
    """Threads used by the kernels (default 1); returns the previous count."""
    from ._threads import set_num_threads as _set

    return _set(n)


def get_num_threads() -> int:
    """Threads the kernels use now."""
    from ._threads import get_num_threads as _get

    return _get()


def num_threads(n: int) -> Any:
    """Context manager: ``with num_threads(2): ...`` runs the block with ``n`` kernel threads."""
    from ._threads import num_threads as _ctx

    return _ctx(n)
