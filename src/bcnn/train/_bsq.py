"""The trainer's BSQ stages (``bsq_alpha`` set; docs/bsq.md).

* step ``2`` is the BSQ stage: the model is converted to bit variables (:func:`bcnn.bsq.bsq_`,
  at ``bsq_bits``) from the weights it starts with (``init``, or step 1's), the loss gains
  ``bsq_alpha * bit_group_lasso``, the bits are clamped to [0, 2] after every step, and every
  ``bsq_interval`` epochs (rounded to whole iterations, before the batch that starts the
  interval) the model is re-quantized with precision adjustment; a last re-quantization ends
  the stage.
* step ``ft`` (``bsq_finetune`` epochs) fine-tunes with the scheme frozen: no regularizer,
  no precision change, weights clipped to each layer's range.

Re-quantization rewrites the bit variables, so the optimizer's moments of the BSQ parameters
are reset (as the official code re-creates its optimizer). Everything here is a function of
the model, the epoch and the config, so a resumed run repeats it exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BsqStage", "make_bsq_stage"]


class BsqStage:
    def __init__(self, alpha: float, bits: int, interval: float, finetune: bool) -> None:
        self.alpha = float(alpha)
        self.bits = int(bits)
        self.interval = float(interval)
        self.every = 0  # iterations between re-quantizations (set by ``start``)
        self.finetune = finetune
        self.model: nn.Module | None = None
        self._last_reg = 0.0

    def structure(self, model: nn.Module) -> None:
        """Give a freshly built model the BSQ structure (its state is loaded afterwards)."""
        from ..bsq import bsq_

        bsq_(model, self.bits, init=False)
        self.model = model

    def convert(self, model: nn.Module) -> None:
        """Convert a model holding trained weights (the start of the BSQ stage)."""
        from ..bsq import bsq_

        bsq_(model, self.bits, init=True)
        self.model = model

    def start(self, model: nn.Module, per_epoch: int) -> None:
        from ..bsq import freeze_

        self.model = model
        self.every = max(1, round(self.interval * per_epoch))
        freeze_(model, self.finetune)

    def penalty(self, model: nn.Module) -> Tensor | None:
        if self.finetune or self.alpha == 0.0:
            return None
        from ..bsq import bit_group_lasso

        reg = bit_group_lasso(model)
        self._last_reg = float(reg.detach())
        return self.alpha * reg

    def after_step(self, model: nn.Module) -> None:
        from ..bsq import clamp_

        clamp_(model)

    def before_batch(self, model: nn.Module, iteration: int, opt: torch.optim.Optimizer) -> None:
        """Re-quantize before the batch of step ``iteration`` when an interval starts there."""
        if self.finetune or iteration == 0 or iteration % self.every:
            return
        self.requantize(model, opt)

    def requantize(self, model: nn.Module, opt: torch.optim.Optimizer | None) -> None:
        from ..bsq import bsq_layers, requantize_

        requantize_(model, adjust=not self.finetune)
        if opt is None:
            return
        for layer in bsq_layers(model).values():
            for p in layer.weight_quantizer.parameters():
                opt.state.pop(p, None)

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        from ..bsq import avg_weight_bits

        out: dict[str, Any] = {"avg_weight_bits": avg_weight_bits(model)}
        if not self.finetune:
            out["bsq_reg"] = self._last_reg
        return out

    def optimizer(self, model: nn.Module, lr: float, bits_lr: float) -> torch.optim.Adam:
        """Adam without weight decay; the bit variables at their own peak lr ``bits_lr``
        (they live in [0, 2]: at the weights' lr they would barely move)."""
        from ..bsq import bsq_layers

        bits = {id(p) for m in bsq_layers(model).values() for p in (m.weight_quantizer.pos,
                m.weight_quantizer.neg)}  # fmt: skip
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [  # the weights' group first: the trainer logs param_groups[0]'s lr
            {"params": [p for p in params if id(p) not in bits], "lr": lr},
            {"params": [p for p in params if id(p) in bits], "lr": bits_lr},
        ]
        return torch.optim.Adam(groups, lr=lr, weight_decay=0.0)

    def describe(self) -> str:
        if self.finetune:
            return ", BSQ fine-tuning (scheme frozen)"
        return (
            f", BSQ alpha {self.alpha:g} from {self.bits} bits, re-quantize every {self.every} it"
        )


def make_bsq_stage(cfg: Any, step: str) -> BsqStage | None:
    """The BSQ stage of ``step`` (None when the run or the step has none)."""
    if cfg.bsq_alpha is None or step not in ("2", "ft"):
        return None
    return BsqStage(cfg.bsq_alpha, cfg.bsq_bits, cfg.bsq_interval, finetune=step == "ft")
