"""Factories of the k-bit quantizers the models and :func:`bcnn.transforms.quantize_` use."""

from __future__ import annotations

from torch import nn

from ._uniform import UniformQuantizer

__all__ = ["make_act_quantizer", "make_weight_quantizer"]


def make_weight_quantizer(bits: int, out_channels: int, per_channel: bool = True) -> nn.Module:
    """k-bit signed weight quantizer (LSQ step per output channel); k = 1: ``ste_sign``."""
    if bits == 1 and not per_channel:
        from ._sign import SteSign

        return SteSign()
    return UniformQuantizer(bits, signed=True, channels=out_channels if per_channel else 0)


def make_act_quantizer(bits: int, signed: bool | None = None) -> nn.Module:
    """k-bit activation quantizer (one learned step); ``signed=None`` decides on the first batch."""
    return UniformQuantizer(bits, signed=signed)
