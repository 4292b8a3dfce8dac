"""The trainer's BSQ stages (``bsq_alpha`` set; docs/bsq.md).

* step ``2`` is the BSQ stage: the model is converted to bit variables (:func:`bcnn.bsq.bsq_`,
  at ``bsq_bits``) from the weights it starts with (``init``, or step 1's), the group Lasso
  weighs in with ``bsq_alpha`` (see :class:`BsqStage`), the bits are clamped to [0, 2] after
  every step, and every
  ``bsq_interval`` epochs (rounded to whole iterations, before the batch that starts the
  interval) the model is re-quantized with precision adjustment; a last re-quantization ends
  the stage.
* step ``ft`` (``bsq_finetune`` epochs) fine-tunes with the scheme frozen: no regularizer,
  no precision change, weights clipped to each layer's range. ``bsq_finetune_mode`` says
  what trains: the bit variables at a tenth of the lr (``bits``, the official code), or each
  layer's float weight through its frozen grid with a straight-through rounding, at step 2's
  lr (``weights``: the quantization-aware training the uniform models get).

Re-quantization rewrites the bit variables, so their momentum (or Adam moments) is reset
(as the official code re-creates its optimizer). Everything here is a function of
the model, the epoch and the config, so a resumed run repeats it exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BsqStage", "make_bsq_stage"]


class BsqStage:
    """One BSQ stage of a run (step ``2``: free scheme; ``ft``: frozen), on the step's
    learning-rate schedule; every parameter but the bit variables stays with the trainer's
    Adam. The bit variables (``kind``):

    * ``"sgd"``: SGD with momentum 0.9 at ``bits_lr`` on task loss + alpha * R, as the
      official code trains them;
    * ``"adam"``: Adam at ``bits_lr`` on the task loss, and the group Lasso applied decoupled
      (``p -= lr * alpha * dR/dp`` after each step, as AdamW decouples weight decay): Adam's
      steps ignore the gradient's size, so added to the loss ``alpha`` would barely matter.
    """

    MOMENTUM = 0.9

    def __init__(
        self,
        alpha: float,
        bits: int,
        interval: float,
        bits_lr: float,
        finetune: bool,
        kind: str = "sgd",
        through_weights: bool = False,
        grid: str = "zero",
    ) -> None:
        if kind not in ("sgd", "adam"):
            raise ValueError(f"BSQ optimizer must be sgd or adam, got {kind!r}")
        self.kind = kind
        self._opt: torch.optim.Optimizer | None = None
        self.alpha = float(alpha)
        self.bits = int(bits)
        self.interval = float(interval)
        self.bits_lr = float(bits_lr)
        self.every = 0  # iterations between re-quantizations (set by ``start``)
        self.finetune = finetune
        self.through_weights = finetune and through_weights
        self.grid = grid
        self.base_lr = 1.0
        self._momentum: dict[str, Tensor] = {}
        self._last_reg = 0.0

    def structure(self, model: nn.Module) -> None:
        """Give a freshly built model the BSQ structure (its state is loaded afterwards)."""
        from ..bsq import bsq_

        bsq_(model, self.bits, init=False, grid=self.grid)

    def convert(self, model: nn.Module) -> None:
        """Convert a model holding trained weights (the start of the BSQ stage)."""
        from ..bsq import bsq_

        bsq_(model, self.bits, init=True, grid=self.grid)

    def start(self, model: nn.Module, per_epoch: int) -> None:
        """Before the optimizer is made: the schedule, and which tensors train (fine-tuning
        ``through_weights``: the float weights, not the bits)."""
        from ..bsq import freeze_

        self.every = max(1, round(self.interval * per_epoch))
        freeze_(model, self.finetune, weights=self.through_weights)

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Adam:
        """Adam (no weight decay) over everything but the bit variables (``"adam"``: them
        too, in a second group at ``bits_lr``)."""
        bits = {id(p) for p in self._bit_params(model).values()}
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in bits]
        self.base_lr = lr
        groups: list[dict[str, Any]] = [{"params": params, "lr": lr}]
        if self.kind == "adam":
            groups.append({"params": list(self._bit_params(model).values()), "lr": self.bits_lr})
        self._opt = torch.optim.Adam(groups, lr=lr, weight_decay=0.0)
        return self._opt

    @staticmethod
    def _bit_params(model: nn.Module) -> dict[str, nn.Parameter]:
        from ..bsq import bsq_layers

        out = {}
        for name, layer in bsq_layers(model).items():
            for k, p in layer.weight_quantizer.bit_parameters().items():
                out[f"{name}.{k}"] = p
        return out

    def penalty(self, model: nn.Module) -> Tensor | None:
        if self.finetune or self.alpha == 0.0 or self.kind == "adam":
            return None
        from ..bsq import bit_group_lasso

        reg = bit_group_lasso(model)
        self._last_reg = float(reg.detach())
        return self.alpha * reg

    @torch.no_grad()
    def step_bits(self, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """After the optimizer's step (before the scheduler's), at the lr it just used: the
        bits' SGD-momentum step (``"sgd"``) or the decoupled group-Lasso step (``"adam"``),
        then the clamp into [0, 2]. Nothing when fine-tuning through the weights (the bits
        do not train then; the stage's last re-quantization re-writes them)."""
        from ..bsq import bit_group_lasso, clamp_

        if self.through_weights:
            return
        lr = self.bits_lr * float(opt.param_groups[0]["lr"]) / self.base_lr
        if self.kind == "adam":  # Adam stepped them; now the decoupled group-Lasso step
            if not self.finetune and self.alpha != 0.0:
                params = list(self._bit_params(model).values())
                with torch.enable_grad():
                    reg = bit_group_lasso(model)
                    grads = torch.autograd.grad(reg, params)
                self._last_reg = float(reg.detach())
                for p, g in zip(params, grads, strict=True):
                    p.sub_(g, alpha=lr * self.alpha)
            clamp_(model)
            return
        for key, p in self._bit_params(model).items():
            if p.grad is None:
                continue
            buf = self._momentum.get(key)
            if buf is None:
                buf = self._momentum[key] = p.grad.detach().clone()
            else:
                buf.mul_(self.MOMENTUM).add_(p.grad)
            p.add_(buf, alpha=-lr)
            p.grad = None  # the trainer's zero_grad only covers its optimizer's parameters
        clamp_(model)

    def before_batch(self, model: nn.Module, iteration: int) -> None:
        """Re-quantize before the batch of step ``iteration`` when an interval starts there."""
        if self.finetune or iteration == 0 or iteration % self.every:
            return
        self.requantize(model)

    def requantize(self, model: nn.Module) -> None:
        """Re-quantize (adjusting precisions unless frozen); the bits' momentum restarts (the
        official code re-creates its optimizer)."""
        from ..bsq import requantize_

        requantize_(model, adjust=not self.finetune)
        self._momentum.clear()
        if self._opt is not None and self.kind == "adam":
            for p in self._bit_params(model).values():
                self._opt.state.pop(p, None)

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": {k: v.detach().cpu().clone() for k, v in self._momentum.items()}}

    def load_state_dict(self, d: dict[str, Any], device: torch.device) -> None:
        self._momentum = {k: v.to(device) for k, v in d.get("momentum", {}).items()}

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        from ..bsq import avg_weight_bits

        out: dict[str, Any] = {"avg_weight_bits": avg_weight_bits(model)}
        if not self.finetune:
            out["bsq_reg"] = self._last_reg
        return out

    def describe(self) -> str:
        if self.through_weights:
            return ", BSQ fine-tuning (scheme frozen, float weights through it)"
        if self.finetune:
            return f", BSQ fine-tuning (scheme frozen, bits lr {self.bits_lr:g})"
        return (
            f", BSQ alpha {self.alpha:g} from {self.bits} bits ({self.grid} grid), "
            f"bits lr {self.bits_lr:g}, re-quantize every {self.every} it"
        )


def make_bsq_stage(cfg: Any, step: str) -> BsqStage | None:
    """The BSQ stage of ``step`` (None when the run or the step has none)."""
    if cfg.bsq_alpha is None or step not in ("2", "ft"):
        return None
    ft = step == "ft"  # fine-tuning: a tenth of the lr, for the bits as for the rest
    return BsqStage(
        cfg.bsq_alpha,
        cfg.bsq_bits,
        cfg.bsq_interval,
        cfg.bsq_lr * (0.1 if ft else 1.0),
        ft,
        cfg.bsq_optimizer,
        cfg.bsq_finetune_mode == "weights",
        getattr(cfg, "bsq_grid", "zero"),
    )
