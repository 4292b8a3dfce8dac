"""Quantizers: 1-bit sign variants with their pseudo-gradients, reachable by string alias.

>>> import torch
>>> from bcnn.quant import get_quantizer
>>> q = get_quantizer("ste_sign")
>>> q(torch.tensor([-0.5, 0.0, 2.0])).tolist()
[-1.0, 1.0, 1.0]
"""

from ._precision import (
    PrecisionSwitchable,
    precision,
    set_precision,
    switchable_layers,
    tune_precision,
)
from ._qat import QuantConfig, make_act_quantizer, make_weight_quantizer, quantize_
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
from ._uniform import UniformQuantizer, grid_limits, quantize_to_grid

__all__ = [
    "ApproxSign",
    "MagnitudeAwareSign",
    "PrecisionSwitchable",
    "QuantConfig",
    "QuantizerLike",
    "SteSign",
    "SwishSign",
    "UniformQuantizer",
    "approx_sign",
    "get_quantizer",
    "grid_limits",
    "list_quantizers",
    "magnitude_aware_sign",
    "make_act_quantizer",
    "make_weight_quantizer",
    "precision",
    "quantize_",
    "quantize_to_grid",
    "register_quantizer",
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
