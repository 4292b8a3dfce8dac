"""Evaluation of a torch model on a loader: loss, top-1, top-5."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._dist import DistInfo, all_reduce_sum

__all__ = ["autocast_context", "evaluate", "topk_correct"]


def autocast_context(device: torch.device, enabled: bool) -> Any:
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == labels[:, None]).any(dim=1).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device | str = "cpu",
    *,
    amp: bool = False,
    dist_info: DistInfo | None = None,
) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy and n over the loader (summed over ranks)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum = c1 = c5 = n = 0.0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with autocast_context(device, amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            c1 += topk_correct(logits, y, 1)
            c5 += topk_correct(logits, y, 5)
            n += len(y)
    finally:
        model.train(was_training)
    loss_sum, c1, c5, n = all_reduce_sum([loss_sum, c1, c5, n], dist_info or DistInfo(), device)
    if n == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "n": 0}
    return {"loss": loss_sum / n, "top1": c1 / n, "top5": c5 / n, "n": int(n)}
