"""Model registry: ``create_model(name, num_classes=..., binary=True, **kw)`` (timm style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a factory under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, num_classes: int = 10, binary: bool = True, **kw: Any) -> nn.Module:
    """Build a registered model. ``binary=False`` gives the float twin of the same topology.

    The arguments are remembered on ``model.bcnn_config`` so that checkpoints can rebuild it.
    """
    try:
        factory = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None
    model = factory(num_classes=num_classes, binary=binary, **kw)
    model.bcnn_config = {  # type: ignore[assignment]
        "name": name,
        "num_classes": num_classes,
        "binary": binary,
        "kwargs": dict(kw),
    }
    return model
