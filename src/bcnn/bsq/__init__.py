"""BSQ: mixed precision learned from bit-level sparsity (Yang et al., ICLR 2021).

Each quantized layer's weights become trainable bits (:class:`BitQuantizer`); a bit-level
group Lasso (:func:`bit_group_lasso`) drives whole bit-planes to zero; periodic
re-quantization (:func:`requantize_`) drops them, so every layer ends at its own precision.
The result packs into the bit-serial engine (``bcnn.engine.pack``) and runs bit-exactly.
Training: ``bcnn train --bsq-alpha A`` (docs/bsq.md).
"""

from ._quantizer import MAX_BITS, BitQuantizer
from ._transform import (
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
    "MAX_BITS",
    "BitQuantizer",
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
