"""``to_onnx`` / ``to_qonnx``: build the graph in memory, check it, write it atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ._graph import Graph, UnsupportedError, require
from ._layers import LayerEmitter
from ._walk import emit_bcnn, emit_sequential

__all__ = ["DEFAULT_OPSET", "build", "export", "to_onnx", "to_qonnx"]

DEFAULT_OPSET = 17
FORMATS = ("onnx", "qonnx")

Batch = int | str


def _dim(v: Any, name: str, sym: str) -> int | str:
    """A fixed positive size, or the symbolic name ``sym`` for ``"dynamic"``."""
    if v == "dynamic":
        return sym
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer or 'dynamic', got {v!r}")
    return v


def _input_channels(model: Any) -> int:
    """Image channels of a chain's first module (an encoder convolution)."""
    from ..models.bcnn import BCNNStem
    from ..nn import EncodedConv2d
    from ._walk import _flatten

    mods = _flatten(model)
    first = mods[0][1] if mods else None
    if isinstance(first, BCNNStem):
        first = first.conv
    if isinstance(first, EncodedConv2d):
        return int(first.image_channels)
    name = f"{mods[0][0]} ({type(mods[0][1]).__name__})" if mods else "an empty chain"
    raise UnsupportedError(f"{name}: the first layer must be an encoder convolution")


def _pool_input_sizes(model: Any, c: int, hw: list[int]) -> dict[int, tuple[int, int]]:
    """Input (H, W) of every AvgPool2d for a static image size, from one torch forward pass on
    a blank image (skipped if a k-bit quantizer is not initialised: the pass would do it)."""
    import torch
    from torch import nn

    if any(not bool(getattr(m, "initialized", True)) for m in model.modules()):
        return {}
    sizes: dict[int, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args: sizes.__setitem__(id(mod), tuple(args[0].shape[-2:]))
        )
        for m in model.modules()
        if isinstance(m, nn.AvgPool2d)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros((1, c, *hw), dtype=torch.uint8))
    except Exception:  # the walker reports what does not fit
        return {}
    finally:
        for hk in hooks:
            hk.remove()
    return sizes


