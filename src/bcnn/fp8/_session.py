"""``FP8Training``: one object that a training loop calls instead of ``backward(); step()``.

fp8 = FP8Training(model, optimizer, "fp8", total_steps=...)
for step, (x, y) in enumerate(batches):
    optimizer.zero_grad()
    fp8.step(loss_fn(model(x), y), step)   # scaled backward, inf check, unscale, step
state = fp8.state_dict()                     # with the optimizer's, for an exact resume
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._master import MasterWeights
from ._recipe import Recipe, get_recipe
from ._scaler import LossScaler
from ._swap import fp8_layers, fp8_training, remove_fp8

__all__ = ["FP8Divergence", "FP8Training"]


class FP8Divergence(RuntimeError):
    """The run diverged beyond what loss scaling handles; the message names the step."""


def _log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


class FP8Training:
    """Swap ``model``'s layers (:func:`fp8_training`), attach 16-bit master weights to
    ``optimizer`` (``recipe.master``) and own the loss scaler. ``log``: where warnings go."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        recipe: str | Recipe | dict[str, Any] = "fp8",
        *,
        total_steps: int = 1,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.recipe = r = get_recipe(recipe)
        self.model = model
        self.optimizer = optimizer
        self.layers = fp8_training(model, r)
        self.scaler = LossScaler(
            r.loss_scaling,
            r.init_scale,
            growth_factor=r.growth_factor,
            backoff_factor=r.backoff_factor,
            growth_interval=r.growth_interval,
            min_scale=r.min_scale,
            floor_schedule=r.floor_schedule,
            max_scale=r.max_scale,
            total_steps=total_steps,
        )
        self.master = (
            MasterWeights(optimizer, r.master, r.master_rounding) if r.master != "fp32" else None
        )
        self.log = log or _log
        self.bad_losses = 0  # consecutive non-finite losses

    def step(self, loss: Tensor, step: int) -> bool:
        """Scaled backward, then the optimizer step unless a gradient is inf/NaN (the scaler
        backs off instead). Returns whether the optimizer stepped. Raises
        :class:`FP8Divergence` after ``recipe.patience`` non-finite losses in a row, or
        ``recipe.floor_stop`` overflows in a row at the minimum scale."""
        r, sc = self.recipe, self.scaler
        lv = float(loss.detach())
        if not math.isfinite(lv):
            self.bad_losses += 1
            sc.update(True, step)
            if self.bad_losses >= r.patience:
                raise FP8Divergence(
                    f"fp8: step {step + 1}: the loss is {lv} for {self.bad_losses} steps in a row "
                    f"(loss scale {sc.scale:g}): the run diverged"
                )
            return False
        self.bad_losses = 0
        (loss * sc.scale if sc.scale != 1.0 else loss).backward()
        grads = [
            p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None
        ]
        found_inf = bool(grads) and not bool(
            torch.stack([torch.isfinite(g).all() for g in grads]).all()
        )
        if not found_inf:
            if sc.scale != 1.0:
                torch._foreach_mul_(grads, 1.0 / sc.scale)
            self.optimizer.step()
        sc.update(found_inf, step)
        if sc.floor_hits == r.floor_warn:
            self.log(
                f"warning: fp8: step {step + 1}: gradients overflowed {sc.floor_hits} times in a "
                f"row at the minimum loss scale {sc.scale:g} (steps skipped); lower min_scale"
            )
        if sc.floor_hits >= r.floor_stop:
            raise FP8Divergence(
                f"fp8: step {step + 1}: gradients overflowed {sc.floor_hits} times in a row at "
                f"the minimum loss scale {sc.scale:g}: the run diverged"
            )
        return not found_inf

    def metrics(self) -> dict[str, Any]:
        return {"loss_scale": self.scaler.scale, "overflows": self.scaler.overflows}

    def flush_fractions(self) -> dict[str, dict[str, float]]:
        """Per FP8 layer: fraction of nonzero errors / weight gradients flushed to zero, since
        ``enable_flush_stats()``."""
        return {
            n: {k: s.stats.fraction(k) for k in ("error", "wgrad")}
            for n, s in fp8_layers(self.model).items()
        }

    def enable_flush_stats(self, on: bool = True) -> None:
        for s in fp8_layers(self.model).values():
            s.stats.enabled = on
            s.stats.counts.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "bad_losses": self.bad_losses}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.scaler.load_state_dict(d["scaler"])
        self.bad_losses = int(d.get("bad_losses", 0))

    def close(self) -> None:
        """Detach the master-weight hook and swap the layers back to their classes."""
        if self.master is not None:
            self.master.remove()
        remove_fp8(self.model)
