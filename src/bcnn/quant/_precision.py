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
    "UntrainedPrecision",
    "average_bits",
    "precision",
    "search_precision",
    "set_precision",
    "switchable_layers",
    "tune_precision",
]


class UntrainedPrecision(ValueError):
    """A precision (or transition) the model was never trained at: e.g. a batch-norm set
    without statistics (:class:`bcnn.nn.SwitchableBatchNorm`)."""


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


def _layer_size(layer: Any) -> int:
    w = getattr(layer, "weight", None)
    if w is not None and hasattr(w, "numel"):
        return int(w.numel())
    return int(getattr(layer, "packed_bytes", 0)) or 1


def _tied(layer: PrecisionSwitchable) -> bool:
    """Weights and activations move together (any-precision layers: the same trained set)."""
    aw, aa = layer.allowed_precision
    return tuple(aw) == tuple(aa)


def average_bits(model: Any, plan: Mapping[str, tuple[int, int]] | None = None) -> float:
    """The weight-count-weighted mean weight bits of the switchable layers (at ``plan``, else
    at their current precisions)."""
    found = switchable_layers(model)
    sizes = {n: _layer_size(m) for n, m in found.items()}
    bits = {n: (plan[n][0] if plan and n in plan else m.precision[0]) for n, m in found.items()}
    return sum(sizes[n] * bits[n] for n in found) / max(1, sum(sizes.values()))


def search_precision(
    model: Any,
    metric: Callable[[Any, Any], float],
    data: Any,
    budget_bits: float | None = None,
    *,
    cost: Callable[[Mapping[str, tuple[int, int]]], float] | None = None,
    budget: float | None = None,
) -> tuple[dict[str, tuple[int, int]], float]:
    """Greedy per-layer bit widths within a budget, without fine-tuning.

    The budget is ``budget_bits`` of the weight-count-weighted average weight bits
    (:func:`average_bits`), or ``budget`` of any ``cost(plan)`` (e.g. the packed engine's
    measured latency: :func:`bcnn.engine.latency_model`). Every layer starts at its default
    (highest) precision. While the cost is above the budget, each layer is tried one
    precision lower (weights and activations together where the layer was trained at the same
    set for both, as any-precision layers are; otherwise the weights alone), and the step that
    loses the least ``metric(model, data)`` per unit of cost saved is kept (a step into a
    precision the model was never trained at, :class:`UntrainedPrecision`, is skipped, and so
    is a step that saves nothing). Last, every uniform setting (one bit width for all layers)
    within the budget is scored too, and the best one replaces the greedy plan when it scores
    higher: a search never returns less than the best uniform precision that fits. Returns
    the chosen ``{name: (w, a)}`` (the model is left at it) and its metric; the budget may
    stay unmet when no further step is possible (check the cost of the returned plan)."""
    found = switchable_layers(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no precision-switchable layer")
    if (cost is None) == (budget_bits is None) or (cost is None) != (budget is None):
        raise ValueError("give budget_bits, or cost and budget")
    plan = {n: m.default_precision for n, m in found.items()}
    lowest = {
        n: (min(m.allowed_precision[0]), min(m.allowed_precision[1]) if _tied(m) else plan[n][1])
        for n, m in found.items()
    }
    if cost is None:
        limit = float(budget_bits)  # type: ignore[arg-type]
        floor = average_bits(model, lowest)
        if limit < floor:
            raise ValueError(f"budget_bits={limit} is below the lowest possible {floor:.3f}")

        def cost(p: Mapping[str, tuple[int, int]]) -> float:
            return average_bits(model, p)
    else:
        limit = float(budget)  # type: ignore[arg-type]
        floor = cost(lowest)
        if limit < floor:
            raise ValueError(f"budget {limit:g} is below the lowest possible {floor:.4g}")
    set_precision(model, layers=plan)
    score = metric(model, data)
    while cost(plan) > limit:
        best: tuple[float, str, tuple[int, int], float] | None = None
        now = cost(plan)
        for n, m in found.items():
            w, a = plan[n]
            lower = [b for b in m.allowed_precision[0] if b < w]
            if not lower:
                continue
            nw = max(lower)
            na = nw if _tied(m) else a
            trial = {**plan, n: (nw, na)}
            saved = now - cost(trial)
            if saved <= 0:
                continue
            set_precision(model, layers=trial)
            try:
                s = metric(model, data)
            except UntrainedPrecision:  # a transition training never visited: not a choice
                continue
            loss = (score - s) / saved
            if best is None or loss < best[0]:
                best = (loss, n, (nw, na), s)
        if best is None:
            break
        _, n, wa, score = best
        plan[n] = wa
    # the best uniform setting within the budget, when it beats the greedy path (whose
    # per-layer mixes can score below it, e.g. when their batch-norm sets trained less)
    fits = cost(plan) <= limit
    common = set.intersection(*(set(m.allowed_precision[0]) for m in found.values()))
    for k in sorted(common):
        trial = {n: (k, k if _tied(m) else plan[n][1]) for n, m in found.items()}
        if trial == plan or cost(trial) > limit:
            continue
        set_precision(model, layers=trial)
        try:
            s = metric(model, data)
        except UntrainedPrecision:
            continue
        if s > score or not fits:
            plan, score, fits = trial, s, True
    set_precision(model, layers=plan)
    return plan, score
