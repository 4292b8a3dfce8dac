"""Layer emitters: bcnn modules -> ONNX nodes, in torch's float order (see docs/export.md).

Both formats share every node but the quantizers:

* ``onnx``: a sign is ``Where(GreaterOrEqual(x, 0), 1, -1)`` (sign(0) = +1; ONNX's ``Sign``
  gives 0 there); a k-bit activation is ``Div(step) -> Clip -> Div(2) -> Floor -> Mul(2) ->
  Add(1)`` (the odd grid); weights are int8/int16 initializers with a ``Cast``.
* ``qonnx``: ``BipolarQuant`` (scale 1: x >= 0 -> +1) and ``Quant`` nodes, float weights,
  ``MultiThreshold`` where a batch norm (or a whole integer conv + element-wise chain) meets a
  sign.

Binary and k-bit convolutions run on exact integers (+-1 values, odd grid values, one-padding
with the grid's pad value), then scale; batch norm is ``fma(x, alpha, beta)`` as ATen computes
it on the CPU, written as ``Cast(double) -> Mul -> Add -> Cast(float)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._graph import QONNX_DOMAIN, Graph, UnsupportedError

__all__ = ["Emitter"]

_F32_MAX = float(np.finfo(np.float32).max)


def _np(t: Any) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy(), dtype=np.float32)


class Emitter:
    """Writes one bcnn module at a time into a :class:`Graph`; values are named strings."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.pool_sizes: dict[int, tuple[int, int]] = {}  # id(AvgPool2d) -> static input (H, W)
        self.q = g.qonnx
        self.onnx = g.onnx

    # ------------------------------------------------------------------ small helpers
    def kind(self, v: str) -> tuple[str, int]:
        return self.g.kinds[v]

    def _vec(self, base: str, arr: np.ndarray, v: str, dtype: Any = np.float32) -> str:
        """A per-channel initializer shaped to broadcast over value ``v`` (C,) or (C, 1, 1)."""
        kind, c = self.kind(v)
        arr = np.asarray(arr, dtype=dtype).reshape(-1)
        if arr.size != c:
            raise UnsupportedError(f"{base}: {arr.size} channels, the input has {c}")
        shape = (c,) if kind in ("vector", "vpm1") else (c, 1, 1)
        return self.g.init(base, arr.reshape(shape))

    def _out(self, v: str, float_kind: bool = True) -> tuple[str, int]:
        kind, c = self.kind(v)
        vec = kind in ("vector", "vpm1")
        if float_kind:
            return ("vector" if vec else "stream", c)
        return ("vpm1" if vec else "pm1", c)

    def binop(self, op: str, a: str, b: str, base: str) -> str:
        return self.g.node(op, [a, b], base, kind=self._out(a))

    # ------------------------------------------------------------------ element-wise
    def elementwise(self, m: Any, src: str, what: str) -> str:
        """BatchNorm / LearnableBias / RPReLU / Scale / Identity, exactly as torch runs them."""
        from torch import nn

        from ..nn import LearnableBias, RPReLU, Scale

        g = self.g
        if isinstance(m, nn.Identity):
            return src
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            from ..engine._pack import _bn_alpha_beta

            try:
                alpha, beta = _bn_alpha_beta(m)
            except ValueError as e:
                raise UnsupportedError(f"{what}: {e}") from None
            d = self.onnx.TensorProto.DOUBLE
            x = g.node("Cast", [src], f"{what}.f64", to=d, kind=self._out(src))
            x = self.binop("Mul", x, self._vec(f"{what}.alpha", alpha, src, np.float64), what)
            x = self.binop("Add", x, self._vec(f"{what}.beta", beta, src, np.float64), what)
            return g.node("Cast", [x], what, to=self.onnx.TensorProto.FLOAT, kind=self._out(src))
        if isinstance(m, LearnableBias):
            return self.binop("Add", src, self._vec(f"{what}.bias", _np(m.bias), src), what)
        if isinstance(m, RPReLU):
            x = self.binop("Sub", src, self._vec(f"{what}.gamma", _np(m.gamma), src), what)
            x = self.binop("PRelu", x, self._vec(f"{what}.slope", _np(m.slope), src), what)
            return self.binop("Add", x, self._vec(f"{what}.zeta", _np(m.zeta), src), what)
        if isinstance(m, Scale):
            x = self.binop("Mul", src, self._vec(f"{what}.weight", _np(m.weight), src), what)
            return self.binop("Add", x, self._vec(f"{what}.bias", _np(m.bias), src), what)
        raise UnsupportedError(f"{what}: unsupported module {type(m).__name__}")

    def chain(self, mods: list[Any], src: str, what: str) -> str:
        for i, m in enumerate(mods):
            src = self.elementwise(m, src, f"{what}.{i}" if len(mods) > 1 else what)
        return src

    # ------------------------------------------------------------------ quantizers
    def sign(self, src: str, what: str) -> str:
        """+1 where x >= 0, else -1 (sign(0) = +1)."""
        g = self.g
        kind = self._out(src, float_kind=False)
        if self.q:
            return g.node("BipolarQuant", [src, g.const(1.0)], what, domain=QONNX_DOMAIN, kind=kind)
        ge = g.node("GreaterOrEqual", [src, g.const(0.0)], f"{what}.ge")
        return g.node("Where", [ge, g.const(1.0), g.const(-1.0)], what, kind=kind)

    def threshold(self, src: str, thr: np.ndarray, negate: np.ndarray | None, what: str) -> str:
        """+1 where (negate ? -x : x) >= thr[c], else -1 (a folded affine + sign)."""
        g = self.g
        if negate is not None and negate.any():
            m = np.where(negate, -1.0, 1.0).astype(np.float32)
            src = self.binop("Mul", src, self._vec(f"{what}.flip", m, src), f"{what}.flip")
        kind = self._out(src, float_kind=False)
        thr = np.clip(np.asarray(thr, np.float64), -_F32_MAX, _F32_MAX).astype(np.float32)
        if self.q:
            t = g.init(f"{what}.thresholds", thr.reshape(-1, 1))
            layout = "NC" if kind[0] == "vpm1" else "NCHW"
            return g.node(
                "MultiThreshold", [src, t], what, domain=QONNX_DOMAIN, kind=kind,
                out_dtype="BIPOLAR", out_scale=2.0, out_bias=-1.0, data_layout=layout,
            )  # fmt: skip
        ge = g.node("GreaterOrEqual", [src, self._vec(f"{what}.thresholds", thr, src)], what)
        return g.node("Where", [ge, g.const(1.0), g.const(-1.0)], what, kind=kind)

    def bn_sign(self, bn: Any, src: str, what: str) -> str:
        """sign(BN(x)) -> one float threshold per channel, found with torch's BN as the oracle."""
        from ..engine._pack import _call_bn, _float_threshold

        _, c = self.kind(src)
        if bn.num_features != c:
            raise UnsupportedError(f"{what}: batch norm width {bn.num_features} != {c}")
        if not bn.track_running_stats or bn.running_mean is None:
            raise UnsupportedError(f"{what}: batch norm without running statistics")
        t, mode = _float_threshold(lambda x: _call_bn(bn, x), c)
        neg = mode == -1
        thr = np.where(neg, -t.astype(np.float64), t.astype(np.float64))
        thr = np.where(mode == 0, np.where(t >= 0, -np.inf, np.inf), thr)  # constant channels
        return self.threshold(src, thr, neg, what)

    def act_quant(self, q: Any, src: str, what: str) -> tuple[str, np.ndarray]:
        """k-bit activation -> (integer grid values X, step float32 ()) as q.integer computes."""
        from ..quant import grid_limits

        g = self.g
        if not bool(q.initialized):
            raise UnsupportedError(f"{what}: the input quantizer is not initialised (run a batch)")
        if q.step.numel() != 1:
            raise UnsupportedError(f"{what}: per-channel activation steps are not supported")
        step = _np(q.step.detach().abs().clamp_min(1e-8)).reshape(())
        lo, hi = grid_limits(q.bits, q.signed)
        kind = self._out(src)
        v = g.node("Div", [src, g.const(step)], f"{what}.v", kind=kind)
        if self.q:
            # signed: the odd grid value 2m + 1 of the k-bit integer m = floor(clip(v / 2))
            u = self.binop("Div", v, g.const(2.0), f"{what}.half") if q.signed else v
            x = g.node(
                "Quant", [u, g.const(1.0), g.const(0.0), g.const(float(q.bits))], f"{what}.q",
                domain=QONNX_DOMAIN, kind=kind, signed=int(q.signed), narrow=0,
                rounding_mode="FLOOR" if q.signed else "HALF_UP",
            )  # fmt: skip
            if not q.signed:
                return x, step
            return self.binop(
                "Add", self.binop("Mul", x, g.const(2.0), what), g.const(1.0), what
            ), step
        v = g.node("Clip", [v, g.const(float(lo)), g.const(float(hi))], f"{what}.clip", kind=kind)
        if q.signed:  # 2 * floor(v / 2) + 1
            f = g.node("Floor", [self.binop("Div", v, g.const(2.0), f"{what}.half")], f"{what}.f")
            self.g.kinds[f] = kind
            return self.binop(
                "Add", self.binop("Mul", f, g.const(2.0), what), g.const(1.0), what
            ), step
        x = g.node("Floor", [self.binop("Add", v, g.const(0.5), what)], what, kind=kind)
        return x, step

    def input_values(self, layer: Any, src: str, what: str) -> tuple[str, np.ndarray | None]:
        """The layer's input quantizer applied to ``src`` -> (values, step or None)."""
        from ..engine._bitserial_pack import is_kbit
        from ..quant import MagnitudeAwareSign, is_binary_quantizer

        q = layer.input_quantizer
        if is_kbit(q):
            return self.act_quant(q, src, f"{what}.act")
        if q is None or not is_binary_quantizer(q) or isinstance(q, MagnitudeAwareSign):
            name = type(q).__name__ if q is not None else "None"
            raise UnsupportedError(f"{what}: inputs must be quantized by a sign or k-bit ({name})")
        if self.kind(src)[0] in ("pm1", "vpm1"):
            return src, None
        return self.sign(src, f"{what}.sign"), None
