"""The BCNN family: a real-valued residual stream read through signs by binary convolutions.

    stem   : h = BN(EncodedConv2d(x))            uint8 -> bit-planes -> binary 3x3 conv
    block  : h = h + RPReLU(BN(conv3x3(sign(h + b))))          binary 3x3, stride 1
    down   : a = avgpool2(h); h = [a, a, ...] + RPReLU(BN(conv1x1(sign(a + b))))   widen x r
    head   : logits = Scale(BinaryLinear(sign(BN(GAP(h)))))    binary classifier, per-class affine

Every convolution (stem and projections included) and the classifier take 1-bit inputs and
1-bit weights; element-wise ops (BN, RPReLU, adds, pooling) stay in float. ``binary=False``
builds the float twin: the same modules with the quantizers removed and a float stem.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..nn import BinaryConv2d, BinaryLinear, EncodedConv2d, LearnableBias, RPReLU, Scale
from ..quant import QuantizerLike, get_quantizer, make_act_quantizer, make_weight_quantizer
from ._any_precision import any_precision_
from ._registry import register_model

__all__ = ["BCNN", "BCNNBlock", "BCNNDownsample", "BCNNHead", "BCNNStem", "bcnn_cifar"]


def _act(channels: int, rprelu: bool) -> nn.Module:
    return RPReLU(channels) if rprelu else nn.Identity()


class BCNNBlock(nn.Module):
    """h + act(bn(conv_kxk(q(h + b)))), stride 1, same width."""

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        input_quantizer: QuantizerLike,
        weight_quantizer: QuantizerLike,
        rprelu: bool = True,
    ) -> None:
        super().__init__()
        self.shift = LearnableBias(channels)
        self.conv = BinaryConv2d(
            channels,
            channels,
            kernel_size,
            padding=kernel_size // 2,
            bias=False,
            input_quantizer=input_quantizer,
            weight_quantizer=weight_quantizer,
        )
        self.bn = nn.BatchNorm2d(channels)
        self.act = _act(channels, rprelu)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.act(self.bn(self.conv(self.shift(h))))


class BCNNDownsample(nn.Module):
    """Average the stream (2x2, stride 2, partial windows at odd sizes) and widen it:
    [a] * (out/in) + act(bn(conv1x1(q(a + b))))."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 2,
        *,
        input_quantizer: QuantizerLike,
        weight_quantizer: QuantizerLike,
        rprelu: bool = True,
    ) -> None:
        super().__init__()
        if out_channels % in_channels:
            raise ValueError(
                f"a BCNN stage must widen by an integer factor ({in_channels} -> {out_channels})"
            )
        self.repeat = out_channels // in_channels
        self.pool = (
            nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
            if stride > 1
            else nn.Identity()
        )
        self.shift = LearnableBias(in_channels)
        self.conv = BinaryConv2d(
            in_channels,
            out_channels,
            1,
            bias=False,
            input_quantizer=input_quantizer,
            weight_quantizer=weight_quantizer,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = _act(out_channels, rprelu)

    def forward(self, h: Tensor) -> Tensor:
        a = self.pool(h)
        shortcut = a.repeat(1, self.repeat, 1, 1) if self.repeat > 1 else a
        return shortcut + self.act(self.bn(self.conv(self.shift(a))))


class BCNNStem(nn.Module):
    """Binary: BN(EncodedConv2d(uint8 x)). Float twin: BN(conv(x / 127.5 - 1))."""

    def __init__(
        self,
        in_chans: int,
        channels: int,
        stride: int,
        *,
        binary: bool,
        encoder: str,
        weight_quantizer: QuantizerLike,
        rprelu: bool,
    ) -> None:
        super().__init__()
        self.binary = binary
        self.conv: nn.Module
        if binary:
            self.conv = EncodedConv2d(
                in_chans,
                channels,
                3,
                stride=stride,
                padding=1,
                encoder=encoder,
                weight_quantizer=weight_quantizer,
            )
        else:
            self.conv = BinaryConv2d(
                in_chans,
                channels,
                3,
                stride=stride,
                padding=1,
                bias=False,
                input_quantizer=None,
                weight_quantizer=None,
            )
        self.bn = nn.BatchNorm2d(channels)
        self.act = _act(channels, rprelu)

    def forward(self, x: Tensor) -> Tensor:
        if not self.binary:
            x = x.to(self.bn.weight.dtype) / 127.5 - 1.0
        return self.act(self.bn(self.conv(x)))


class BCNNHead(nn.Module):
    """Global average pooling, batch norm, q(.), binary linear classifier, per-class scale and
    bias. (The BN before the sign folds into one threshold per feature in the engine.)"""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        *,
        input_quantizer: QuantizerLike,
        weight_quantizer: QuantizerLike,
    ) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(channels)
        self.fc = BinaryLinear(
            channels,
            num_classes,
            bias=False,
            input_quantizer=input_quantizer,
            weight_quantizer=weight_quantizer,
        )
        binary = input_quantizer is not None and getattr(input_quantizer, "bits", 1) == 1
        # A binary dot product over C features lies in [-C, C]: start the logits at unit scale.
        self.scale = Scale(num_classes, init_scale=1.0 / channels**0.5 if binary else 1.0)

    def forward(self, h: Tensor) -> Tensor:
        # the mean summed in float64 and rounded once, as the packed engine and the ONNX export
        # compute it: torch's float32 reduction order depends on the CPU's vector width, and
        # a 1-ulp difference can flip a quantized activation of the classifier's input
        f = h.double().mean(dim=(2, 3)).to(h.dtype)
        return self.scale(self.fc(self.norm(f)))


