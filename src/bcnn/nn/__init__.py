"""Binary layers, input encoders and element-wise modules of binary networks.

>>> import torch
>>> from bcnn.nn import BinaryConv2d
>>> conv = BinaryConv2d(16, 32, 3, padding=1, bias=False)   # sign(x) * sign(w), one-padding
>>> conv(torch.randn(1, 16, 8, 8)).shape
torch.Size([1, 32, 8, 8])
"""

from ._elementwise import LearnableBias, RPReLU, RSign, Scale
from ._encoders import BitPlaneEncoder, ThermometerEncoder, as_uint8_pixels
from ._layers import BinaryConv2d, BinaryLinear
from ._stem import EncodedConv2d, make_encoder
from ._switchable import SwitchableBatchNorm, bn_keys

__all__ = [
    "BinaryConv2d",
    "BinaryLinear",
    "BitPlaneEncoder",
    "EncodedConv2d",
    "LearnableBias",
    "RPReLU",
    "RSign",
    "Scale",
    "SwitchableBatchNorm",
    "ThermometerEncoder",
    "as_uint8_pixels",
    "bn_keys",
    "make_encoder",
]
