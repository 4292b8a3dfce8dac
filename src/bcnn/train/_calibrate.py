"""Batch-norm calibration of any-precision models ("precise BN").

During any-precision training each BN set keeps running statistics of the batches that used
it, with momentum; sets of uniform precisions see fewer batches once the schedule turns to
per-layer mixes (Bit-Mixer's later stages), so their statistics lag the final weights.
:func:`calibrate_bn` re-estimates them after training, as Any-Precision DNN and the slimmable
networks do: for each precision, the sets it uses are reset and fed the exact average over
a fixed set of training images (momentum ``None``: a cumulative mean), without gradients.
Parameters, quantizer steps and every other set are left as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..nn import SwitchableBatchNorm
from ..quant import set_precision

__all__ = ["calibrate_bn"]


@torch.no_grad()
def calibrate_bn(
    model: nn.Module,
    images: torch.Tensor,
    configs: Sequence[Mapping[str, Any]],
    batch_size: int = 250,
) -> list[int]:
    """Re-estimate the running statistics of the BN sets each of ``configs`` (keyword
    arguments of :func:`bcnn.quant.set_precision`, e.g. ``{"weight_bits": 2, "act_bits": 2}``)
    uses, from ``images`` (training images: never the validation split). Returns the number
    of sets calibrated per config; the model is left in eval mode at its default precision.
    Batches of ``batch_size`` (the last may be smaller: its statistics weigh like the others,
    as a cumulative BN mean does)."""
    sites = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm)]
    if not sites:
        raise ValueError(f"{type(model).__name__} has no switchable batch norm to calibrate")
    if len(images) == 0 or batch_size < 1:
        raise ValueError("calibrate_bn needs images and batch_size >= 1")
    counts = []
    try:
        for cfg in configs:
            set_precision(model, **cfg)
            bns: dict[int, nn.modules.batchnorm._BatchNorm] = {}
            for s in sites:
                b = s.set_for(s.active_key)
                assert isinstance(b, nn.modules.batchnorm._BatchNorm)
                bns[id(b)] = b
            saved = [(b, b.momentum) for b in bns.values()]
            for b, _ in saved:
                b.reset_running_stats()
                b.momentum = None  # cumulative average over the batches
            model.train()
            for i in range(0, len(images), batch_size):
                model(images[i : i + batch_size])
            for b, m in saved:
                b.momentum = m
            counts.append(len(saved))
    finally:
        set_precision(model)
        model.eval()
    return counts
