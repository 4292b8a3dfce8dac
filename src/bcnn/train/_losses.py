"""Training loss: cross-entropy (optionally label-smoothed) plus knowledge distillation."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DistillationLoss", "kd_loss"]


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    t = float(temperature)
    log_p = F.log_softmax(student.float() / t, dim=1)
    log_q = F.log_softmax(teacher.float() / t, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)


class DistillationLoss(nn.Module):
    """(1 - alpha) * CE(student, labels) + alpha * kd_loss(student, teacher); CE only when no
    teacher logits are given."""

    def __init__(
        self, alpha: float = 0.5, temperature: float = 2.0, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: Tensor, labels: Tensor, teacher: Tensor | None = None) -> Tensor:
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        if teacher is None or self.alpha == 0.0:
            return ce
        kd = kd_loss(logits, teacher, self.temperature)
        return (1.0 - self.alpha) * ce + self.alpha * kd
