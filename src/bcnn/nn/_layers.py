"""Binary layers, drop-in for ``nn.Conv2d`` / ``nn.Linear``.

With both quantizers set a layer computes exactly ``conv(q_in(x), q_w(w)) (+ bias)``, where the
quantized input is padded with +1 (one-padding: sign(0) = +1, and no correction term is needed
in the packed engine). There is no hidden scale factor: scaling lives in the following affine
(batch norm, :class:`Scale`). With both quantizers ``None`` the layer is exactly ``nn.Conv2d``
(zero padding) or ``nn.Linear``.

k-bit quantizers (:class:`bcnn.quant.UniformQuantizer`) expose ``integer(x) -> (X, step)``; the
layer then computes ``step_x * step_w[o] * conv(X, W)``: the convolution runs on integer grid
values (exact in float32), in the same order as the bit-serial engine. The border is padded with
the quantizer's ``pad_value`` grid point (2^k - 1 on signed grids: every bit-plane +1, the
binary one-padding; 0 on unsigned ones).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant._registry import QuantizerLike, get_quantizer  # submodule, see quant.__init__

__all__ = ["BinaryConv2d", "BinaryLinear"]


def _quantize(q: nn.Module | None, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """(values, step or None): integer grid values and their step for k-bit quantizers."""
    if q is None:
        return x, None
    integer = getattr(q, "integer", None)
    if integer is not None:
        return integer(x)
    return q(x), None


def _output_scale(sx: Tensor | None, sw: Tensor | None) -> Tensor | None:
    """Per-output-channel factor step_x * step_w, shaped (O,) or () ."""
    if sx is None and sw is None:
        return None
    s = sx.reshape(()) if sx is not None else None
    w = sw.reshape(-1) if sw is not None else None
    if s is None:
        return w
    return s if w is None else s * w


class _PlaneKnob:
    """The :class:`bcnn.quant.PrecisionSwitchable` protocol for a layer with k-bit (LSQ)
    weights: ``set_precision(w, a)`` keeps the top ``min(w, k)`` weight planes (the same knob
    as ``PackedModel.set_precision``); activations keep their trained bits. Layers with other
    weight quantizers do not have the protocol (the properties raise AttributeError).

    Any-precision layers (``any_precision`` set to the trained precisions, see
    :func:`bcnn.models.any_precision_`) accept exactly those for weights and activations: the
    weights keep their top planes, a :class:`bcnn.quant.SwitchableQuantizer` input switches to
    that precision's quantizer (a layer without an input quantizer, the stem, reads exact
    pixels: its act bits only select its batch-norm set)."""

    weight_quantizer: Any
    input_quantizer: Any
    any_precision: tuple[int, ...] | None = None
    _act_choice: int | None = None

    def _kbit(self) -> Any:
        from ..quant._uniform import UniformQuantizer

        q = self.weight_quantizer
        if not isinstance(q, UniformQuantizer) or not q.signed:
            raise AttributeError("precision: not a layer with k-bit weights")
        return q

    def _act_bits(self) -> int:
        if self.any_precision is not None and self.input_quantizer is None:
            return self._act_choice or self.any_precision[-1]
        a = self.input_quantizer
        return int(getattr(a, "bits", 1 if a is not None else 32))

    @property
    def precision(self) -> tuple[int, int]:
        q = self._kbit()
        return (q.keep_bits or q.bits, self._act_bits())

    @property
    def default_precision(self) -> tuple[int, int]:
        if self.any_precision is not None:
            return (self.any_precision[-1], self.any_precision[-1])
        return (self._kbit().bits, self._act_bits())

    @property
    def allowed_precision(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        self._kbit()
        if self.any_precision is not None:
            return self.any_precision, self.any_precision
        return tuple(range(1, 9)), (self._act_bits(),)

    def set_precision(self, weight_bits: int, act_bits: int) -> None:
        q = self._kbit()
        q.keep_bits = None if weight_bits >= q.bits else int(weight_bits)
        if self.any_precision is not None:
            if self.input_quantizer is None:
                self._act_choice = int(act_bits)
            else:
                self.input_quantizer.select(int(act_bits))


class BinaryConv2d(_PlaneKnob, nn.Conv2d):
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
        self._pad_value = None if pad_value is None else float(pad_value)
        ph, pw = (int(p) for p in self.padding)
        self.pad_hw: tuple[int, int] = (ph, pw)

    @property
    def pad_value(self) -> float:
        """Border value of the (quantized) input: explicit, else the quantizer's (+1 for sign)."""
        if self._pad_value is not None:
            return self._pad_value
        if self.input_quantizer is None:
            return 0.0
        return float(getattr(self.input_quantizer, "pad_value", 1.0))

    def quantized_weight(self) -> Tensor:
        """The weight as the convolution sees it (times its step, for k-bit quantizers)."""
        w, sw = _quantize(self.weight_quantizer, self.weight)
        return w if sw is None else w * sw

    def forward(self, x: Tensor) -> Tensor:
        x, sx = _quantize(self.input_quantizer, x)
        w, sw = _quantize(self.weight_quantizer, self.weight)
        scale = _output_scale(sx, sw)
        bias = self.bias if scale is None else None
        ph, pw = self.pad_hw
        pad_value = self.pad_value
        if pad_value != 0.0 and (ph or pw):
            x = F.pad(x, (pw, pw, ph, ph), value=pad_value)
            y = F.conv2d(x, w, bias, self.stride, 0, self.dilation, self.groups)
        else:
            y = F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)
        if scale is not None:
            y = y * scale.view(1, -1, 1, 1).to(y.dtype) if scale.dim() else y * scale.to(y.dtype)
            if self.bias is not None:
                y = y + self.bias.view(1, -1, 1, 1).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pad_value={self.pad_value:g}"


class BinaryLinear(_PlaneKnob, nn.Linear):
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
        w, sw = _quantize(self.weight_quantizer, self.weight)
        return w if sw is None else w * sw

    def forward(self, x: Tensor) -> Tensor:
        x, sx = _quantize(self.input_quantizer, x)
        w, sw = _quantize(self.weight_quantizer, self.weight)
        scale = _output_scale(sx, sw)
        if scale is None:
            return F.linear(x, w, self.bias)
        y = F.linear(x, w) * scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)
