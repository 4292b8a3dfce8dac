"""Loss scaling for FP8 gradients: none, constant, or the enhanced dynamic scaler.

E5M2 keeps magnitudes in [2^-16, 57344]: errors of a CIFAR-size network (~1e-6) flush to zero
unless the loss is multiplied by a scale ``S`` before backward (gradients are divided by ``S``
in FP32 before the optimizer step). The *enhanced* scaler (Mellempudi et al. 2019) is a dynamic
scaler with a minimum: a plain dynamic scaler, after a burst of overflows, can back off so far
that most errors underflow for the rest of training; a floor, raised on a schedule as gradients
shrink during training, prevents that.

    on inf/NaN gradients : skip the step; S <- max(S * backoff, floor(t))
    after N finite steps : S <- min(S * growth, max_scale)
    floor(t)             : min_scale, raised to f_i once the training fraction t >= t_i
"""

from __future__ import annotations

from typing import Any

__all__ = ["LossScaler"]


class LossScaler:
    """``mode``: ``none`` | ``constant`` | ``dynamic``. ``total_steps`` maps the floor schedule's
    training fractions to steps. ``update(found_inf, step)`` after every backward."""

    def __init__(
        self,
        mode: str = "dynamic",
        init_scale: float = 2.0**16,
        *,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 200,
        min_scale: float = 1.0,
        floor_schedule: tuple[tuple[float, float], ...] = (),
        max_scale: float = 2.0**24,
        total_steps: int = 1,
    ) -> None:
        if mode not in ("none", "constant", "dynamic"):
            raise ValueError(f"unknown loss scaling {mode!r}; known: none, constant, dynamic")
        self.mode = mode
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self.floor_schedule = tuple(sorted((float(t), float(f)) for t, f in floor_schedule))
        self.max_scale = float(max_scale)
        self.total_steps = max(int(total_steps), 1)
        self.scale = 1.0 if mode == "none" else float(init_scale)
        self.good_steps = 0  # finite steps since the last change of scale
        self.overflows = 0  # steps with inf/NaN gradients (skipped), in total
        self.floor_hits = 0  # consecutive overflows while already at the floor

    def floor(self, step: int) -> float:
        """The minimum scale at ``step`` (0-based global step of the run)."""
        f = self.min_scale
        for t, v in self.floor_schedule:
            if step >= t * self.total_steps:
                f = max(f, v)
        return f

    def update(self, found_inf: bool, step: int) -> None:
        """Record one backward (``found_inf``: some gradient was inf/NaN) at ``step``."""
        if found_inf:
            self.overflows += 1
        if self.mode != "dynamic":
            return
        floor = self.floor(step + 1)
        if found_inf:
            self.good_steps = 0
            self.floor_hits = self.floor_hits + 1 if self.scale <= floor else 0
            self.scale = max(self.scale * self.backoff_factor, floor)
            return
        self.floor_hits = 0
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.good_steps = 0
            self.scale = min(self.scale * self.growth_factor, self.max_scale)
        self.scale = max(self.scale, floor)

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "scale": self.scale,
            "good_steps": self.good_steps,
            "overflows": self.overflows,
            "floor_hits": self.floor_hits,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("mode", self.mode) != self.mode:
            raise ValueError(f"loss scaler state is {d['mode']!r}, this run uses {self.mode!r}")
        self.scale = float(d["scale"])
        self.good_steps = int(d["good_steps"])
        self.overflows = int(d["overflows"])
        self.floor_hits = int(d["floor_hits"])
