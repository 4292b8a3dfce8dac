"""BSQ: mixed precision learned from bit-level sparsity (Yang et al., ICLR 2021).

Each quantized layer's weights become trainable bits (:class:`BitQuantizer`); a bit-level
group Lasso (:func:`bit_group_lasso`) drives whole bit-planes to zero; periodic
re-quantization (:func:`requantize_`) drops them, so every layer ends at its own precision.
The result packs into the bit-serial engine (``bcnn.engine.pack``) and runs bit-exactly.
:class:`OddBitQuantizer` adapts it to the engine's odd grid (``grid="odd"``: binary layers
allowed, no 0). Training: ``bcnn train --bsq-alpha A [--bsq-grid odd]`` (docs/bsq.md).
"""

from ._odd import OddBitQuantizer
from ._quantizer import MAX_BITS, BitQuantizer
from ._transform import (
    GRIDS,
    avg_weight_bits,
    bit_group_lasso,
    bsq_,
    bsq_layers,
    check_,
    clamp_,
    freeze_,
    layer_bits,
    quantizable_layers,
    requantize_,
)

__all__ = [
    "GRIDS",
    "MAX_BITS",
    "BitQuantizer",
    "OddBitQuantizer",
    "avg_weight_bits",
    "bit_group_lasso",
    "bsq_",
    "bsq_layers",
    "check_",
    "clamp_",
    "freeze_",
    "layer_bits",
    "quantizable_layers",
    "requantize_",
]
