"""Matrix-op emitters: binary / k-bit convolutions, the encoded stem, linear layers."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._graph import QONNX_DOMAIN, UnsupportedError
from ._ops import Emitter, _np

__all__ = ["LayerEmitter", "weight_values"]


def weight_values(
    layer: Any, what: str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
    """(signs or odd grid integers in torch's layout, k-bit step per output or None, binary
    alpha per output or None, bits) of a layer's quantized weight."""
    import torch

    from ..engine._bitserial_pack import is_kbit
    from ..quant import is_binary_quantizer

    q = layer.weight_quantizer
    with torch.no_grad():
        if is_kbit(q):
            if not q.signed:
                raise UnsupportedError(f"{what}: k-bit weights must use the signed grid")
            if not bool(q.initialized):
                raise UnsupportedError(f"{what}: the weight quantizer is not initialised")
            x, sw = q.integer(layer.weight.detach().float())
            # a per-layer step (BSQ) applies to every output; BSQ's zero-grid integers
            # |W| <= 2^N - 1 share the odd grid's range at N bits (0 bits: all zero)
            steps = np.broadcast_to(_np(sw).reshape(-1), (x.shape[0],)).copy()
            return _np(x), steps, None, max(1, int(q.bits))
        if q is not None and is_binary_quantizer(q):
            qw = q(layer.weight.detach().float())
            a = qw.abs().reshape(qw.shape[0], -1)
            amax = a.amax(dim=1)
            if not bool((a == amax[:, None]).all()):
                raise UnsupportedError(f"{what}: binary weights are not +-alpha per channel")
            signs = np.where(_np(qw) < 0, -1.0, 1.0).astype(np.float32)
            return signs, None, (None if bool((amax == 1.0).all()) else _np(amax)), 1
    name = type(q).__name__ if q is not None else "None"
    raise UnsupportedError(f"{what}: weights must be quantized ({name})")


