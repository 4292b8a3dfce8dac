"""Runs the graph IR of a packed model (numpy + the numba kernels; never imports torch).

Layouts: float streams are float32 NHWC; packed bits are uint64 (N, H + 2*ph, W + 2*pw, words)
with a border of zero bits (= +1: one-padding) sized for the widest consumer; bit vectors are
uint64 (N, words); float vectors float32 (N, C).

Float arithmetic follows torch's eval-mode order step by step (batch norm as
fma(x, alpha, beta), computed in float64 then rounded once to float32), so that the residual
stream matches the torch model closely and the signs that read it agree.

A plan (buffers + bound steps) is built once per input shape and reused. Plans hold working
buffers, so a plan serves one call at a time: concurrent calls on one model each check out a plan
of their own from the model's pool (see :meth:`PackedModel.__call__` and docs/serving.md).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from ._format import read_bcnn, validate_graph, words, write_bcnn

__all__ = ["PackedModel"]


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
    def __init__(self, model: PackedModel, shape: tuple[int, int, int, int]) -> None:
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
        self.precision: dict[str, int | None] = dict(model._precision)
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

    # k-bit layers run bit-serially on the binary kernels (_bitserial); _FastPlan has no
    # handler for these ops and runs them through its fallback to this plan
    def _op_qconv(self, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
        from ._bitserial import bind_qconv

        return bind_qconv(self, op, t)

    def _op_qlinear(self, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
        from ._bitserial import bind_qlinear

        return bind_qlinear(self, op, t)

    def _op_qstem(self, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
        from ._bitserial import bind_qstem

        return bind_qstem(self, op, t)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for step in self.steps:
            step(x)
        assert self.output.array is not None
        return self.output.array.copy()


# ------------------------------------------------------------------ the fast plan (numba)
_E32 = np.zeros(0, np.float32)
_E64 = np.zeros(0, np.float64)
_ER = np.zeros((0, 1), np.float32)


class PackedModel:
    """A packed fully binary model: call it on uint8 images (N, C, H, W) for float32 logits.

    Build one with :func:`bcnn.engine.pack` or :func:`bcnn.engine.load`.
    """

    def __init__(
        self, graph: dict[str, Any], tensors: dict[str, np.ndarray], *, backend: str = "numba"
    ) -> None:
        if backend not in ("numba", "reference"):
            raise ValueError(f"backend must be 'numba' or 'reference', got {backend!r}")
        validate_graph(graph, tensors)
        self.graph = graph
        self.tensors = tensors
        self.backend = backend
        # idle plans per input shape (most recently used last); a call checks one out and
        # returns it, so concurrent calls never share working buffers
        self._plans: OrderedDict[tuple[int, ...], list[Any]] = OrderedDict()
        self._lock = threading.Lock()
        # replaced as a whole (never mutated) so that a call reads one consistent setting
        self._precision: dict[str, int | None] = {"weight_bits": None}

    # at most this many input shapes keep plans, and this many idle plans per shape (one per
    # thread that called concurrently; more are dropped when returned)
    MAX_SHAPES = 4
    MAX_IDLE_PLANS = 8

    def set_precision(self, *, weight_bits: int | None = None) -> int | None:
        """Run k-bit weight layers with only their ``weight_bits`` highest bit-planes (the
        PrecisionBatching knob; no re-packing). A layer of k > weight_bits bits drops its
        d = k - weight_bits lowest planes: W' = sum_{i >= d} 2^i s_i (the dropped part is in
        [-(2^d - 1), 2^d - 1]) with the same output scale step_x * step_w; layers of at most
        weight_bits bits are unchanged. ``None`` restores full precision. Returns the previous
        setting. Safe while other threads call the model: a call runs entirely at the setting
        it started with."""
        if weight_bits is not None and (
            isinstance(weight_bits, bool) or not isinstance(weight_bits, int)
        ):
            raise ValueError(f"weight_bits must be an integer in 1..8 or None, got {weight_bits!r}")
        if weight_bits is not None and not 1 <= weight_bits <= 8:
            raise ValueError(f"weight_bits must be in 1..8 or None, got {weight_bits}")
        prev = self._precision["weight_bits"]
        self._precision = {"weight_bits": weight_bits}
        return prev

    @property
    def in_channels(self) -> int:
        return int(self.graph["input"]["channels"])

    @property
    def input_size(self) -> tuple[int, int] | None:
        s = self.graph["input"].get("size")
        return (int(s[0]), int(s[1])) if s else None

    @property
    def num_classes(self) -> int:
        return int(self.graph["num_classes"])

    @property
    def classes(self) -> list[str] | None:
        c = self.graph.get("classes")
        return list(c) if c else None

    @property
    def meta(self) -> dict[str, Any]:
        """Where the model came from: its data spec, validation split and seed, when known."""
        return dict(self.graph.get("meta") or {})

    @property
    def nbytes(self) -> int:
        """Bytes of the packed tensors."""
        return int(sum(a.nbytes for a in self.tensors.values()))

    def __repr__(self) -> str:
        ops = [op["op"] for op in self.graph["ops"]]
        return (
            f"PackedModel(in_channels={self.in_channels}, classes={self.num_classes}, "
            f"ops={len(ops)}, {self.nbytes / 1024:.1f} KiB)"
        )

    def __call__(self, x: Any) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise ValueError(f"expected a numpy uint8 array (N, C, H, W), got {type(x).__name__}")
        if x.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (N, C, H, W), got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[0] < 1:
            raise ValueError(
                f"expected images (N, {self.in_channels}, H, W) with N >= 1, got shape {x.shape}"
            )
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"empty images: shape {x.shape}")
        key = tuple(int(d) for d in x.shape)
        plan = self._checkout(key)
        try:
            plan.precision.update(self._precision)
            return plan(np.ascontiguousarray(x))  # type: ignore[no-any-return]
        finally:
            self._checkin(key, plan)

    def _checkout(self, key: tuple[int, ...]) -> Any:
        """An idle plan for this input shape, or a new one (built outside the lock)."""
        with self._lock:
            idle = self._plans.get(key)
            if idle:
                self._plans.move_to_end(key)
                return idle.pop()
        shape = (key[0], key[1], key[2], key[3])
        if self.backend == "numba":
            from ._fastplan import _FastPlan

            return _FastPlan(self, shape)
        return _Plan(self, shape)

    def _checkin(self, key: tuple[int, ...], plan: Any) -> None:
        with self._lock:
            idle = self._plans.get(key)
            if idle is None:
                while len(self._plans) >= self.MAX_SHAPES:
                    self._plans.popitem(last=False)
                idle = self._plans[key] = []
            else:
                self._plans.move_to_end(key)
            if len(idle) < self.MAX_IDLE_PLANS:
                idle.append(plan)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a .bcnn file atomically (see docs/format.md)."""
        write_bcnn(path, self.graph, self.tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PackedModel:
        graph, tensors = read_bcnn(path)
        return cls(graph, tensors)
