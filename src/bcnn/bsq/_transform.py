"""Model-level BSQ: convert layers, the bit-level group Lasso, re-quantize, report precisions.

>>> # bsq_(model, bits=8)                   every quantized layer -> BSQ bits, from its weights
>>> # loss = ce + alpha * bit_group_lasso(model)
>>> # clamp_(model)                         after each optimizer step
>>> # requantize_(model)                    every few epochs (precision adjustment)
>>> # layer_bits(model), avg_weight_bits(model)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._odd import OddBitQuantizer
from ._quantizer import MAX_BITS, BitQuantizer

__all__ = [
    "GRIDS",
    "avg_weight_bits",
    "bit_group_lasso",
    "bsq_",
    "bsq_layers",
    "check_",
    "clamp_",
    "freeze_",
    "layer_bits",
    "quantizable_layers",
    "requantize_",
]


GRIDS = {"zero": BitQuantizer, "odd": OddBitQuantizer}  # the trainer's ``bsq_grid``


def bsq_layers(model: nn.Module) -> dict[str, Any]:
    """The layers of ``model`` whose weights are BSQ bits, by qualified name."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight_quantizer", None), BitQuantizer)
    }


def quantizable_layers(model: nn.Module) -> dict[str, Any]:
    """Layers with a weight quantizer (binary or k-bit) and a weight of >= 2 dimensions."""
    out = {}
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if getattr(m, "weight_quantizer", None) is not None and isinstance(w, nn.Parameter):
            if w.dim() >= 2:
                out[n] = m
    return out


@torch.no_grad()
def _sync_weight(layer: Any) -> None:
    """Keep the layer's (frozen) float weight equal to step * W, for anything reading it (not
    in ``latent`` mode: there the weight is what trains)."""
    q = layer.weight_quantizer
    if not bool(q.latent):
        layer.weight.copy_(q().to(layer.weight.dtype))


def bsq_(model: nn.Module, bits: int = 8, *, init: bool = True, grid: str = "zero") -> nn.Module:
    """Convert every layer with a weight quantizer (sign or k-bit) to BSQ bit variables at
    ``bits`` bits (BSQ's N; 8 in the paper), in place, initialised from the layer's trained
    weights (``init``; the k-bit weights as the layer computes them, or the latent float
    weights of a sign quantizer). The layer's ``weight`` stops training (it mirrors
    ``step * W``). ``grid``: ``"zero"`` (BSQ's sign-magnitude grid, :class:`BitQuantizer`)
    or ``"odd"`` (the engine's odd grid, ``bits`` = its width k, :class:`OddBitQuantizer`).
    Returns ``model``. Raises ``ValueError`` if there is no such layer."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"BSQ bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    if not isinstance(grid, str) or grid not in GRIDS:
        raise ValueError(f"BSQ grid must be one of {sorted(GRIDS)}, got {grid!r}")
    cls = GRIDS[grid]
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no quantizable layer (a conv or linear layer with a "
            "weight quantizer) for BSQ"
        )
    for layer in layers.values():
        old = layer.weight_quantizer
        if isinstance(old, BitQuantizer):
            if type(old) is not cls:
                raise ValueError(f"the model's BSQ layers use the {old.grid!r} grid, not {grid!r}")
            continue
        w = layer.weight.detach()
        if callable(getattr(old, "integer", None)):
            with torch.no_grad():
                x, s = old.integer(w.float())
                w = x * s
        q = cls(layer.weight.shape, bits).to(layer.weight.device)
        if init:
            q.init_from(w, bits)
        layer.weight_quantizer = q
        layer.weight.requires_grad_(False)
        _sync_weight(layer)
    cfg = getattr(model, "bcnn_config", None)
    if isinstance(cfg, dict):
        extra = {"bsq_grid": grid} if grid != "zero" else {}  # zero-grid files stay as they were
        setattr(model, "bcnn_config", {**cfg, "bsq": True, **extra})  # noqa: B010 (nn.Module)
    return model


def _quantizers(model: nn.Module) -> list[BitQuantizer]:
    qs: list[BitQuantizer] = [m.weight_quantizer for m in bsq_layers(model).values()]
    if not qs:
        raise ValueError(f"{type(model).__name__} has no BSQ layer (convert it with bsq_ first)")
    return qs


def bit_group_lasso(model: nn.Module) -> Tensor:
    """BSQ's memory-aware bit-level group Lasso::

        R = sum_l (n_l * N_l / n) * sum_{b < N_l} sqrt(sum_{w in l} p_b(w)^2 + n_b(w)^2)

    (n_l weights and N_l bits in layer l, n weights in all BSQ layers; the official code's
    ``L1reg`` divided by the total parameter count). The training loss adds ``alpha * R``."""
    qs = _quantizers(model)
    total = sum(q.numel for q in qs)
    reg = qs[0].pos.new_zeros(())
    for q in qs:
        reg = reg + (q.numel * q.nbits.to(reg.dtype) / total) * q.plane_norms().sum()
    return reg


def clamp_(model: nn.Module) -> None:
    """Clamp every layer's bit variables into [0, 2] (after each optimizer step)."""
    for q in _quantizers(model):
        q.clamp_()


