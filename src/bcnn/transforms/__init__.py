"""Model-level transforms (above ``bcnn.nn``): ``quantize_`` with its ``QuantConfig``.

Their names are also importable from ``bcnn.quant`` (forwarded lazily, so that ``bcnn.quant``,
which ``bcnn.nn`` imports, never imports ``bcnn.nn`` back).
"""

from ._qat import QuantConfig, quantize_

__all__ = ["QuantConfig", "quantize_"]