class LayerEmitter(Emitter):
    # ------------------------------------------------------------------ weights
    def weight(
        self, layer: Any, what: str, *, unit: bool = False, flip: Any = None, linear: bool = False
    ) -> tuple[str, np.ndarray | None, np.ndarray | None]:
        """(weight value, k-bit step per output or None, binary alpha per output or None).

        Binary weights are +-1 (times their per-channel alpha unless ``unit``: then the
        alpha is returned for the caller to fold); k-bit weights are odd grid integers, their
        step returned apart (torch scales after the integer conv). ``flip``: output channels
        whose signs are negated (folded decreasing thresholds). ``linear``: (out, in) weights
        stored transposed for MatMul."""
        g = self.g
        ints, step, alpha, bits = weight_values(layer, what)
        rows = (-1,) + (1,) * (ints.ndim - 1)
        if flip is not None:
            ints = ints * np.where(flip, -1.0, 1.0).astype(np.float32).reshape(rows)
        scaled = alpha is not None and not unit
        vals = ints * alpha.reshape(rows) if alpha is not None and scaled else ints
        if linear:
            ints, vals = np.ascontiguousarray(ints.T), np.ascontiguousarray(vals.T)
        if self.q:
            w = g.init(f"{what}.weight", ints.astype(np.float32))
            zero = getattr(layer.weight_quantizer, "zero_grid", False)  # BSQ: 0 is a value
            if bits == 1 and not zero:
                sc = g.const(1.0)
                if alpha is not None and scaled:
                    sc = g.init(f"{what}.alpha", alpha.reshape((1, -1) if linear else rows))
                w = g.node("BipolarQuant", [w, sc], f"{what}.wq", domain=QONNX_DOMAIN)
            else:  # odd integers (and BSQ's |W| <= 2^N - 1) lie on the narrow (k+1)-bit grid:
                # this Quant is their identity
                w = g.node(
                    "Quant", [w, g.const(1.0), g.const(0.0), g.const(float(bits + 1))],
                    f"{what}.wq", domain=QONNX_DOMAIN, signed=1, narrow=1, rounding_mode="ROUND",
                )  # fmt: skip
            return w, step, alpha
        if scaled:  # torch convolves with alpha * sign(w): keep those floats
            return g.init(f"{what}.weight", vals.astype(np.float32)), None, alpha
        dt = np.int8 if np.abs(ints).max(initial=0) <= 127 else np.int16
        w = g.init(f"{what}.weight", ints.astype(dt))  # small integers, cast once at load
        return g.node("Cast", [w], f"{what}.w", to=self.onnx.TensorProto.FLOAT), step, alpha

    def _scale_bias(
        self, y: str, sx: np.ndarray | None, sw: np.ndarray | None, bias: Any, what: str
    ) -> str:
        """torch's epilogue of a quantized layer: y * (step_x * step_w[o]) (float32), + bias.

        The product is taken in float64 and rounded once to float32: the same value as torch's
        float32 product of the integer y, and a Conv -> Mul pattern that onnxruntime would
        fold into the weights (non-integer sums, another rounding) does not appear."""
        g = self.g
        if sx is not None or sw is not None:
            kind = self._out(y)
            s = sw if sx is None else np.float32(sx) * (sw if sw is not None else np.float32(1.0))
            s = np.asarray(s, np.float32).astype(np.float64)
            yd = g.node("Cast", [y], f"{what}.f64", to=self.onnx.TensorProto.DOUBLE, kind=kind)
            sc = g.const(s) if s.ndim == 0 else self._vec(f"{what}.scale", s, y, np.float64)
            yd = self.binop("Mul", yd, sc, f"{what}.scale")
            y = g.node("Cast", [yd], f"{what}.scaled", to=self.onnx.TensorProto.FLOAT, kind=kind)
        if bias is not None:
            y = self.binop("Add", y, self._vec(f"{what}.bias", _np(bias), y), f"{what}.bias")
        return y

    def _conv(self, layer: Any, x: str, w: str, pad_value: float, cout: int, what: str) -> str:
        g = self.g
        ph, pw = layer.pad_hw
        kind = self._out(x)
        if ph or pw:
            pads = g.const([0, 0, ph, pw, 0, 0, ph, pw], np.int64)
            x = g.node(
                "Pad", [x, pads, g.const(pad_value)], f"{what}.pad", mode="constant", kind=kind
            )
        kh, kw = layer.kernel_size
        return g.node(
            "Conv", [x, w], f"{what}.acc", kind=("stream", cout),
            kernel_shape=[kh, kw], strides=list(layer.stride), dilations=list(layer.dilation),
            group=int(layer.groups), pads=[0, 0, 0, 0],
        )  # fmt: skip

    # ------------------------------------------------------------------ layers
    def conv(self, layer: Any, src: str, what: str) -> str:
        """BinaryConv2d(x): quantize x, pad with the grid's pad value, integer conv, scale."""
        self._check_width(src, layer.in_channels, what)
        x, sx = self.input_values(layer, src, what)
        w, sw, _ = self.weight(layer, what)
        y = self._conv(layer, x, w, float(layer.pad_value), layer.out_channels, what)
        return self._scale_bias(y, sx, sw, layer.bias, what)

    def conv_sign(self, layer: Any, src: str, post: list[Any], what: str) -> str:
        """sign(post(BinaryConv2d(x))) for a 1-bit layer: integer thresholds on the +-1 conv
        (flipped weights where the chain decreases), evaluated with torch as the oracle."""
        from ..engine._pack import _Builder, _ConvBias

        self._check_width(src, layer.in_channels, what)
        x, _ = self.input_values(layer, src, what)
        k = layer.kernel_size[0] * layer.kernel_size[1] * layer.in_channels // layer.groups
        _, step, alpha, _ = weight_values(layer, what)
        if step is not None:
            raise UnsupportedError(
                f"{what}: k-bit weights before a folded sign"
            )  # pragma: no cover
        extra = [_ConvBias(layer.bias)] if layer.bias is not None else []
        try:
            thr, flip = _Builder().int_threshold(layer, k, alpha, extra + post, what)
        except ValueError as e:
            raise UnsupportedError(str(e)) from None
        w, _, _ = self.weight(layer, what, flip=flip, unit=True)
        y = self._conv(layer, x, w, float(layer.pad_value), layer.out_channels, what)
        return self.threshold(y, thr.astype(np.float64), None, f"{what}.sign")

    def linear(self, layer: Any, src: str, what: str) -> str:
        if self.kind(src)[0] not in ("vector", "vpm1"):
            raise UnsupportedError(f"{what}: flatten or pool before a linear layer")
        self._check_width(src, layer.in_features, what)
        x, sx = self.input_values(layer, src, what)
        w, sw, _ = self.weight(layer, what, linear=True)
        y = self.g.node("MatMul", [x, w], f"{what}.acc", kind=("vector", layer.out_features))
        return self._scale_bias(y, sx, sw, layer.bias, what)

    def stem(self, layer: Any, src: str, what: str) -> str:
        """EncodedConv2d on uint8 pixels: bit-planes (or thermometer planes) in +-1, one-padded,
        convolved with binary (or k-bit) weights times each plane's place value."""
        from ..nn import BitPlaneEncoder, ThermometerEncoder

        g = self.g
        enc = layer.encoder
        c_img = int(layer.image_channels)
        if self.kind(src) != ("image", c_img):
            raise UnsupportedError(f"{what}: the encoder convolution must read the uint8 image")
        if isinstance(enc, BitPlaneEncoder):
            planes = enc.bits
            idx = g.const(np.repeat(np.arange(c_img), planes), np.int64)
            rep = g.node("Gather", [src, idx], f"{what}.rep", axis=1)
            shifts = np.tile(np.arange(planes) + 8 - planes, c_img).reshape(1, -1, 1, 1)
            sh = g.node(
                "BitShift", [rep, g.const(shifts, np.uint8)], f"{what}.shift", direction="RIGHT"
            )
            bit = g.node("Mod", [sh, g.const(2, np.uint8)], f"{what}.bit")
            bit = g.node("Cast", [bit], f"{what}.bitf", to=self.onnx.TensorProto.FLOAT)
            on = g.node("Mul", [bit, g.const(2.0)], f"{what}.bit2")
            p = g.node("Sub", [g.const(1.0), on], f"{what}.planes")
        elif isinstance(enc, ThermometerEncoder):
            planes = enc.levels
            idx = g.const(np.repeat(np.arange(c_img), planes), np.int64)
            rep = g.node("Gather", [src, idx], f"{what}.rep", axis=1)
            t = enc.thresholds.cpu().numpy().astype(np.uint8)
            thr = g.const(np.tile(t, c_img).reshape(1, -1, 1, 1), np.uint8)
            on = g.node("GreaterOrEqual", [rep, thr], f"{what}.on")
            p = g.node("Where", [on, g.const(-1.0), g.const(1.0)], f"{what}.planes")
        else:  # pragma: no cover - EncodedConv2d checks this
            raise UnsupportedError(f"{what}: unsupported encoder {type(enc).__name__}")
        self.g.kinds[p] = ("pm1", c_img * planes)
        if self.q:  # the planes are +-1 already: annotate them as bipolar for FINN
            p = g.node(
                "BipolarQuant",
                [p, g.const(1.0)],
                f"{what}.planes",
                domain=QONNX_DOMAIN,
                kind=("pm1", c_img * planes),
            )
        w, sw, _ = self.weight(layer, what)
        pw = enc.plane_weights.cpu().numpy().astype(np.float32).reshape(1, -1, 1, 1)
        w = g.node("Mul", [w, g.init(f"{what}.plane_weights", pw)], f"{what}.w_planes")
        y = self._conv(layer, p, w, 1.0, layer.out_channels, what)
        return self._scale_bias(y, None, sw, layer.bias, what)

    def window_mean(
        self, src: str, k: list[int], ceil: bool, hw: tuple[int, int] | None, what: str
    ) -> str:
        """Mean over non-overlapping k[0] x k[1] windows as torch's CPU kernel computes it: the
        taps summed in row-major order, divided by the number of valid taps (partial windows
        at the bottom / right edge with ``ceil``; cut off without). ``hw``: the input's size
        if static (constant pads and counts, as FINN / qonnx's shape inference want), else
        computed from its shape in the graph."""
        g = self.g
        i64 = np.int64
        kind = self.kind(src)
        kk = g.const(k, i64)
        axes, end = g.const([2, 3], i64), g.const([2**62, 2**62], i64)

        def window_sum(x: str, base: str) -> str:
            total = ""
            for i in range(k[0]):
                for j in range(k[1]):
                    start = g.const([i, j], i64)
                    tap = g.node("Slice", [x, start, end, axes, kk], f"{base}.tap{i}{j}")
                    total = tap if not total else g.node("Add", [total, tap], f"{base}.sum")
            return total

        if hw is not None:
            h, w = hw
            fill = [(-h) % k[0], (-w) % k[1]] if ceil else [-(h % k[0]), -(w % k[1])]
            x = src
            if any(fill):  # zero rows / columns (adding 0 is exact), or the remainder cut off
                pads = g.const([0, 0, 0, 0, 0, 0, *fill], i64)
                x = g.node("Pad", [x, pads, g.const(0.0)], f"{what}.tiles", mode="constant")
            valid = np.pad(
                np.ones((h, w), np.float32), [(0, max(fill[0], 0)), (0, max(fill[1], 0))]
            )
            hh, ww = valid.shape[0] // k[0] * k[0], valid.shape[1] // k[1] * k[1]
            counts = valid[:hh, :ww].reshape(hh // k[0], k[0], ww // k[1], k[1]).sum((1, 3))
            c = (
                g.const(counts[0, 0])
                if np.all(counts == counts[0, 0])
                else g.const(counts[None, None])
            )
            return g.node("Div", [window_sum(x, what), c], what, kind=kind)
        shape = g.node("Shape", [src], f"{what}.shape")
        dyn_hw = g.node("Slice", [shape, g.const([2], i64), g.const([4], i64)], f"{what}.hw")

        def tiled(x: str, base: str) -> str:
            if ceil:
                short = g.node(
                    "Sub", [kk, g.node("Mod", [dyn_hw, kk], f"{base}.rem")], f"{base}.short"
                )
                rem = g.node("Mod", [short, kk], f"{base}.fill")
                pads = g.node("Concat", [g.const([0] * 6, i64), rem], f"{base}.pads", axis=0)
                return g.node("Pad", [x, pads, g.const(0.0)], f"{base}.tiles", mode="constant")
            ends = g.node("Mul", [g.node("Div", [dyn_hw, kk], f"{base}.n"), kk], f"{base}.ends")
            return g.node("Slice", [x, g.const([0, 0], i64), ends, axes], f"{base}.tiles")

        s = window_sum(tiled(src, what), what)
        if ceil:
            one = self.onnx.helper.make_tensor("one", self.onnx.TensorProto.FLOAT, [1], [1.0])
            ones_shape = g.node("Concat", [g.const([1, 1], i64), dyn_hw], f"{what}.ones", axis=0)
            ones = g.node("ConstantOfShape", [ones_shape], f"{what}.ones", value=one)
            count = window_sum(tiled(ones, f"{what}.count"), f"{what}.count")
        else:
            count = g.const(float(k[0] * k[1]))
        return g.node("Div", [s, count], what, kind=kind)

    def _check_width(self, src: str, c: int, what: str) -> None:
        if self.kind(src)[1] != c:
            raise UnsupportedError(f"{what}: expects {c} channels, gets {self.kind(src)[1]}")
