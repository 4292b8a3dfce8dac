"""The executor side of the k-bit ops (``qconv``, ``qlinear``, ``qstem``): each op's run-time
variants (act step, pre-quantization steps and epilogue per precision selection) and its step
in a plan, which picks per call, from the plan's precision setting, either the bit-serial
layers of :mod:`._bitserial` or, at W1A1, the binary models' fused kernels (the routes below:
same bits, tests/test_engine_any_precision.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._bitserial import (
    BitSerialConv,
    BitSerialLinear,
    BitSerialStem,
    _pack_sign_step,
    _words,
)
from ._epilogue import _Epilogue, _FusedEpilogue

__all__ = ["bind_qconv", "bind_qlinear", "bind_qstem", "qconv_reader"]


def _pre_fn(steps: list[dict[str, Any]], t: dict[str, np.ndarray]) -> tuple[Any, np.ndarray | None]:
    """(callable or None, fused bias or None): a lone ``bias`` step is fused into the
    quantizer ((x + b) / step, torch's order); other steps run as an epilogue first."""
    if not steps:
        return None, None
    if len(steps) == 1 and steps[0]["kind"] == "bias":
        return None, np.ascontiguousarray(t[steps[0]["bias"]], np.float32)
    epi = _Epilogue(steps, t)
    return (lambda x: epi(x, None)), None


def _emitter(plan: Any, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
    """emit(acc float32): the op's epilogue into its output buffer; the fused numba epilogue
    (same arithmetic) when the steps fit it, else the numpy one."""
    kinds = [st["kind"] for st in op["epilogue"]]
    fe = (
        _FusedEpilogue.build(op["epilogue"], t) if set(kinds) <= set(_FusedEpilogue.ORDER) else None
    )
    if fe is None:
        epi = _Epilogue(op["epilogue"], t)
        return lambda acc: plan._emit(op, acc, epi)
    out = plan.bufs[op["output"]]
    res = plan.bufs[op["inputs"][1]] if len(op["inputs"]) == 2 else None

    def emit(acc: np.ndarray) -> None:
        fe(acc, None if res is None else res.array, out.array)

    return emit


class _Route:
    """A layer's W1A1 route (:meth:`_Variants.binary`): ``run`` calls its kernels; ``spec`` =
    (bias, bits, border): where a producing route's kernel may pack this route's input signs
    (None: it always packs them itself); ``fresh``: the plan call in which a producer did.
    ``gap``: a linear route's ``gap(h)``, which computes the layer from the global average
    pool's input h (N, H, W, C) in one call (None: it cannot); the route then skips."""

    __slots__ = ("fresh", "gap", "run", "spec")

    def __init__(self, run: Any = None, spec: Any = None) -> None:
        self.run, self.spec, self.fresh = run, spec, -1
        self.gap: Any = None


class _Variants:
    """An op's run-time variants (any-precision ``.bcnn``): its act steps, and its epilogue
    emitters and ``pre`` functions per step-list index, built on first use (-1: the op's own).
    ``pick(precision)`` -> (weight bits, act bits or None, step, pre, bias, emit)."""

    def __init__(self, plan: Any, op: dict[str, Any], t: dict[str, np.ndarray]) -> None:
        self.plan, self.op, self.t = plan, op, t
        self.name = op["name"]
        p = op.get("precision") or {}
        steps = p.get("act_steps")
        self.steps = [float(v) for v in t[steps]] if steps else []
        self.step = float(t[op["act_step"]][0]) if "act_step" in op else 1.0
        self._emit: dict[int, Any] = {}
        self._pre: dict[int, tuple[Any, np.ndarray | None]] = {}
        self._binary: dict[tuple[int, ...], Any] = {}
        self._last: tuple[Any, Any] = (self, None)  # (setting's selection, its route)
        self._consumer: Any = False  # (variants, layer) of the qconv reading the output

    def emit(self, j: int) -> Any:
        e = self._emit.get(j)
        if e is None:
            op = self.op
            if j >= 0:
                op = {**op, "epilogue": op["precision"]["epilogues"]["steps"][j]}
            e = self._emit[j] = _emitter(self.plan, op, self.t)
        return e

    def pre(self, j: int) -> tuple[Any, np.ndarray | None]:
        f = self._pre.get(j)
        if f is None:
            steps = self.op.get("pre", []) if j < 0 else self.op["precision"]["pres"]["steps"][j]
            f = self._pre[j] = _pre_fn(steps, self.t)
        return f

    def pick(self, precision: dict[str, Any]) -> tuple[Any, ...]:
        s = (precision.get("sel") or {}).get(self.name)
        if s is None:  # the op's own (highest) precision, or the weight-plane knob
            return (precision.get("weight_bits"), None, self.step, *self.pre(-1), self.emit(-1))
        step = self.steps[s.act_index] if self.steps else self.step
        return (s.weight_bits, s.act_bits, step, *self.pre(s.pre), self.emit(s.epilogue))

    def binary(self, precision: dict[str, Any], layer: Any, x: np.ndarray | None = None) -> Any:
        """The fused binary route of a conv or linear layer selected at W1A1 (a stem at W1:
        ``x`` its input), or None (see :func:`_route`, :func:`_route_linear`,
        :func:`_route_stem`)."""
        sel = precision.get("sel")
        if sel is self._last[0]:  # the same setting as the last call (settings are immutable)
            return self._last[1]
        s = (sel or {}).get(self.name)
        if s is None or s.weight_bits != 1 or (x is None and s.act_bits != 1):
            self._last = (sel, None)
            return None
        nxt = None  # the consumer's route, when this route's kernel can pack its input signs
        if not isinstance(layer, BitSerialLinear):
            c = self.consumer()
            nr = c[0].binary(precision, c[1]) if c is not None else None
            nxt = nr if nr is not None and nr.spec is not None else None
        key = (s.act_index, s.pre, s.epilogue, id(nxt))
        r = self._binary.get(key, False)
        if r is False:
            if x is not None:
                r = _route_stem(self, s, layer, x, nxt)
            elif isinstance(layer, BitSerialLinear):
                r = _route_linear(self, s, layer)
            else:
                r = _route(self, s, layer, nxt)
            self._binary[key] = r
        self._last = (sel, r)
        return r

    def consumer(self) -> Any:
        """(variants, layer) of the qconv that quantizes this op's output, when it is the only
        op reading that output as its input (a residual read of the float stream is fine),
        else None."""
        if self._consumer is False:
            self._consumer = qconv_reader(self.plan, self.op["output"])
        return self._consumer


def qconv_reader(plan: Any, name: str) -> Any:
    """(variants, layer) of the qconv that quantizes the value ``name``, when it is the only
    op reading ``name`` as its input (a residual read of the float stream is fine), else
    None. ``plan``: the reference plan (its ops and k-bit ops)."""
    first = [o for o in plan.ops if o["inputs"] and o["inputs"][0] == name]
    if len(first) == 1 and first[0]["op"] == "qconv":
        return plan.kbit.get(first[0]["name"])
    return None


def _packs_as_sign(step: float | np.floating[Any]) -> bool:
    """Whether :func:`_sign_packer` packs the sign of x + b alone at this step."""
    return bool(0 < np.float32(step) < 2)


def _sign_packer(step: float) -> Any:
    """pack(x, bias, out, pad): the 1-bit codes of :func:`._bitserial._pack_sign_step` (bit =
    (x + b) / step < 0 in float32) for one step. With 0 < step < 2 that is the sign of the
    rounded sum s = x + b alone, packed by the binary models' vectorized kernel: s / step
    keeps the sign of s, and a negative s (|s| >= 2^-149) over step < 2 exceeds 2^-150 in
    magnitude, so it does not round to -0. Larger steps can flush a denormal s to -0 (code
    +1): those run the division."""
    st = np.float32(step)
    if _packs_as_sign(st):
        from ._kernels._packing import _pack_rows_padded

        return _pack_rows_padded
    return lambda x, b, out, pad: _pack_sign_step(x, b, st, out, pad)


def _route(v: _Variants, s: Any, layer: BitSerialConv, nxt: _Route | None = None) -> Any:
    """A conv at W1A1 is a binary conv: run it on the binary model's fused kernels, or None
    when this selection does not fit them.

    The 1-bit activation code of v = (x + b) / step is +1 iff v >= 0 (:func:`_sign_packer`
    packs it straight into a zero-bordered buffer). The top weight plane alone is X' = 2^d s
    (d = planes - 1),
    so the combined integer is acc << d and its scale step gives
    float32(acc) * (2^d * scale) exactly (a power of two). Then batch norm (the same fma),
    RPReLU and the residual add: the fused epilogue of :func:`bind_conv_affine` with that
    ``prescale``. Same bits as the bit-serial path (tests/test_engine_any_precision.py).

    When the consumer of the output is a W1A1 route too (``nxt``), this kernel also packs the
    consumer's input signs (its ``spec``: the sign of out + b, as the binary models' fused
    pack) and marks them fresh for this call; the consumer then skips its own pack."""
    from . import _kernels as K

    plan, op, t = v.plan, v.op, v.t
    step = v.steps[s.act_index] if v.steps else v.step
    fn, bias = v.pre(s.pre)
    steps = op["precision"]["epilogues"]["steps"][s.epilogue] if s.epilogue >= 0 else []
    kinds = [st["kind"] for st in steps]
    res = op["inputs"][1] if len(op["inputs"]) == 2 else None
    want = ["scale", "bn", *(["rprelu"] if "rprelu" in kinds else []), *(["add"] if res else [])]
    if kinds != want or fn is not None or not layer.w.act_signed or layer.w.zero:
        return None
    d = layer.w.bits - 1
    pre = _prescale(v, steps, layer.w.bits)
    if pre is None:
        return None
    src, out = plan.bufs[op["inputs"][0]], plan.bufs[op["output"]]
    rb = plan.bufs[res] if res is not None else None
    f32 = lambda a: np.ascontiguousarray(t[a], np.float32)  # noqa: E731
    bn = steps[1]
    rp = None
    if "rprelu" in kinds:
        r = steps[2]
        rp = (f32(r["gamma"]), f32(r["slope"]), f32(r["zeta"]))
    n, h, w, c = src.array.shape
    p = layer.padding
    b = np.zeros(c, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
    bits = np.zeros((n, h + 2 * p, w + 2 * p, _words(c)), np.uint64)  # border 0: one-padding
    pack = _sign_packer(step)
    pw, _ = layer.w.get(d, lambda a: K.prepare_conv_weights(a, layer.cin))
    conv = K.bind_conv_affine(
        bits.shape, pw,
        f32(bn["alpha"]), f32(bn["beta"]), stride=layer.stride, padding=0, rprelu=rp,
        residual_channels=rb.channels if rb is not None else None, fma=True, prescale=pre,
        pack=nxt.spec if nxt is not None else None,
    )  # fmt: skip
    route = _Route(spec=(b, bits, p) if _packs_as_sign(step) else None)

    def run() -> None:
        if route.fresh != plan.calls:  # no producer packed them in this call
            pack(src.array, b, bits, p)
        conv(bits, rb.array if rb is not None else None, out.array)
        if nxt is not None:
            nxt.fresh = plan.calls

    route.run = run
    return route


def _route_linear(v: _Variants, s: Any, layer: BitSerialLinear) -> Any:
    """A linear layer at W1A1 is a binary linear layer: its pre-quantization steps, then sign
    codes, the top weight plane's XOR-popcount and its place value in one fused call
    (:func:`._fused.fused_sign_linear`: the bit-serial path's integers), then the op's
    epilogue. A batch norm before (the classifier's transitional BN) and a ``scale``,
    ``affine`` epilogue after (float32 per-output vectors) run in that call too, with the
    arithmetic of :class:`._epilogue._Epilogue`; other steps run as their own calls. None
    when the layer is not on a signed grid."""
    from . import _kernels as K
    from ._fused import fused_gap_sign_linear, fused_sign_linear

    if layer.w.zero or not layer.w.act_signed:
        return None
    d = layer.w.bits - 1
    layer.w.get(d, lambda a: K.prepare_dense_weights(a, layer.k))  # checks the plane's tail
    w = np.ascontiguousarray(layer.w.planes[d])  # (O, Kw) uint64, place 2^d
    op, t = v.op, v.t
    pres = op.get("pre", []) if s.pre < 0 else op["precision"]["pres"]["steps"][s.pre]
    epis = op["epilogue"] if s.epilogue < 0 else op["precision"]["epilogues"]["steps"][s.epilogue]
    o_ = layer.w.out
    e64 = np.zeros(0, np.float64)
    e32 = np.zeros(0, np.float32)
    if [p["kind"] for p in pres] == ["bn"] and all(
        t[pres[0][k]].shape == (layer.k,) for k in ("alpha", "beta")
    ):  # the kernel indexes them by input feature, unchecked
        bn = (
            np.asarray(t[pres[0]["alpha"]], np.float64),
            np.asarray(t[pres[0]["beta"]], np.float64),
        )
        fn, bias = None, None
    else:
        bn = None
        fn, bias = v.pre(s.pre)
    vec = lambda k: t[k].dtype == np.float32 and t[k].shape == (o_,)  # noqa: E731
    if [e["kind"] for e in epis] == ["scale", "affine"] and all(
        vec(k) for k in (epis[0]["scale"], epis[1]["weight"], epis[1]["bias"])
    ):
        epi = tuple(
            np.ascontiguousarray(t[k])
            for k in (epis[0]["scale"], epis[1]["weight"], epis[1]["bias"])
        )
        emit = None
    else:
        epi = None
        emit = v.emit(s.epilogue)
    src = v.plan.bufs[op["inputs"][0]]
    n = src.array.shape[0]
    b = np.zeros(layer.k, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
    st = np.float32(v.steps[s.act_index] if v.steps else v.step)
    acc = np.empty((n, o_), np.float32)  # (N, O)
    bits = np.empty(w.shape[1], np.uint64)  # (Kw,)
    al, be = bn if bn is not None else (e64, e64)
    sc, aw, ab = epi if epi is not None else (e32, e32, e32)
    has_bn, has_epi = bn is not None, epi is not None
    plan = v.plan
    out = plan.bufs[op["output"]]
    route = _Route()

    def run() -> None:
        if route.fresh == plan.calls:  # computed from the pool's input in this call
            return
        a = src.array if fn is None else fn(src.array)
        y = acc if emit is not None else out.array
        fused_sign_linear(a, al, be, has_bn, b, st, w, layer.k, d, sc, aw, ab, has_epi, y, bits)
        if emit is not None:
            emit(acc)

    mean = np.empty((n, layer.k), np.float32)  # (N, C)

    def gap(h: np.ndarray) -> None:
        h3 = h.reshape(h.shape[0], -1, h.shape[-1])  # (N, H*W, C)
        fused_gap_sign_linear(
            h3, mean, al, be, has_bn, b, st, w, layer.k, d, sc, aw, ab, has_epi, out.array, bits
        )
        route.fresh = plan.calls

    route.run = run
    if fn is None and emit is None:  # the whole layer is in the fused call
        route.gap = gap
    return route


def _prescale(v: _Variants, steps: list[dict[str, Any]], bits: int) -> np.ndarray | None:
    """The scale step's per-channel factor times 2^(bits - 1) (the top weight plane's place),
    or None when that product is not exact in float32."""
    d = bits - 1
    wscale = np.asarray(v.t[steps[0]["scale"]], np.float32)
    pre = (wscale * np.float32(2.0**d)).astype(np.float32)
    if not (np.all(np.isfinite(pre)) and np.array_equal(pre / np.float32(2.0**d), wscale)):
        return None
    return pre


def _route_stem(
    v: _Variants, s: Any, layer: BitSerialStem, x: np.ndarray, nxt: _Route | None = None
) -> Any:
    """A bit-plane stem at W1 is the binary models' stem: its top weight plane on the fused
    stem kernel, with the weight scale as its ``prescale`` (as :func:`_route`), batch norm and
    RPReLU from registers (and the consumer's input signs packed, as :func:`_route`); None
    when the selection does not fit."""
    from . import _kernels as K

    op, t = v.op, v.t
    steps = op["precision"]["epilogues"]["steps"][s.epilogue] if s.epilogue >= 0 else []
    kinds = [st["kind"] for st in steps]
    if kinds not in (["scale", "bn"], ["scale", "bn", "rprelu"]) or layer.w.zero:
        return None
    pre = _prescale(v, steps, layer.w.bits)
    if pre is None:
        return None
    f32 = lambda a: np.ascontiguousarray(t[a], np.float32)  # noqa: E731
    rp = None
    if "rprelu" in kinds:
        r = steps[2]
        rp = (f32(r["gamma"]), f32(r["slope"]), f32(r["zeta"]))
    pw, _ = layer.w.get(layer.w.bits - 1, lambda a: K.prepare_stem_weights(a, layer.c, layer.p))
    stem = K.bind_stem_affine(
        x.shape, pw, f32(steps[1]["alpha"]), f32(steps[1]["beta"]), stride=layer.stride,
        padding=layer.padding, rprelu=rp, fma=True, prescale=pre,
        pack=nxt.spec if nxt is not None else None,
    )  # fmt: skip
    plan = v.plan
    out = plan.bufs[op["output"]]

    def run(x: np.ndarray) -> None:
        y = stem(x, out.array)
        if y is not out.array:
            out.array[...] = y
        if nxt is not None:
            nxt.fresh = plan.calls

    return _Route(run)


def _bind_stream_op(plan: Any, op: dict[str, Any], t: dict[str, np.ndarray], layer: Any) -> Any:
    """The step of a k-bit op reading a float input (qconv, qlinear): its W1A1 route when
    the setting selects one, else the bit-serial layer."""
    v = _Variants(plan, op, t)
    src = plan.bufs[op["inputs"][0]]
    precision = plan.precision
    plan.kbit[op["name"]] = (v, layer)

    def run(x: np.ndarray) -> None:
        fast = v.binary(precision, layer)
        if fast is not None:
            fast.run()
            return
        wb, ab, step, pre, bias, emit = v.pick(precision)
        a = src.array if pre is None else pre(src.array)
        emit(layer(a, step, bias, wb, act_bits=ab))

    return run


def bind_qconv(plan: Any, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
    layer = BitSerialConv(
        t[op["weight"]], op["in_channels"], op["act_bits"], op["act_signed"],
        op["stride"][0], op["pad"][0], bool(op.get("weight_zero", False)),
    )  # fmt: skip
    return _bind_stream_op(plan, op, t, layer)


def bind_qlinear(plan: Any, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
    layer = BitSerialLinear(
        t[op["weight"]], op["in_features"], op["act_bits"], op["act_signed"],
        bool(op.get("weight_zero", False)),
    )  # fmt: skip
    return _bind_stream_op(plan, op, t, layer)


def bind_qstem(plan: Any, op: dict[str, Any], t: dict[str, np.ndarray]) -> Any:
    layer = BitSerialStem(
        t[op["weight"]], op["in_channels"], op["planes"], op["stride"][0], op["pad"][0],
        bool(op.get("weight_zero", False)),
    )  # fmt: skip
    v = _Variants(plan, op, t)
    precision = plan.precision

    def run(x: np.ndarray) -> None:
        fast = v.binary(precision, layer, x)
        if fast is not None:
            fast.run(x)
            return
        wb, _, _, _, _, emit = v.pick(precision)
        emit(layer(x, wb))

    return run