def requantize_(model: nn.Module, adjust: bool = True) -> dict[str, dict[str, Any]]:
    """Re-quantize every BSQ layer (see :meth:`BitQuantizer.requantize`; ``adjust``: also
    adjust the precisions). Returns {layer: {"before", "after", "overflow"}}."""
    out = {}
    for name, layer in bsq_layers(model).items():
        q = layer.weight_quantizer
        out[name] = q.requantize(adjust=adjust and not bool(q.frozen), weight=layer.weight)
        _sync_weight(layer)
    if not out:
        raise ValueError(f"{type(model).__name__} has no BSQ layer (convert it with bsq_ first)")
    return out


def freeze_(model: nn.Module, frozen: bool = True, *, weights: bool = False) -> None:
    """Freeze the precision scheme (fine-tuning): N stays fixed, W is clipped to its range.
    ``weights``: fine-tune each layer's float weight (starting at ``step * W``) through the
    frozen grid, with a step per output channel, instead of its bits (:class:`BitQuantizer`'s
    ``latent`` mode); the weight trains, the bits follow at the next re-quantization. Needs
    ``frozen``. Call it before making the optimizer (it replaces the step parameters)."""
    if weights and not frozen:
        raise ValueError("BSQ fine-tuning through the weights needs a frozen scheme")
    _quantizers(model)  # ValueError if there is no BSQ layer
    for layer in bsq_layers(model).values():
        q = layer.weight_quantizer
        q.frozen.fill_(bool(frozen))
        if bool(q.latent) == weights:
            pass  # a resumed fine-tuning keeps its trained weights
        elif weights:  # start from exactly step * W: the output does not move
            _sync_weight(layer)
            q.per_channel_()  # every channel starts at the layer's step
            q.latent.fill_(True)
        else:  # the bits take over again from the weights' W
            q.requantize(adjust=False, weight=layer.weight)
            q.latent.fill_(False)
            _sync_weight(layer)
        layer.weight.requires_grad_(bool(weights))


def check_(model: nn.Module) -> None:
    """ValueError naming the layer if a BSQ layer's state is out of range (loaded files)."""
    for name, layer in bsq_layers(model).items():
        try:
            layer.weight_quantizer.check()
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None


def layer_bits(model: nn.Module) -> dict[str, int]:
    """{layer: N} of every BSQ layer."""
    return {n: m.weight_quantizer.bits for n, m in bsq_layers(model).items()}


def avg_weight_bits(model: nn.Module, stored: bool = True) -> float:
    """Average bits per weight of the BSQ layers, weighted by their weight counts: as stored
    (``stored``: sign + N magnitude bits, 0 for an all-zero layer; what the packed model holds
    and computes) or BSQ's precision N alone (``stored=False``, the paper's count)."""
    qs = _quantizers(model)
    n = sum(q.numel for q in qs)
    if not n:
        return math.nan
    return sum(q.numel * (q.storage_bits if stored else q.bits) for q in qs) / n
