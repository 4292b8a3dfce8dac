"""Binary layers, drop-in for ``nn.Conv2d`` / ``nn.Linear``.

With both quantizers set a layer computes exactly ``conv(q_in(x), q_w(w)) (+ bias)``, where the
quantized input is padded with +1 (one-padding: sign(0) = +1, and no correction term is needed
in the packed engine). There is no hidden scale factor: scaling lives in the following affine
(batch norm, :class:`Scale`). With both quantizers ``None`` the layer is exactly ``nn.Conv2d``
(zero padding) or ``nn.Linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant import QuantizerLike, get_quantizer

__all__ = ["BinaryConv2d", "BinaryLinear"]


class BinaryConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose input and weights pass through quantizers.

    Args:
        input_quantizer: alias (``"ste_sign"``, ``"approx_sign"``...), module, or ``None``.
        weight_quantizer: alias, module, or ``None``.
        pad_value: value of the padded border. Default: +1 when an input quantizer is set
            (one-padding, the binary convention), 0 otherwise (``nn.Conv2d``'s zero padding).
        Other arguments: as ``nn.Conv2d`` (``padding_mode`` must be ``"zeros"``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        input_quantizer: QuantizerLike = "ste_sign",
        weight_quantizer: QuantizerLike = "ste_sign",
        pad_value: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        if isinstance(padding, str):
            raise ValueError("BinaryConv2d needs explicit integer padding, not a string")
        self.input_quantizer = get_quantizer(input_quantizer)
        self.weight_quantizer = get_quantizer(weight_quantizer)
        if pad_value is None:
            pad_value = 1.0 if self.input_quantizer is not None else 0.0
        self.pad_value = float(pad_value)
        ph, pw = (int(p) for p in self.padding)
        self.pad_hw: tuple[int, int] = (ph, pw)

    def quantized_weight(self) -> Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.quantized_weight()
        ph, pw = self.pad_hw
        if self.pad_value != 0.0 and (ph or pw):
            x = F.pad(x, (pw, pw, ph, ph), value=self.pad_value)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pad_value={self.pad_value:g}"


class BinaryLinear(nn.Linear):
    """``nn.Linear`` whose input and weights pass through quantizers (see :class:`BinaryConv2d`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        input_quantizer: QuantizerLike = "ste_sign",
        weight_quantizer: QuantizerLike = "ste_sign",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.input_quantizer = get_quantizer(input_quantizer)
        self.weight_quantizer = get_quantizer(weight_quantizer)

    def quantized_weight(self) -> Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.quantized_weight(), self.bias)
