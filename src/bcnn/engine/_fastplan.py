"""The numba fast path of the executor: a plan per input shape whose steps call the kernels'
checked-once entry points, with sign/pack folded into the producing kernel where possible and
fused epilogues (ops the kernels do not cover run :class:`_plan._Plan`'s numpy code).
Bit-exact with :class:`_plan._Plan` and with torch (tests/test_engine_exact.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._epilogue import _Epilogue, _FusedEpilogue
from ._format import words
from ._kbit_ops import qconv_reader
from ._kernels._bound import Record
from ._plan import _Plan


class _FastPlan:
    """Runs the graph with the numba kernels of ``_kernels`` (ops they do not cover, e.g.
    non-square strides, run the numpy reference code of :class:`_Plan`)."""

    def __init__(self, model: Any, shape: tuple[int, int, int, int]) -> None:
        """model: a :class:`~bcnn.engine.PackedModel` (its graph, tensors and precision)."""
        from . import _kernels as K

        self.K = K
        self.ref = _Plan(model, shape)  # shapes, checks, and the fallback
        self.precision = self.ref.precision  # the k-bit fallback ops read it at run time
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
        # for the plan runner: each step's serial kernel call on fixed arrays (None: the step
        # has none), and the fixed array each value lives in when its producer has one
        self._records: list[Record | None] = []
        self._fixed: dict[str, np.ndarray] = {}
        for i, (op, ref_step) in enumerate(zip(ops, self.ref.steps, strict=True)):
            self._index = i
            self._records.append(None)
            f = getattr(self, "_op_" + op["op"], None)
            if i in self._skip:
                f = self._op_done
            step = f(op) if f is not None else None
            self.steps.append(step if step is not None else self._fallback(op, ref_step))
            self._root.setdefault(op["output"], op["output"])
        self._hot = [s for i, s in enumerate(self.steps) if i not in self._skip]
        hot_records = [r for i, r in enumerate(self._records) if i not in self._skip]
        self._runner: Callable[[np.ndarray], None] | None = None
        self._runnable = self.output in self._fixed and all(r is not None for r in hot_records)
        self._hot_records = hot_records if self._runnable else []
        self._runner_out = self._fixed.get(self.output)
        from ._threads import get_num_threads

        self._threads = get_num_threads
        if get_num_threads() == 1:  # the serial kernels the records name: loaded from the
            from ._precompile import precompile  # cache, or compiled on two cores

            precompile(self._records)
        else:
            from ._numba_start import start_numba

            start_numba()  # numba's registries without SciPy's BLAS probe (once)

    def use_runner(self) -> None:
        """From now on, run the hot steps as one compiled call (:mod:`._runner`) when they all
        have one (same kernels, same order, same arrays: the same bits). Enabled by the model
        once calls overlap; single-threaded use keeps the step-by-step calls, whose kernels load
        faster from the cache (the runner's compiled code holds its own copy of them)."""
        if self._runnable and self._runner is None:
            from ._runner import build_runner

            self._runner = build_runner(self._hot_records)  # type: ignore[arg-type]
            self._runnable = self._runner is not None

    def _record(self, rec: Record | None, outputs: dict[str, np.ndarray]) -> None:
        """The current step's kernel call (None: it has none) and the fixed arrays it
        writes its values into."""
        self._records[self._index] = rec
        if rec is not None:
            self._fixed.update(outputs)

    def _fixed_in(self, *names: str | None) -> bool:
        """Whether every named input (None: absent) lives in a fixed array."""
        return all(n is None or n in self._fixed for n in names)

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

    def _kbit(self, op: dict[str, Any]) -> Any:
        """A k-bit op (qconv, qlinear, qstem: :mod:`._kbit_ops`, which picks its kernels per
        call from the run-time precision) run in the reference plan's step without the
        fallback's copies: its float inputs are lent to the reference buffers it reads at run
        time, and its output buffer is handed on (it rewrites that buffer on every call).

        A conv whose residual input is read by no later op, when the call's setting runs it
        on its W1A1 route (:func:`._kbit_ops._route`), writes its output over that input
        (h += ..., as the binary models' convs do): :func:`._kernels.bind_conv_affine` reads
        each residual value before writing the same index, and the route packs its input
        signs before the conv runs. The bit-serial path keeps its own output array (its
        epilogue writes the output before it adds the residual)."""
        ref, ref_step = self.ref, self.ref.steps[self._index]
        names = [n for n in op["inputs"] if n != "input"]
        bufs = [ref.bufs[n] for n in names]
        if any(b.kind not in ("stream", "vector") for b in bufs):
            return None
        own = [b.array for b in bufs]  # the buffers' own arrays, for inputs that do not fit
        out, oname = ref.bufs[op["output"]], op["output"]
        rbuf = None  # the residual's buffer, when the output may overwrite it
        if op["op"] == "qconv" and len(op["inputs"]) == 2:
            res = op["inputs"][1]
            rb = ref.bufs[res]
            assert rb.array is not None and out.array is not None
            if rb.array.shape == out.array.shape and self._can_overwrite(res):
                self._root[oname] = self._root[res]
                rbuf = rb
        own_out, kbit = out.array, ref.kbit.get(op["name"])

        def run(v: dict[str, np.ndarray], x: np.ndarray) -> None:
            for n, b, o in zip(names, bufs, own, strict=True):
                a = v[n]
                if a is b.array:  # lent on an earlier call (producers reuse their arrays)
                    continue
                assert o is not None
                if a.shape == o.shape and a.dtype == np.float32 and a.flags.c_contiguous:
                    b.array = a
                else:
                    o[...] = a
                    b.array = o
            fast = kbit[0].binary(ref.precision, kbit[1]) if kbit is not None else None
            if rbuf is not None:  # in place on the W1A1 route only
                out.array = rbuf.array if fast is not None else own_out
            if fast is not None:  # the route the reference step would take, called directly
                fast.run()
            else:
                ref_step(x)
            assert out.array is not None
            v[oname] = out.array

        return run

    _op_qconv = _op_qlinear = _op_qstem = _kbit

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
                rec = stem_affine.record(sbuf)  # type: ignore[attr-defined]
                self._record(rec, {name: sbuf} | ({nxt[1]: nxt[0][1]} if nxt else {}))
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
                    if self._fixed_in(src, res):
                        h0 = self._fixed[res]
                        rec = affine.record(self._fixed[src], h0, h0)  # type: ignore[attr-defined]
                        self._record(rec, {name: h0, bname: bits})

                    def run_inplace_pack(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                        h = v[res]
                        v[name] = affine(v[src], h, h)
                        v[bname] = bits

                    return run_inplace_pack
                pbuf = np.empty(ob.array.shape, np.float32)
                if self._fixed_in(src, res):
                    r0 = self._fixed[res] if res is not None else None
                    rec = affine.record(self._fixed[src], r0, pbuf)  # type: ignore[attr-defined]
                    self._record(rec, {name: pbuf, bname: bits})

                def run_pack(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                    v[name] = affine(v[src], v[res] if res is not None else None, pbuf)
                    v[bname] = bits

                return run_pack
            if res is None:
                buf = np.empty(ob.array.shape, np.float32)
                if self._fixed_in(src):
                    rec = affine.record(self._fixed[src], None, buf)  # type: ignore[attr-defined]
                    self._record(rec, {name: buf})

                def run_fused(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                    v[name] = affine(v[src], None, buf)

                return run_fused
            assert rb is not None
            if rb.channels == op["out_channels"] and self._can_overwrite(res):
                self._root[name] = self._root[res]  # h += ... in place
                if self._fixed_in(src, res):
                    h0 = self._fixed[res]
                    rec = affine.record(self._fixed[src], h0, h0)  # type: ignore[attr-defined]
                    self._record(rec, {name: h0})

                def run_inplace(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                    h = v[res]
                    v[name] = affine(v[src], h, h)

                return run_inplace
            buf = np.empty(ob.array.shape, np.float32)
            if self._fixed_in(src, res):
                fx = self._fixed
                rec = affine.record(fx[src], fx[res], buf)  # type: ignore[attr-defined]
                self._record(rec, {name: buf})

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
                if self._fixed_in(src):
                    rec = packer.record(self._fixed[src])  # type: ignore[attr-defined]
                    self._record(rec, {name: rec[1][2]})

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
        if self._fixed_in(src):
            rec = pool.record(self._fixed[src])  # type: ignore[attr-defined]
            self._record(rec, {name: rec[1][1]} | ({nxt[1]: nxt[0][1]} if nxt else {}))
        if nxt is not None:
            bits, bname = nxt[0][1], nxt[1]

            def run_pack(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                v[name] = pool(v[src])
                v[bname] = bits

            return run_pack
        reader = qconv_reader(self.ref, name)
        if reader is not None:  # a k-bit conv: pack its W1A1 route's signs when it runs
            from ._kernels._bound import _avgpool_pack

            rv, layer = reader
            precision, calls = self.ref.precision, self.ref
            self._records[self._index] = None  # never the plain pool's record in a runner
            out = pool(np.zeros((self._shape[0], sb.h, sb.w, sb.channels), np.float32))

            def run_kbit(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                r = rv.binary(precision, layer)
                if r is not None and r.spec is not None:
                    b, bits, p = r.spec
                    _avgpool_pack(v[src], out, b, bits, p, True)
                    r.fresh = calls.calls
                else:
                    pool(v[src])
                v[name] = out

            return run_kbit

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
        if self._fixed_in(src):
            h3 = self._fixed[src].reshape(n, hw, c)
            self._record(("head", (h3, neg, wl, c, sc, bi, out, bits, acc)), {oname: out})

        def run(v: dict[str, np.ndarray], x: np.ndarray) -> None:
            fused_head(v[src].reshape(n, hw, c), neg, wl, c, sc, bi, out, bits, acc)
            v[oname] = out

        return run

    def _kbit_reader(self, name: str) -> Any:
        """(variants, layer) of the k-bit op that is the only reader of ``name`` and the next
        op, when there is one (and ``name`` is not the graph output), else None."""
        i = self._index
        if name == self.output or self._readers(name) != [i + 1]:
            return None
        return self.ref.kbit.get(self._ops[i + 1]["name"])

    def _op_gap(self, op: dict[str, Any]) -> Any:
        """The global average pool; the fused binary head when a binary classifier follows;
        before a k-bit classifier, its W1A1 route's fused pool + classifier call when the
        call's setting selects that route (the pooled vector is then not written)."""
        K = self.K
        src, name = op["inputs"][0], op["output"]
        head = self._head(op)
        if head is not None:
            return head
        reader = self._kbit_reader(name)
        sb = self.ref.bufs[src]
        if reader is not None and getattr(reader[1], "k", None) == sb.channels:  # a linear
            rv, layer = reader
            precision, ob = self.ref.precision, self.ref.bufs[name]
            assert ob.array is not None
            stale = np.empty(ob.array.shape, np.float32)  # what the skipped vector reads

            def run_kbit(v: dict[str, np.ndarray], x: np.ndarray) -> None:
                r = rv.binary(precision, layer)
                if r is not None and r.gap is not None:
                    r.gap(v[src])
                    v[name] = stale
                else:
                    v[name] = K.global_avgpool(v[src])

            return run_kbit

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
        self.ref.calls += 1  # the k-bit ops' steps run in the reference plan (_kbit)
        if self._runner is not None and self._threads() == 1:
            self._runner(x)  # the hot steps' serial calls, in one compiled call
            return np.array(self._runner_out, dtype=np.float32, copy=True)
        v: dict[str, np.ndarray] = {}
        for step in self._hot:  # the steps less those done by an earlier fused step
            step(v, x)
        return np.array(v[self.output], dtype=np.float32, copy=True)


# ------------------------------------------------------------------ the public object
