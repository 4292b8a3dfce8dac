"""Quantization-aware training as a configuration applied to an existing torch model
(``quantize_`` swaps layers for ``bcnn.nn`` ones, so it sits above ``bcnn.nn``; ``bcnn.quant``
forwards its names lazily).

>>> import torch
>>> from torch import nn
>>> from bcnn.quant import QuantConfig, quantize_
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
...                     nn.Linear(8 * 4 * 4, 10))
>>> net = quantize_(net, QuantConfig(weight_bits=2, act_bits=4,
...                                   overrides={"0": dict(weight_bits=8, act_bits=8)}))
>>> net(torch.randn(2, 3, 4, 4)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from ..quant._factory import make_act_quantizer, make_weight_quantizer
from ..quant._registry import QuantizerLike

__all__ = ["QuantConfig", "quantize_"]


@dataclass(frozen=True)
class QuantConfig:
    """What :func:`quantize_` does to each ``nn.Conv2d`` / ``nn.Linear``.

    Args:
        weight_bits, act_bits: 1..8, or ``None`` to leave that operand in float.
        act_signed: grid of the activations: ``True`` (odd integers, for real-valued inputs),
            ``False`` (0..2^k-1, after ReLU) or ``None`` (decided on the first batch).
        per_channel: one weight step per output channel.
        overrides: ``{name pattern: None | dict(weight_bits=..., act_bits=..., ...)}``; fnmatch
            patterns on module names, first match wins; ``None`` keeps the layer in float.
        skip: a predicate ``(name, module) -> bool``; True keeps the layer in float.
        weight_quantizer, input_quantizer: explicit quantizers (alias or factory) instead of
            the k-bit defaults, e.g. ``"ste_sign"``.
    """

    weight_bits: int | None = 8
    act_bits: int | None = 8
    act_signed: bool | None = None
    per_channel: bool = True
    overrides: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    skip: Callable[[str, nn.Module], bool] | None = None
    weight_quantizer: QuantizerLike = None
    input_quantizer: QuantizerLike = None

    def for_layer(self, name: str, module: nn.Module) -> QuantConfig | None:
        if self.skip is not None and self.skip(name, module):
            return None
        for pattern, ov in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                return None if ov is None else replace(self, overrides={}, **ov)
        return self


def _build(cfg: QuantConfig, out_channels: int) -> tuple[QuantizerLike, QuantizerLike]:
    from ..quant._registry import get_quantizer

    iq: QuantizerLike
    wq: QuantizerLike
    if cfg.input_quantizer is not None:
        iq = get_quantizer(cfg.input_quantizer)
    else:
        iq = None if cfg.act_bits is None else make_act_quantizer(cfg.act_bits, cfg.act_signed)
    if cfg.weight_quantizer is not None:
        wq = get_quantizer(cfg.weight_quantizer)
    else:
        wq = (
            None
            if cfg.weight_bits is None
            else make_weight_quantizer(cfg.weight_bits, out_channels, cfg.per_channel)
        )
    return iq, wq


def _convert(module: nn.Module, cfg: QuantConfig) -> nn.Module:
    from ..nn import BinaryConv2d, BinaryLinear  # above nn: no import circle

    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError("quantize_ supports nn.Conv2d with integer zero padding only")
        iq, wq = _build(cfg, module.out_channels)
        new: nn.Module = BinaryConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,  # type: ignore[arg-type]
            stride=module.stride,  # type: ignore[arg-type]
            padding=module.padding,  # type: ignore[arg-type]
            dilation=module.dilation,  # type: ignore[arg-type]
            groups=module.groups,
            bias=module.bias is not None,
            input_quantizer=iq,
            weight_quantizer=wq,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
    else:
        assert isinstance(module, nn.Linear)
        iq, wq = _build(cfg, module.out_features)
        new = BinaryLinear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            input_quantizer=iq,
            weight_quantizer=wq,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
    new.load_state_dict(module.state_dict(), strict=False)
    new.train(module.training)
    return new


def quantize_(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Replace, in place, every ``nn.Conv2d`` / ``nn.Linear`` of ``model`` by a quantized layer.

    Weights and biases are kept; quantizer steps initialise from the first batch (LSQ).
    Layers that are already quantized (a bcnn layer with a quantizer) are left alone. Returns
    ``model``.
    """
    config = config or QuantConfig()
    named = dict(model.named_modules())
    for name, module in list(named.items()):
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        if getattr(module, "input_quantizer", None) is not None:
            continue
        if getattr(module, "weight_quantizer", None) is not None:
            continue
        if type(module).__name__ == "EncodedConv2d":
            continue
        cfg = config.for_layer(name, module)
        if cfg is None or (cfg.weight_bits is None and cfg.act_bits is None):
            continue
        new = _convert(module, cfg)
        if name == "":
            raise ValueError("quantize_ needs a container model, not a bare layer")
        parent_name, _, child = name.rpartition(".")
        setattr(named[parent_name] if parent_name else model, child, new)
    return model
