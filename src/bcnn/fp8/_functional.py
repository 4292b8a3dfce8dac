"""FP8 convolution and linear as autograd functions (emulated: FP8 grid values, FP32 arithmetic).

    forward : y  = conv(Q_f(x), Q_f(w)) + b            Q_f: RNE onto the forward format
    backward: g  = Q_b(dL/dy)                           the error, onto the backward format
              dx = conv_input_grad(g, Q_f(w))           FP32 accumulation
              dw = Q_b'(conv_weight_grad(Q_f(x), g))    weight gradient, onto the grid
              db = sum(g)                               FP32 (not a matrix product)

Every multiply of the three matrix products (forward, data gradient, weight gradient) takes two
FP8 operands; sums are FP32 (exact products of 1-5-2 numbers fit FP32's mantissa). ``dx`` is not
rounded here: it passes through element-wise ops (batch norm, activations) in FP32 and is
rounded where it enters the next FP8 matrix product, as that layer's error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._formats import FP8_FORMATS, check_rounding, get_format
from ._round import round_to_format

__all__ = ["FP8Spec", "FlushStats", "fp8_conv2d", "fp8_linear"]


@dataclass
class FlushStats:
    """Counts of gradient values that FP8 rounding flushed to zero (nonzero before, zero after),
    per kind: ``error`` (dL/dy) and ``wgrad`` (dL/dw). Filled only while ``enabled``."""

    enabled: bool = False
    counts: dict[str, list[int]] = field(default_factory=dict)  # kind -> [flushed, nonzero]

    def add(self, kind: str, before: Tensor, after: Tensor) -> None:
        nz = before != 0
        c = self.counts.setdefault(kind, [0, 0])
        c[0] += int((nz & (after == 0)).sum())
        c[1] += int(nz.sum())

    def fraction(self, kind: str) -> float:
        flushed, nonzero = self.counts.get(kind, [0, 0])
        return flushed / nonzero if nonzero else 0.0


@dataclass
class FP8Spec:
    """What one layer quantizes: ``forward`` format (weights and activations, RNE; ``None``
    keeps them FP32), ``backward`` format (errors and weight gradients; ``None``: FP32), the
    rounding of errors and of weight gradients."""

    forward: str | None = "e5m2"
    backward: str | None = "e5m2"
    error_rounding: str = "stochastic"
    wgrad_rounding: str = "stochastic"
    stats: FlushStats = field(default_factory=FlushStats)

    def __post_init__(self) -> None:
        for f in (self.forward, self.backward):
            if f is not None:
                get_format(f, FP8_FORMATS)
        check_rounding(self.error_rounding)
        check_rounding(self.wgrad_rounding)

    def q_forward(self, t: Tensor) -> Tensor:
        return t if self.forward is None else round_to_format(t, self.forward, "nearest")

    def q_backward(self, t: Tensor, kind: str) -> Tensor:
        if self.backward is None:
            return t
        rounding = self.error_rounding if kind == "error" else self.wgrad_rounding
        q = round_to_format(t, self.backward, rounding)
        if self.stats.enabled:
            self.stats.add(kind, t, q)
        return q


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


class _FP8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        w: Tensor,
        b: Tensor | None,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
        spec: FP8Spec,
    ) -> Tensor:
        xq, wq = spec.q_forward(x), spec.q_forward(w)
        ctx.save_for_backward(xq, wq)
        ctx.conf = (stride, padding, dilation, groups, spec, b is not None)
        return F.conv2d(xq, wq, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xq, wq = ctx.saved_tensors
        stride, padding, dilation, groups, spec, has_bias = ctx.conf
        g = spec.q_backward(gy.contiguous(), "error")
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g,
            xq,
            wq,
            [wq.shape[0]] if has_bias else None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [need[0], need[1], has_bias and need[2]],
        )
        if gw is not None:
            gw = spec.q_backward(gw, "wgrad")
        return gx, gw, gb, None, None, None, None, None


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, spec: FP8Spec) -> Tensor:  # type: ignore[override]
        xq, wq = spec.q_forward(x), spec.q_forward(w)
        ctx.save_for_backward(xq, wq)
        ctx.conf = (spec, b is not None)
        return F.linear(xq, wq, b)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xq, wq = ctx.saved_tensors
        spec, has_bias = ctx.conf
        g = spec.q_backward(gy, "error")
        g2 = g.reshape(-1, g.shape[-1])
        need = ctx.needs_input_grad
        gx = (g @ wq) if need[0] else None
        gw = spec.q_backward(g2.t() @ xq.reshape(-1, xq.shape[-1]), "wgrad") if need[1] else None
        gb = g2.sum(0) if has_bias and need[2] else None
        return gx, gw, gb, None


def fp8_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | str | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    spec: FP8Spec | None = None,
) -> Tensor:
    """``F.conv2d`` with FP8 operands in forward and backward (see the module docstring)."""
    spec = spec or FP8Spec()
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same": symmetric padding needs an odd effective kernel at stride 1
            d, k = _pair(dilation), weight.shape[-2:]
            if padding != "same" or any((di * (ki - 1)) % 2 for di, ki in zip(d, k)):
                raise ValueError(f"fp8_conv2d: padding={padding!r} needs an odd kernel")
            padding = tuple(di * (ki - 1) // 2 for di, ki in zip(d, k))
    if x.dim() == 3:  # unbatched (C, H, W), as F.conv2d accepts
        return fp8_conv2d(x[None], weight, bias, stride, padding, dilation, groups, spec)[0]
    out = _FP8Conv2d.apply(
        x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), int(groups), spec
    )
    return out  # type: ignore[no-any-return]


def fp8_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, spec: FP8Spec | None = None
) -> Tensor:
    """``F.linear`` with FP8 operands in forward and backward (see the module docstring)."""
    out = _FP8Linear.apply(x, weight, bias, spec or FP8Spec())
    return out  # type: ignore[no-any-return]
