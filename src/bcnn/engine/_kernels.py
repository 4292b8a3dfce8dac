"""Bit-packed XOR-popcount kernels of the packed engine (numba), bit-exact with training.

Conventions (a contract, tested in tests/test_kernels.py; see docs/kernels.md):

- sign(x) = +1 for x >= 0, -1 otherwise. Packed: bit 1 means -1, bit 0 means +1.
- Channels-last (NHWC), packed along the reduction axis (channels) into uint64 words: bit ``i``
  of word ``j`` is element ``64*j + i``. Unused tail bits are 0 in activations and weights, so
  they XOR to 0 and cancel.
- For n-bit vectors a·w = n - 2·popcount(a XOR w); for a convolution n = KH*KW*Cin at every
  output position, because padding is one-padding (pad value +1 = bit 0): no correction term.
- Shapes: activations (N, H, W, Cw) with Cw = ceil(C/64); canonical conv weights
  (O, KH, KW, Cw); canonical dense weights (O, Kw). The kernels use a prepared layout
  (:class:`PreparedWeights`: output channels in blocks of ``LANES`` = 32, interleaved, so the
  inner loop broadcasts one activation word and XORs it with 32 output channels' words, four
  512-bit vectors, with no horizontal sums).

The compiled kernels do not bounds-check: every public function here validates shapes and
dtypes first and raises ``ValueError``; the packed-model loader validates files before they
reach these functions. No fastmath: float epilogues round exactly like the numpy reference
(separate multiply and add, no FMA contraction), and ``x + b < 0`` is never rewritten.

The GEMM micro-kernel (:func:`_mk`) is a numba intrinsic that emits LLVM IR with explicit
``<8 x i64>`` vectors, so its 16 accumulators stay in registers (LLVM's auto-vectorizers do not
manage that from plain loops); ``llvm.ctpop.v8i64`` lowers to VPOPCNTQ where the CPU has
AVX512-VPOPCNTDQ and to a correct (slower) sequence elsewhere.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _threads

__all__ = [
    "LANES",
    "MR",
    "PreparedStem",
    "PreparedWeights",
    "avgpool2x2",
    "bconv2d",
    "bconv2d_affine",
    "bconv2d_threshold",
    "bgemm",
    "blinear",
    "blinear_affine",
    "global_avgpool",
    "maxpool_packed",
    "pack_sign",
    "pack_threshold",
    "pack_weights",
    "prepare_conv_weights",
    "prepare_dense_weights",
    "prepare_stem_weights",
    "stem_conv",
    "stem_conv_affine",
    "unpack_bits",
]

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


_EPI_KINDS = ("int", "affine", "affine_rp", "affine_res", "affine_rp_res")


def _emit_epilogue(context, builder, kind, rows, out_p, o0, vec_ps, res_p, fma):  # type: ignore[no-untyped-def]
    """Emit the epilogue of rows of 32 outputs: rows = [(d, out_off, res_off)], d four
    <8 x i64> dot products.

    kind ``int``: out[out_off + l] = int32(d); otherwise y = float32(d) * scale[o] + bias[o]
    (IEEE multiply then add; if the i1 ``fma`` is set: fma(float32(d), scale[o], bias[o]),
    one rounding, as ATen's CPU batch norm), ``rp``: y = y - g[o]; y = y*s[o] if y < 0 else y;
    y = y + z[o]; ``res``: y = res[res_off + l] + y; out[out_off + l] = y. o = o0 + l.
    vec_ps: element pointers (scale, bias, g, s, z); the per-channel vectors are loaded once
    for all rows, and the fma choice is a branch, not a select of both results.
    """
    i64, i32, f32 = ir.IntType(64), ir.IntType(32), ir.FloatType()
    v32, vf = ir.VectorType(i32, _VL), ir.VectorType(f32, _VL)

    def at(base, off, j, vt):  # type: ignore[no-untyped-def]
        p = builder.gep(base, [builder.add(off, ir.Constant(i64, j * _VL))])
        return builder.bitcast(p, vt.as_pointer())

    if kind == "int":
        for d, out_off, _ in rows:
            for j in range(_NV):
                builder.store(builder.trunc(d[j], v32), at(out_p, out_off, j, v32), align=4)
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

    def emit(use_fma: bool) -> None:
        for d, out_off, res_off in rows:
            for j in range(_NV):
                x = builder.sitofp(d[j], vf)
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
            if not (
                check_base(*base)
                and _is_c_array(out, types.int32 if kind == "int" else types.float32)
                and _is_c_array(ooffs, types.int64)
                and _is_c_array(resoffs, types.int64)
                and all(_is_c_array(t, types.float32) for t in (scale, bias, g, s, z, res))
                and isinstance(nbits, types.Integer)
                and isinstance(o0, types.Integer)
                and isinstance(fma, types.Boolean | types.Integer)
            ):
                return None
            sig = types.void(*base, nbits, out, ooffs, o0, scale, bias, g, s, z, res, resoffs, fma)
            return sig, _codegen

    def _codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        st = signature.args
        i64 = ir.IntType(64)
        i32 = ir.IntType(32)
        vty = ir.VectorType(i64, _VL)

        def data(k, elt=i64):  # type: ignore[no-untyped-def]
            arr = context.make_array(st[k])(context, builder, args[k])
            return builder.bitcast(arr.data, elt.as_pointer())

        def idx(k):  # type: ignore[no-untyped-def]
            return context.cast(builder, args[k], st[k], types.int64)

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
        entry = builder.block
        loop = builder.append_basic_block("mk.loop")
        done = builder.append_basic_block("mk.done")
        ok = builder.and_(
            builder.icmp_signed(">", total, zero_i), builder.icmp_signed(">", seg_words, zero_i)
        )
        builder.cbranch(ok, loop, done)

        builder.position_at_end(loop)
        t = builder.phi(i64)  # flat word index (into b and shifts)
        w = builder.phi(i64)  # word within the current segment
        aoff = builder.phi(i64)  # offset of the current word from roffs[r]
        for ph in (t, w, aoff):
            ph.add_incoming(zero_i, entry)
        accs = []
        for _ in range(MR * _NV):
            p = builder.phi(vty)
            p.add_incoming(zero, entry)
            accs.append(p)
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
        t1 = builder.add(t, one)
        w1 = builder.add(w, one)
        seg_end = builder.icmp_signed("==", w1, seg_words)
        w_next = builder.select(seg_end, zero_i, w1)
        a_next = builder.add(aoff, builder.select(seg_end, jump, one))
        t.add_incoming(t1, loop)
        w.add_incoming(w_next, loop)
        aoff.add_incoming(a_next, loop)
        for p, n in zip(accs, new):
            p.add_incoming(n, loop)
        builder.cbranch(builder.icmp_signed("<", t1, total), loop, done)

        builder.position_at_end(done)
        outs = []
        for i in range(MR * _NV):
            ph = builder.phi(vty)
            ph.add_incoming(zero, entry)
            ph.add_incoming(new[i], loop)
            outs.append(ph)
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
        fma = builder.icmp_signed("!=", idx(k + 11), zero_i)
        nb_v = splat(nbits)
        two = ir.Constant(vty, [2] * _VL)
        rows = []
        for r in range(MR):
            d = [builder.sub(nb_v, builder.mul(two, outs[r * _NV + j])) for j in range(_NV)]
            out_off = builder.add(builder.load(builder.gep(oo_p, [ir.Constant(i64, r)])), o0)
            res_off = builder.add(builder.load(builder.gep(ro_p, [ir.Constant(i64, r)])), o0)
            rows.append((d, out_off, res_off))
        _emit_epilogue(context, builder, kind, rows, out_p, o0, vec_ps, res_p, fma)
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
    ``_epi_<kind>(acc, acc_off, nbits, out, out_off, scale, bias, g, s, z, res, res_off, o0,
    fma)``
    with d = nbits - 2*acc[acc_off + l]. Unused arrays may be empty; the caller guarantees
    in-bounds offsets.
    """

    def typer(
        typingctx, acc, acc_off, nbits, out, out_off, scale, bias, g, s, z, res, res_off, o0, fma
    ):  # type: ignore[no-untyped-def]
        if not (
            _is_c_array(acc, types.int64)
            and _is_c_array(out, types.int32 if kind == "int" else types.float32)
            and all(_is_c_array(t, types.float32) for t in (scale, bias, g, s, z, res))
            and all(isinstance(t, types.Integer) for t in (acc_off, nbits, out_off, res_off, o0))
            and isinstance(fma, types.Boolean | types.Integer)
        ):
            return None
        sig = types.void(
            acc, acc_off, nbits, out, out_off, scale, bias, g, s, z, res, res_off, o0, fma
        )
        return sig, codegen

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        st = signature.args
        i64, f32 = ir.IntType(64), ir.FloatType()
        v64 = ir.VectorType(i64, _VL)

        def ptr(k, elt):  # type: ignore[no-untyped-def]
            arr = context.make_array(st[k])(context, builder, args[k])
            return builder.bitcast(arr.data, elt.as_pointer())

        def idx(k):  # type: ignore[no-untyped-def]
            return context.cast(builder, args[k], st[k], types.int64)

        acc_p, acc_off, nbits = ptr(0, i64), idx(1), idx(2)
        nb_v = builder.insert_element(
            ir.Constant(v64, ir.Undefined), nbits, ir.Constant(ir.IntType(32), 0)
        )
        nb_v = builder.shuffle_vector(
            nb_v,
            ir.Constant(v64, ir.Undefined),
            ir.Constant(ir.VectorType(ir.IntType(32), _VL), None),
        )
        two = ir.Constant(v64, [2] * _VL)
        d = []
        for j in range(_NV):
            p = builder.gep(acc_p, [builder.add(acc_off, ir.Constant(i64, j * _VL))])
            a = builder.load(builder.bitcast(p, v64.as_pointer()), align=8)
            d.append(builder.sub(nb_v, builder.mul(two, a)))
        out_p = ptr(3, ir.IntType(32) if kind == "int" else f32)
        vec_ps = tuple(ptr(5 + q, f32) for q in range(5))
        fma = builder.icmp_signed("!=", idx(13), ir.Constant(i64, 0))
        _emit_epilogue(
            context,
            builder,
            kind,
            [(d, idx(4), idx(11))],
            out_p,
            idx(12),
            vec_ps,
            ptr(10, f32),
            fma,
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
        if not (
            _is_c_array(x, types.float32)
            and _is_c_array(bias, types.float32)
            and _is_c_array(out, types.uint64)
            and all(isinstance(t, types.Integer) for t in ints)
        ):
            return None
        return types.void(x, x_off, pstride, c0, nc, bias, out, o_off, ostride), codegen

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        st = signature.args
        i64, f32 = ir.IntType(64), ir.FloatType()
        vf = ir.VectorType(f32, 16)
        v64 = ir.VectorType(i64, 16)

        def ptr(k, elt):  # type: ignore[no-untyped-def]
            arr = context.make_array(st[k])(context, builder, args[k])
            return builder.bitcast(arr.data, elt.as_pointer())

        def idx(k):  # type: ignore[no-untyped-def]
            return context.cast(builder, args[k], st[k], types.int64)

        xp, bp, op = ptr(0, f32), ptr(5, f32), ptr(6, i64)
        x_off, pstride, c0, nc, o_off, ostride = idx(1), idx(2), idx(3), idx(4), idx(7), idx(8)
        zero_f = ir.Constant(vf, [0.0] * 16)
        zero_v = ir.Constant(v64, None)
        entry = builder.block
        loop = builder.append_basic_block("pk.loop")
        done = builder.append_basic_block("pk.done")
        builder.cbranch(builder.icmp_signed(">", nc, ir.Constant(i64, 0)), loop, done)
        builder.position_at_end(loop)
        c = builder.phi(i64)
        c.add_incoming(ir.Constant(i64, 0), entry)
        accs = []
        for _ in range(nvec):
            a = builder.phi(v64)
            a.add_incoming(zero_v, entry)
            accs.append(a)
        ch = builder.add(c0, c)
        base = builder.gep(xp, [builder.add(x_off, builder.mul(ch, pstride))])
        b = _splat(builder, builder.load(builder.gep(bp, [ch])), 16)
        bit = _splat(builder, builder.shl(ir.Constant(i64, 1), c), 16)
        new = []
        for q in range(nvec):
            p = builder.bitcast(builder.gep(base, [ir.Constant(i64, 16 * q)]), vf.as_pointer())
            neg = builder.fcmp_ordered("<", builder.fadd(builder.load(p, align=4), b), zero_f)
            new.append(builder.or_(accs[q], builder.select(neg, bit, zero_v)))
        c1 = builder.add(c, ir.Constant(i64, 1))
        c.add_incoming(c1, loop)
        for a, n in zip(accs, new):
            a.add_incoming(n, loop)
        builder.cbranch(builder.icmp_signed("<", c1, nc), loop, done)
        builder.position_at_end(done)
        for q in range(nvec):
            res = builder.phi(v64)
            res.add_incoming(zero_v, entry)
            res.add_incoming(new[q], loop)
            new[q] = res
        for q in range(nvec):
            for i in range(16):
                o = builder.add(o_off, builder.mul(ostride, ir.Constant(i64, 16 * q + i)))
                val = builder.extract_element(new[q], ir.Constant(ir.IntType(32), i))
                builder.store(val, builder.gep(op, [o]))
        return context.get_dummy_value()

    typer.__name__ = f"_pack{npx}_nchw"
    return intrinsic(typer)


_pack64_nchw = _make_pack_nchw(4)
_pack16_nchw = _make_pack_nchw(1)


# --------------------------------------------------------------------------- prepared weights


class PreparedWeights(NamedTuple):
    """Binary weights in the kernels' layout (build with :func:`prepare_conv_weights` or
    :func:`prepare_dense_weights`).

    ``blocks[j, k, l]`` is word ``k`` of the canonical packed weights of output channel
    ``32*j + l`` (``k`` runs over (ky, kx, channel word): the canonical (O, KH, KW, Cw) layout
    flattened); padded channels (``32*j + l >= out_channels``) are 0.
    """

    blocks: np.ndarray  # uint64 (ceil(O/32), KH*KW*Cw, 32)
    out_channels: int
    in_channels: int  # Cin of a conv, K of a dense layer (bits per tap)
    kh: int
    kw: int

    @property
    def words(self) -> int:
        """Words per tap: ceil(in_channels / 64)."""
        return _words(self.in_channels)


class PreparedStem(NamedTuple):
    """First-layer weights and encoder in the kernels' layout (:func:`prepare_stem_weights`).

    Planes are split into groups of equal place value; group g covers ``group_planes``
    planes per image channel. Per output pixel and group the patch is packed densely:
    bit ``(ky*KW + kx) * C*group_planes + c*group_planes + p`` (p: plane within the group).
    """

    blocks: np.ndarray  # uint64 (ceil(O/32), G*Wg, 32), groups word-major: word g*Wg + k
    lut: np.ndarray  # uint64 (G, 256): plane bits of one channel's pixel value, per group
    lutc: np.ndarray  # uint64 (C, 256, G): lut[g, v] << (c * group_planes)
    plane_bits: np.ndarray  # int64 (G,): bit-planes: the pixel bit of group g; thermometer: ()
    shifts: np.ndarray  # int64 (G*Wg,): place value 2^shift of each word's group
    const: int  # sum_g 2^shift_g * (bits per patch of group g)
    out_channels: int
    image_channels: int
    group_planes: int
    groups: int
    group_words: int  # Wg
    kh: int
    kw: int


def _words(n: int) -> int:
    return max(1, -(-int(n) // 64))


def _check_packed(x: np.ndarray, ndim: int, name: str) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype == np.uint64 and x.ndim == ndim and x.flags.c_contiguous:
        return x  # the common case, checked cheaply
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.uint64:
        raise ValueError(f"{name} must be packed bits (uint64), got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    return np.ascontiguousarray(x)


def _vec(v: object, n: int, name: str, dtype: type = np.float32) -> np.ndarray:
    if type(v) is np.ndarray and v.dtype == dtype and v.shape == (n,) and v.flags.c_contiguous:
        return v  # the common case, checked cheaply
    a: np.ndarray = np.ascontiguousarray(np.asarray(v, dtype=dtype))
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
    return a


def _pack_bool_rows(neg: np.ndarray) -> np.ndarray:
    """bool (..., n), True = -1 -> uint64 (..., ceil(n/64)), little-endian bit order."""
    n = neg.shape[-1]
    words = _words(n)
    pad = words * 64 - n
    if pad:
        neg = np.concatenate([neg, np.zeros((*neg.shape[:-1], pad), dtype=bool)], axis=-1)
    by = np.packbits(neg, axis=-1, bitorder="little")
    return np.ascontiguousarray(by).view("<u8").astype(np.uint64).reshape(*neg.shape[:-1], words)


def _unpack_bool_rows(packed: np.ndarray, n: int) -> np.ndarray:
    by = np.ascontiguousarray(packed.astype("<u8")).view(np.uint8)
    bits = np.unpackbits(by.reshape(*packed.shape[:-1], -1), axis=-1, bitorder="little")
    return bits[..., :n].astype(bool)


def pack_weights(w: object) -> np.ndarray:
    """Signs of weights -> canonical packed layout (sign(0) = +1, bit 1 = -1).

    (O, Cin, KH, KW) (torch conv layout) -> uint64 (O, KH, KW, ceil(Cin/64));
    (O, K) (torch linear layout) -> uint64 (O, ceil(K/64)). Accepts numpy arrays or torch
    tensors (anything ``np.asarray`` takes).
    """
    a = np.asarray(w)
    if a.ndim == 4:
        return _pack_bool_rows(np.transpose(a, (0, 2, 3, 1)) < 0)
    if a.ndim == 2:
        return _pack_bool_rows(a < 0)
    raise ValueError(f"weights must be (O, Cin, KH, KW) or (O, K), got shape {a.shape}")


def _blocks_from_rows(rows: np.ndarray) -> np.ndarray:
    """uint64 (O, Wk) -> (ceil(O/32), Wk, 32), zero-padded channels."""
    o, wk = rows.shape
    nob = -(-o // LANES)
    padded = np.zeros((nob * LANES, wk), np.uint64)
    padded[:o] = rows
    return np.ascontiguousarray(padded.reshape(nob, LANES, wk).transpose(0, 2, 1))


def _check_tail_zero(w: np.ndarray, n: int, name: str) -> None:
    tail = w.shape[-1] * 64 - n
    if tail:
        mask = np.uint64(((1 << tail) - 1) << (64 - tail))
        if np.any(w[..., -1] & mask):
            raise ValueError(f"{name}: unused tail bits (past {n} channels) must be 0")


def prepare_conv_weights(w_packed: np.ndarray, in_channels: int) -> PreparedWeights:
    """Canonical packed conv weights (O, KH, KW, Cw) uint64 -> :class:`PreparedWeights`."""
    w = _check_packed(w_packed, 4, "conv weights")
    o, kh, kw, cw = w.shape
    if in_channels < 1 or cw != _words(in_channels):
        raise ValueError(
            f"conv weights have {cw} words per tap, {in_channels} input channels need "
            f"{_words(in_channels)}"
        )
    if o < 1 or kh < 1 or kw < 1:
        raise ValueError(f"conv weights shape {w.shape} is empty")
    _check_tail_zero(w, in_channels, "conv weights")
    return PreparedWeights(_blocks_from_rows(w.reshape(o, kh * kw * cw)), o, in_channels, kh, kw)


def prepare_dense_weights(w_packed: np.ndarray, in_features: int) -> PreparedWeights:
    """Canonical packed dense weights (O, Kw) uint64 -> :class:`PreparedWeights`."""
    w = _check_packed(w_packed, 2, "dense weights")
    o, kw_ = w.shape
    if in_features < 1 or kw_ != _words(in_features):
        raise ValueError(
            f"dense weights have {kw_} words, {in_features} input features need "
            f"{_words(in_features)}"
        )
    if o < 1:
        raise ValueError("dense weights have no output features")
    _check_tail_zero(w, in_features, "dense weights")
    return PreparedWeights(_blocks_from_rows(w), o, in_features, 1, 1)


def _check_prepared(w: object) -> PreparedWeights:
    if not isinstance(w, PreparedWeights):
        raise ValueError("weights must be PreparedWeights (see prepare_conv_weights)")
    b = w.blocks
    words = (w.in_channels + 63) >> 6
    if (
        b.dtype != np.uint64
        or not b.flags.c_contiguous
        or b.shape != ((w.out_channels + LANES - 1) // LANES, w.kh * w.kw * words, LANES)
    ):
        raise ValueError(f"inconsistent PreparedWeights: blocks {b.dtype} {b.shape}")
    return w


# ---------------------------------------------------------------------------- packing kernels


@njit(cache=True, boundscheck=False)
def _pack_rows(x, bias, out):  # type: ignore[no-untyped-def]
    """out[m, j] bit i = (x[m, 64j+i] + bias[64j+i]) < 0 (float32)."""
    m_, c_ = x.shape
    cw = out.shape[1]
    full = c_ // 64
    for m in range(m_):
        for j in range(full):
            out[m, j] = _cmp64(x, m * c_ + 64 * j, bias, 64 * j, 0, 0)
        if full < cw:
            c0 = full * 64
            w = np.uint64(0)
            for i in range(c_ - c0):
                v = x[m, c0 + i] + bias[c0 + i]
                w |= np.uint64(v < 0) << np.uint64(i)
            out[m, full] = w


@njit(cache=True, boundscheck=False)
def _pack_nchw(x, bias, out):  # type: ignore[no-untyped-def]
    """x (N, C, P) float32 -> out (N, P, Cw): bit = x + bias[c] < 0, by blocks of pixels
    (vector loads along the pixels of each channel, 64 or 16 pixels per block), scalar for
    the last P % 16."""
    n_, c_, p_ = x.shape
    cw = out.shape[2]
    for n in range(n_):
        p0 = 0
        while p0 + 64 <= p_:
            for j in range(cw):
                _pack64_nchw(x, n * c_ * p_ + p0, p_, 64 * j, min(64, c_ - 64 * j), bias, out,
                             (n * p_ + p0) * cw + j, cw)  # fmt: skip
            p0 += 64
        while p0 + 16 <= p_:
            for j in range(cw):
                _pack16_nchw(x, n * c_ * p_ + p0, p_, 64 * j, min(64, c_ - 64 * j), bias, out,
                             (n * p_ + p0) * cw + j, cw)  # fmt: skip
            p0 += 16
        for p in range(p0, p_):
            for j in range(cw):
                w = np.uint64(0)
                for i in range(min(64, c_ - 64 * j)):
                    c = 64 * j + i
                    w |= np.uint64(x[n, c, p] + bias[c] < 0) << np.uint64(i)
                out[n, p, j] = w


@njit(cache=True, boundscheck=False)
def _pack_thr_rows(x, thr, flip, fwords, out):  # type: ignore[no-untyped-def]
    """bit = (x > thr[c]) if flip[c] else (x < thr[c]); fwords: flip packed as bits."""
    m_, c_ = x.shape
    cw = out.shape[1]
    full = c_ // 64
    for m in range(m_):
        for j in range(full):
            out[m, j] = _cmp64(x, m * c_ + 64 * j, thr, 64 * j, fwords[j], 1)
        if full < cw:
            c0 = full * 64
            w = np.uint64(0)
            for i in range(c_ - c0):
                v = x[m, c0 + i]
                t = thr[c0 + i]
                bit = (v > t) if flip[c0 + i] else (v < t)
                w |= np.uint64(bit) << np.uint64(i)
            out[m, full] = w


def _as_f32(x: object, name: str) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous:
        return x  # the common case, checked cheaply
    a = np.asarray(x)
    if a.dtype == np.bool_ or not (
        np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a float or integer array, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.integer) and a.size and np.abs(a).max() > 2**24:
        raise ValueError(f"{name}: integers beyond 2^24 are not exact in float32")
    return np.ascontiguousarray(a, dtype=np.float32)


def pack_sign(x: object, bias: object = None, *, channels_first: bool = False) -> np.ndarray:
    """Signs of ``x + bias`` packed along the last axis: bit = (x + bias[c]) < 0 in float32.

    x: (..., C) float (or integer) array; bias: (C,) or None. The sum is rounded to float32
    as torch does for ``sign(h + b)`` on float32 tensors, so the bits match training exactly.
    ``channels_first=True``: x is (N, C, H, W) (e.g. NCHW float input) and the result is the
    channels-last (N, H, W, ceil(C/64)).
    """
    a = _as_f32(x, "x")
    if channels_first:
        if a.ndim != 4:
            raise ValueError(f"channels_first input must be (N, C, H, W), got shape {a.shape}")
        n, c, h, w = a.shape
    else:
        if a.ndim < 1:
            raise ValueError("x must have at least one dimension (the channels)")
        c = a.shape[-1]
    if c < 1:
        raise ValueError("x has no channels")
    b = np.zeros(c, np.float32) if bias is None else _vec(bias, c, "bias")
    if channels_first:
        out = np.empty((n, h * w, _words(c)), np.uint64)
        if out.size:
            _pack_nchw(a.reshape(n, c, h * w), b, out)
        return out.reshape(n, h, w, _words(c))
    rows = a.reshape(-1, c)
    out = np.empty((rows.shape[0], _words(c)), np.uint64)
    if out.size:
        _pack_rows(rows, b, out)
    return out.reshape(*a.shape[:-1], _words(c))


def pack_threshold(x: object, thr: object, flip: object) -> np.ndarray:
    """Per-channel threshold packing: bit = (x > thr[c]) if flip[c] else (x < thr[c]).

    So with ``flip[c]`` False the value is +1 iff x >= thr[c] (sign(BN(x)) with a positive BN
    scale), with ``flip[c]`` True it is +1 iff x <= thr[c] (a negative scale). Constant
    channels: thr = -inf, flip False -> always +1; thr = +inf, flip False -> always -1 (for
    finite x). NaN compares false (+1). x: (..., C) float32; thr: (C,) float32; flip: (C,) bool.
    """
    a = _as_f32(x, "x")
    if a.ndim < 1 or a.shape[-1] < 1:
        raise ValueError(f"x must be (..., C) with C >= 1, got shape {a.shape}")
    c = a.shape[-1]
    t = _vec(thr, c, "thr")
    f = _vec(flip, c, "flip", np.bool_)
    rows = a.reshape(-1, c)
    out = np.empty((rows.shape[0], _words(c)), np.uint64)
    if out.size:
        _pack_thr_rows(rows, t, f, _pack_bool_rows(f), out)
    return out.reshape(*a.shape[:-1], _words(c))


def unpack_bits(packed: np.ndarray, n: int) -> np.ndarray:
    """uint64 (..., Cw) -> int8 (..., n) in {-1, +1} (bit 1 -> -1)."""
    p = np.asarray(packed)
    if p.dtype != np.uint64 or p.ndim < 1:
        raise ValueError(f"packed must be uint64 (..., Cw), got {p.dtype} {p.shape}")
    if n < 0 or n > p.shape[-1] * 64:
        raise ValueError(f"cannot unpack {n} values from {p.shape[-1]} words")
    return (1 - 2 * _unpack_bool_rows(p, n).astype(np.int8)).astype(np.int8)


# ------------------------------------------------------------------------ conv / GEMM kernels

_MODE_INT, _MODE_AFFINE, _MODE_THRESHOLD, _MODE_AFFINE_FMA = 0, 1, 2, 3


@njit(cache=True, boundscheck=False)
def _epilogue(  # type: ignore[no-untyped-def]
    acc, rows, m0, o0, lmax, nbits, mode, out_i, out_f, out_b, ob,
    scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
):  # fmt: skip
    """acc rows 0..rows-1 (LANES popcounts each) -> outputs m0.., channels o0..o0+lmax-1.
    Full rows of 32 channels go through the vector intrinsics; a partial last block of
    channels through the scalar loops (same arithmetic)."""
    cr = res.shape[1]
    o_ = out_i.shape[1] if mode == 0 else out_f.shape[1]
    fma = mode == 3
    full = lmax == LANES
    for r in range(rows):
        m = m0 + r
        base = r * LANES
        if mode == 0:
            if full:
                _epi_int(acc, base, nbits, out_i, m * o_ + o0, scale, bias, rp_g, rp_s, rp_z,
                         res, 0, o0, fma)  # fmt: skip
            else:
                for l in range(lmax):
                    out_i[m, o0 + l] = nbits - 2 * acc[base + l]
        elif mode == 1 or mode == 3:
            if full and (not has_res or cr == o_):
                oo = m * o_ + o0
                if not has_rp and not has_res:
                    _epi_affine(acc, base, nbits, out_f, oo, scale, bias, rp_g, rp_s, rp_z,
                                res, 0, o0, fma)  # fmt: skip
                elif not has_res:
                    _epi_rp(acc, base, nbits, out_f, oo, scale, bias, rp_g, rp_s, rp_z,
                            res, 0, o0, fma)  # fmt: skip
                elif not has_rp:
                    _epi_res(acc, base, nbits, out_f, oo, scale, bias, rp_g, rp_s, rp_z,
                             res, oo, o0, fma)  # fmt: skip
                else:
                    _epi_rp_res(acc, base, nbits, out_f, oo, scale, bias, rp_g, rp_s, rp_z,
                                res, oo, o0, fma)  # fmt: skip
            else:
                for l in range(lmax):
                    o = o0 + l
                    x = np.float32(nbits - 2 * acc[base + l])
                    y = _fma32(x, scale[o], bias[o]) if fma else x * scale[o] + bias[o]
                    if has_rp:
                        y = y - rp_g[o]
                        y = y * rp_s[o] if y < 0 else y
                        y = y + rp_z[o]
                    if has_res:
                        y = res[m, o % cr] + y
                    out_f[m, o] = y
        else:
            word = np.uint64(0)
            for l in range(lmax):
                o = o0 + l
                v = np.float32(nbits - 2 * acc[base + l])
                bit = (v > thr[o]) if flip[o] else (v < thr[o])
                word |= np.uint64(bit) << np.uint64(l)
            out_b[m, ob] = np.uint32(word)


@njit(cache=True, boundscheck=False)
def _conv_range(  # type: ignore[no-untyped-def]
    t0, t1, ob0, ob1, xp, blocks, o_, nbits, kh, kw, stride, ho, wo, mode,
    out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
):  # fmt: skip
    """Macro tiles t0..t1 (MB*MR output pixels each) of a binary conv over the padded input
    ``xp``, output blocks ob0..ob1, with the epilogue. The micro-kernel reads each pixel's patch
    straight from ``xp``: KH segments (kernel rows) of KW*Cw contiguous words."""
    n_, hp, wp, cw = xp.shape
    wk = blocks.shape[1]
    m_ = n_ * ho * wo
    howo = ho * wo
    roffs = np.empty((_MB, MR), np.int64)
    ooffs = np.empty((_MB, MR), np.int64)
    acc = np.empty(_MB * MR * LANES, np.int64)
    noshift = np.empty(0, np.int64)
    o_out = out_i.shape[1] if mode == 0 else out_f.shape[1]
    # full tiles of 32 channels run a fused micro-kernel (epilogue from registers)
    fma = mode == 3
    cr = res.shape[1]
    # a residual of Cr < O channels is read at o % Cr: fused when no 32-block wraps around
    fuse = mode == 0 or ((mode == 1 or fma) and (not has_res or cr == o_out or cr % LANES == 0))
    rbase = np.empty((_MB, MR), np.int64)
    rr = np.empty(MR, np.int64)
    sw = kw * cw
    ss = wp * cw
    for t in range(t0, t1):
        mt0 = t * _MB * MR
        mrows = min(_MB * MR, m_ - mt0)
        nmt = -(-mrows // MR)
        n = mt0 // howo  # (n, oy, ox) of pixel mt0, then stepped without divisions
        rem = mt0 - n * howo
        oy = rem // wo
        ox = rem - oy * wo
        last = 0
        for u in range(nmt):
            for r in range(MR):
                if u * MR + r < mrows:
                    last = ((n * hp + oy * stride) * wp + ox * stride) * cw
                    ox += 1
                    if ox == wo:
                        ox = 0
                        oy += 1
                        if oy == ho:
                            oy = 0
                            n += 1
                roffs[u, r] = last  # rows past the end repeat the last one
                ooffs[u, r] = (mt0 + u * MR + r) * o_out
                rbase[u, r] = (mt0 + u * MR + r) * cr
        nfull = mrows // MR if fuse else 0
        for ob in range(ob0, ob1):
            boff = ob * wk * LANES
            o0 = ob * LANES
            lmax = min(LANES, o_ - o0)
            u0 = 0
            if lmax == LANES:
                delta = o0 % cr - o0 if has_res else 0  # res[m, o % cr] at rr[r] + o0 + l
                for u in range(nfull):
                    ro = roffs[u]
                    oo = ooffs[u]
                    if has_res:
                        for r in range(MR):
                            rr[r] = rbase[u, r] + delta
                    if mode == 0:
                        _mkf_int(xp, ro, sw, ss, kh, blocks, boff, noshift, nbits, out_i, oo, o0,
                                 scale, bias, rp_g, rp_s, rp_z, res, oo, fma)  # fmt: skip
                    elif not has_rp and not has_res:
                        _mkf_affine(xp, ro, sw, ss, kh, blocks, boff, noshift, nbits, out_f, oo,
                                    o0, scale, bias, rp_g, rp_s, rp_z, res, oo, fma)  # fmt: skip
                    elif not has_res:
                        _mkf_rp(xp, ro, sw, ss, kh, blocks, boff, noshift, nbits, out_f, oo, o0,
                                scale, bias, rp_g, rp_s, rp_z, res, oo, fma)  # fmt: skip
                    elif not has_rp:
                        _mkf_res(xp, ro, sw, ss, kh, blocks, boff, noshift, nbits, out_f, oo, o0,
                                 scale, bias, rp_g, rp_s, rp_z, res, rr, fma)  # fmt: skip
                    else:
                        _mkf_rp_res(xp, ro, sw, ss, kh, blocks, boff, noshift, nbits, out_f, oo,
                                    o0, scale, bias, rp_g, rp_s, rp_z, res, rr, fma)  # fmt: skip
                u0 = nfull
            if u0 < nmt:
                for u in range(u0, nmt):
                    _mk(xp, roffs[u], sw, ss, kh, blocks, boff, noshift, acc, (u - u0) * MR * LANES)
                _epilogue(
                    acc, mrows - u0 * MR, mt0 + u0 * MR, o0, lmax, nbits, mode, out_i, out_f,
                    out_b, ob, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
                )  # fmt: skip


@njit(cache=True, boundscheck=False)
def _pad_bits(x, pad):  # type: ignore[no-untyped-def]
    """One-padding of packed bits: a zero border (bit 0 = +1)."""
    if pad == 0:
        return x
    n_, h, w, cw = x.shape
    xp = np.zeros((n_, h + 2 * pad, w + 2 * pad, cw), np.uint64)
    for n in range(n_):
        for y in range(h):
            for i in range(w):
                for c in range(cw):
                    xp[n, y + pad, i + pad, c] = x[n, y, i, c]
    return xp


@njit(cache=True, boundscheck=False)
def _conv_serial(  # type: ignore[no-untyped-def]
    ntiles, x, blocks, o_, nbits, kh, kw, stride, pad, ho, wo, mode,
    out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
):  # fmt: skip
    xp = _pad_bits(x, pad)
    _conv_range(
        0, ntiles, 0, blocks.shape[0], xp, blocks, o_, nbits, kh, kw, stride, ho, wo, mode,
        out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
    )  # fmt: skip


@njit(cache=True, boundscheck=False, parallel=True)
def _conv_parallel(  # type: ignore[no-untyped-def]
    nchunks, ntiles, nsplit, x, blocks, o_, nbits, kh, kw, stride, pad, ho, wo, mode,
    out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
):  # fmt: skip
    """Work items: (macro tile, one of nsplit groups of output blocks), in nchunks chunks."""
    xp = _pad_bits(x, pad)
    nob = blocks.shape[0]
    nitems = ntiles * nsplit
    for c in prange(nchunks):
        for it in range(c * nitems // nchunks, (c + 1) * nitems // nchunks):
            t = it // nsplit
            g = it - t * nsplit
            _conv_range(
                t, t + 1, g * nob // nsplit, (g + 1) * nob // nsplit, xp, blocks, o_, nbits,
                kh, kw, stride, ho, wo, mode,
                out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr,
                flip,
            )  # fmt: skip


_F0 = np.zeros(0, np.float32)
_F00 = np.zeros((0, 1), np.float32)
_I00 = np.zeros((0, 0), np.int32)
_U00 = np.zeros((0, 0), np.uint32)
_B0 = np.zeros(0, np.bool_)


def _chunks(ntiles: int, work: int) -> int:
    """Number of parallel chunks (0: run the serial variant); sets numba's thread count for
    the calling thread to the engine's (:mod:`bcnn.engine._threads`, default 1)."""
    t = _threads.get_num_threads()
    if t <= 1 or ntiles < 1 or work < _PARALLEL_MIN_WORK:
        return 0
    numba.set_num_threads(t)
    return min(ntiles, 4 * t)


def _split(ntiles: int, nob: int) -> int:
    """Groups of output blocks per macro tile, so that there are >= 4 work items per thread."""
    want = 4 * _threads.get_num_threads()
    return max(1, min(nob, -(-want // ntiles)))


def _out_hw(h: int, w: int, kh: int, kw: int, stride: int, padding: int) -> tuple[int, int]:
    if type(stride) is not int and (
        isinstance(stride, bool) or not isinstance(stride, int | np.integer)
    ):
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    if type(padding) is not int and (
        isinstance(padding, bool) or not isinstance(padding, int | np.integer)
    ):
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    if stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    if padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    if h < 1 or w < 1 or ho < 1 or wo < 1:
        raise ValueError(
            f"input {h}x{w} with kernel {kh}x{kw}, padding {padding} gives no output pixels"
        )
    return ho, wo


def _run_conv(
    x: np.ndarray,
    w: PreparedWeights,
    stride: int,
    padding: int,
    mode: int,
    *,
    scale: np.ndarray = _F0,
    bias: np.ndarray = _F0,
    rprelu: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    residual: np.ndarray | None = None,
    out: np.ndarray | None = None,
    thr: np.ndarray = _F0,
    flip: np.ndarray = _B0,
) -> np.ndarray:
    x = _check_packed(x, 4, "x")
    w = _check_prepared(w)
    n, h, wd, cw = x.shape
    if cw != (w.in_channels + 63) >> 6:
        raise ValueError(
            f"x has {cw} words per pixel, the weights expect {w.words} ({w.in_channels} channels)"
        )
    if padding >= max(w.kh, w.kw) and padding > 0:
        raise ValueError(f"padding {padding} must be smaller than the kernel size")
    ho, wo = _out_hw(h, wd, w.kh, w.kw, stride, padding)
    o = w.out_channels
    m = n * ho * wo
    out_i, out_f, out_b = _I00, _F00, _U00
    res, has_res = _F00, False
    rp = (_F0, _F0, _F0)
    if mode == _MODE_INT:
        result = out_i = np.empty((m, o), np.int32)
    elif mode in (_MODE_AFFINE, _MODE_AFFINE_FMA):
        scale = _vec(scale, o, "scale")
        bias = _vec(bias, o, "bias")
        if rprelu is not None:
            if len(rprelu) != 3:
                raise ValueError("rprelu must be (gamma, slope, zeta)")
            rp = (
                _vec(rprelu[0], o, "rprelu gamma"),
                _vec(rprelu[1], o, "rprelu slope"),
                _vec(rprelu[2], o, "rprelu zeta"),
            )
        if residual is not None:
            if (
                not isinstance(residual, np.ndarray)
                or residual.dtype != np.float32
                or residual.ndim != 4
                or residual.shape[:3] != (n, ho, wo)
                or residual.shape[3] < 1
                or o % residual.shape[3]
                or not residual.flags.c_contiguous
            ):
                raise ValueError(
                    f"residual must be C-contiguous float32 ({n}, {ho}, {wo}, Cr) with "
                    f"{o} % Cr == 0, got {getattr(residual, 'dtype', None)} "
                    f"{getattr(residual, 'shape', None)}"
                )
            res, has_res = residual.reshape(m, residual.shape[3]), True
        if out is None:
            result = np.empty((n, ho, wo, o), np.float32)
        else:
            if (
                not isinstance(out, np.ndarray)
                or out.dtype != np.float32
                or out.shape != (n, ho, wo, o)
                or not out.flags.c_contiguous
            ):
                raise ValueError(f"out must be C-contiguous float32 ({n}, {ho}, {wo}, {o})")
            if residual is not None and out is not residual and np.may_share_memory(out, residual):
                if (
                    out.__array_interface__["data"][0] != residual.__array_interface__["data"][0]
                    or residual.shape != out.shape
                ):
                    raise ValueError("out may overlap residual only as the very same array")
            result = out
        out_f = result.reshape(m, o)
    else:
        thr = _vec(thr, o, "thr")
        flip = _vec(flip, o, "flip", np.bool_)
        cwo = _words(o)
        result = np.zeros((n, ho, wo, cwo), np.uint64)
        out_b = result.reshape(m, cwo).view(np.uint32)
    ntiles = -(-m // (MR * _MB))
    nob, wk, _ = w.blocks.shape
    nbits = w.kh * w.kw * w.in_channels
    args = (
        x, w.blocks, o, nbits, w.kh, w.kw, int(stride), int(padding), ho, wo, mode,
        out_i, out_f, out_b, scale, bias, rp[0], rp[1], rp[2], rprelu is not None,
        res, has_res, thr, flip,
    )  # fmt: skip
    nsplit = _split(ntiles, nob)
    chunks = _chunks(ntiles * nsplit, ntiles * _MB * nob * wk)
    if chunks:
        prev = numba.set_parallel_chunksize(1)  # dynamic: an idle thread takes the next chunk
        try:
            _conv_parallel(chunks, ntiles, nsplit, *args)
        finally:
            numba.set_parallel_chunksize(prev)
    else:
        _conv_serial(ntiles, *args)
    if mode == _MODE_INT:
        return result.reshape(n, ho, wo, o)
    return result


def bconv2d(x: np.ndarray, w: PreparedWeights, stride: int = 1, padding: int = 0) -> np.ndarray:
    """Binary conv2d: packed x (N, H, W, Cw) uint64 -> int32 (N, Ho, Wo, O), the exact ±1 dot
    products (one-padding; n - 2*popcount(a XOR w) with n = KH*KW*Cin)."""
    return _run_conv(x, w, stride, padding, _MODE_INT)


def bconv2d_affine(
    x: np.ndarray,
    w: PreparedWeights,
    scale: object,
    bias: object,
    *,
    stride: int = 1,
    padding: int = 0,
    rprelu: tuple[object, object, object] | None = None,
    residual: np.ndarray | None = None,
    out: np.ndarray | None = None,
    fma: bool = False,
) -> np.ndarray:
    """Binary conv2d + per-channel affine (+ RPReLU) (+ residual add), one pass, float32 NHWC.

    y = float32(acc) * scale[o] + bias[o]; with ``rprelu=(gamma, slope, zeta)``:
    y = y - gamma; y = y if y >= 0 else y * slope; y = y + zeta; with ``residual``
    (N, Ho, Wo, Cr), O % Cr == 0: y = residual[..., o % Cr] + y (Cr < O: the channel-repeated
    shortcut of a widening downsample). ``out`` may be ``residual`` itself (h += ... in place).
    ``fma=True``: y = fma(float32(acc), scale[o], bias[o]) with one rounding (how ATen's CPU
    batch norm computes x * alpha + beta in eval mode) instead of a multiply then an add.
    """
    return _run_conv(
        x,
        w,
        stride,
        padding,
        _MODE_AFFINE_FMA if fma else _MODE_AFFINE,
        scale=scale,  # type: ignore[arg-type]
        bias=bias,  # type: ignore[arg-type]
        rprelu=rprelu,  # type: ignore[arg-type]
        residual=residual,
        out=out,
    )


def bconv2d_threshold(
    x: np.ndarray,
    w: PreparedWeights,
    thr: object,
    flip: object,
    *,
    stride: int = 1,
    padding: int = 0,
) -> np.ndarray:
    """Binary conv2d whose output is packed bits: bit = (acc > thr[o]) if flip[o] else
    (acc < thr[o]), acc compared as float32 (exact: |acc| <= KH*KW*Cin < 2^24).
    -> uint64 (N, Ho, Wo, ceil(O/64)), tail bits 0 (for conv -> BN -> sign chains)."""
    if w.kh * w.kw * w.in_channels >= 2**24:
        raise ValueError("reduction too long for an exact float32 threshold")
    return _run_conv(x, w, stride, padding, _MODE_THRESHOLD, thr=thr, flip=flip)  # type: ignore[arg-type]


def _dense_input(x: np.ndarray, w: PreparedWeights) -> np.ndarray:
    x = _check_packed(x, 2, "x")
    w = _check_prepared(w)
    if w.kh != 1 or w.kw != 1:
        raise ValueError("dense kernels need dense weights (prepare_dense_weights)")
    if x.shape[1] != w.words:
        raise ValueError(
            f"x has {x.shape[1]} words per row, the weights expect {w.words} "
            f"({w.in_channels} features)"
        )
    return x.reshape(x.shape[0], 1, 1, x.shape[1])


def blinear(x: np.ndarray, w: PreparedWeights) -> np.ndarray:
    """Binary linear layer: packed x (N, Kw) -> int32 (N, O) dot products."""
    return _run_conv(_dense_input(x, w), w, 1, 0, _MODE_INT).reshape(x.shape[0], -1)


def blinear_affine(
    x: np.ndarray, w: PreparedWeights, scale: object, bias: object, *, fma: bool = False
) -> np.ndarray:
    """Binary linear layer + per-output affine: float32(acc) * scale + bias -> float32 (N, O)
    (``fma=True``: one rounding, see :func:`bconv2d_affine`)."""
    mode = _MODE_AFFINE_FMA if fma else _MODE_AFFINE
    y = _run_conv(_dense_input(x, w), w, 1, 0, mode, scale=scale, bias=bias)  # type: ignore[arg-type]
    return y.reshape(x.shape[0], -1)


def bgemm(a: np.ndarray, b: PreparedWeights | np.ndarray, k: int | None = None) -> np.ndarray:
    """Binary GEMM: a (M, W) uint64 packed rows, b (N, W) packed rows (or prepared dense
    weights) -> int32 (M, N) with out[i, j] = k - 2*popcount(a[i] XOR b[j]) (k: bits per row,
    default 64*W; tail bits beyond k must be 0 in both)."""
    a = _check_packed(a, 2, "a")
    if isinstance(b, PreparedWeights):
        if k is not None and k != b.in_channels:
            raise ValueError(f"k={k} but the prepared weights have {b.in_channels} features")
        prep = b
    else:
        bb = _check_packed(b, 2, "b")
        kk = 64 * bb.shape[1] if k is None else int(k)
        prep = prepare_dense_weights(bb, kk)
    return blinear(a, prep)


# ------------------------------------------------------------------------------- first layer


@njit(cache=True, boundscheck=False)
def _stem_codes(x, lutc, codes):  # type: ignore[no-untyped-def]
    """codes[n, y, x, g] = OR_c lutc[c, pixel[n, c, y, x], g]: each pixel's plane bits of
    group g, channel-major (bit c*gp + p; lutc holds lut[g, v] << (c*gp))."""
    n_, c_, h, w = x.shape
    g_ = lutc.shape[2]
    for n in range(n_):
        for yy in range(h):
            for xx in range(w):
                row = codes[n, yy, xx]
                l0 = lutc[0, x[n, 0, yy, xx]]
                for g in range(g_):
                    row[g] = l0[g]
                for c in range(1, c_):
                    lc = lutc[c, x[n, c, yy, xx]]
                    for g in range(g_):
                        row[g] |= lc[g]


@njit(cache=True, boundscheck=False)
def _stem_rows(codes, cg, kw, stride, pad, wo, rows):  # type: ignore[no-untyped-def]
    """rows[n, y, ox, g] = OR_kx codes[n, y, ox*stride - pad + kx, g] << (kx * cg): the bits
    of one kernel row of the patch of output column ox (needs kw * cg <= 64)."""
    n_, h, w, g_ = codes.shape
    for n in range(n_):
        for y in range(h):
            for ox in range(wo):
                for g in range(g_):
                    rows[n, y, ox, g] = 0
                for kx in range(kw):
                    ix = ox * stride - pad + kx
                    if ix >= 0 and ix < w:
                        sh = np.uint64(kx * cg)
                        for g in range(g_):
                            rows[n, y, ox, g] |= codes[n, y, ix, g] << sh


@njit(cache=True, boundscheck=False)
def _put_bits(patch, r, k, off, v, nbits):  # type: ignore[no-untyped-def]
    """OR the low nbits of v into patch row r at word k, bit offset off (may cross a word)."""
    patch[r, k] |= v << np.uint64(off)
    if off + nbits > 64:
        patch[r, k + 1] |= v >> np.uint64(64 - off)


@njit(cache=True, boundscheck=False)
def _stem_range(  # type: ignore[no-untyped-def]
    t0, t1, codes, rowc, cg, kh, kw, stride, pad, ho, wo, blocks, wg, shifts, const, o_, mode,
    out_i, out_f, scale, bias, rp_g, rp_s, rp_z, has_rp,
):  # fmt: skip
    """Micro tiles t0..t1 of the first layer. The patch of each output pixel and plane group
    is packed densely (bit (ky*KW + kx)*cg + channel bit), from whole kernel rows (``rowc``,
    when KW*cg <= 64) or tap by tap."""
    n_, h, w, g_ = codes.shape
    nob, wt, _ = blocks.shape
    m_ = n_ * ho * wo
    howo = ho * wo
    use_rows = rowc.shape[0] > 0
    one_word = use_rows and wg == 1 and kh * kw * cg <= 64
    rbits = kw * cg
    patch = np.zeros((MR, wt), np.uint64)
    acc = np.empty(MR * LANES, np.int64)
    roffs = np.arange(MR) * wt
    ooffs = np.empty(MR, np.int64)
    fma = mode == 3
    for t in range(t0, t1):
        m0 = t * MR
        rows = min(MR, m_ - m0)
        patch[:] = 0
        for r in range(rows):
            m = m0 + r
            ooffs[r] = m * o_
            n = m // howo
            rem = m - n * howo
            oy = rem // wo
            ox = rem - oy * wo
            if one_word:  # each group's patch is one word: OR of shifted kernel rows
                for ky in range(kh):
                    iy = oy * stride - pad + ky
                    if iy >= 0 and iy < h:
                        sh = np.uint64(ky * rbits)
                        for g in range(g_):
                            patch[r, g] |= rowc[n, iy, ox, g] << sh
                continue
            for g in range(g_):
                for ky in range(kh):
                    iy = oy * stride - pad + ky
                    if iy < 0 or iy >= h:
                        continue
                    if use_rows:
                        pos = ky * rbits
                        _put_bits(
                            patch,
                            r,
                            g * wg + (pos >> 6),
                            pos & 63,
                            rowc[n, iy, ox, g],
                            rbits,
                        )
                    else:
                        for kx in range(kw):
                            ix = ox * stride - pad + kx
                            if ix >= 0 and ix < w:
                                pos = (ky * kw + kx) * cg
                                _put_bits(patch, r, g * wg + (pos >> 6), pos & 63,
                                          codes[n, iy, ix, g], cg)  # fmt: skip
        for ob in range(nob):
            o0 = ob * LANES
            lmax = min(LANES, o_ - o0)
            boff = ob * wt * LANES
            if rows == MR and lmax == LANES:
                if mode == 0:
                    _mkf_shift_int(patch, roffs, wt, wt, 1, blocks, boff, shifts, const,
                                   out_i, ooffs, o0, scale, bias, rp_g, rp_s, rp_z, scale,
                                   ooffs, fma)  # fmt: skip
                elif not has_rp:
                    _mkf_shift_affine(patch, roffs, wt, wt, 1, blocks, boff, shifts, const,
                                      out_f, ooffs, o0, scale, bias, rp_g, rp_s, rp_z, scale,
                                      ooffs, fma)  # fmt: skip
                else:
                    _mkf_shift_rp(patch, roffs, wt, wt, 1, blocks, boff, shifts, const,
                                  out_f, ooffs, o0, scale, bias, rp_g, rp_s, rp_z, scale,
                                  ooffs, fma)  # fmt: skip
                continue
            _mk_shift(patch, roffs, wt, wt, 1, blocks, boff, shifts, acc, 0)
            for r in range(rows):
                m = m0 + r
                base = r * LANES
                if mode == 0:
                    for l in range(lmax):
                        out_i[m, o0 + l] = const - 2 * acc[base + l]
                else:
                    for l in range(lmax):
                        o = o0 + l
                        xv = np.float32(const - 2 * acc[base + l])
                        y = _fma32(xv, scale[o], bias[o]) if fma else xv * scale[o] + bias[o]
                        if has_rp:
                            y = y - rp_g[o]
                            if y < 0:
                                y = y * rp_s[o]
                            y = y + rp_z[o]
                        out_f[m, o] = y


@njit(cache=True, boundscheck=False)
def _stem_serial(  # type: ignore[no-untyped-def]
    ntiles, codes, rowc, cg, kh, kw, stride, pad, ho, wo, blocks, wg, shifts, const,
    o_, mode, out_i, out_f, scale, bias, rp_g, rp_s, rp_z, has_rp,
):  # fmt: skip
    _stem_range(
        0, ntiles, codes, rowc, cg, kh, kw, stride, pad, ho, wo, blocks, wg, shifts, const, o_,
        mode, out_i, out_f, scale, bias, rp_g, rp_s, rp_z, has_rp,
    )  # fmt: skip


@njit(cache=True, boundscheck=False, parallel=True)
def _stem_parallel(  # type: ignore[no-untyped-def]
    nchunks, ntiles, codes, rowc, cg, kh, kw, stride, pad, ho, wo, blocks, wg, shifts,
    const, o_, mode, out_i, out_f, scale, bias, rp_g, rp_s, rp_z, has_rp,
):  # fmt: skip
    for c in prange(nchunks):
        _stem_range(
            c * ntiles // nchunks, (c + 1) * ntiles // nchunks, codes, rowc, cg, kh, kw, stride,
            pad, ho, wo, blocks, wg, shifts, const, o_, mode,
            out_i, out_f, scale, bias, rp_g, rp_s, rp_z, has_rp,
        )  # fmt: skip


@njit(cache=True, boundscheck=False)
def _stem_planes(x, bit, pad, cp):  # type: ignore[no-untyped-def]
    """Bit-planes: cp[g, n, y + pad, x + pad] = OR_c ((pixel[n, c, y, x] >> bit[g]) & 1) << c;
    cp zeroed by the caller (its border is the one-padding). Inner loops run along rows."""
    n_, c_, h, w = x.shape
    g_ = bit.shape[0]
    for g in range(g_):
        b = np.uint64(bit[g])
        for n in range(n_):
            for c in range(c_):
                sh = np.uint64(c)
                for y in range(h):
                    row = cp[g, n, y + pad]
                    src = x[n, c, y]
                    for i in range(w):
                        row[i + pad] |= ((np.uint64(src[i]) >> b) & np.uint64(1)) << sh


@njit(cache=True, boundscheck=False)
def _stem_patches(cp, cg, kh, kw, stride, ho, wo, patch):  # type: ignore[no-untyped-def]
    """patch[g, m] = the dense KH*KW*cg-bit patch of group g at output pixel m (one word):
    OR over taps of cp[g, n, oy*stride + ky, ox*stride + kx] << ((ky*KW + kx) * cg)."""
    g_, n_, hp, wp = cp.shape
    if stride == 1:
        # on the padded grid: position j = oy*Wp + ox' (ox' < Wp; ox' >= Wo is never read),
        # every tap is one long contiguous loop per plane
        flat = cp.reshape(g_, n_, hp * wp)
        span = (ho - 1) * wp + wo
        grid = np.zeros(span, np.uint64)
        for g in range(g_):
            for n in range(n_):
                src = flat[g, n]
                for i in range(span):
                    grid[i] = 0
                for ky in range(kh):
                    for kx in range(kw):
                        sh = np.uint64((ky * kw + kx) * cg)
                        s1 = src[ky * wp + kx : ky * wp + kx + span]
                        for i in range(span):
                            grid[i] |= s1[i] << sh
                for oy in range(ho):
                    prow = patch[g, (n * ho + oy) * wo : (n * ho + oy + 1) * wo]
                    gr = grid[oy * wp : oy * wp + wo]
                    for ox in range(wo):
                        prow[ox] = gr[ox]
        return
    for g in range(g_):
        for n in range(n_):
            for oy in range(ho):
                base = (n * ho + oy) * wo
                prow = patch[g, base : base + wo]
                for ox in range(wo):
                    prow[ox] = 0
                for ky in range(kh):
                    src = cp[g, n, oy * stride + ky]
                    for kx in range(kw):
                        sh = np.uint64((ky * kw + kx) * cg)
                        for ox in range(wo):
                            prow[ox] |= src[ox * stride + kx] << sh


@njit(cache=True, boundscheck=False)
def _stem_fast_range(  # type: ignore[no-untyped-def]
    t0, t1, patch, blocks, shifts, const, o_, mode, out_i, out_f, scale, bias, rp_g, rp_s,
    rp_z, has_rp,
):  # fmt: skip
    """Micro tiles t0..t1 of the first layer from one-word group patches ``patch`` (G, M):
    the micro-kernel reads G segments of one word, M apart."""
    g_, m_ = patch.shape
    nob = blocks.shape[0]
    roffs = np.empty(MR, np.int64)
    ooffs = np.empty(MR, np.int64)
    acc = np.empty(MR * LANES, np.int64)
    fma = mode == 3
    for t in range(t0, t1):
        m0 = t * MR
        rows = min(MR, m_ - m0)
        for r in range(MR):
            mm = min(m0 + r, m_ - 1)
            roffs[r] = mm
            ooffs[r] = mm * o_
        for ob in range(nob):
            o0 = ob * LANES
            lmax = min(LANES, o_ - o0)
            boff = ob * g_ * LANES
            if rows == MR and lmax == LANES:
                if mode == 0:
                    _mkf_shift_int(patch, roffs, 1, m_, g_, blocks, boff, shifts, const,
                                   out_i, ooffs, o0, scale, bias, rp_g, rp_s, rp_z, scale,
                                   ooffs, fma)  # fmt: skip
                elif not has_rp:
                    _mkf_shift_affine(patch, roffs, 1, m_, g_, blocks, boff, shifts, const,
                                      out_f, ooffs, o0, scale, bias, rp_g, rp_s, rp_z, scale,
                                      ooffs, fma)  # fmt: skip
                else:
                    _mkf_shift_rp(patch, roffs, 1, m_, g_, blocks, boff, shifts, const,
                                  out_f, ooffs, o0, scale, bias, rp_g, rp_s, rp_z, scale,
                                  ooffs, fma)  # fmt: skip
                continue
            _mk_shift(patch, roffs, 1, m_, g_, blocks, boff, shifts, acc, 0)
            for r in range(rows):
                m = m0 + r
                base = r * LANES
                if mode == 0:
                    for l in range(lmax):
                        out_i[m, o0 + l] = const - 2 * acc[base + l]
                else:
                    for l in range(lmax):
                        o = o0 + l
                        xv = np.float32(const - 2 * acc[base + l])
                        y = _fma32(xv, scale[o], bias[o]) if fma else xv * scale[o] + bias[o]
                        if has_rp:
                            y = y - rp_g[o]
                            if y < 0:
                                y = y * rp_s[o]
                            y = y + rp_z[o]
                        out_f[m, o] = y


@njit(cache=True, boundscheck=False)
def _stem_fast_serial(  # type: ignore[no-untyped-def]
    x, bit, cg, kh, kw, stride, pad, ho, wo, blocks, shifts, const, o_, mode,
    out_i, out_f, scale, bias, rp_g, rp_s, rp_z, has_rp,
):  # fmt: skip
    n_, _, h, w = x.shape
    g_ = bit.shape[0]
    cp = np.zeros((g_, n_, h + 2 * pad, w + 2 * pad), np.uint64)
    _stem_planes(x, bit, pad, cp)
    patch = np.empty((g_, n_ * ho * wo), np.uint64)
    _stem_patches(cp, cg, kh, kw, stride, ho, wo, patch)
    _stem_fast_range(
        0, -(-(n_ * ho * wo) // MR), patch, blocks, shifts, const, o_, mode, out_i, out_f,
        scale, bias, rp_g, rp_s, rp_z, has_rp,
    )  # fmt: skip


def prepare_stem_weights(
    w_packed: np.ndarray,
    image_channels: int,
    planes: int,
    encoding: str = "bitplane",
    thresholds: object = None,
) -> PreparedStem:
    """First-layer weights -> :class:`PreparedStem`.

    w_packed: canonical packed weights (O, KH, KW, Cw) of the binary conv over the encoded
    planes, Cin = image_channels * planes, input channel c*planes + p = plane p of image
    channel c (as ``bcnn.nn.BitPlaneEncoder`` / ``ThermometerEncoder``).

    - ``"bitplane"``: planes = bits (1..8); plane p is bit (8 - planes + p) of the pixel and
      has place value 2^p; one group per plane (word shifts p).
    - ``"thermometer"``: plane p is ``pixel >= thresholds[p]`` (thresholds: ints, (planes,));
      all place values 1 (the model multiplies by its step); one group of all planes.
    """
    w = _check_packed(w_packed, 4, "stem weights")
    o, kh, kw, cw = w.shape
    c, p = int(image_channels), int(planes)
    if c < 1 or p < 1 or cw != _words(c * p):
        raise ValueError(
            f"stem weights have {cw} words per tap; {c} channels x {p} planes need "
            f"{_words(c * p) if c > 0 and p > 0 else '?'}"
        )
    _check_tail_zero(w, c * p, "stem weights")
    bits = _unpack_bool_rows(w, c * p).reshape(o, kh, kw, c, p)
    vals = np.arange(256)
    if encoding == "bitplane":
        if not 1 <= p <= 8:
            raise ValueError(f"bitplane encoding has 1..8 planes, got {p}")
        if thresholds is not None:
            raise ValueError("thresholds are only for the thermometer encoding")
        gp = 1
        groups = [bits[..., q : q + 1] for q in range(p)]
        lut = np.stack([(vals >> (8 - p + q)) & 1 for q in range(p)]).astype(np.uint64)
        gshift = list(range(p))
    elif encoding == "thermometer":
        t = np.asarray(thresholds)
        if thresholds is None or t.shape != (p,):
            raise ValueError(f"thermometer encoding needs ({p},) thresholds")
        gp = p
        groups = [bits]
        ge = vals[:, None] >= t[None, :].astype(np.int64)  # (256, P)
        lut = (ge.astype(np.uint64) << np.arange(p, dtype=np.uint64)).sum(1, dtype=np.uint64)
        lut = lut[None, :]
        gshift = [0]
    else:
        raise ValueError(f"unknown stem encoding {encoding!r}; known: bitplane, thermometer")
    cg = c * gp
    if cg > 64:
        raise ValueError(f"stem: {c} channels x {gp} planes per group exceed 64 bits per tap")
    kg = kh * kw * cg
    wg = _words(kg)
    rows = np.concatenate(
        [_pack_bool_rows(gb.reshape(o, kg)) for gb in groups], axis=1
    )  # (O, G*Wg), group-major words
    shifts = np.repeat(np.asarray(gshift, np.int64), wg)
    const = sum(kg << s for s in gshift)
    lut = np.ascontiguousarray(lut, dtype=np.uint64)
    lutc = np.stack([lut.T << np.uint64(ci * gp) for ci in range(c)])
    bits_g = [8 - p + q for q in range(p)] if encoding == "bitplane" else []
    return PreparedStem(
        _blocks_from_rows(rows),
        lut,
        np.ascontiguousarray(lutc, dtype=np.uint64),
        np.asarray(bits_g, np.int64),
        np.ascontiguousarray(shifts),
        int(const),
        o,
        c,
        gp,
        len(groups),
        wg,
        kh,
        kw,
    )


def _run_stem(
    x: np.ndarray,
    w: PreparedStem,
    stride: int,
    padding: int,
    mode: int,
    scale: object = None,
    bias: object = None,
    rprelu: tuple[object, object, object] | None = None,
) -> np.ndarray:
    if not isinstance(w, PreparedStem):
        raise ValueError("weights must be PreparedStem (see prepare_stem_weights)")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(
            f"stem input must be uint8 (N, C, H, W), got {getattr(x, 'dtype', type(x).__name__)}"
            f" {getattr(x, 'shape', '')}"
        )
    n, c, h, wd = x.shape
    if c != w.image_channels:
        raise ValueError(f"stem expects {w.image_channels} image channels, got {c}")
    if padding >= max(w.kh, w.kw) and padding > 0:
        raise ValueError(f"padding {padding} must be smaller than the kernel size")
    ho, wo = _out_hw(h, wd, w.kh, w.kw, stride, padding)
    nob, wt, lanes = w.blocks.shape
    if (
        lanes != LANES
        or wt != w.groups * w.group_words
        or w.shifts.shape != (wt,)
        or w.lut.shape != (w.groups, 256)
        or w.lutc.shape != (w.image_channels, 256, w.groups)
        or nob != -(-w.out_channels // LANES)
    ):
        raise ValueError("inconsistent PreparedStem")
    o = w.out_channels
    m = n * ho * wo
    cg = w.image_channels * w.group_planes
    out_i, out_f = _I00, _F00
    sc, bi, rp = _F0, _F0, (_F0, _F0, _F0)
    if mode == _MODE_INT:
        result = out_i = np.empty((m, o), np.int32)
    else:
        sc, bi = _vec(scale, o, "scale"), _vec(bias, o, "bias")
        if rprelu is not None:
            rp = tuple(_vec(v, o, "rprelu") for v in rprelu)  # type: ignore[assignment]
        result = out_f = np.empty((m, o), np.float32)
    if (
        w.plane_bits.size
        and w.group_words == 1
        and w.kh * w.kw * cg <= 64
        and _threads.get_num_threads() == 1
    ):
        # bit-planes whose patches are one word per plane: built with row-wise vector loops
        _stem_fast_serial(
            np.ascontiguousarray(x), w.plane_bits, cg, w.kh, w.kw, int(stride),
            int(padding), ho, wo, w.blocks, w.shifts, w.const, o, mode, out_i, out_f, sc, bi,
            rp[0], rp[1], rp[2], rprelu is not None,
        )  # fmt: skip
        return result.reshape(n, ho, wo, o)
    codes = np.empty((n, h, wd, w.groups), np.uint64)
    _stem_codes(np.ascontiguousarray(x), w.lutc, codes)
    if w.kw * cg <= 64:  # whole kernel rows fit a word: build them once per input row
        rowc = np.empty((n, h, wo, w.groups), np.uint64)
        _stem_rows(codes, cg, w.kw, int(stride), int(padding), wo, rowc)
    else:
        rowc = np.empty((0, 0, 0, 0), np.uint64)
    ntiles = -(-m // MR)
    args = (
        codes, rowc, cg, w.kh, w.kw, int(stride), int(padding), ho, wo,
        w.blocks, w.group_words, w.shifts, w.const, o, mode, out_i, out_f, sc, bi,
        rp[0], rp[1], rp[2], rprelu is not None,
    )  # fmt: skip
    chunks = _chunks(ntiles, ntiles * nob * (wt + 8))
    if chunks:
        prev = numba.set_parallel_chunksize(1)
        try:
            _stem_parallel(chunks, ntiles, *args)
        finally:
            numba.set_parallel_chunksize(prev)
    else:
        _stem_serial(ntiles, *args)
    return result.reshape(n, ho, wo, o)


def stem_conv(x: np.ndarray, w: PreparedStem, stride: int = 1, padding: int = 0) -> np.ndarray:
    """First layer: uint8 pixels (N, C, H, W) -> int32 (N, Ho, Wo, O), exactly
    S = sum_p place(p) * conv(s_p, w_p) over the encoded planes (one-padding on planes).
    Bitplane: S is EncodedConv2d's output; thermometer: the output is step * S."""
    return _run_stem(x, w, stride, padding, _MODE_INT)


def stem_conv_affine(
    x: np.ndarray,
    w: PreparedStem,
    scale: object,
    bias: object,
    *,
    stride: int = 1,
    padding: int = 0,
    rprelu: tuple[object, object, object] | None = None,
    fma: bool = False,
) -> np.ndarray:
    """:func:`stem_conv` + float32(S) * scale + bias (+ RPReLU) -> float32 (N, Ho, Wo, O)
    (``fma=True``: one rounding, see :func:`bconv2d_affine`)."""
    mode = _MODE_AFFINE_FMA if fma else _MODE_AFFINE
    return _run_stem(x, w, stride, padding, mode, scale, bias, rprelu)


# ----------------------------------------------------------------------------------- pooling


@njit(cache=True, boundscheck=False)
def _maxpool_bits(x, k, stride, pad, out):  # type: ignore[no-untyped-def]
    n_, h, w, cw = x.shape
    _, ho, wo, _ = out.shape
    for n in range(n_):
        for oy in range(ho):
            for ox in range(wo):
                for c in range(cw):
                    out[n, oy, ox, c] = ~np.uint64(0)
                for ky in range(k):
                    iy = oy * stride - pad + ky
                    if iy < 0 or iy >= h:
                        continue
                    for kx in range(k):
                        ix = ox * stride - pad + kx
                        if ix < 0 or ix >= w:
                            continue
                        for c in range(cw):
                            out[n, oy, ox, c] &= x[n, iy, ix, c]


def maxpool_packed(
    x: np.ndarray, kernel: int, stride: int | None = None, padding: int = 0
) -> np.ndarray:
    """Max-pool of ±1 values on packed bits: max = +1 unless all are -1, i.e. the AND of the
    bits (bit 0 = +1). Padding is ignored (torch pads max-pool with -inf). Floor mode.
    x (N, H, W, Cw) uint64 -> (N, Ho, Wo, Cw); tail bits stay 0."""
    x = _check_packed(x, 4, "x")
    s = kernel if stride is None else stride
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1:
        raise ValueError(f"kernel must be an int >= 1, got {kernel!r}")
    if padding > kernel // 2:
        raise ValueError(f"padding {padding} must be at most half the kernel {kernel}")
    ho, wo = _out_hw(x.shape[1], x.shape[2], kernel, kernel, s, padding)
    out = np.empty((x.shape[0], ho, wo, x.shape[3]), np.uint64)
    _maxpool_bits(x, kernel, s, padding, out)
    return out


@njit(cache=True, boundscheck=False)
def _avgpool2(h, out):  # type: ignore[no-untyped-def]
    n_, hh, ww, c_ = h.shape
    _, ho, wo, _ = out.shape
    for n in range(n_):
        for oy in range(ho):
            y0 = 2 * oy
            ny = min(2, hh - y0)
            for ox in range(wo):
                x0 = 2 * ox
                nx = min(2, ww - x0)
                cnt = np.float32(ny * nx)
                for c in range(c_):
                    s = h[n, y0, x0, c]
                    if nx == 2:
                        s = s + h[n, y0, x0 + 1, c]
                    if ny == 2:
                        s = s + h[n, y0 + 1, x0, c]
                        if nx == 2:
                            s = s + h[n, y0 + 1, x0 + 1, c]
                    out[n, oy, ox, c] = s / cnt


def avgpool2x2(h: np.ndarray) -> np.ndarray:
    """2x2 stride-2 average pool of a float32 NHWC stream, partial windows at odd sizes averaging
    only their valid elements (torch AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False));
    float32 sums in window order, then one division. -> (N, ceil(H/2), ceil(W/2), C)."""
    if not isinstance(h, np.ndarray) or h.dtype != np.float32 or h.ndim != 4:
        raise ValueError("h must be a float32 (N, H, W, C) array")
    h = np.ascontiguousarray(h)
    n, hh, ww, c = h.shape
    if hh < 1 or ww < 1:
        raise ValueError(f"cannot pool an empty {hh}x{ww} stream")
    out = np.empty((n, -(-hh // 2), -(-ww // 2), c), np.float32)
    _avgpool2(h, out)
    return out


@njit(cache=True, boundscheck=False)
def _gap(h, out):  # type: ignore[no-untyped-def]
    n_, p_, c_ = h.shape
    acc = np.empty(c_, np.float64)
    for n in range(n_):
        for c in range(c_):
            acc[c] = 0.0
        for p in range(p_):
            row = h[n, p]
            for c in range(c_):
                acc[c] += np.float64(row[c])
        for c in range(c_):
            out[n, c] = np.float32(acc[c] / p_)


def global_avgpool(h: np.ndarray) -> np.ndarray:
    """Mean over H and W of a float32 NHWC stream -> float32 (N, C) (float64 sum, one
    rounding: within an ulp of torch's float32 mean)."""
    if not isinstance(h, np.ndarray) or h.dtype != np.float32 or h.ndim != 4:
        raise ValueError("h must be a float32 (N, H, W, C) array")
    if h.shape[1] < 1 or h.shape[2] < 1:
        raise ValueError("cannot pool an empty stream")
    n, hh, ww, c = h.shape
    out = np.empty((n, c), np.float32)
    _gap(np.ascontiguousarray(h).reshape(n, hh * ww, c), out)
    return out
