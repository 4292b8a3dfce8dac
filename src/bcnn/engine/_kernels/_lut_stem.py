"""The ``lut`` kernel path's first layer: bit-plane patches looked up, not popcounted.

The stem's fast path (``_stem._stem_fast_range``: bit-planes whose patch is one word per plane,
``KH*KW*C <= 64`` bits) sums, for each output pixel and channel, ``S = sum_g 2^shift_g *
popcount(patch_g XOR w_g)`` over the G planes. On AVX2, LLVM's 64-bit vector popcount costs
about a dozen operations per 4 channels; here, as in ``_lut_conv``, weights are nibbles (one
per byte, 32 channels per vector) and each activation nibble ``v`` selects the 16-byte table
``T_v[n] = popcount(n XOR v)``: one ``vpshufb`` + one ``vpaddb`` per 4 bits of 32 channels.

* weights (:func:`stem_nibbles`): ``nib[j, nq*g + q, l]`` = bits 4q..4q+3 of plane g's word
  of channel 32j + l, for the ``nq`` nibbles that hold the patch's bits (rounded up to a
  multiple of :data:`_QSTEP`; the bits past the patch are 0 in both operands);
* per plane, 4 pixels x 32 channels of byte sums (at most 4 * 16 = 64 per byte), widened to
  uint16 and shifted by the plane's place value (the total is at most 255 * 64 < 2^15);
* the fused epilogue of the popcount kernels (``_llvm._emit_epilogue``: int32, or float affine
  (+ RPReLU)) on ``const - 2*S``, so the outputs are the popcount path's bit for bit.

Tested against the popcount path and the numpy reference (tests/test_kernels.py).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ._conv_epi import _ctl, _stem_tile, _store_tile
from ._ir import aligned_bytes, counted_loop, pshufb
from ._llvm import _NV, _VL, LANES, MR, _arg_readers, _args_ok, _emit_epilogue, _epi_args_ok
from ._lut_conv import TABLES, lut_blocks

__all__ = ["stem_nibbles"]

_QSTEP = 4  # nibbles per unrolled step of the inner loop


def stem_nibbles(blocks: np.ndarray, bits: int) -> np.ndarray:
    """The fast stem's prepared words uint64 (nob, G, 32) (one word per plane, ``bits`` bits
    used) -> nibbles uint8 (nob, G*nq, 32), nq = ceil(bits / 4) rounded up to _QSTEP."""
    nob, g_, lanes = blocks.shape
    nib4 = -(-bits // 4)  # nibbles that hold the patch's bits
    nq = min(16, -(-nib4 // _QSTEP) * _QSTEP)
    nib = lut_blocks(blocks).reshape(nob, g_, 16, lanes)  # plane g's nibble q at [:, g, q]
    return np.ascontiguousarray(nib[:, :, :nq].reshape(nob, g_ * nq, lanes))


def _make_mk_stem(kind: str | None):  # type: ignore[no-untyped-def]
    """``mk(patch, roffs, m_, g_, nq, nib, boff, shifts, ...)``: rows r < MR (plane g's
    patch word ``patch[g*m_ + roffs[r]]``), the 32 channels at byte ``boff`` of ``nib`` (nq
    nibbles per plane, a multiple of _QSTEP); ``S[r, l] = sum_g popcount(patch word XOR
    weights) << shifts[g]``. kind None: then ``(acc, acc_off)``, acc[acc_off + 32 r + l] = S
    (int64); else the fused epilogue's arguments ``(nbits, out, ooffs, o0, scale, bias, g, s,
    z, res, resoffs, fma)`` on ``nbits - 2*S``, as ``_llvm._mkf_shift_*``."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
        v8, v16 = ir.VectorType(i8, 32), ir.VectorType(i16, 32)
        data, idx = _arg_readers(context, builder, signature, args)
        pp, rop, nbp, shp = data(0), data(1), data(5, i8), data(7)
        tabp = aligned_bytes(builder, "bcnn.lut.tables", TABLES)  # no load straddles a line
        m_, g_, nq, boff = idx(2), idx(3), idx(4), idx(6)
        c = lambda v: ir.Constant(i64, v)  # noqa: E731
        shuf = pshufb(builder, 32)
        rows = [builder.load(builder.gep(rop, [c(r)])) for r in range(MR)]
        wbase = builder.gep(nbp, [boff])
        undef16 = ir.Constant(v16, ir.Undefined)
        splat_mask = ir.Constant(ir.VectorType(i32, 32), None)

        def plane(g, accs):  # type: ignore[no-untyped-def]
            """Plane g: byte sums over its nibbles, widened, shifted, added."""
            words = [builder.load(builder.gep(pp, [builder.add(builder.mul(g, m_), rows[r])]))
                     for r in range(MR)]  # fmt: skip
            wg = builder.gep(wbase, [builder.mul(builder.mul(g, nq), c(LANES))])

            def step(q0, bsum):  # type: ignore[no-untyped-def]
                bsum = list(bsum)
                for dq in range(_QSTEP):
                    q = builder.add(q0, c(dq))
                    wp = builder.gep(wg, [builder.mul(q, c(LANES))])
                    wv = builder.load(builder.bitcast(wp, v8.as_pointer()), align=1)
                    sh = builder.mul(q, c(4))
                    for r in range(MR):
                        v = builder.and_(builder.lshr(words[r], sh), c(15))
                        tp = builder.gep(tabp, [builder.shl(v, c(5))])
                        tv = builder.load(builder.bitcast(tp, v8.as_pointer()), align=1)
                        bsum[r] = builder.add(bsum[r], builder.call(shuf, [tv, wv]))
                return bsum

            bsum = counted_loop(builder, c(0), nq, _QSTEP, [ir.Constant(v8, None)] * MR, step,
                                "lsq")  # fmt: skip
            sv = builder.trunc(builder.load(builder.gep(shp, [g])), i16)
            sv = builder.shuffle_vector(
                builder.insert_element(undef16, sv, ir.Constant(i32, 0)), undef16, splat_mask
            )
            return [builder.add(accs[r], builder.shl(builder.zext(bsum[r], v16), sv))
                    for r in range(MR)]  # fmt: skip

        sums = counted_loop(builder, c(0), g_, 1, [ir.Constant(v16, None)] * MR, plane, "lsg")
        if kind is None:
            v64 = ir.VectorType(i64, 32)
            accp, acc_off = data(8), idx(9)
            for r in range(MR):
                ptr = builder.gep(accp, [builder.add(acc_off, c(r * LANES))])
                builder.store(builder.zext(sums[r], v64), builder.bitcast(ptr, v64.as_pointer()),
                              align=8)  # fmt: skip
            return context.get_dummy_value()
        # the epilogue's dot products nbits - 2*S in int32 (exact: S and nbits, the planes'
        # place-weighted bit count, are below 2^15): half the vectors of int64, and no
        # int64 -> int32 narrowing before the float conversion
        k = 8
        v32x = ir.VectorType(i32, 32)
        nb_v = builder.shuffle_vector(
            builder.insert_element(
                ir.Constant(v32x, ir.Undefined), builder.trunc(idx(k), i32), ir.Constant(i32, 0)
            ),
            ir.Constant(v32x, ir.Undefined),
            splat_mask,
        )
        out_p = data(k + 1, i32 if kind == "int" else ir.FloatType())
        oo_p, o0 = data(k + 2), idx(k + 3)
        vec_ps = tuple(data(k + 4 + q, ir.FloatType()) for q in range(5))
        res_p, ro_p, ctl = data(k + 9, ir.FloatType()), data(k + 10), idx(k + 11)
        one = ir.Constant(v32x, [1] * 32)
        out_rows = []
        for r in range(MR):
            d = builder.sub(nb_v, builder.shl(builder.zext(sums[r], v32x), one))
            parts = [
                builder.shuffle_vector(
                    d, d, ir.Constant(ir.VectorType(i32, _VL), list(range(j * _VL, (j + 1) * _VL)))
                )
                for j in range(_NV)
            ]
            out_off = builder.add(builder.load(builder.gep(oo_p, [c(r)])), o0)
            res_off = builder.add(builder.load(builder.gep(ro_p, [c(r)])), o0)
            out_rows.append((parts, out_off, res_off))
        _emit_epilogue(context, builder, kind, out_rows, out_p, o0, vec_ps, res_p, ctl)
        return context.get_dummy_value()

    base_ok = lambda patch, roffs, m_, g_, nq, nib, boff, shifts: _args_ok(  # noqa: E731
        [(patch, types.uint64), (roffs, types.int64), (nib, types.uint8),
         (shifts, types.int64)],
        (m_, g_, nq, boff),
    )  # fmt: skip

    if kind is None:

        @intrinsic
        def mk(typingctx, patch, roffs, m_, g_, nq, nib, boff, shifts, acc, acc_off):  # type: ignore[no-untyped-def]
            base = (patch, roffs, m_, g_, nq, nib, boff, shifts)
            if not (base_ok(*base) and _args_ok([(acc, types.int64)], (acc_off,))):
                return None
            return types.void(*base, acc, acc_off), codegen

        return mk

    @intrinsic
    def mkf(  # type: ignore[no-untyped-def]
        typingctx, patch, roffs, m_, g_, nq, nib, boff, shifts,
        nbits, out, ooffs, o0, scale, bias, g, s, z, res, resoffs, fma,
    ):  # fmt: skip
        base = (patch, roffs, m_, g_, nq, nib, boff, shifts)
        epi = (nbits, out, ooffs, o0, scale, bias, g, s, z, res, resoffs, fma)
        if not (base_ok(*base) and _epi_args_ok(kind, *epi)):
            return None
        return types.void(*base, *epi), codegen

    return mkf


