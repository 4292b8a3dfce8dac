"""``fp8_training(model, recipe)``: run a model's Conv2d/Linear layers in FP8, in place.

Each eligible module keeps its class's own ``forward`` (padding conventions, quantizers,
per-channel scales of bcnn's binary layers all unchanged); its class is swapped for a subclass
whose ``forward`` runs under a torch-function mode that reroutes that forward's ``F.conv2d`` /
``F.linear`` calls to :func:`fp8_conv2d` / :func:`fp8_linear`. Parameters, buffers and
state-dict keys are untouched; :func:`remove_fp8` swaps the classes back.

For bcnn's binary layers the operands the convolution sees are +-1 (and EncodedConv2d's
plane-weighted signs, +-2^b): exact in both FP8 formats, so the forward is unchanged; what FP8
changes is the backward: errors and the (latent) weights' gradients.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ._functional import FP8Spec, fp8_conv2d, fp8_linear
from ._recipe import Recipe, get_recipe

__all__ = ["eligible_layers", "fp8_layers", "fp8_training", "remove_fp8"]

_CONV = {torch.conv2d, F.conv2d}
_LINEAR = {F.linear}


class _FP8Mode(TorchFunctionMode):
    def __init__(self, spec: FP8Spec) -> None:
        super().__init__()
        self.spec = spec

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _CONV:
            return fp8_conv2d(*args, **{**kwargs, "spec": self.spec})
        if func in _LINEAR:
            return fp8_linear(*args, **{**kwargs, "spec": self.spec})
        return func(*args, **kwargs)


class _FP8Layer:
    """Mixin placed in front of the layer's class."""

    fp8_spec: FP8Spec
    fp8_base: type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _FP8Mode(self.fp8_spec):
            return super().forward(*args, **kwargs)  # type: ignore[misc]


_CLASSES: dict[type, type] = {}


def _fp8_class(base: type) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"FP8{base.__name__}", (_FP8Layer, base), {"__module__": base.__module__})
        _CLASSES[base] = cls
    return cls


def eligible_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear modules (subclasses included), in ``named_modules`` order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def fp8_layers(model: nn.Module) -> dict[str, FP8Spec]:
    """The modules that currently run in FP8, with their specs."""
    return {n: m.fp8_spec for n, m in model.named_modules() if isinstance(m, _FP8Layer)}


def fp8_training(model: nn.Module, recipe: str | Recipe | dict[str, Any] = "fp8") -> list[str]:
    """Swap the eligible layers of ``model`` to FP8 in place; returns their names.

    Skipped: the first and last Conv2d/Linear (``recipe.skip_first`` / ``skip_last``), names
    matching ``recipe.skip`` (fnmatch patterns), and layers already in FP8. A model left with no
    eligible layer is a one-line ``ValueError``.
    """
    r = get_recipe(recipe)
    names = eligible_layers(model)
    skip = set()
    if names and r.skip_first:
        skip.add(names[0])
    if names and r.skip_last:
        skip.add(names[-1])
    mods = dict(model.named_modules())
    chosen = [
        n
        for n in names
        if n not in skip
        and not any(fnmatch.fnmatchcase(n, p) for p in r.skip)
        and not isinstance(mods[n], _FP8Layer)
    ]
    if not chosen:
        why = f"{len(names)} found, all skipped (first/last/skip list)" if names else "none found"
        raise ValueError(
            f"fp8_training: {type(model).__name__} has no Conv2d/Linear layer to run in FP8 ({why})"
        )
    for n in chosen:
        m = mods[n]
        spec = FP8Spec(
            forward=r.forward_format,
            backward=r.backward_format,
            error_rounding="stochastic" if r.stochastic_rounding else "nearest",
            wgrad_rounding="stochastic" if r.stochastic_rounding else "nearest",
        )
        base = type(m)
        m.__class__ = _fp8_class(base)
        m.fp8_spec = spec  # type: ignore[assignment]
        m.fp8_base = base  # type: ignore[assignment]
    return chosen


def remove_fp8(model: nn.Module) -> nn.Module:
    """Undo :func:`fp8_training` in place (the classes are swapped back); returns ``model``."""
    for m in model.modules():
        if isinstance(m, _FP8Layer):
            m.__class__ = m.fp8_base
            del m.fp8_spec, m.fp8_base
    return model
