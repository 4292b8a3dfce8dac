"""First-layer input encoders: uint8 pixels -> binary planes in {-1, +1}.

Sign convention (as the packed format): a plane value s = 1 - 2*bit, so bit 1 means -1.
Each encoder has ``plane_weights`` (one per output plane) with the exact identity

    pixel = offset + sum_k plane_weights[k] * (1 - s_k) / 2

so that a binary-weight convolution over the planes, weighted by ``plane_weights``, is exact
integer arithmetic on the pixels (:class:`EncodedConv2d`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BitPlaneEncoder", "ThermometerEncoder", "as_uint8_pixels"]


def as_uint8_pixels(x: Tensor) -> Tensor:
    """Accept a uint8 tensor or a float tensor holding 0..255; return int32 pixel values."""
    if x.dtype == torch.uint8:
        return x.to(torch.int32)
    if x.is_floating_point():
        return x.round().clamp(0, 255).to(torch.int32)
    return x.clamp(0, 255).to(torch.int32)


class BitPlaneEncoder(nn.Module):
    """uint8 (N, C, H, W) -> (N, C*bits, H, W) planes; plane c*bits + b holds 1 - 2*bit_b(pixel).

    Exact: ``pixel = sum_b 2^b * (1 - s_b) / 2`` (see :meth:`decode`).
    """

    plane_weights: Tensor

    def __init__(self, in_channels: int = 3, bits: int = 8) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits}")
        self.in_channels = in_channels
        self.bits = bits
        w = torch.tensor([2.0**b for b in range(bits)]).repeat(in_channels)
        self.register_buffer("plane_weights", w, persistent=False)
        self.offset = 0.0

    @property
    def out_channels(self) -> int:
        return self.in_channels * self.bits

    def forward(self, x: Tensor) -> Tensor:
        p = as_uint8_pixels(x)
        if self.bits < 8:  # keep the most significant bits
            p = p >> (8 - self.bits)
        shifts = torch.arange(self.bits, device=x.device, dtype=torch.int32).view(1, 1, -1, 1, 1)
        bits = (p.unsqueeze(2) >> shifts) & 1  # (N, C, bits, H, W)
        planes = (1 - 2 * bits).to(torch.float32)
        n, c, b, h, w = planes.shape
        return planes.reshape(n, c * b, h, w)

    def decode(self, planes: Tensor) -> Tensor:
        """Inverse of forward (for the most significant ``bits``): the integer pixels."""
        n, _, h, w = planes.shape
        bits = (1 - planes) / 2
        weighted = bits * self.plane_weights.view(1, -1, 1, 1)
        p = weighted.view(n, self.in_channels, self.bits, h, w).sum(2)
        return p * 2 ** (8 - self.bits)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, bits={self.bits}"


class ThermometerEncoder(nn.Module):
    """uint8 (N, C, H, W) -> (N, C*levels, H, W); plane c*levels + l is -1 where the pixel
    reaches threshold t_l = round(256 * (l + 1) / (levels + 1)), +1 otherwise.

    ``offset + sum_l (1 - s_l)/2 * step`` approximates the pixel (a uniform quantization).
    """

    plane_weights: Tensor
    thresholds: Tensor

    def __init__(self, in_channels: int = 3, levels: int = 16) -> None:
        super().__init__()
        if not 1 <= levels <= 255:
            raise ValueError(f"levels must be in 1..255, got {levels}")
        self.in_channels = in_channels
        self.levels = levels
        t = torch.tensor([round(256 * (i + 1) / (levels + 1)) for i in range(levels)])
        self.register_buffer("thresholds", t.to(torch.int32), persistent=False)
        step = 256.0 / (levels + 1)
        self.register_buffer(
            "plane_weights", torch.full((in_channels * levels,), step), persistent=False
        )
        self.offset = 0.0

    @property
    def out_channels(self) -> int:
        return self.in_channels * self.levels

    def forward(self, x: Tensor) -> Tensor:
        p = as_uint8_pixels(x)
        on = p.unsqueeze(2) >= self.thresholds.view(1, 1, -1, 1, 1)  # (N, C, L, H, W)
        planes = (1 - 2 * on.to(torch.int32)).to(torch.float32)
        n, c, lv, h, w = planes.shape
        return planes.reshape(n, c * lv, h, w)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, levels={self.levels}"
