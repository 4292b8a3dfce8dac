"""The element-wise steps after an integer accumulator (batch norm, scale, bias, RPReLU, residual
add), in torch's float32 order: :class:`_Epilogue` (numpy, any order of steps) and
:class:`_FusedEpilogue` (one numba call for the usual order). Shared by the reference plan, the
fast plan and the bit-serial ops."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["_E32", "_E64", "_ER", "_Epilogue", "_FusedEpilogue"]

_E32 = np.zeros(0, np.float32)
_E64 = np.zeros(0, np.float64)
_ER = np.zeros((0, 1), np.float32)


class _Epilogue:
    """The element-wise steps after an integer accumulator, in torch's float32 order."""

    def __init__(self, steps: list[dict[str, Any]], tensors: dict[str, np.ndarray]) -> None:
        self.steps: list[tuple[str, tuple[np.ndarray, ...], int]] = []
        for st in steps:
            kind = st["kind"]
            if kind == "scale":
                self.steps.append((kind, (tensors[st["scale"]],), 0))
            elif kind == "bias":
                self.steps.append((kind, (tensors[st["bias"]],), 0))
            elif kind == "bn":
                a = tensors[st["alpha"]].astype(np.float64)
                b = tensors[st["beta"]].astype(np.float64)
                self.steps.append((kind, (a, b), 0))
            elif kind == "affine":
                self.steps.append((kind, (tensors[st["weight"]], tensors[st["bias"]]), 0))
            elif kind == "rprelu":
                g, s, z = (tensors[st[k]] for k in ("gamma", "slope", "zeta"))
                self.steps.append((kind, (g, s, z), 0))
            elif kind == "add":
                self.steps.append((kind, (), int(st["repeat"])))

    def __call__(self, x: np.ndarray, residual: np.ndarray | None) -> np.ndarray:
        """x: float32 (..., C) (the accumulator values); returns float32."""
        for kind, t, rep in self.steps:
            if kind == "scale":
                x = x * t[0]
            elif kind == "bias":
                x = x + t[0]
            elif kind == "bn":
                x = (x.astype(np.float64) * t[0] + t[1]).astype(np.float32)
            elif kind == "affine":
                x = x * t[0]
                x = x + t[1]
            elif kind == "rprelu":
                x = x - t[0]
                x = np.where(x >= 0, x, x * t[1])
                x = x + t[2]
            elif kind == "add":
                assert residual is not None
                r = np.tile(residual, rep) if rep > 1 else residual
                x = r + x
        return x.astype(np.float32, copy=False)


class _FusedEpilogue:
    """[scale] [bias] [bn] [rprelu] [add] in this order, or None (use :class:`_Epilogue`)."""

    ORDER = ("scale", "bias", "bn", "rprelu", "add")

    @classmethod
    def build(cls, steps: list[dict[str, Any]], t: dict[str, np.ndarray]) -> Any:
        kinds = [s["kind"] for s in steps]
        pos = [cls.ORDER.index(k) for k in kinds]
        if pos != sorted(set(pos)):
            return None
        return cls(steps, t)

    def __init__(self, steps: list[dict[str, Any]], t: dict[str, np.ndarray]) -> None:
        d = {s["kind"]: s for s in steps}
        self.pre = t[d["scale"]["scale"]] if "scale" in d else _E32
        self.cb = t[d["bias"]["bias"]] if "bias" in d else _E32
        if "bn" in d:
            self.al = t[d["bn"]["alpha"]].astype(np.float64)
            self.be = t[d["bn"]["beta"]].astype(np.float64)
        else:
            self.al = self.be = _E64
        rp = d.get("rprelu")
        self.rp = tuple(t[rp[k]] for k in ("gamma", "slope", "zeta")) if rp else (_E32,) * 3
        self.flags = ("scale" in d, "bias" in d, "bn" in d, rp is not None, "add" in d)
        from ._fused import fused_epilogue

        self.fn = fused_epilogue

    def __call__(self, acc: np.ndarray, res: np.ndarray | None, out: np.ndarray) -> None:
        o = acc.shape[-1]
        r = _ER if res is None else res.reshape(-1, res.shape[-1])
        hp, hc, hb, hr, ha = self.flags
        g, sl, z = self.rp
        self.fn(
            acc.reshape(-1, o), self.pre, hp, self.cb, hc, self.al, self.be, hb,
            g, sl, z, hr, r, ha, out.reshape(-1, o),
        )  # fmt: skip
