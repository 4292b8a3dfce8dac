"""Run-time precision of a torch model: one function for every precision-switchable module.

A module is *precision-switchable* when it implements the small protocol
:class:`PrecisionSwitchable`: ``precision`` (its current ``(weight_bits, act_bits)``),
``default_precision``, ``allowed_precision`` (the bit widths it accepts) and
``set_precision(weight_bits, act_bits)``. The post-training bit-serial modules of
:func:`bcnn.engine.pbatch` implement it; so can any layer (k-bit QAT, any-precision).

>>> # set_precision(model, weight_bits=2)            every switchable layer at 2-bit weights
>>> # set_precision(model, layers={"fc1": (4, 8)})   one layer, the others unchanged
>>> # set_precision(model)                           every layer back to its default
>>> # with precision(model, weight_bits=2): ...      the same, restored on exit

This module imports no layer (it sits below ``bcnn.nn``): it walks ``named_modules()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "PrecisionSwitchable",
    "precision",
    "set_precision",
    "switchable_layers",
    "tune_precision",
]


@runtime_checkable
class PrecisionSwitchable(Protocol):
    """What :func:`set_precision` needs from a module."""

    @property
    def precision(self) -> tuple[int, int]: ...

    @property
    def default_precision(self) -> tuple[int, int]: ...

    @property
    def allowed_precision(self) -> tuple[tuple[int, ...], tuple[int, ...]]: ...

    def set_precision(self, weight_bits: int, act_bits: int) -> None: ...


def switchable_layers(model: Any) -> dict[str, PrecisionSwitchable]:
    """The precision-switchable modules of ``model`` by qualified name (the model itself is
    named ``""``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PrecisionSwitchable)}


def _check(name: str, layer: PrecisionSwitchable, w: int, a: int) -> None:
    aw, aa = layer.allowed_precision
    for what, v, allowed in (("weight_bits", w, aw), ("act_bits", a, aa)):
        if isinstance(v, bool) or not isinstance(v, int) or v not in allowed:
            lo, hi = min(allowed), max(allowed)
            span = f"{lo}..{hi}" if len(allowed) == hi - lo + 1 else str(tuple(allowed))
            raise ValueError(f"layer {name!r}: {what}={v!r} is not in {span}")


def set_precision(
    model: Any,
    weight_bits: int | None = None,
    act_bits: int | None = None,
    layers: Mapping[str, tuple[int | None, int | None]] | None = None,
) -> dict[str, tuple[int, int]]:
    """Set every switchable layer to ``weight_bits`` / ``act_bits`` (None: the layer's
    default), then apply ``layers`` overrides ``{module_name: (w, a)}`` (None in a pair: that
    layer's default). Everything is checked before anything changes. Returns the previous
    precisions ``{name: (w, a)}`` (what :func:`precision` restores)."""
    found = switchable_layers(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no precision-switchable layer "
            "(see bcnn.engine.pbatch or create_model(..., precisions=...))"
        )
    plan: dict[str, tuple[int, int]] = {}
    for name, layer in found.items():
        dw, da = layer.default_precision
        plan[name] = (
            dw if weight_bits is None else weight_bits,
            da if act_bits is None else act_bits,
        )
    for name, (w, a) in (layers or {}).items():
        if name not in found:
            known = ", ".join(repr(n) for n in list(found)[:8])
            more = ", ..." if len(found) > 8 else ""
            raise ValueError(f"unknown layer {name!r}; switchable layers: {known}{more}")
        dw, da = found[name].default_precision
        plan[name] = (dw if w is None else w, da if a is None else a)
    for name, (w, a) in plan.items():
        _check(name, found[name], w, a)
    prev = {name: layer.precision for name, layer in found.items()}
    for name, (w, a) in plan.items():
        found[name].set_precision(w, a)
    return prev


@contextmanager
def precision(
    model: Any,
    weight_bits: int | None = None,
    act_bits: int | None = None,
    layers: Mapping[str, tuple[int | None, int | None]] | None = None,
) -> Iterator[Any]:
    """``with precision(model, weight_bits=2): ...``: :func:`set_precision` for the block,
    then every layer back to what it was."""
    prev = set_precision(model, weight_bits, act_bits, layers)
    try:
        yield model
    finally:
        set_precision(model, layers=prev)


def tune_precision(
    model: Any,
    metric: Callable[[Any, Any], float],
    data: Any,
    tolerance: float,
    candidates: Iterable[int] = (6, 4, 3, 2, 1),
    act_bits: int | None = None,
) -> dict[str, tuple[int, int]]:
    """Greedy per-layer weight bits within an accuracy tolerance, without retraining.

    ``metric(model, data)`` (higher is better, e.g. accuracy) is measured with every layer at
    its default precision; then, layer by layer (largest first, by parameter count when
    known), each layer takes the lowest of ``candidates`` for which the metric stays at or
    above ``baseline - tolerance`` with the layers chosen so far (it stops at the first
    failing candidate, so ``candidates`` go from high to low). The model is left at the chosen
    precisions, which are returned ``{name: (w, a)}``."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    found = switchable_layers(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no precision-switchable layer")
    set_precision(model, act_bits=act_bits)
    floor = metric(model, data) - tolerance
    choice = {name: layer.precision for name, layer in found.items()}

    def size(name: str) -> int:
        params = getattr(found[name], "parameters", None)
        n = sum(p.numel() for p in params()) if params else 0
        return n or int(getattr(found[name], "packed_bytes", 0))

    for name in sorted(found, key=size, reverse=True):
        for w in candidates:
            if w >= choice[name][0]:
                continue
            trial = dict(choice)
            trial[name] = (w, choice[name][1])
            set_precision(model, layers=trial)
            if metric(model, data) >= floor:
                choice = trial
            else:
                break
    set_precision(model, layers=choice)
    return choice
