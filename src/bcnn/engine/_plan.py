"""The reference plan: the graph IR of a packed model run op by op with numpy (the plain
reference every optimized path is tested against; the fast plan falls back to it for ops its
kernels do not cover). Never imports torch.

Layouts: float streams are float32 NHWC; packed bits are uint64 (N, H + 2*ph, W + 2*pw, words)
with a border of zero bits (= +1: one-padding) sized for the widest consumer; bit vectors are
uint64 (N, words); float vectors float32 (N, C). A plan (buffers + bound steps) is built once
per input shape; it holds working buffers, so it serves one call at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._epilogue import _Epilogue
from ._format import words

__all__ = ["_Plan"]


# ------------------------------------------------------------------ reference (numpy) kernels
def _popcount_conv(
    xb: np.ndarray,
    off: tuple[int, int],
    w: np.ndarray,
    stride: tuple[int, int],
    out_hw: tuple[int, int],
) -> np.ndarray:
    """popcount(x XOR w) summed over taps and words -> int32 (N, Ho, Wo, Cout)."""
    n = xb.shape[0]
    cout, kh, kw, _ = w.shape
    ho, wo = out_hw
    sh, sw = stride
    oy, ox = off
    acc = np.zeros((n, ho, wo, cout), np.int32)
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = oy + ky, ox + kx
            patch = xb[:, y0 : y0 + sh * (ho - 1) + 1 : sh, x0 : x0 + sw * (wo - 1) + 1 : sw]
            acc += np.bitwise_count(patch[..., None, :] ^ w[:, ky, kx, :]).sum(-1, dtype=np.int32)
    return acc


def _pack_bits(neg: np.ndarray, out: np.ndarray) -> None:
    """bool (..., C) -> uint64 words written into ``out`` (..., words)."""
    c = neg.shape[-1]
    wds = out.shape[-1]
    if wds * 64 != c:
        full = np.zeros((*neg.shape[:-1], wds * 64), bool)
        full[..., :c] = neg
        neg = full
    by = np.packbits(neg, axis=-1, bitorder="little")
    out[...] = np.ascontiguousarray(by).view("<u8").reshape(out.shape)


def _pack_signs(neg: np.ndarray) -> np.ndarray:
    out = np.zeros((*neg.shape[:-1], words(neg.shape[-1])), np.uint64)
    _pack_bits(neg, out)
    return out


def _out_size(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def _pool_size(n: int, k: int, s: int, ceil: bool) -> int:
    if not ceil:
        return (n - k) // s + 1
    o = -(-(n - k) // s) + 1
    if (o - 1) * s >= n:
        o -= 1
    return o


# ------------------------------------------------------------------ the plan
class _Buf:
    def __init__(self, kind: str, channels: int) -> None:
        self.kind = kind
        self.channels = channels
        self.h = 0
        self.w = 0
        self.pad = (0, 0)  # for spatial bits: border reserved for consumers
        self.array: np.ndarray | None = None


class _Plan:
    def __init__(self, model: Any, shape: tuple[int, int, int, int]) -> None:
        """model: a :class:`~bcnn.engine.PackedModel` (its graph, tensors and precision)."""
        n, c, h, w = shape
        g = model.graph
        t = model.tensors
        bufs: dict[str, _Buf] = {"input": _Buf("image", c)}
        bufs["input"].h, bufs["input"].w = h, w
        ops = g["ops"]
        # pass 1: shapes and the padding each bits value needs
        for op in ops:
            kind = op["op"]
            src = bufs[op["inputs"][0]]
            where = f"op {op['name']!r} ({kind})"
            if kind in ("encode_conv", "conv", "qstem", "qconv"):
                kh, kw = op["kernel"]
                sh, sw = op["stride"]
                ph, pw = op["pad"]
                if src.h + 2 * ph < kh or src.w + 2 * pw < kw:
                    raise ValueError(f"input {h}x{w} is too small for {where}")
                o = _Buf("bits" if "threshold" in op else "stream", op["out_channels"])
                o.h, o.w = _out_size(src.h, kh, sh, ph), _out_size(src.w, kw, sw, pw)
                if kind == "conv":
                    src.pad = (max(src.pad[0], ph), max(src.pad[1], pw))
                if len(op["inputs"]) == 2:
                    r = bufs[op["inputs"][1]]
                    if (r.h, r.w) != (o.h, o.w):
                        raise ValueError(
                            f"{where}: residual is {r.h}x{r.w}, output is {o.h}x{o.w} "
                            f"(input {h}x{w})"
                        )
            elif kind == "binarize":
                o = _Buf("bits" if src.kind == "stream" else "vbits", op["channels"])
                o.h, o.w = src.h, src.w
            elif kind == "avgpool":
                kh, kw = op["kernel"]
                sh, sw = op["stride"]
                if src.h < kh or src.w < kw:
                    raise ValueError(f"input {h}x{w} is too small for {where}")
                o = _Buf("stream", src.channels)
                o.h = _pool_size(src.h, kh, sh, op["ceil_mode"])
                o.w = _pool_size(src.w, kw, sw, op["ceil_mode"])
            elif kind == "gap":
                o = _Buf("vector", src.channels)
            else:  # linear
                o = _Buf("vector", op["out_features"])
            bufs[op["output"]] = o
        # pass 2: allocate
        for name, b in bufs.items():
            if name == "input":
                continue
            if b.kind == "stream":
                b.array = np.zeros((n, b.h, b.w, b.channels), np.float32)
            elif b.kind == "bits":
                ph, pw = b.pad
                b.array = np.zeros((n, b.h + 2 * ph, b.w + 2 * pw, words(b.channels)), np.uint64)
            elif b.kind == "vbits":
                b.array = np.zeros((n, words(b.channels)), np.uint64)
            else:
                b.array = np.zeros((n, b.channels), np.float32)
        self.bufs = bufs
        # read at run time by the k-bit ops; the model copies its setting in before each call
        self.precision: dict[str, Any] = dict(model._precision)
        # the k-bit ops' run-time variants by op name (_kbit_ops: a W1A1 route packs the signs
        # its consumer reads), the graph's ops, and a call counter that marks those bits fresh
        self.kbit: dict[str, Any] = {}
        self.ops = ops
        self.calls = 0
        self.steps: list[Callable[[np.ndarray], None]] = [self._bind(op, t) for op in ops]
        self.output = bufs[g["output"]]

    # each _bind returns a closure running one op into preallocated buffers
    def _bind(self, op: dict[str, Any], t: dict[str, np.ndarray]) -> Callable[[np.ndarray], None]:
        return getattr(self, "_op_" + op["op"])(op, t)

    def _interior(self, b: _Buf) -> np.ndarray:
        assert b.array is not None
        ph, pw = b.pad
        return b.array[:, ph : ph + b.h, pw : pw + b.w]

    def _emit(self, op: dict[str, Any], acc: np.ndarray, epi: _Epilogue) -> None:
        out = self.bufs[op["output"]]
        assert out.array is not None
        res = None
        if len(op["inputs"]) == 2:
            res = self.bufs[op["inputs"][1]].array
        out.array[...] = epi(acc.astype(np.float32), res)

    def _op_encode_conv(self, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
        w = t[op["weight"]]  # (Cout, kh, kw, words(C*P)); plane-channel c*P + p
        pw_ = t[op["plane_weights"]].astype(np.float64)
        thr = t[op["plane_thresholds"]]
        planes = op["planes"]
        c_img = op["in_channels"]
        bitplane = op["encoder"] == "bitplane"
        ph, pwid = op["pad"]
        stride = tuple(op["stride"])
        src = self.bufs["input"]
        out = self.bufs[op["output"]]
        n = out.array.shape[0] if out.array is not None else 0
        cp = c_img * planes
        # unpack the weights once: plane p's weights over the image channels
        wbits = np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")[..., :cp]
        wbits = wbits.reshape(*w.shape[:3], c_img, planes).astype(bool)
        wp = [_pack_signs(wbits[..., p]) for p in range(planes)]
        xb = np.zeros((n, src.h + 2 * ph, src.w + 2 * pwid, words(c_img)), np.uint64)
        integral = bool(np.all(pw_ == np.round(pw_)))
        epi = _Epilogue(op["epilogue"], t)
        k = op["kernel"][0] * op["kernel"][1] * c_img

        def run(x: np.ndarray) -> None:
            p = x.transpose(0, 2, 3, 1).astype(np.int32)  # NHWC
            if bitplane and planes < 8:
                p = p >> (8 - planes)
            total = np.zeros((n, out.h, out.w, out.channels), np.float64)
            for pl in range(planes):
                neg = ((p >> pl) & 1).astype(bool) if bitplane else p >= thr[pl]
                _pack_bits(neg, xb[:, ph : ph + src.h, pwid : pwid + src.w])
                pc = _popcount_conv(xb, (0, 0), wp[pl], stride, (out.h, out.w))
                total += pw_[pl] * (k - 2 * pc)
            if integral:
                total = np.rint(total)
            self._emit(op, total, epi)

        return run

    def _op_conv(self, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
        w = t[op["weight"]]
        src = self.bufs[op["inputs"][0]]
        out = self.bufs[op["output"]]
        ph, pw = op["pad"]
        off = (src.pad[0] - ph, src.pad[1] - pw)
        stride = tuple(op["stride"])
        k = op["kernel"][0] * op["kernel"][1] * op["in_channels"]
        if "threshold" in op:
            thr = t[op["threshold"]]

            def run_bits(x: np.ndarray) -> None:
                assert src.array is not None
                acc = k - 2 * _popcount_conv(src.array, off, w, stride, (out.h, out.w))
                _pack_bits(acc < thr, self._interior(out))

            return run_bits
        epi = _Epilogue(op["epilogue"], t)

        def run(x: np.ndarray) -> None:
            assert src.array is not None
            acc = k - 2 * _popcount_conv(src.array, off, w, stride, (out.h, out.w))
            self._emit(op, acc, epi)

        return run

    def _op_binarize(self, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
        thr = t[op["threshold"]]
        mode = t[op["mode"]]
        src = self.bufs[op["inputs"][0]]
        out = self.bufs[op["output"]]
        const_on = thr >= 0

        def run(x: np.ndarray) -> None:
            v = src.array
            on = np.where(mode == 1, v >= thr, np.where(mode == -1, v <= thr, const_on))
            dst = self._interior(out) if out.kind == "bits" else out.array
            assert dst is not None
            _pack_bits(~on, dst)

        return run

    def _op_avgpool(self, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
        kh, kw = op["kernel"]
        sh, sw = op["stride"]
        src = self.bufs[op["inputs"][0]]
        out = self.bufs[op["output"]]

        def run(x: np.ndarray) -> None:
            a = src.array
            o = out.array
            assert a is not None and o is not None
            for oy in range(out.h):
                y0, y1 = oy * sh, min(oy * sh + kh, src.h)
                for ox in range(out.w):
                    x0, x1 = ox * sw, min(ox * sw + kw, src.w)
                    s = np.zeros(o[:, oy, ox].shape, np.float32)
                    for iy in range(y0, y1):
                        for ix in range(x0, x1):
                            s = s + a[:, iy, ix]
                    o[:, oy, ox] = s / np.float32((y1 - y0) * (x1 - x0))

        return run

    def _op_gap(self, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
        src = self.bufs[op["inputs"][0]]
        out = self.bufs[op["output"]]

        def run(x: np.ndarray) -> None:
            a = src.array
            assert a is not None and out.array is not None
            s = a.astype(np.float64).sum(axis=(1, 2)) / (src.h * src.w)
            out.array[...] = s.astype(np.float32)

        return run

    def _op_linear(self, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
        w = t[op["weight"]]
        src = self.bufs[op["inputs"][0]]
        epi = _Epilogue(op["epilogue"], t)
        k = op["in_features"]

        def run(x: np.ndarray) -> None:
            a = src.array
            assert a is not None
            pc = np.bitwise_count(a[:, None, :] ^ w[None]).sum(-1, dtype=np.int32)
            self._emit(op, (k - 2 * pc).astype(np.float32), epi)

        return run

    # k-bit layers run bit-serially on the binary kernels (_bitserial); _FastPlan runs these
    # steps too (_FastPlan._kbit), lending them its arrays
    def _op_qconv(self, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
        from ._kbit_ops import bind_qconv

        return bind_qconv(self, op, t)

    def _op_qlinear(self, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
        from ._kbit_ops import bind_qlinear

        return bind_qlinear(self, op, t)

    def _op_qstem(self, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
        from ._kbit_ops import bind_qstem

        return bind_qstem(self, op, t)

    def use_runner(self) -> None:
        """The reference plan has no compiled runner (see _fastplan._FastPlan.use_runner)."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        for step in self.steps:
            step(x)
        assert self.output.array is not None
        return self.output.array.copy()
