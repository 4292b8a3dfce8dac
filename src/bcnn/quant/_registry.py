"""String aliases for quantizers: ``get_quantizer("ste_sign")``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["QuantizerLike", "get_quantizer", "list_quantizers", "register_quantizer"]

QuantizerLike = str | nn.Module | None

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_quantizer(alias: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a quantizer reachable as ``get_quantizer(alias)``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if alias in _REGISTRY:
            raise ValueError(f"quantizer alias {alias!r} is already registered")
        _REGISTRY[alias] = cls
        cls.alias = alias  # type: ignore[attr-defined]
        return cls

    return deco


def list_quantizers() -> list[str]:
    """The registered aliases, sorted."""
    return sorted(_REGISTRY)


def get_quantizer(spec: QuantizerLike, **kwargs: Any) -> nn.Module | None:
    """Resolve an alias string, pass an ``nn.Module`` through, keep ``None`` (= no quantizer)."""
    if spec is None or isinstance(spec, nn.Module):
        if kwargs:
            raise ValueError("keyword arguments are only accepted with a quantizer alias")
        return spec
    if isinstance(spec, str):
        try:
            return _REGISTRY[spec](**kwargs)
        except KeyError:
            raise ValueError(
                f"unknown quantizer {spec!r}; known: {', '.join(list_quantizers())}"
            ) from None
    raise TypeError(f"quantizer must be an alias string, an nn.Module or None, not {type(spec)}")
