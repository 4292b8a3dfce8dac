"""The binary first layer: an input encoder followed by a binary-weight convolution."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..quant._registry import QuantizerLike  # the submodule: bcnn.quant forwards transforms
from ._encoders import BitPlaneEncoder, ThermometerEncoder
from ._layers import BinaryConv2d, _quantize

__all__ = ["EncodedConv2d", "make_encoder"]


def make_encoder(kind: str, in_channels: int, **kw: int) -> nn.Module:
    if kind == "bitplane":
        return BitPlaneEncoder(in_channels, **kw)
    if kind == "thermometer":
        return ThermometerEncoder(in_channels, **kw)
    raise ValueError(f"unknown encoder {kind!r}; known: bitplane, thermometer")


class EncodedConv2d(BinaryConv2d):
    """y = sum_k plane_weights[k] * conv(s_k, q_w(w_k)): a binary convolution over encoded planes.

    The encoder turns uint8 pixels into planes s_k in {-1, +1}; the planes are one-padded,
    weighted by their place value (2^b for bit-planes) and convolved with binary weights of
    shape (out, in_channels * planes, kh, kw). Every multiply is 1 bit x 1 bit; the weighted
    sum over planes is exact integer arithmetic, and the engine runs it as one binary GEMM per
    plane group. Input: uint8 (or float holding 0..255) NCHW.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
        *,
        encoder: nn.Module | str = "bitplane",
        weight_quantizer: QuantizerLike = "ste_sign",
    ) -> None:
        enc = make_encoder(encoder, in_channels) if isinstance(encoder, str) else encoder
        if not isinstance(enc, BitPlaneEncoder | ThermometerEncoder):
            raise TypeError("encoder must be a BitPlaneEncoder or ThermometerEncoder")
        super().__init__(
            enc.out_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            bias=bias,
            input_quantizer=None,
            weight_quantizer=weight_quantizer,
            pad_value=1.0,
        )
        self.image_channels = in_channels
        self.encoder = enc

    def forward(self, x: Tensor) -> Tensor:
        planes = self.encoder(x)  # (N, C*planes, H, W) in {-1, +1}
        ph, pw = self.pad_hw
        if ph or pw:
            planes = F.pad(planes, (pw, pw, ph, ph), value=1.0)
        plane_weights: Tensor = self.encoder.plane_weights  # type: ignore[assignment]
        w, sw = _quantize(self.weight_quantizer, self.weight)
        # Weight each plane by its place value through the (small) weight tensor rather than the
        # (large) plane tensor: the same exact integer sums, one pass less over the planes.
        w = w * plane_weights.view(1, -1, 1, 1).to(w.dtype)
        y = F.conv2d(planes, w, None, self.stride, 0, self.dilation, self.groups)
        if sw is not None:  # k-bit weights: integer conv, then the per-channel step
            y = y * sw.reshape(1, -1, 1, 1).to(y.dtype)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1).to(y.dtype)
