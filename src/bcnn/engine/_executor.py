"""Runs the graph IR of a packed model (numpy + the numba kernels; never imports torch).

Layouts: float streams are float32 NHWC; packed bits are uint64 (N, H + 2*ph, W + 2*pw, words)
with a border of zero bits (= +1: one-padding) sized for the widest consumer; bit vectors are
uint64 (N, words); float vectors float32 (N, C).

Float arithmetic follows torch's eval-mode order step by step (batch norm as
fma(x, alpha, beta), computed in float64 then rounded once to float32), so that the residual
stream matches the torch model closely and the signs that read it agree.

A plan (buffers + bound steps) is built once per input shape and reused.
"""

from __future__ import annotations

import os
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
        self.precision = model._precision  # read at run time by the k-bit ops
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


class _FastPlan:
    """Runs the graph with the numba kernels of ``_kernels`` (ops they do not cover, e.g.
    non-square strides, run the numpy reference code of :class:`_Plan`)."""

    def __init__(self, model: PackedModel, shape: tuple[int, int, int, int]) -> None:
        from . import _kernels as K

        self.K = K
        self.ref = _Plan(model, shape)  # shapes, checks, and the fallback
        self.t = model.tensors
        self.steps: list[Callable[[dict[str, np.ndarray], np.ndarray], None]] = []
        ops = model.graph["ops"]
        self.output = model.graph["output"]
        # liveness, for in-place residual updates: the last op reading each value (the graph
        # output counts as read after the last op); values sharing storage form groups
        self._last_use: dict[str, int] = {}
        for i, op in enumerate(ops):
            for name in op["inputs"]:
                self._last_use[name] = i
        self._last_use[self.output] = len(ops)
        self._root: dict[str, str] = {}
        self._ops = ops
        self._shape = shape
        # bits values written by pack-sign steps straight into a zero-bordered buffer sized
        # for their consumers (which then convolve with padding 0): name -> border
        self._prepad: dict[str, int] = {}
        self._skip: set[int] = set()  # ops computed by an earlier fused step
        for i, (op, ref_step) in enumerate(zip(ops, self.ref.steps, strict=True)):
            self._index = i
            f = getattr(self, "_op_" + op["op"], None)
            if i in self._skip:
                f = self._op_done
            step = f(op) if f is not None else None
            self.steps.append(step if step is not None else self._fallback(op, ref_step))
            self._root.setdefault(op["output"], op["output"])
        self._hot = [s for i, s in enumerate(self.steps) if i not in self._skip]

    def _fallback(self, op: dict[str, Any], ref_step: Any) -> Any:
        """Run one op with the reference code: copy inputs into its buffers, run, read out."""
        ref = self.ref

        def run(v: dict[str, np.ndarray], x: np.ndarray) -> None:
            for name in op["inputs"]:
                if name == "input":
                    continue
                b = ref.bufs[name]
                assert b.array is not None
                if b.kind == "bits":
                    ref._interior(b)[...] = v[name]
                else:
                    b.array[...] = v[name]
            ref_step(x)
            ob = ref.bufs[op["output"]]
            arr = ref._interior(ob) if ob.kind == "bits" else ob.array
            assert arr is not None
            v[op["output"]] = arr.copy()

        return run

    @staticmethod
    def _square(op: dict[str, Any]) -> tuple[int, int] | None:
        (sh, sw), (ph, pw), (kh, kw) = op["stride"], op["pad"], op["kernel"]
        if sh != sw or ph != pw or (ph and ph >= max(kh, kw)):
            return None
        return sh, ph

    def _fusable(self, steps: list[dict[str, Any]], residual: bool) -> Any:
        """(alpha, beta, rprelu | None) when the epilogue is exactly what the fused kernels
        compute (fma batch norm [, RPReLU] [, residual add], torch's order), else None."""
        kinds = [s["kind"] for s in steps]
        want = ["bn"]
        if "rprelu" in kinds:
            want.append("rprelu")
        if residual:
            want.append("add")
        if kinds != want:
            return None
        t = self.t
        f32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
        al, be = f32(t[steps[0]["alpha"]]), f32(t[steps[0]["beta"]])
        rp = None
        if "rprelu" in kinds:
            r = steps[1]
            rp = (f32(t[r["gamma"]]), f32(t[r["slope"]]), f32(t[r["zeta"]]))
        return al, be, rp

    def _prepad_for(self, name: str) -> int | None:
        """The border to pack ``name`` into when every consumer is a conv on the fused path
        with one square padding (it then runs with padding 0 on the bordered buffer)."""
        if name == self.output:
            return None
        pads = set()
        for op in self._ops:
            if name not in op["inputs"]:
                continue
            if op["op"] != "conv" or op["inputs"][0] != name or "threshold" in op:
                return None
            sq = self._square(op)
            if sq is None or self._fusable(op["epilogue"], len(op["inputs"]) == 2) is None:
                return None
            pads.add(sq[1])
        return pads.pop() if len(pads) == 1 else None

    def _sign_thresholds(self, op: dict[str, Any]) -> np.ndarray | None:
        """-threshold (float32) when a binarize op is a plain sign(x + b) (every channel mode
        1, finite thresholds): bit = x < thr exactly as fl(x - thr) < 0, so pack_sign with
        bias -thr."""
        thr = self.t[op["threshold"]].astype(np.float32)
        if not (np.all(self.t[op["mode"]] == 1) and np.all(np.isfinite(thr))):
            return None
        return np.ascontiguousarray(-thr, np.float32)

    def _pack_next(self, name: str, channels: int) -> tuple[Any, str] | None:
        """When the next op is a sign binarize of ``name`` whose bits only fused convs read:
        ((bias, zero-bordered bits buffer, border), its output name) for the producing
        kernel to pack in the same call; the binarize op is then skipped."""
        i, ops = self._index, self._ops
        if i + 1 >= len(ops):
            return None
        b = ops[i + 1]
        if b["op"] != "binarize" or b["inputs"] != [name] or b["channels"] != channels:
            return None
        neg = self._sign_thresholds(b)
        pre = self._prepad_for(b["output"])
        if neg is None or pre is None or neg.shape != (channels,):
            return None
        ob = self.ref.bufs[name]
        bits = np.zeros(
            (self._shape[0], ob.h + 2 * pre, ob.w + 2 * pre, words(channels)), np.uint64
        )
        self._prepad[b["output"]] = pre
        self._skip.add(i + 1)
        return (neg, bits, pre), b["output"]

    def _bits_shape(self, name: str) -> tuple[int, int, int, int]:
        """Shape of the bits value ``name`` as the fast plan holds it (with its border)."""
        b = self.ref.bufs[name]
        p = self._prepad.get(name, 0)
        return (self._shape[0], b.h + 2 * p, b.w + 2 * p, words(b.channels))

    def _can_overwrite(self, name: str) -> bool:
        """True when no later op (nor the graph output) reads ``name``'s storage."""
        root = self._root.get(name)
        if root is None:
            return False
        group = [k for k, r in self._root.items() if r == root]
        return all(self._last_use.get(k, -1) <= self._index for k in group)

    def _op_encode_conv(self, op: dict[str, Any]) -> Any:
        K, t = self.K, self.t
        sq = self._square(op)
        pwts = t[op["plane_weights"]]
        if sq is None:
            return None
        if op["encoder"] == "bitplane" and np.array_equal(
            pwts, 2.0 ** np.arange(op["planes"], dtype=np.float32)
        ):
            fz = self._fusable(op["epilogue"], False)
            if fz is not None:
                al, be, rp = fz
                wst = K.prepare_stem_weights(t[op["weight"]], op["in_channels"], op["planes"])
                stride, pad = sq
                name = op["output"]
                nxt = self._pack_next(name, op["out_channels"])
                stem_affine = K.bind_stem_affine(
                    self._shape, wst, al, be, stride=stride, padding=pad, rprelu=rp, fma=True,
                    pack=nxt[0] if nxt is not None else None,
                )  # fmt: skip
                ob = self.ref.bufs[name]
                assert ob.array is not None
                sbuf = np.empty(ob.array.shape, np.float32)
                if nxt is not None:
                    bits, bname = nxt[0][1], nxt[1]

                    def run_fused_pack(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                        v[name] = stem_affine(x, sbuf)
                        v[bname] = bits

                    return run_fused_pack

                def run_fused(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                    v[name] = stem_affine(x, sbuf)

                return run_fused
        if op["encoder"] == "bitplane":
            if not np.array_equal(pwts, 2.0 ** np.arange(op["planes"], dtype=np.float32)):
                return None
            steps = op["epilogue"]
            w = K.prepare_stem_weights(t[op["weight"]], op["in_channels"], op["planes"])
        else:
            if not np.all(pwts == pwts[0]):
                return None
            steps = [{"kind": "scale", "scale": "__step"}, *op["epilogue"]]
            w = K.prepare_stem_weights(
                t[op["weight"]], op["in_channels"], op["planes"], "thermometer",
                t[op["plane_thresholds"]],
            )  # fmt: skip
        cout = op["out_channels"]
        tt = dict(t)
        tt["__step"] = np.full(cout, pwts[0], np.float32)
        epi = _FusedEpilogue.build(steps, tt)
        if epi is None or (steps and steps[0]["kind"] != "scale" and "__step" in str(steps)):
            return None
        stride, pad = sq
        ob = self.ref.bufs[op["output"]]
        out = np.empty((ob.array.shape if ob.array is not None else (0,)), np.float32)
        name = op["output"]

        def run(v: dict[str, np.ndarray], x: np.ndarray) -> None:
            acc = K.stem_conv(x, w, stride, pad)
            epi(acc, None, out)
            v[name] = out

        return run

    def _op_conv(self, op: dict[str, Any]) -> Any:
        K, t = self.K, self.t
        sq = self._square(op)
        if sq is None:
            return None
        stride, pad = sq
        w = K.prepare_conv_weights(t[op["weight"]], op["in_channels"])
        src, name = op["inputs"][0], op["output"]
        if "threshold" in op:
            thr = t[op["threshold"]].astype(np.float32)
            flip = np.zeros(op["out_channels"], bool)

            def run_bits(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                v[name] = K.bconv2d_threshold(v[src], w, thr, flip, stride=stride, padding=pad)

            return run_bits
        res = op["inputs"][1] if len(op["inputs"]) == 2 else None
        ob = self.ref.bufs[name]
        assert ob.array is not None
        fz = self._fusable(op["epilogue"], res is not None)
        if fz is not None:
            al, be, rp = fz
            rb = self.ref.bufs[res] if res is not None else None
            nxt = self._pack_next(name, op["out_channels"])
            affine = K.bind_conv_affine(
                self._bits_shape(src), w, al, be, stride=stride,
                padding=0 if src in self._prepad else pad, rprelu=rp,
                residual_channels=rb.channels if rb is not None else None, fma=True,
                pack=nxt[0] if nxt is not None else None,
            )  # fmt: skip
            if nxt is not None:
                bits, bname = nxt[0][1], nxt[1]
                if res is not None and rb is not None and rb.channels == op["out_channels"]:
                    inplace = self._can_overwrite(res)
                else:
                    inplace = False
                if inplace:
                    assert res is not None
                    self._root[name] = self._root[res]  # h += ... in place

                    def run_inplace_pack(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                        h = v[res]
                        v[name] = affine(v[src], h, h)
                        v[bname] = bits

                    return run_inplace_pack
                pbuf = np.empty(ob.array.shape, np.float32)

                def run_pack(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                    v[name] = affine(v[src], v[res] if res is not None else None, pbuf)
                    v[bname] = bits

                return run_pack
            if res is None:
                buf = np.empty(ob.array.shape, np.float32)

                def run_fused(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                    v[name] = affine(v[src], None, buf)

                return run_fused
            assert rb is not None
            if rb.channels == op["out_channels"] and self._can_overwrite(res):
                self._root[name] = self._root[res]  # h += ... in place

                def run_inplace(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                    h = v[res]
                    v[name] = affine(v[src], h, h)

                return run_inplace
            buf = np.empty(ob.array.shape, np.float32)

            def run_res(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                v[name] = affine(v[src], v[res], buf)

            return run_res
        epi = _FusedEpilogue.build(op["epilogue"], t)
        if epi is None:
            return None
        out = np.empty(ob.array.shape, np.float32)

        def run(v: dict[str, np.ndarray], x: np.ndarray) -> None:
            acc = K.bconv2d(v[src], w, stride, pad)
            epi(acc, v[res] if res is not None else None, out)
            v[name] = out

        return run

    def _op_binarize(self, op: dict[str, Any]) -> Any:
        K, t = self.K, self.t
        thr = t[op["threshold"]].astype(np.float32).copy()
        mode = t[op["mode"]]
        flip = mode == -1
        const = mode == 0
        thr[const] = np.where(thr[const] >= 0, -np.inf, np.inf)
        src, name = op["inputs"][0], op["output"]
        if np.all(mode == 1) and np.all(np.isfinite(thr)):
            # bit = x < thr exactly as fl(x - thr) < 0 (a float subtraction rounds to zero only
            # when exact, and keeps the sign otherwise; NaN gives 0 both ways): pack_sign with
            # bias = -thr, which skips pack_threshold's per-call flip preparation
            neg = self._sign_thresholds(op)
            assert neg is not None
            sb = self.ref.bufs[src]
            pre = self._prepad_for(name) if sb.kind == "stream" else None
            if pre is not None:
                self._prepad[name] = pre
                packer = K.bind_pack_sign_padded(
                    (self._shape[0], sb.h, sb.w, sb.channels), neg, pre
                )

                def run_padded(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                    v[name] = packer(v[src])

                return run_padded
            pack_sign = K.pack_sign

            def run_sign(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                v[name] = pack_sign(v[src], neg)

            return run_sign

        def run(v: dict[str, np.ndarray], x: np.ndarray) -> None:
            v[name] = K.pack_threshold(v[src], thr, flip)

        return run

    def _op_avgpool(self, op: dict[str, Any]) -> Any:
        if op["kernel"] != [2, 2] or op["stride"] != [2, 2] or not op["ceil_mode"]:
            return None
        src, name = op["inputs"][0], op["output"]
        sb = self.ref.bufs[src]
        nxt = self._pack_next(name, sb.channels)
        pool = self.K.bind_avgpool2x2(
            (self._shape[0], sb.h, sb.w, sb.channels), pack=nxt[0] if nxt is not None else None
        )
        if nxt is not None:
            bits, bname = nxt[0][1], nxt[1]

            def run_pack(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                v[name] = pool(v[src])
                v[bname] = bits

            return run_pack

        def run(v: dict[str, np.ndarray], x: np.ndarray) -> None:
            v[name] = pool(v[src])

        return run

    @staticmethod
    def _op_done(op: dict[str, Any]) -> Any:
        def run(v: dict[str, np.ndarray], x: np.ndarray) -> None:
            pass

        return run

    def _readers(self, name: str) -> list[int]:
        return [i for i, op in enumerate(self._ops) if name in op["inputs"]]

    def _head(self, op: dict[str, Any]) -> Any:
        """gap -> sign binarize -> binary linear + affine as one fused call, when those three
        ops form a chain read by nothing else."""
        i, ops, t = self._index, self._ops, self.t
        name = op["output"]
        if i + 2 >= len(ops) or self._readers(name) != [i + 1]:
            return None
        b, lin = ops[i + 1], ops[i + 2]
        if b["op"] != "binarize" or lin["op"] != "linear" or name == self.output:
            return None
        if self._readers(b["output"]) != [i + 2] or b["output"] == self.output:
            return None
        steps = lin["epilogue"]
        thr = t[b["threshold"]].astype(np.float32)
        if [s["kind"] for s in steps] != ["affine"] or not (
            np.all(t[b["mode"]] == 1) and np.all(np.isfinite(thr))
        ):
            return None
        from ._fused import fused_head

        sb = self.ref.bufs[op["inputs"][0]]
        n, c = self._shape[0], sb.channels
        wl = np.ascontiguousarray(t[lin["weight"]], np.uint64)
        o, kw = wl.shape
        if c != b["channels"] or c != lin["in_features"] or kw != words(c):
            return None
        neg = np.ascontiguousarray(-thr, np.float32)
        sc = np.ascontiguousarray(t[steps[0]["weight"]], np.float32)
        bi = np.ascontiguousarray(t[steps[0]["bias"]], np.float32)
        if neg.shape != (c,) or sc.shape != (o,) or bi.shape != (o,):
            return None
        out = np.empty((n, o), np.float32)
        bits = np.empty(kw, np.uint64)
        acc = np.empty(c, np.float64)
        src, hw, oname = op["inputs"][0], sb.h * sb.w, lin["output"]
        self._skip.update((i + 1, i + 2))

        def run(v: dict[str, np.ndarray], x: np.ndarray) -> None:
            fused_head(v[src].reshape(n, hw, c), neg, wl, c, sc, bi, out, bits, acc)
            v[oname] = out

        return run

    def _op_gap(self, op: dict[str, Any]) -> Any:
        K = self.K
        src, name = op["inputs"][0], op["output"]
        head = self._head(op)
        if head is not None:
            return head

        def run(v: dict[str, np.ndarray], x: np.ndarray) -> None:
            v[name] = K.global_avgpool(v[src])

        return run

    def _op_linear(self, op: dict[str, Any]) -> Any:
        K, t = self.K, self.t
        w = K.prepare_dense_weights(t[op["weight"]], op["in_features"])
        src, name = op["inputs"][0], op["output"]
        steps = op["epilogue"]
        if [s["kind"] for s in steps] == ["affine"]:
            sc, bi = t[steps[0]["weight"]], t[steps[0]["bias"]]

            def run_affine(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                v[name] = K.blinear_affine(v[src], w, sc, bi)

            return run_affine
        epi = _Epilogue(steps, t)

        def run(v: dict[str, np.ndarray], x: np.ndarray) -> None:
            v[name] = epi(K.blinear(v[src], w).astype(np.float32), None)

        return run

    def __call__(self, x: np.ndarray) -> np.ndarray:
        v: dict[str, np.ndarray] = {}
        for step in self._hot:  # the steps less those done by an earlier fused step
            step(v, x)
        return np.array(v[self.output], dtype=np.float32, copy=True)


# ------------------------------------------------------------------ the public object
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
        self._plans: dict[tuple[int, ...], Any] = {}
        self._precision: dict[str, int | None] = {"weight_bits": None}

    def set_precision(self, *, weight_bits: int | None = None) -> int | None:
        """Run k-bit weight layers with only their ``weight_bits`` highest bit-planes (the
        PrecisionBatching knob; no re-packing). A layer of k > weight_bits bits drops its
        d = k - weight_bits lowest planes: W' = sum_{i >= d} 2^i s_i (the dropped part is in
        [-(2^d - 1), 2^d - 1]) with the same output scale step_x * step_w; layers of at most
        weight_bits bits are unchanged. ``None`` restores full precision. Returns the previous
        setting."""
        if weight_bits is not None and (
            isinstance(weight_bits, bool) or not isinstance(weight_bits, int)
        ):
            raise ValueError(f"weight_bits must be an integer in 1..8 or None, got {weight_bits!r}")
        if weight_bits is not None and not 1 <= weight_bits <= 8:
            raise ValueError(f"weight_bits must be in 1..8 or None, got {weight_bits}")
        prev = self._precision["weight_bits"]
        self._precision["weight_bits"] = weight_bits
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
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 4:
                self._plans.clear()
            shape = (key[0], key[1], key[2], key[3])
            plan = _FastPlan(self, shape) if self.backend == "numba" else _Plan(self, shape)
            self._plans[key] = plan
        return plan(np.ascontiguousarray(x))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a .bcnn file atomically (see docs/format.md)."""
        write_bcnn(path, self.graph, self.tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PackedModel:
        graph, tensors = read_bcnn(path)
        return cls(graph, tensors)
