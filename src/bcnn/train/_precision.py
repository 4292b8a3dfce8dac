"""The trainer's numeric precision: ``fp32`` (plain backward + step) or an FP8 recipe
(``fp8``, ``fp8-hybrid``: :class:`bcnn.fp8.FP8Training`). ``bcnn.fp8`` is imported only when
an FP8 precision is asked for."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PRECISIONS", "Precision", "check_precision", "make_precision"]

PRECISIONS = ("fp32", "fp8", "fp8-hybrid")


def check_precision(precision: str, fp8: dict[str, Any]) -> None:
    """One-line errors for an unknown precision or recipe key (no torch import)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if fp8:
        from ..fp8._recipe import get_recipe

        get_recipe(precision if precision != "fp32" else "fp8", **fp8)


class Precision:
    """FP32: ``step`` = backward + optimizer step; no extra metrics or state."""

    def step(self, loss: Tensor, optimizer: torch.optim.Optimizer, iteration: int) -> bool:
        loss.backward()
        optimizer.step()
        return True

    def metrics(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        pass

    def describe(self) -> str:
        return ""

    def close(self) -> None:
        pass


class _FP8Precision(Precision):
    def __init__(self, session: Any) -> None:
        self.session = session

    def step(self, loss: Tensor, optimizer: torch.optim.Optimizer, iteration: int) -> bool:
        return bool(self.session.step(loss, iteration))

    def metrics(self) -> dict[str, Any]:
        return dict(self.session.metrics())

    def state_dict(self) -> dict[str, Any]:
        return dict(self.session.state_dict())

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.session.load_state_dict(d)

    def describe(self) -> str:
        r = self.session.recipe
        return (
            f", {r.name} ({r.forward_format} fwd / {r.backward_format} bwd, "
            f"{len(self.session.layers)} FP8 layers, loss scaling {r.loss_scaling}, "
            f"master {r.master})"
        )

    def close(self) -> None:
        self.session.close()


def make_precision(
    precision: str,
    fp8: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    log: Callable[[str], None] | None = None,
) -> Precision:
    """The precision of a training step; FP8 swaps ``model``'s layers in place and attaches
    master weights to ``optimizer`` (call before wrapping the model in DDP / compile)."""
    check_precision(precision, fp8)
    if precision == "fp32":
        return Precision()
    from ..fp8 import FP8Training, get_recipe

    recipe = get_recipe(precision, **fp8)
    return _FP8Precision(FP8Training(model, optimizer, recipe, total_steps=total_steps, log=log))
