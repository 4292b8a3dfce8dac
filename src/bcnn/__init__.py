"""bcnn: fully binary CNNs in PyTorch, with bit-exact XOR-popcount CPU inference.

Subpackages: ``bcnn.quant`` (quantizers, set_precision), ``bcnn.nn`` (binary layers, encoders),
``bcnn.transforms`` (quantize_),
``bcnn.models`` (registry, BCNN family), ``bcnn.data``, ``bcnn.train``, ``bcnn.engine``,
``bcnn.export`` (ONNX / QONNX), ``bcnn.fp8`` (emulated FP8 training).
The import of ``bcnn`` itself is light: subpackages load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "summary"]

if TYPE_CHECKING:
    from ._summary import summary

_SUBMODULES = {"quant", "nn", "transforms", "models", "data", "train", "engine", "export", "fp8"}


def __getattr__(name: str) -> Any:
    if name == "summary":
        from ._summary import summary

        return summary
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'bcnn' has no attribute {name!r}")