class BCNN(nn.Module):
    """A fully binary CNN. Input: uint8 images NCHW (0..255), or a float tensor of those values.

    ``precisions=(1, 2, 3, 4)`` builds an any-precision network (one set of weights, any
    per-layer bit width at run time, batch norm per precision: ``precision_bn`` "transitional"
    or "switchable"); see :mod:`bcnn.models._any_precision`."""

    def __init__(
        self,
        num_classes: int = 10,
        *,
        binary: bool = True,
        in_chans: int = 3,
        stem_channels: int = 64,
        stem_stride: int = 1,
        widths: Sequence[int] = (64, 128, 256),
        depths: Sequence[int] = (2, 2, 2),
        strides: Sequence[int] = (1, 2, 2),
        kernel_size: int = 3,
        encoder: str = "bitplane",
        input_quantizer: QuantizerLike = "approx_sign",
        weight_quantizer: QuantizerLike = "ste_sign",
        act_bits: int = 1,
        weight_bits: int = 1,
        rprelu: bool = True,
        precisions: Sequence[int] | None = None,
        precision_bn: str = "transitional",
    ) -> None:
        super().__init__()
        self.default_input_size: tuple[int, int, int] = (in_chans, 32, 32)
        if not len(widths) == len(depths) == len(strides):
            raise ValueError("widths, depths and strides must have the same length")

        # One quantizer instance per layer (they may carry state: learned steps).
        def iq() -> nn.Module | None:
            if not binary:
                return None
            if act_bits > 1:
                return make_act_quantizer(act_bits, signed=True)
            q = get_quantizer(input_quantizer)
            return copy.deepcopy(q) if q is input_quantizer else q

        def wq(out_channels: int) -> nn.Module | None:
            if not binary:
                return None
            if weight_bits > 1:
                return make_weight_quantizer(weight_bits, out_channels)
            q = get_quantizer(weight_quantizer)
            return copy.deepcopy(q) if q is weight_quantizer else q

        self.binary = binary
        self.act_bits = act_bits if binary else 32
        self.weight_bits = weight_bits if binary else 32
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.stem = BCNNStem(
            in_chans,
            stem_channels,
            stem_stride,
            binary=binary,
            encoder=encoder,
            weight_quantizer=wq(stem_channels),
            rprelu=rprelu,
        )
        layers: list[nn.Module] = []
        c = stem_channels
        for width, depth, stride in zip(widths, depths, strides, strict=True):
            if stride != 1 or width != c:
                layers.append(
                    BCNNDownsample(
                        c, width, stride, input_quantizer=iq(), weight_quantizer=wq(width),
                        rprelu=rprelu,
                    )
                )  # fmt: skip
                c = width
            for _ in range(depth):
                layers.append(
                    BCNNBlock(
                        c, kernel_size, input_quantizer=iq(), weight_quantizer=wq(c), rprelu=rprelu
                    )
                )
        self.blocks = nn.Sequential(*layers)
        self.head = BCNNHead(c, num_classes, input_quantizer=iq(), weight_quantizer=wq(num_classes))
        self.precisions: tuple[int, ...] | None = None
        if precisions is not None:  # any-precision: nested weights, switchable quantizers/BN
            any_precision_(self, precisions, precision_bn)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                if self.binary:  # latent weights well inside the STE's clip range
                    with torch.no_grad():
                        m.weight.mul_(0.1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected images (N, {self.in_chans}, H, W), got shape {tuple(x.shape)}"
            )
        return self.head(self.blocks(self.stem(x)))


def _stages(
    widths: Sequence[int] | None,
    depths: Sequence[int] | None,
    width: int | None,
    depth: int | None,
    default_widths: Sequence[int],
    default_depths: Sequence[int],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if widths is None:
        widths = (
            default_widths
            if width is None
            else tuple(width * 2**i for i in range(len(default_widths)))
        )
    if depths is None:
        depths = default_depths if depth is None else (depth,) * len(widths)
    return tuple(widths), tuple(depths)


@register_model
def bcnn_cifar(
    num_classes: int = 10,
    binary: bool = True,
    *,
    width: int | None = None,
    depth: int | None = None,
    widths: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
    stem_channels: int | None = None,
    **kw,
) -> BCNN:
    """BCNN for 32x32 inputs: stem 3x3 stride 1, stages at 32, 16, 8 (default widths 64-128-256,
    2 blocks each). ``width=`` sets the first stage's width (doubling per stage), ``depth=`` the
    blocks per stage."""
    ws, ds = _stages(widths, depths, width, depth, (64, 128, 256), (2, 2, 2))
    strides = kw.pop("strides", (1,) + (2,) * (len(ws) - 1))
    model = BCNN(
        num_classes,
        binary=binary,
        stem_channels=stem_channels or ws[0],
        stem_stride=1,
        widths=ws,
        depths=ds,
        strides=strides,
        **kw,
    )
    model.default_input_size = (model.in_chans, 32, 32)
    return model


@register_model
def bcnn_imagenet(
    num_classes: int = 1000,
    binary: bool = True,
    *,
    width: int | None = None,
    depth: int | None = None,
    widths: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
    stem_channels: int | None = None,
    **kw,
) -> BCNN:
    """BCNN for 224x224 inputs: stem 3x3 stride 2 (32 channels), four stages at 56, 28, 14, 7
    (default widths 64-128-256-512, 2 blocks each)."""
    ws, ds = _stages(widths, depths, width, depth, (64, 128, 256, 512), (2, 2, 2, 2))
    strides = kw.pop("strides", (2,) * len(ws))
    model = BCNN(
        num_classes,
        binary=binary,
        stem_channels=stem_channels or max(ws[0] // 2, 8),
        stem_stride=2,
        widths=ws,
        depths=ds,
        strides=strides,
        **kw,
    )
    model.default_input_size = (model.in_chans, 224, 224)
    return model


__all__ += ["bcnn_imagenet"]
