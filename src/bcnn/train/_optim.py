"""Adam with per-group weight decay, warm-up + linear/cosine decay to zero, latent clipping."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["binarised_weight_names", "clip_latent_weights", "lr_lambda", "make_optimizer"]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam; weight decay (if any) on conv/linear weights only (not BN, biases, thresholds)."""
    decay: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() > 1 else other).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    return torch.optim.Adam(groups, lr=lr)


def lr_lambda(total: int, warmup: int, schedule: str) -> Callable[[int], float]:
    """Multiplier of the peak lr at iteration i: linear warm-up over ``warmup`` iterations,
    then cosine or linear decay reaching zero at ``total``."""
    total = max(int(total), 1)
    warmup = min(max(int(warmup), 0), total - 1)

    def f(i: int) -> float:
        if i < warmup:
            return (i + 1) / (warmup + 1)
        t = min((i - warmup) / max(total - warmup, 1), 1.0)
        if schedule == "linear":
            return 1.0 - t
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def binarised_weight_names(model: nn.Module) -> set[str]:
    """Parameter names of the weights that a binary model binarises (modules with a weight
    quantizer). Use it on the binary model: step 1's model has the same keys."""
    names = set()
    for mname, m in model.named_modules():
        if getattr(m, "weight_quantizer", None) is not None and isinstance(
            getattr(m, "weight", None), nn.Parameter
        ):
            names.add(f"{mname}.weight" if mname else "weight")
    return names


@torch.no_grad()
def clip_latent_weights(params: list[nn.Parameter], bound: float = 1.0) -> None:
    for p in params:
        p.clamp_(-bound, bound)
