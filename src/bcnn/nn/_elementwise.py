"""Per-channel element-wise modules of binary networks (they stay in float in the engine)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant._registry import QuantizerLike, get_quantizer  # submodule, see quant.__init__

__all__ = ["LearnableBias", "RPReLU", "RSign", "Scale"]


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast a (C,) vector over dim 1 of x (NC, NCHW...)."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


class LearnableBias(nn.Module):
    """y = x + b, one learnable b per channel (ReActNet's shift before a sign: a learnable
    threshold, since sign(x + b) fires at x >= -b)."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + _per_channel(self.bias, x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.bias.numel()}"


class RSign(nn.Module):
    """RSign: q(x + b) with a learnable per-channel threshold -b (Liu et al., ReActNet, ECCV
    2020). ``quantizer=None`` keeps only the shift (the float twin)."""

    def __init__(self, num_channels: int, quantizer: QuantizerLike = "ste_sign") -> None:
        super().__init__()
        self.shift = LearnableBias(num_channels)
        self.quantizer = get_quantizer(quantizer)

    def forward(self, x: Tensor) -> Tensor:
        x = self.shift(x)
        return x if self.quantizer is None else self.quantizer(x)


class _PReLUFn(torch.autograd.Function):
    """F.prelu with a hand-written backward: same forward, same gradients as PyTorch's
    (x > 0 passes grad, else slope * grad; d slope = sum of x * grad where x <= 0), but a few
    vectorised passes instead of ATen's CPU prelu backward, which is several times slower."""

    @staticmethod
    def forward(ctx, x: Tensor, slope: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, slope)
        return F.prelu(x, slope)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x, slope = ctx.saved_tensors
        dims = [d for d in range(x.dim()) if d != 1]
        acc = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
        d_slope = (x.clamp(max=0) * grad).sum(dim=dims, dtype=acc).to(slope.dtype)
        s = _per_channel(slope, x)
        pos = (x > 0).to(grad.dtype)
        d_x = torch.addcmul(pos, 1 - pos, s).mul_(grad)  # exactly 1 or slope, times grad
        return d_x, d_slope


def prelu(x: Tensor, slope: Tensor) -> Tensor:
    """Per-channel PReLU (dim 1), equal to ``F.prelu`` in value and gradient, faster backward."""
    if x.dim() < 2 or slope.numel() != x.shape[1]:
        return F.prelu(x, slope)
    return _PReLUFn.apply(x, slope)  # type: ignore[no-any-return]


class RPReLU(nn.Module):
    """RPReLU (ReActNet): y = PReLU(x - gamma) + zeta with per-channel gamma, slope and zeta."""

    def __init__(self, num_channels: int, init_slope: float = 0.25) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(num_channels))
        self.slope = nn.Parameter(torch.full((num_channels,), float(init_slope)))
        self.zeta = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        x = x - _per_channel(self.gamma, x).to(x.dtype)
        x = prelu(x, self.slope.to(x.dtype))  # x if x >= 0 else slope * x, per channel
        return x + _per_channel(self.zeta, x).to(x.dtype)


class Scale(nn.Module):
    """y = x * alpha + beta per channel (the classifier's per-class scale and bias)."""

    def __init__(self, num_channels: int, init_scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((num_channels,), float(init_scale)))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * _per_channel(self.weight, x).to(x.dtype) + _per_channel(self.bias, x).to(x.dtype)
