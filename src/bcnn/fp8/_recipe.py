"""FP8 training recipes as dataclass configs (no torch import: the trainer's config validates
``fp8:`` overrides through this module cheaply)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["RECIPES", "Recipe", "get_recipe"]

_FORMATS = ("e5m2", "e4m3")
_MASTERS = ("fp32", "fp16", "bf16")
_SCALINGS = ("none", "constant", "dynamic")


@dataclass(frozen=True)
class Recipe:
    """How a model trains in FP8 (emulated). Fields, with the ``fp8`` recipe's values:

    - ``forward_format`` (``e5m2``): weights and activations at the inputs of every FP8
      conv/linear, round-to-nearest-even.
    - ``backward_format`` (``e5m2``): errors (dL/dy) and weight gradients (dL/dw).
    - ``stochastic_rounding`` (True): of errors and weight gradients (else RNE).
    - ``loss_scaling``: ``none`` (scale 1), ``constant`` (``init_scale`` throughout) or
      ``dynamic`` (the *enhanced* scaler: x``backoff_factor`` on inf/NaN gradients, the step
      skipped; x``growth_factor`` after ``growth_interval`` finite steps; never below a floor
      that starts at ``min_scale`` and is raised to ``floor`` at training fraction ``t`` for each
      ``(t, floor)`` of ``floor_schedule``; never above ``max_scale``).
    - ``master`` (``fp16``): the stored copy of every parameter, updated with
      ``master_rounding`` (``stochastic``); ``fp32`` keeps the optimizer's FP32 update.
    - ``skip_first`` / ``skip_last`` (True): keep the first and last Conv2d/Linear (in
      ``named_modules`` order) in FP32; ``skip``: more module names (fnmatch patterns).
      Norms and every other module always stay FP32.
    - ``patience`` (3): consecutive non-finite losses before the run stops;
      ``floor_warn`` (20): consecutive overflows at the floor before a warning in the log,
      ``floor_stop`` (200): ... before the run stops.
    """

    name: str = "fp8"
    forward_format: str = "e5m2"
    backward_format: str = "e5m2"
    stochastic_rounding: bool = True
    loss_scaling: str = "dynamic"
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 200
    min_scale: float = 2.0**10
    floor_schedule: tuple[tuple[float, float], ...] = ((0.5, 2.0**12),)
    max_scale: float = 2.0**24
    master: str = "fp16"
    master_rounding: str = "stochastic"
    skip_first: bool = True
    skip_last: bool = True
    skip: tuple[str, ...] = ()
    patience: int = 3
    floor_warn: int = 20
    floor_stop: int = 200

    def __post_init__(self) -> None:
        for k in ("forward_format", "backward_format"):
            if getattr(self, k) not in _FORMATS:
                raise ValueError(f"unknown format {getattr(self, k)!r}; known: e5m2, e4m3")
        if self.loss_scaling not in _SCALINGS:
            raise ValueError(
                f"unknown loss_scaling {self.loss_scaling!r}; known: {', '.join(_SCALINGS)}"
            )
        if self.master not in _MASTERS:
            raise ValueError(f"unknown master {self.master!r}; known: {', '.join(_MASTERS)}")
        if self.master_rounding not in ("nearest", "stochastic"):
            raise ValueError(
                f"unknown rounding {self.master_rounding!r}; known: nearest, stochastic"
            )
        if not (0 < self.min_scale <= self.init_scale <= self.max_scale):
            raise ValueError("loss scales need 0 < min_scale <= init_scale <= max_scale")
        if not (0 < self.backoff_factor < 1 < self.growth_factor) or self.growth_interval < 1:
            raise ValueError("need 0 < backoff_factor < 1 < growth_factor and growth_interval >= 1")
        for t, floor in self.floor_schedule:
            if not (0 <= t <= 1 and floor > 0):
                raise ValueError(
                    f"floor_schedule entries are (fraction in [0, 1], floor > 0): {t, floor}"
                )
        if min(self.patience, self.floor_warn, self.floor_stop) < 1:
            raise ValueError("patience, floor_warn and floor_stop must be >= 1")

    def replace(self, **changes: Any) -> Recipe:
        return _from_dict({**dataclasses.asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["floor_schedule"] = [list(p) for p in self.floor_schedule]
        d["skip"] = list(self.skip)
        return d


def _from_dict(d: dict[str, Any]) -> Recipe:
    names = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(
            f"unknown fp8 recipe keys: {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    d = dict(d)
    if "floor_schedule" in d:
        d["floor_schedule"] = tuple((float(t), float(f)) for t, f in d["floor_schedule"])
    if "skip" in d:
        d["skip"] = (d["skip"],) if isinstance(d["skip"], str) else tuple(d["skip"])
    for k in ("init_scale", "min_scale", "max_scale", "growth_factor", "backoff_factor"):
        if k in d:
            d[k] = float(d[k])
    return Recipe(**d)


RECIPES: dict[str, Recipe] = {
    "fp8": Recipe(),
    "fp8-hybrid": Recipe(name="fp8-hybrid", forward_format="e4m3"),
}


def get_recipe(recipe: str | Recipe | dict[str, Any] = "fp8", **overrides: Any) -> Recipe:
    """A recipe by name (``fp8``, ``fp8-hybrid``), a :class:`Recipe`, or a dict of fields
    (``{"name": "fp8", ...}`` starts from that recipe); ``overrides`` replace fields.

    >>> get_recipe("fp8", loss_scaling="none").loss_scaling
    'none'
    """
    if isinstance(recipe, dict):
        d = dict(recipe)
        base = get_recipe(d.pop("name", "fp8"))
        return base.replace(**d, **overrides)
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"unknown fp8 recipe {recipe!r}; known: {', '.join(RECIPES)}")
        recipe = RECIPES[recipe]
    return recipe.replace(**overrides) if overrides else recipe