_mks_acc = _make_mk_stem(None)
_mks_int, _mks_affine, _mks_rp = (_make_mk_stem(k) for k in ("int", "affine", "affine_rp"))


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _stem_fast_range_lut(  # type: ignore[no-untyped-def]
    t0, t1, patch, blocks, shifts, const, o_, mode, out_i, out_f, scale, bias, rp_g, rp_s,
    rp_z, has_rp,
):  # fmt: skip
    """``_stem._stem_fast_range_pop`` on nibble weights ``blocks`` (uint8 (nob, G*nq, 32),
    :func:`stem_nibbles`); ``shifts``: one per plane."""
    nib = blocks
    g_, m_ = patch.shape
    nob = nib.shape[0]
    nq = nib.shape[1] // g_
    bstride = nib.shape[1] * LANES
    roffs = np.empty(MR, np.int64)
    ooffs = np.empty(MR, np.int64)
    acc = np.empty(MR * LANES, np.int64)
    fma = _ctl(mode, o_)
    for t in range(t0, t1):
        m0, rows = _stem_tile(t, m_, o_, roffs, ooffs)
        for ob in range(nob):
            o0 = ob * LANES
            lmax = min(LANES, o_ - o0)
            boff = ob * bstride
            if rows == MR and lmax == LANES:
                a = (patch, roffs, m_, g_, nq, nib, boff, shifts, const)
                e = (ooffs, o0, scale, bias, rp_g, rp_s, rp_z, scale, ooffs, fma)
                if mode == 0:
                    _mks_int(*a, out_i, *e)
                elif not has_rp:
                    _mks_affine(*a, out_f, *e)
                else:
                    _mks_rp(*a, out_f, *e)
                continue
            _mks_acc(patch, roffs, m_, g_, nq, nib, boff, shifts, acc, 0)
            _store_tile(acc, rows, m0, o0, lmax, mode, const, out_i, out_f, scale, bias,
                        rp_g, rp_s, rp_z, has_rp, fma)  # fmt: skip