def build(
    model: Any,
    *,
    format: str = "onnx",
    batch: Batch = 1,
    input_size: tuple[int, int] | str | None = None,
    opset: int = DEFAULT_OPSET,
    classes: list[str] | None = None,
) -> Any:
    """The ``onnx.ModelProto`` of a BCNN-family model or an ``nn.Sequential`` chain of bcnn
    layers (see :func:`to_onnx`); raises ``ValueError`` naming what cannot be exported."""
    from torch import nn

    from ..models.bcnn import BCNN

    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not 13 <= int(opset) <= 21:
        raise ValueError(f"opset must be in 13..21, got {opset}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"export expects a torch.nn.Module, got {type(model).__name__}")
    n = _dim(batch, "batch", "N")
    if input_size is None:
        size = getattr(model, "default_input_size", None)
        hw: list[int | str] = [int(size[1]), int(size[2])] if size else ["H", "W"]
    elif input_size == "dynamic":
        hw = ["H", "W"]
    else:
        hw = [_dim(input_size[0], "input height", "H"), _dim(input_size[1], "input width", "W")]
    was_training = model.training
    model.eval()
    try:
        if getattr(model, "precisions", None):
            raise UnsupportedError(
                "any-precision models (precisions=...) cannot be exported yet: ONNX graphs "
                "run at one precision (train or fine-tune at one precision to export)"
            )
        if not isinstance(model, BCNN | nn.Sequential):
            raise UnsupportedError(
                f"cannot export a {type(model).__name__}: supported are the BCNN family and "
                "nn.Sequential chains of bcnn layers"
            )
        c = int(model.in_chans) if isinstance(model, BCNN) else _input_channels(model)
        g = Graph(opset, qonnx=format == "qonnx")
        g.kinds["input"] = ("image", c)
        e = LayerEmitter(g)
        if isinstance(hw[0], int) and isinstance(hw[1], int):
            e.pool_sizes = _pool_input_sizes(model, c, [hw[0], hw[1]])
        walk = emit_bcnn if isinstance(model, BCNN) else emit_sequential
        out = walk(e, model, "input")
    except UnsupportedError as err:
        raise ValueError(f"export: {err}") from None
    finally:
        model.train(was_training)
    num_classes = e.kind(out)[1]
    logits = g.node("Identity", [out], "logits")
    meta = {
        "bcnn_format": format,
        "bcnn_input": "uint8 NCHW, values 0..255",
        "bcnn_config": json.dumps(getattr(model, "bcnn_config", None) or {}),
    }
    if classes is not None and len(classes) == num_classes:
        meta["bcnn_classes"] = json.dumps(list(classes))
    doc = (
        f"bcnn {format} export: uint8 images (N, {c}, H, W) -> logits (N, {num_classes}); "
        "sign(0) = +1, binary convolutions one-padded (docs/export.md)"
    )
    proto = g.model("input", [n, c, *hw], logits, [n, num_classes], doc=doc, metadata=meta)
    onnx = g.onnx
    if format == "onnx":
        onnx.checker.check_model(proto, full_check=True)
    else:  # value shapes through the custom ops (qonnx's executor needs them)
        onnx.checker.check_model(proto)
        mw = require("qonnx.core.modelwrapper").ModelWrapper(proto)
        proto = mw.transform(require("qonnx.transformation.infer_shapes").InferShapes()).model
    return proto


def export(
    model: Any,
    path: str | os.PathLike[str],
    *,
    format: str = "onnx",
    batch: Batch = 1,
    input_size: tuple[int, int] | str | None = None,
    opset: int = DEFAULT_OPSET,
    classes: list[str] | None = None,
) -> Path:
    """Build the graph (:func:`build`) and write it atomically to ``path``; returns the path."""
    from .._io import atomic_write

    proto = build(
        model, format=format, batch=batch, input_size=input_size, opset=opset, classes=classes
    )
    data = proto.SerializeToString()
    path = Path(path)
    atomic_write(path, lambda f: f.write(data))
    return path


def to_onnx(
    model: Any,
    path: str | os.PathLike[str],
    *,
    batch: Batch = 1,
    input_size: tuple[int, int] | str | None = None,
    opset: int = DEFAULT_OPSET,
    classes: list[str] | None = None,
) -> Path:
    """Write ``model`` as a standard ONNX file that onnxruntime runs: input ``uint8`` NCHW
    (0..255), output float logits equal to the torch model's.

    ``batch``: a fixed batch size or ``"dynamic"``; ``input_size``: ``(H, W)``, ``"dynamic"``
    or ``None`` (the model's ``default_input_size``, else dynamic). Binary convolutions are
    comparisons giving +-1 (sign(0) = +1) and ``Conv`` on +-1 values with one-padding;
    weights are stored as int8. Raises ``ValueError`` naming a module that cannot be
    exported; needs ``pip install 'bcnn[export]'``."""
    return export(
        model, path, format="onnx", batch=batch, input_size=input_size, opset=opset,
        classes=classes,
    )  # fmt: skip


def to_qonnx(
    model: Any,
    path: str | os.PathLike[str],
    *,
    batch: Batch = 1,
    input_size: tuple[int, int] | str | None = None,
    opset: int = DEFAULT_OPSET,
    classes: list[str] | None = None,
) -> Path:
    """Write ``model`` as QONNX (the dialect of Brevitas and FINN): the graph of
    :func:`to_onnx` with ``BipolarQuant`` / ``Quant`` nodes on weights and activations and
    ``MultiThreshold`` where a batch norm meets a sign (domain ``qonnx.custom_op.general``).
    Run it with ``qonnx.core.onnx_exec.execute_onnx``; see docs/export.md for FINN."""
    require("qonnx")
    return export(
        model, path, format="qonnx", batch=batch, input_size=input_size, opset=opset,
        classes=classes,
    )  # fmt: skip
