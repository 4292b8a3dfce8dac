"""Quantizers: 1-bit sign variants with their pseudo-gradients, reachable by string alias.

>>> import torch
>>> from bcnn.quant import get_quantizer
>>> q = get_quantizer("ste_sign")
>>> q(torch.tensor([-0.5, 0.0, 2.0])).tolist()
[-1.0, 1.0, 1.0]
"""

from ._factory import make_act_quantizer, make_weight_quantizer
from ._precision import (
    PrecisionSwitchable,
    UntrainedPrecision,
    average_bits,
    precision,
    search_precision,
    set_precision,
    switchable_layers,
    tune_precision,
)
from ._registry import QuantizerLike, get_quantizer, list_quantizers, register_quantizer
from ._sign import (
    ApproxSign,
    MagnitudeAwareSign,
    SteSign,
    SwishSign,
    approx_sign,
    magnitude_aware_sign,
    sign,
    ste_sign,
    swish_sign,
)
from ._switchable import SwitchableQuantizer
from ._uniform import UniformQuantizer, grid_limits, quantize_to_grid

__all__ = [
    "ApproxSign",
    "MagnitudeAwareSign",
    "PrecisionSwitchable",
    "QuantConfig",  # forwarded from bcnn.transforms
    "QuantizerLike",
    "SteSign",
    "SwishSign",
    "SwitchableQuantizer",
    "UniformQuantizer",
    "UntrainedPrecision",
    "approx_sign",
    "average_bits",
    "get_quantizer",
    "grid_limits",
    "list_quantizers",
    "magnitude_aware_sign",
    "make_act_quantizer",
    "make_weight_quantizer",
    "precision",
    "quantize_",  # forwarded from bcnn.transforms
    "quantize_to_grid",
    "register_quantizer",
    "search_precision",
    "set_precision",
    "sign",
    "ste_sign",
    "swish_sign",
    "switchable_layers",
    "tune_precision",
]


def is_binary_quantizer(q: object) -> bool:
    """True for quantizers whose output is (a per-channel multiple of) {-1, +1}."""
    return isinstance(q, SteSign | ApproxSign | SwishSign | MagnitudeAwareSign)


__all__ += ["is_binary_quantizer"]


_FORWARDED = {"QuantConfig", "quantize_"}  # model-level transforms that live above bcnn.nn


def __getattr__(name: str) -> object:
    if name in _FORWARDED:
        import importlib

        return getattr(importlib.import_module("bcnn.transforms"), name)
    raise AttributeError(f"module 'bcnn.quant' has no attribute {name!r}")
