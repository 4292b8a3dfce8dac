"""A small ONNX graph builder: named initializers, nodes with unique names, the model proto.

onnx is imported lazily (:func:`require`), so that ``import bcnn.export`` stays light and a
missing extra gives a one-line error.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

__all__ = ["QONNX_DOMAIN", "Graph", "UnsupportedError", "require"]

QONNX_DOMAIN = "qonnx.custom_op.general"


class UnsupportedError(ValueError):
    """A module or setting that the exporter cannot express (the message names it)."""


def require(name: str) -> Any:
    """Import an optional dependency of the export extra, or fail with a one-line hint."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(
            f"exporting needs the '{name.split('.')[0]}' package: pip install 'bcnn[export]'"
        ) from None


class Graph:
    """Collects nodes and initializers; ``value_shape`` tracks what the walkers need to know
    about a value: ``(kind, channels)`` with kind ``image`` (uint8 NCHW), ``stream`` (float
    NCHW), ``pm1`` (float NCHW in {-1, +1}), ``vector`` (float (N, C)), ``vpm1``."""

    def __init__(self, opset: int, qonnx: bool) -> None:
        self.onnx = require("onnx")
        self.opset = int(opset)
        self.qonnx = qonnx
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.kinds: dict[str, tuple[str, int]] = {}
        self._names: set[str] = set()
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    def unique(self, base: str) -> str:
        base = base.replace("/", ".") or "t"
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def init(self, base: str, arr: np.ndarray) -> str:
        """A named initializer (weights and per-channel parameters)."""
        from onnx import numpy_helper

        name = self.unique(base)
        self.inits.append(numpy_helper.from_array(np.array(arr, order="C"), name))  # keeps 0-d
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        """A small shared constant (scalars, shapes), deduplicated by value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.tobytes(), arr.shape)
        if key not in self._consts:
            self._consts[key] = self.init("const", arr)
        return self._consts[key]

    def node(
        self,
        op: str,
        inputs: list[str],
        base: str,
        *,
        domain: str = "",
        kind: tuple[str, int] | None = None,
        **attrs: Any,
    ) -> str:
        """Append one node with one output named after ``base``; return the output name."""
        out = self.unique(base)
        name = self.unique(f"{base}.{op}")
        self.nodes.append(
            self.onnx.helper.make_node(op, inputs, [out], name=name, domain=domain, **attrs)
        )
        if kind is not None:
            self.kinds[out] = kind
        return out

    def model(
        self,
        input_name: str,
        input_shape: list[Any],
        output_name: str,
        output_shape: list[Any],
        *,
        doc: str,
        metadata: dict[str, str],
    ) -> Any:
        """The ModelProto: one uint8 input, one float output, opset (and the QONNX domain)."""
        onnx = self.onnx
        h = onnx.helper
        graph = h.make_graph(
            self.nodes,
            "bcnn",
            [h.make_tensor_value_info(input_name, onnx.TensorProto.UINT8, input_shape)],
            [h.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, output_shape)],
            initializer=self.inits,
        )
        opsets = [h.make_opsetid("", self.opset)]
        if self.qonnx:
            opsets.append(h.make_opsetid(QONNX_DOMAIN, 1))
        m = h.make_model(graph, opset_imports=opsets, producer_name="bcnn", doc_string=doc)
        # the oldest IR version that knows this opset: older runtimes load the file too
        m.ir_version = h.find_min_ir_version_for(opsets, ignore_unknown=True)
        for k, v in metadata.items():
            p = m.metadata_props.add()
            p.key, p.value = k, v
        return m
