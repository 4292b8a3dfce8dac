"""Constants and LLVM-level building blocks: the GEMM micro-kernel intrinsic, vector
compare/pack helpers and fused epilogues emitted as IR (see the package docstring)."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._ir import counted_loop

LANES = 32  # output channels per prepared weight block (4 x 8 uint64 lanes)
MR = 4  # output rows (pixels) per micro-kernel tile
_MB = 8  # micro tiles per macro tile (the im2col patch of MB*MR pixels stays in L1)
_VL = 8  # uint64 lanes in a 512-bit vector
_NV = LANES // _VL

# work (tiles * blocks * words) below which the serial variant runs even with threads
_PARALLEL_MIN_WORK = 4096

# ------------------------------------------------------------------------------ micro-kernel


def _is_c_array(t: types.Type, dtype: types.Type) -> bool:
    return isinstance(t, types.Array) and t.dtype == dtype and t.layout == "C"


def _args_ok(arrays: list[tuple[types.Type, types.Type]], ints: tuple[types.Type, ...]) -> bool:
    """An intrinsic typer's check: each (type, dtype) a C-contiguous array of that dtype, and
    each of ``ints`` an integer."""
    return all(_is_c_array(t, d) for t, d in arrays) and all(
        isinstance(t, types.Integer) for t in ints
    )


def _arg_readers(context, builder, signature, args):  # type: ignore[no-untyped-def]
    """For an intrinsic's codegen: ``ptr(k, elt)``, argument k (an array) as a pointer to its
    data typed ``elt`` (default i64), and ``idx(k)``, argument k (an integer) as an i64."""
    st = signature.args

    def ptr(k, elt=None):  # type: ignore[no-untyped-def]
        arr = context.make_array(st[k])(context, builder, args[k])
        return builder.bitcast(arr.data, (elt or ir.IntType(64)).as_pointer())

    def idx(k):  # type: ignore[no-untyped-def]
        return context.cast(builder, args[k], st[k], types.int64)

    return ptr, idx


_EPI_KINDS = ("int", "affine", "affine_rp", "affine_res", "affine_rp_res")


def _epi_args_ok(kind, nbits, out, ooffs, o0, scale, bias, g, s, z, res, resoffs, fma) -> bool:  # type: ignore[no-untyped-def]
    """An intrinsic typer's check of the fused epilogue's arguments (:func:`_emit_epilogue`)."""
    return bool(
        _is_c_array(out, types.int32 if kind == "int" else types.float32)
        and _is_c_array(ooffs, types.int64)
        and _is_c_array(resoffs, types.int64)
        and all(_is_c_array(t, types.float32) for t in (scale, bias, g, s, z, res))
        and isinstance(nbits, types.Integer)
        and isinstance(o0, types.Integer)
        and isinstance(fma, types.Boolean | types.Integer)
    )


def _emit_epilogue(context, builder, kind, rows, out_p, o0, vec_ps, res_p, ctl):  # type: ignore[no-untyped-def]
    """Emit the epilogue of rows of 32 outputs: rows = [(d, out_off, res_off)], d four
    <8 x i64> (or <8 x i32>) dot products.

    kind ``int``: out[out_off + l] = int32(d); otherwise y = float32(d) * scale[o] + bias[o]
    (IEEE multiply then add), or with the i64 control word ``ctl`` (:func:`._conv._ctl`):
    bit 0 set: fma(float32(d), scale[o], bias[o]), one rounding, as ATen's CPU batch norm;
    bit 1 set too: fma(float32(d) * pre[o], scale[o], bias[o]) (the multiply rounded first,
    a k-bit layer's scale before its batch norm) with pre[o] = scale[(ctl >> 2) + o];
    ``rp``: y = y - g[o]; y = y*s[o] if y < 0 else y; y = y + z[o]; ``res``:
    y = res[res_off + l] + y; out[out_off + l] = y. o = o0 + l.
    vec_ps: element pointers (scale, bias, g, s, z); the per-channel vectors are loaded once
    for all rows, and the variant is a branch, not a select of every result.
    """
    i64, i32, f32 = ir.IntType(64), ir.IntType(32), ir.FloatType()
    v32, vf = ir.VectorType(i32, _VL), ir.VectorType(f32, _VL)

    def at(base, off, j, vt):  # type: ignore[no-untyped-def]
        p = builder.gep(base, [builder.add(off, ir.Constant(i64, j * _VL))])
        return builder.bitcast(p, vt.as_pointer())

    def i32s(d):  # type: ignore[no-untyped-def]
        """A part as <_VL x i32>: |d| < 2^31, so i64 parts are truncated (i32 ones, which the
        lut stem computes directly, are taken as they are)."""
        return d if d.type == v32 else builder.trunc(d, v32)

    if kind == "int":
        for d, out_off, _ in rows:
            for j in range(_NV):
                builder.store(i32s(d[j]), at(out_p, out_off, j, v32), align=4)
        return
    names = ["scale", "bias"] + (["g", "s", "z"] if "rp" in kind else [])
    ch = {
        nm: [builder.load(at(vec_ps[q], o0, j, vf), align=4) for j in range(_NV)]
        for q, nm in enumerate(names)
    }
    zero_f = ir.Constant(vf, [0.0] * _VL)
    fma_fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{_VL}f32"
    )

    def emit(use_fma: bool, pre: list | None = None) -> None:  # type: ignore[type-arg]
        for d, out_off, res_off in rows:
            for j in range(_NV):
                # |d| < 2^31: via int32, whose conversion AVX2 has (an i64 one is scalarized)
                x = builder.sitofp(i32s(d[j]), vf)
                if pre is not None:
                    x = builder.fmul(x, pre[j])
                sc, bi = ch["scale"][j], ch["bias"][j]
                if use_fma:
                    y = builder.call(fma_fn, [x, sc, bi])
                else:
                    y = builder.fadd(builder.fmul(x, sc), bi)
                if "rp" in kind:
                    y = builder.fsub(y, ch["g"][j])
                    neg = builder.fcmp_ordered("<", y, zero_f)
                    y = builder.select(neg, builder.fmul(y, ch["s"][j]), y)
                    y = builder.fadd(y, ch["z"][j])
                if "res" in kind:
                    y = builder.fadd(builder.load(at(res_p, res_off, j, vf), align=4), y)
                builder.store(y, at(out_p, out_off, j, vf), align=4)

    one, two = ir.Constant(i64, 1), ir.Constant(i64, 2)
    fma = builder.icmp_signed("!=", builder.and_(ctl, one), ir.Constant(i64, 0))
    prescaled = builder.icmp_signed("!=", builder.and_(ctl, two), ir.Constant(i64, 0))
    with builder.if_else(prescaled) as (then_pre, otherwise_pre):
        with then_pre:
            off = builder.add(o0, builder.ashr(ctl, two))
            emit(True, [builder.load(at(vec_ps[0], off, j, vf), align=4) for j in range(_NV)])
        with otherwise_pre:
            with builder.if_else(fma) as (then, otherwise):
                with then:
                    emit(True)
                with otherwise:
                    emit(False)


def _make_microkernel(with_shifts: bool, kind: str | None = None):  # type: ignore[no-untyped-def]
    """Build a micro-kernel intrinsic: ``kind=None`` stores the popcount sums (see :data:`_mk`),
    a kind of :data:`_EPI_KINDS` applies that epilogue and stores the outputs (:data:`_mkf`)."""
    n_base = 8  # a, roffs, seg_words, seg_stride, nseg, b, b_off, shifts

    def check_base(a, roffs, seg_words, seg_stride, nseg, b, b_off, shifts):  # type: ignore[no-untyped-def]
        return (
            _is_c_array(a, types.uint64)
            and _is_c_array(roffs, types.int64)
            and _is_c_array(b, types.uint64)
            and _is_c_array(shifts, types.int64)
            and all(isinstance(t, types.Integer) for t in (seg_words, seg_stride, nseg, b_off))
        )

    if kind is None:

        def typer(typingctx, a, roffs, seg_words, seg_stride, nseg, b, b_off, shifts, acc, acc_off):  # type: ignore[no-untyped-def]
            base = (a, roffs, seg_words, seg_stride, nseg, b, b_off, shifts)
            if not (
                check_base(*base)
                and _is_c_array(acc, types.int64)
                and isinstance(acc_off, types.Integer)
            ):
                return None
            return types.void(*base, acc, acc_off), _codegen

    else:

        def typer(  # type: ignore[no-untyped-def,misc]
            typingctx, a, roffs, seg_words, seg_stride, nseg, b, b_off, shifts,
            nbits, out, ooffs, o0, scale, bias, g, s, z, res, resoffs, fma,
        ):  # fmt: skip
            base = (a, roffs, seg_words, seg_stride, nseg, b, b_off, shifts)
            epi = (nbits, out, ooffs, o0, scale, bias, g, s, z, res, resoffs, fma)
            if not (check_base(*base) and _epi_args_ok(kind, *epi)):
                return None
            sig = types.void(*base, nbits, out, ooffs, o0, scale, bias, g, s, z, res, resoffs, fma)
            return sig, _codegen

    def _codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i64 = ir.IntType(64)
        i32 = ir.IntType(32)
        vty = ir.VectorType(i64, _VL)

        data, idx = _arg_readers(context, builder, signature, args)

        ap, rp, bp, shp = data(0), data(1), data(5), data(7)
        seg_words, seg_stride, nseg, b_off = idx(2), idx(3), idx(4), idx(6)
        one = ir.Constant(i64, 1)
        zero_i = ir.Constant(i64, 0)
        ctpop = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty]), f"llvm.ctpop.v{_VL}i64"
        )
        zero = ir.Constant(vty, None)
        undef = ir.Constant(vty, ir.Undefined)
        splat_mask = ir.Constant(ir.VectorType(i32, _VL), None)

        def splat(s):  # type: ignore[no-untyped-def]
            v = builder.insert_element(undef, s, ir.Constant(i32, 0))
            return builder.shuffle_vector(v, undef, splat_mask)

        # row r reads a[roffs[r] + seg * seg_stride + w] for w < seg_words, seg < nseg
        arow0 = [
            builder.gep(ap, [builder.load(builder.gep(rp, [ir.Constant(i64, r)]))])
            for r in range(MR)
        ]
        jump = builder.add(builder.sub(seg_stride, seg_words), one)  # pointer step at seg end
        total = builder.mul(seg_words, nseg)
        bbase = builder.gep(bp, [b_off])
        # (a loop of no iterations when seg_words <= 0)
        stop = builder.select(builder.icmp_signed(">", seg_words, zero_i), total, zero_i)

        def body(t, vals):  # type: ignore[no-untyped-def]
            w, aoff, accs = vals[0], vals[1], vals[2:]  # word in the segment, offset from roffs
            boff = builder.mul(t, ir.Constant(i64, LANES))
            bvs = []
            for j in range(_NV):
                ptr = builder.gep(bbase, [builder.add(boff, ir.Constant(i64, j * _VL))])
                bvs.append(builder.load(builder.bitcast(ptr, vty.as_pointer()), align=8))
            shv = splat(builder.load(builder.gep(shp, [t]), align=8)) if with_shifts else None
            new = []
            for r in range(MR):
                sv = splat(builder.load(builder.gep(arow0[r], [aoff]), align=8))
                for j in range(_NV):
                    pc = builder.call(ctpop, [builder.xor(sv, bvs[j])])
                    if shv is not None:
                        pc = builder.shl(pc, shv)
                    new.append(builder.add(accs[r * _NV + j], pc))
            w1 = builder.add(w, one)
            seg_end = builder.icmp_signed("==", w1, seg_words)
            w_next = builder.select(seg_end, zero_i, w1)
            a_next = builder.add(aoff, builder.select(seg_end, jump, one))
            return [w_next, a_next, *new]

        init = [zero_i, zero_i] + [zero] * (MR * _NV)
        outs = counted_loop(builder, zero_i, stop, 1, init, body, "mk")[2:]
        if kind is None:
            cp, c_off = data(n_base), idx(n_base + 1)
            for i in range(MR * _NV):
                ptr = builder.gep(cp, [builder.add(c_off, ir.Constant(i64, i * _VL))])
                builder.store(outs[i], builder.bitcast(ptr, vty.as_pointer()), align=8)
            return context.get_dummy_value()
        k = n_base
        nbits = idx(k)
        out_p = data(k + 1, ir.IntType(32) if kind == "int" else ir.FloatType())
        oo_p = data(k + 2)
        o0 = idx(k + 3)
        vec_ps = tuple(data(k + 4 + q, ir.FloatType()) for q in range(5))
        res_p = data(k + 9, ir.FloatType())
        ro_p = data(k + 10)
        ctl = idx(k + 11)  # the epilogue's control word (bool fma: 0 / 1)
        nb_v = splat(nbits)
        two = ir.Constant(vty, [2] * _VL)
        rows = []
        for r in range(MR):
            d = [builder.sub(nb_v, builder.mul(two, outs[r * _NV + j])) for j in range(_NV)]
            out_off = builder.add(builder.load(builder.gep(oo_p, [ir.Constant(i64, r)])), o0)
            res_off = builder.add(builder.load(builder.gep(ro_p, [ir.Constant(i64, r)])), o0)
            rows.append((d, out_off, res_off))
        _emit_epilogue(context, builder, kind, rows, out_p, o0, vec_ps, res_p, ctl)
        return context.get_dummy_value()

    typer.__name__ = ("_mk_shift" if with_shifts else "_mk") + (f"_{kind}" if kind else "")
    return intrinsic(typer)


#: ``_mk(a, roffs, seg_words, seg_stride, nseg, b, b_off, shifts, acc, acc_off)``:
#: for r < MR, l < 32, with t = seg * seg_words + w running over the reduction,
#: ``acc[acc_off + r*32 + l] =``
#: ``sum_{seg < nseg, w < seg_words}``
#: ``popcount(a[roffs[r] + seg*seg_stride + w] ^ b[b_off + t*32 + l])``
#: a, b: C-contiguous uint64 (flat element offsets); roffs: int64 (MR,); acc: C-contiguous
#: int64; shifts unused. Segments let a KHxKW convolution read its patch straight from a padded
#: NHWC input (segment = one kernel row: KW*Cw contiguous words; seg_stride = padded row
#: length): no im2col copy. The caller guarantees every index is in bounds.
_mk = _make_microkernel(False)
#: As ``_mk`` with each word's popcount shifted left by ``shifts[t]``: the weighted sum over
#: bit-planes of the first layer.
_mk_shift = _make_microkernel(True)
#: Fused micro-kernels, one per epilogue kind: ``_mkf[kind](a, roffs, seg_words, seg_stride,
#: nseg, b, b_off, shifts, nbits, out, ooffs, o0, scale, bias, g, s, z, res, resoffs, fma)``:
#: d = nbits - 2*sum (as ``_mk``), then the epilogue of :func:`_emit_epilogue` for row r at
#: out[ooffs[r] + o0 + l] (and res[resoffs[r] + o0 + l]), straight from registers.
_mkf_int = _make_microkernel(False, "int")
_mkf_affine = _make_microkernel(False, "affine")
_mkf_rp = _make_microkernel(False, "affine_rp")
_mkf_res = _make_microkernel(False, "affine_res")
_mkf_rp_res = _make_microkernel(False, "affine_rp_res")
#: The first layer's fused micro-kernels (word shifts, no residual).
_mkf_shift_int = _make_microkernel(True, "int")
_mkf_shift_affine = _make_microkernel(True, "affine")
_mkf_shift_rp = _make_microkernel(True, "affine_rp")


def _make_row_epilogue(kind: str):  # type: ignore[no-untyped-def]
    """Build an intrinsic storing one full row of 32 accumulators through an epilogue
    (:func:`_emit_epilogue`), with explicit 8-lane vectors (numba's loop vectorizer leaves
    these loops scalar):
    ``_epi_<kind>(acc, acc_hi, hi, acc_off, nbits, out, out_off, scale, bias, g, s, z, res,
    res_off, o0, fma)``
    with d = nbits - 2*(acc[acc_off + l] + (acc_hi[acc_off + l] if hi else 0)): ``acc`` int64
    sums, or the lookup-table tiles' uint16 ones read as they are (no widening copy), with
    ``acc_hi`` the int64 part of a reduction too long for uint16 (read only when ``hi``).
    Every d is computed in int32 (|d| < 2^31). Unused arrays may be empty; the caller
    guarantees in-bounds offsets.
    """

    def typer(
        typingctx, acc, acc_hi, hi, acc_off, nbits, out, out_off, scale, bias, g, s, z, res,
        res_off, o0, fma,
    ):  # type: ignore[no-untyped-def]  # fmt: skip
        if not (
            (_is_c_array(acc, types.int64) or _is_c_array(acc, types.uint16))
            and _is_c_array(acc_hi, types.int64)
            and isinstance(hi, types.Boolean)
            and _is_c_array(out, types.int32 if kind == "int" else types.float32)
            and all(_is_c_array(t, types.float32) for t in (scale, bias, g, s, z, res))
            and all(isinstance(t, types.Integer) for t in (acc_off, nbits, out_off, res_off, o0))
            and isinstance(fma, types.Boolean | types.Integer)
        ):
            return None
        sig = types.void(
            acc, acc_hi, hi, acc_off, nbits, out, out_off, scale, bias, g, s, z, res, res_off,
            o0, fma,
        )  # fmt: skip
        return sig, codegen

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i16, i32, i64, f32 = ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
        v32 = ir.VectorType(i32, _VL)

        ptr, idx = _arg_readers(context, builder, signature, args)
        narrow = signature.args[0].dtype == types.uint16
        elt = i16 if narrow else i64
        acc_p, hi_p, acc_off = ptr(0, elt), ptr(1, i64), idx(3)
        nbits = builder.trunc(idx(4), i32)

        def part(p, e, j):  # type: ignore[no-untyped-def]
            q = builder.gep(p, [builder.add(acc_off, ir.Constant(i64, j * _VL))])
            vt = ir.VectorType(e, _VL)
            a = builder.load(builder.bitcast(q, vt.as_pointer()), align=e.width // 8)
            return builder.zext(a, v32) if e.width < 32 else builder.trunc(a, v32)

        lo = [part(acc_p, elt, j) for j in range(_NV)]
        entry = builder.block
        with builder.if_then(context.cast(builder, args[2], signature.args[2], types.boolean)):
            with_hi = [builder.add(a, part(hi_p, i64, j)) for j, a in enumerate(lo)]
            hi_block = builder.block
        sums = []
        for a, b in zip(lo, with_hi):
            ph = builder.phi(v32)
            ph.add_incoming(a, entry)
            ph.add_incoming(b, hi_block)
            sums.append(ph)
        nb_v = builder.insert_element(
            ir.Constant(v32, ir.Undefined), nbits, ir.Constant(ir.IntType(32), 0)
        )
        nb_v = builder.shuffle_vector(
            nb_v,
            ir.Constant(v32, ir.Undefined),
            ir.Constant(ir.VectorType(ir.IntType(32), _VL), None),
        )
        two = ir.Constant(v32, [2] * _VL)
        d = [builder.sub(nb_v, builder.mul(two, a)) for a in sums]
        out_p = ptr(5, ir.IntType(32) if kind == "int" else f32)
        vec_ps = tuple(ptr(7 + q, f32) for q in range(5))
        _emit_epilogue(
            context,
            builder,
            kind,
            [(d, idx(6), idx(13))],
            out_p,
            idx(14),
            vec_ps,
            ptr(12, f32),
            idx(15),
        )
        return context.get_dummy_value()

    typer.__name__ = f"_epi_{kind}"
    return intrinsic(typer)


_epi_int = _make_row_epilogue("int")
_epi_affine = _make_row_epilogue("affine")
_epi_rp = _make_row_epilogue("affine_rp")
_epi_res = _make_row_epilogue("affine_res")
_epi_rp_res = _make_row_epilogue("affine_rp_res")


@intrinsic
def _fma32(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """fma(a, b, c) in float32 with one rounding (llvm.fma.f32)."""
    if not all(t == types.float32 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32"
        )
        return builder.call(fn, list(args))

    return types.float32(a, b, c), codegen


def _splat(builder, val, n):  # type: ignore[no-untyped-def]
    vt = ir.VectorType(val.type, n)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), val, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(
        v, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), n), None)
    )


@intrinsic
def _cmp64(typingctx, x, x_off, t, t_off, flipmask, mode):  # type: ignore[no-untyped-def]
    """64 contiguous float32 -> uint64 bits (bit i from x[x_off + i], t[t_off + i]).
    mode 0: bit = x + t < 0 (sign of x + bias); mode 1: bit = (x > t) if flip else (x < t),
    flip bit i = bit i of ``flipmask``. ``mode`` must be a compile-time literal."""
    if not (
        _is_c_array(x, types.float32)
        and _is_c_array(t, types.float32)
        and isinstance(x_off, types.Integer)
        and isinstance(t_off, types.Integer)
        and isinstance(flipmask, types.Integer)
        and isinstance(mode, types.IntegerLiteral)
    ):
        return None
    lit = mode.literal_value
    sig = types.uint64(x, x_off, t, t_off, flipmask, mode)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        st = signature.args
        i64, f32 = ir.IntType(64), ir.FloatType()
        vf = ir.VectorType(f32, 16)
        xp = builder.bitcast(
            context.make_array(st[0])(context, builder, args[0]).data, f32.as_pointer()
        )
        tp = builder.bitcast(
            context.make_array(st[2])(context, builder, args[2]).data, f32.as_pointer()
        )
        xo = context.cast(builder, args[1], st[1], types.int64)
        to = context.cast(builder, args[3], st[3], types.int64)
        zero = ir.Constant(vf, [0.0] * 16)
        word = ir.Constant(i64, 0)
        for q in range(4):
            off = ir.Constant(i64, 16 * q)
            xv = builder.load(
                builder.bitcast(builder.gep(xp, [builder.add(xo, off)]), vf.as_pointer()), align=4
            )
            tv = builder.load(
                builder.bitcast(builder.gep(tp, [builder.add(to, off)]), vf.as_pointer()), align=4
            )
            if lit == 0:
                m = builder.fcmp_ordered("<", builder.fadd(xv, tv), zero)
                bits = builder.zext(builder.bitcast(m, ir.IntType(16)), i64)
            else:
                lt = builder.zext(
                    builder.bitcast(builder.fcmp_ordered("<", xv, tv), ir.IntType(16)), i64
                )
                gt = builder.zext(
                    builder.bitcast(builder.fcmp_ordered(">", xv, tv), ir.IntType(16)), i64
                )
                fm = builder.and_(
                    builder.lshr(args[4], ir.Constant(i64, 16 * q)), ir.Constant(i64, 0xFFFF)
                )
                bits = builder.or_(builder.and_(lt, builder.not_(fm)), builder.and_(gt, fm))
            word = builder.or_(word, builder.shl(bits, ir.Constant(i64, 16 * q)))
        return word

    return sig, codegen


def _make_pack_nchw(nvec: int):  # type: ignore[no-untyped-def]
    """Intrinsic packing one word for each of 16*nvec consecutive pixels of an NCHW float32
    input: out[o_off + i*ostride] = sum_{c < nc} (x[x_off + (c0+c)*pstride + i]
    + bias[c0+c] < 0) << c for i < 16*nvec (channels c0 .. c0+nc-1, nc <= 64)."""
    npx = 16 * nvec

    def typer(typingctx, x, x_off, pstride, c0, nc, bias, out, o_off, ostride):  # type: ignore[no-untyped-def]
        ints = (x_off, pstride, c0, nc, o_off, ostride)
        if not _args_ok([(x, types.float32), (bias, types.float32), (out, types.uint64)], ints):
            return None
        return types.void(x, x_off, pstride, c0, nc, bias, out, o_off, ostride), codegen

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
        vf = ir.VectorType(f32, 16)
        v32 = ir.VectorType(i32, 16)
        v64 = ir.VectorType(i64, 16)

        ptr, idx = _arg_readers(context, builder, signature, args)

        xp, bp, op = ptr(0, f32), ptr(5, f32), ptr(6, i64)
        x_off, pstride, c0, nc, o_off, ostride = idx(1), idx(2), idx(3), idx(4), idx(7), idx(8)
        zero_f = ir.Constant(vf, [0.0] * 16)
        zero_32 = ir.Constant(v32, None)
        c32 = ir.Constant(i64, 32)

        def half(lo, hi):  # type: ignore[no-untyped-def]
            """Channels lo..hi-1 (hi - lo <= 32) as bits c - lo of int32 lanes: a compare's
            lane mask is already 32 bits wide, so each channel costs a load, an add, a
            compare, an and and an or per 8 pixels (int64 lanes took twice the vectors)."""

            def body(c, accs):  # type: ignore[no-untyped-def]
                ch = builder.add(c0, c)
                base = builder.gep(xp, [builder.add(x_off, builder.mul(ch, pstride))])
                b = _splat(builder, builder.load(builder.gep(bp, [ch])), 16)
                sh = builder.trunc(builder.sub(c, lo), i32)
                bit = _splat(builder, builder.shl(ir.Constant(i32, 1), sh), 16)
                out = []
                for q in range(nvec):
                    p = builder.bitcast(
                        builder.gep(base, [ir.Constant(i64, 16 * q)]), vf.as_pointer()
                    )
                    neg = builder.fcmp_ordered(
                        "<", builder.fadd(builder.load(p, align=4), b), zero_f
                    )
                    out.append(builder.or_(accs[q], builder.select(neg, bit, zero_32)))
                return out

            return counted_loop(builder, lo, hi, 1, [zero_32] * nvec, body, "pk")

        low = half(ir.Constant(i64, 0), builder.select(builder.icmp_signed("<", nc, c32), nc, c32))
        high = half(c32, nc)  # runs no iteration when nc <= 32
        for q in range(nvec):
            word = builder.or_(
                builder.zext(low[q], v64),
                builder.shl(builder.zext(high[q], v64), ir.Constant(v64, [32] * 16)),
            )
            for i in range(16):
                o = builder.add(o_off, builder.mul(ostride, ir.Constant(i64, 16 * q + i)))
                val = builder.extract_element(word, ir.Constant(ir.IntType(32), i))
                builder.store(val, builder.gep(op, [o]))
        return context.get_dummy_value()

    typer.__name__ = f"_pack{npx}_nchw"
    return intrinsic(typer)


_pack64_nchw = _make_pack_nchw(4)
_pack16_nchw = _make_pack_nchw(1)
