"""The ``lut`` kernel path's binary conv / dense tiles: lookup tables instead of popcounts.

For CPUs with AVX2 but no VPOPCNTDQ, where ``llvm.ctpop`` lowers to a nibble-table sequence
with a ``vpsadbw`` reduction at every step (about 9 vector operations per 256 binary MACs).
Here the table is the method (see docs/kernels.md, "the lut path"):

* weights are nibbles, one per byte (:func:`lut_blocks`): ``blocks[j, 16*k + q, l]`` is bits
  4q..4q+3 of word k of output channel 32*j + l, so one 256-bit vector holds one nibble of 32
  channels;
* for an activation nibble ``v`` the table ``T_v[n] = popcount(n XOR v)``: one ``vpshufb``
  gives ``popcount(a XOR w)`` for those 4 bits of all 32 channels, one ``vpaddb`` accumulates
  it: 128 binary MACs for two vector operations, plus the nibble's table address, which is
  shared by the :data:`NBL` channel blocks of a tile;
* byte accumulators take at most :data:`_RUN` words (16 nibbles each, 4 per nibble: <= 192)
  before they are widened into the tile's uint16 sums (two 256-bit adds per 32 channels, half
  the memory traffic of int32), which the epilogue reads as they are; a reduction longer
  than :func:`_geometry`'s limit adds them into int64 sums on the way (uint16 never wraps),
  and the epilogue adds the two.

:func:`_conv_range_lut` has the signature and the outputs of ``_conv._conv_range_pop``
(macro tiles of MB*MR pixels, the same row offsets into the padded input, the same epilogue),
so the conv, dense, threshold and bit-serial kernels run on either path: ``_conv`` dispatches
on the weights' dtype (uint64 words: popcounts; uint8 nibbles: lookup tables). Exactness is
tested against the numpy reference and the popcount path (tests/test_kernels.py runs every
conv test on both layouts; tests/test_kernel_paths.py whole models on ``BCNN_KERNEL_PATH=lut``).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ._conv_epi import _epilogue, _tile_rows
from ._ir import aligned_bytes, counted_loop, pshufb
from ._llvm import _MB, LANES, MR, _arg_readers, _args_ok

__all__ = ["NBL", "PAIR_TABLES", "lut_blocks", "pair_bytes"]

MRL = 2  # rows (pixels) per lookup micro-tile of 3 or 4 blocks (8 or 6 byte accumulators)
MRL_NARROW = 4  # rows per micro-tile of 1 or 2 blocks (4 or 8 accumulators): each weight
# load serves 4 pixels, and as many accumulators are in flight as in the wide tiles
NBL = 4  # blocks of 32 output channels per micro-tile (each table load serves NBL shuffles)
_RUN = 3  # words per byte-accumulation run: 3 * 16 nibbles * 4 <= 192 < 256
_ROWS = -(-_MB * MR // MRL_NARROW) * MRL_NARROW  # a macro tile's rows, in whole micro-tiles
assert _ROWS % MRL == 0

_RUN_PAIR = 1  # words per run on plane pairs: 16 nibbles * 12 <= 192
# words a uint16 tile sum takes before it is added into int64: 1023 * 64 and 341 * 192 <= 65535
_FLUSH, _FLUSH_PAIR = 1023, 341

# T_v[n] = popcount(n ^ v), each 16-byte table repeated for both 128-bit lanes: (16 * 32,)
TABLES = np.array(
    [[bin(n ^ v).count("1") for n in list(range(16)) * 2] for v in range(16)], np.uint8
).reshape(-1)
# plane pairs: T2_{v0 | v1 << 4}[n] = popcount(n ^ v0) + 2 popcount(n ^ v1): (256 * 32,)
PAIR_TABLES = (TABLES.reshape(16, 1, 32) * 2 + TABLES.reshape(1, 16, 32)).reshape(-1)


def lut_blocks(words: np.ndarray) -> np.ndarray:
    """Prepared weight words uint64 (nob, K, 32) -> nibbles uint8 (nob, 16*K, 32):
    ``out[j, 16*k + q, l] = (words[j, k, l] >> 4q) & 15``."""
    nob, k, lanes = words.shape
    by = np.ascontiguousarray(words.transpose(0, 2, 1)).view(np.uint8)  # (nob, 32, 8K)
    nib = np.empty((nob, lanes, 16 * k), np.uint8)
    nib[..., 0::2] = by & 15
    nib[..., 1::2] = by >> 4
    return np.ascontiguousarray(nib.transpose(0, 2, 1))


def _emit_mk_lut(nbl: int, pair: bool = False, mrl: int = MRL):  # type: ignore[no-untyped-def]
    """Codegen of the micro-kernel for ``nbl`` blocks and ``mrl`` rows (``acc`` uint16), on
    the arguments ``(xp, roffs, r0, add, k0, nw, blocks, boff, bstride, acc, acc_off,
    jstride)``: ``acc[acc_off + j*jstride + r*32 + l] += sum over words w < nw, nibbles q < 16
    of T[(xp[roffs[r0 + r] + add + w] >> 4q) & 15][blocks[boff + j*bstride + ((k0 + w)*16 + q)
    *32 + l]]`` for r < mrl, j < nbl, l < 32 (nw <= _RUN).
    ``pair``: xp holds plane-pair bytes (:func:`pair_bytes`, 16 per word) and the table is
    ``T2[xp8[(roffs[r0 + r] + add + w)*16 + q]]`` (:data:`PAIR_TABLES`, nw <= _RUN_PAIR)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i8, i16, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(64)
        v8, v16 = ir.VectorType(i8, 32), ir.VectorType(i16, 32)
        data, idx = _arg_readers(context, builder, signature, args)
        xpp = data(0, i8 if pair else i64)
        rop, blp, accp = data(1), data(6, i8), data(9, i16)
        tabp = aligned_bytes(  # 64-byte aligned: no 32-byte table load straddles a cache line
            builder, "bcnn.lut.pair_tables" if pair else "bcnn.lut.tables",
            PAIR_TABLES if pair else TABLES,
        )  # fmt: skip
        r0_, add_, k0_, nw_, boff_, bstride_, acc_off_, jstride_ = (
            idx(k) for k in (2, 3, 4, 5, 7, 8, 10, 11)
        )
        shuf = pshufb(builder, 32)
        c = lambda v: ir.Constant(i64, v)  # noqa: E731
        rows = [
            builder.add(builder.load(builder.gep(rop, [builder.add(r0_, c(r))])), add_)
            for r in range(mrl)
        ]  # each row's first word
        blk = [
            builder.gep(blp, [builder.add(boff_, builder.mul(bstride_, c(j)))]) for j in range(nbl)
        ]

        def table(words, r, q):  # type: ignore[no-untyped-def]
            """Row r's table for nibble q: a pointer to its 32 bytes."""
            if pair:  # the byte is the index: two planes' nibbles
                b = builder.load(builder.gep(xpp, [builder.add(words[r], c(q))]))
                v = builder.zext(b, i64)
            else:
                v = builder.and_(builder.lshr(words[r], c(4 * q)), c(15))
            tp = builder.gep(tabp, [builder.shl(v, c(5))])
            return builder.load(builder.bitcast(tp, v8.as_pointer()), align=1)

        def body(w, accs):  # type: ignore[no-untyped-def]
            if pair:  # each row's first byte of word w
                words = [builder.mul(builder.add(rows[r], w), c(16)) for r in range(mrl)]
            else:
                words = [
                    builder.load(builder.gep(xpp, [builder.add(rows[r], w)])) for r in range(mrl)
                ]
            kq = builder.mul(builder.add(k0_, w), c(16 * 32))  # the word's first nibble
            accs = list(accs)
            for q in range(16):
                off = builder.add(kq, c(32 * q))
                wv = [
                    builder.load(
                        builder.bitcast(builder.gep(blk[j], [off]), v8.as_pointer()), align=1
                    )
                    for j in range(nbl)
                ]
                for r in range(mrl):
                    tv = table(words, r, q)
                    for j in range(nbl):
                        i = r * nbl + j
                        accs[i] = builder.add(accs[i], builder.call(shuf, [tv, wv[j]]))
            return accs

        zero = ir.Constant(v8, None)
        finals = counted_loop(builder, c(0), nw_, 1, [zero] * (mrl * nbl), body, "lutc")
        for r in range(mrl):
            for j in range(nbl):
                at = builder.add(acc_off_, builder.add(builder.mul(jstride_, c(j)), c(32 * r)))
                ptr = builder.bitcast(builder.gep(accp, [at]), v16.as_pointer())
                old = builder.load(ptr, align=2)
                new = builder.add(old, builder.zext(finals[r * nbl + j], v16))
                builder.store(new, ptr, align=2)
        return context.get_dummy_value()

    return codegen


def _mk_lut_sig(xp, roffs, r0, add, k0, nw, blocks, boff, bstride, acc, acc_off, jstride):  # type: ignore[no-untyped-def]
    """The micro-kernels' typing: (pair, argument types) or None."""
    ints = (r0, add, k0, nw, boff, bstride, acc_off, jstride)
    pair = isinstance(xp, types.Array) and xp.dtype == types.uint8
    xdt = types.uint8 if pair else types.uint64
    arrays = [(xp, xdt), (roffs, types.int64), (blocks, types.uint8)]
    if not _args_ok([*arrays, (acc, types.uint16)], ints):
        return None
    return pair, (xp, roffs, r0, add, k0, nw, blocks, boff, bstride, acc, acc_off, jstride)


def _make_mk_lut(nbl: int, pair: bool = False, mrl: int = MRL):  # type: ignore[no-untyped-def]
    """One micro-kernel (:func:`_emit_mk_lut`) as an intrinsic of its 12 arguments (the
    micro-kernel benchmark's; the conv calls :func:`_mk_lut`)."""
    emit = _emit_mk_lut(nbl, pair, mrl)

    @intrinsic
    def mk(typingctx, xp, roffs, r0, add, k0, nw, blocks, boff, bstride, acc, acc_off, jstride):  # type: ignore[no-untyped-def]
        typed = _mk_lut_sig(xp, roffs, r0, add, k0, nw, blocks, boff, bstride, acc, acc_off,
                            jstride)  # fmt: skip
        if typed is None or typed[0] != pair:
            return None
        return types.void(*typed[1]), emit

    return mk


def _rows(nbl):  # type: ignore[no-untyped-def]
    """Rows per micro-tile of ``nbl`` blocks."""
    return MRL_NARROW if nbl <= 2 else MRL


_rows_jit = njit(inline="always", nogil=True, cache=True)(_rows)
_EMIT = {
    pair: [_emit_mk_lut(n, pair, _rows(n)) for n in range(1, NBL + 1)] for pair in (False, True)
}


@intrinsic
def _mk_lut(  # type: ignore[no-untyped-def]
    typingctx, nbl, xp, roffs, r0, add, k0, nw, blocks, boff, bstride, acc, acc_off, jstride
):  # fmt: skip
    """One micro-tile of ``nbl`` (1..NBL, at run time) blocks of ``_rows(nbl)`` rows: single
    planes (uint64 xp, :data:`TABLES`) or plane pairs (uint8 xp, :data:`PAIR_TABLES`), chosen
    by xp's type. One intrinsic, a switch on ``nbl`` over the :func:`_emit_mk_lut` bodies: no
    numba-level dispatch for the compiler to type (and compile) on its own."""
    typed = _mk_lut_sig(xp, roffs, r0, add, k0, nw, blocks, boff, bstride, acc, acc_off,
                        jstride)  # fmt: skip
    if typed is None or not isinstance(nbl, types.Integer):
        return None
    pair, rest = typed
    emits = _EMIT[pair]

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        sub = types.void(*signature.args[1:])
        n = context.cast(builder, args[0], signature.args[0], types.int64)
        end = builder.append_basic_block("mk.end")
        cases = [builder.append_basic_block(f"mk.nbl{k + 1}") for k in range(NBL)]
        sw = builder.switch(n, cases[0])  # 1 (and anything out of range: never passed)
        for k in range(1, NBL):
            sw.add_case(ir.Constant(ir.IntType(64), k + 1), cases[k])
        for k in range(NBL):
            builder.position_at_end(cases[k])
            emits[k](context, builder, sub, args[1:])
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return types.void(nbl, *rest), codegen


assert NBL == 4  # _conv_range_lut's groups: 1..NBL blocks


def _geometry(xp):  # type: ignore[no-untyped-def]
    """(bytes per packed word, words per byte-accumulation run, words per uint16 sum) of an
    input layout (its lookup tables are the micro-kernel's own constants)."""
    raise NotImplementedError  # compiled code only: see the overload below


@overload(_geometry, inline="always")
def _geometry_typed(xp):  # type: ignore[no-untyped-def]
    if xp.dtype == types.uint8:
        return lambda xp: (16, _RUN_PAIR, _FLUSH_PAIR)
    return lambda xp: (1, _RUN, _FLUSH)


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _flush_rows(acc, acc64, i0, n, nbl, jstride):  # type: ignore[no-untyped-def]
    """acc64 += acc, acc = 0 over rows i0..i0+n of each block (a long reduction's uint16
    sums, before they could wrap)."""
    for j in range(nbl):
        for i in range(j * jstride + i0, j * jstride + i0 + n):
            acc64[i] += acc[i]
            acc[i] = 0


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _conv_range_lut(  # type: ignore[no-untyped-def]
    t0, t1, ob0, ob1, xp, blocks, o_, nbits, kh, kw, stride, ho, wo, mode,
    out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
):  # fmt: skip
    """``_conv._conv_range_pop`` on nibble weights (uint8 (nob, 16*K, 32)): macro tiles
    t0..t1, output blocks ob0..ob1 in groups of NBL, every tile through ``_epilogue``. With
    plane-pair bytes for ``xp`` (uint8 (N, Hp, Wp, 16*Cw), :func:`pair_bytes`) the sums are
    ``pc0 + 2*pc1`` of the pair's two planes (pass ``nbits`` = 3 * taps*Cin: the int output is
    then ``conv(a0, w) + 2*conv(a1, w)``)."""
    n_, hp, wp, cwb = xp.shape
    wbytes, run, flush = _geometry(xp)
    cw = cwb // wbytes  # words per pixel
    bstride = blocks.shape[1] * LANES  # bytes per block
    m_ = n_ * ho * wo
    roffs = np.empty(_ROWS, np.int64)
    jstride = _ROWS * LANES
    sw = kw * cw
    ss = wp * cw
    long = kh * sw > flush  # a row's reduction overflows uint16: add into int64 on the way
    acc = np.empty(NBL * jstride, np.uint16)  # byte runs widened: (NBL, rows, 32)
    acc64 = np.empty(NBL * jstride if long else 0, np.int64)  # the long reductions' int64 part
    for t in range(t0, t1):
        mt0 = t * _MB * MR
        mrows = min(_MB * MR, m_ - mt0)
        _tile_rows(mt0, mrows, -(-mrows // MRL_NARROW) * MRL_NARROW, ho, wo, hp, wp, cw, stride,
                   roffs)  # fmt: skip
        for g in range(ob0, ob1, NBL):
            nbl = min(NBL, ob1 - g)
            mrl = _rows_jit(nbl)
            nrp = -(-mrows // mrl)  # micro-tiles of mrl rows
            acc[: nbl * jstride] = 0
            if long:
                acc64[: nbl * jstride] = 0
            boff = g * bstride
            for p in range(nrp):
                done = 0  # words in the row pair's uint16 sums
                for seg in range(kh):
                    for i0 in range(0, sw, run):
                        nw = min(run, sw - i0)
                        if done + nw > flush:
                            _flush_rows(acc, acc64, p * mrl * LANES, mrl * LANES, nbl, jstride)
                            done = 0
                        _mk_lut(
                            nbl, xp, roffs, p * mrl, seg * ss + i0, seg * sw + i0, nw, blocks,
                            boff, bstride, acc, p * mrl * LANES, jstride,
                        )  # fmt: skip
                        done += nw
            for j in range(nbl):
                ob = g + j
                o0 = ob * LANES
                _epilogue(
                    acc[j * jstride : (j + 1) * jstride],
                    acc64[j * jstride : (j + 1) * jstride], long, mrows, mt0, o0,
                    min(LANES, o_ - o0), nbits, mode, out_i, out_f, out_b, ob, scale, bias,
                    rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
                )  # fmt: skip


@njit(nogil=True, cache=True, boundscheck=False)
def _pair_bytes_into(xp, n, out):  # type: ignore[no-untyped-def]
    npairs = out.shape[0] // n
    rows = xp.shape[1] * xp.shape[2]
    cw = xp.shape[3]
    a = xp.reshape(xp.shape[0], rows, cw)
    o = out.reshape(out.shape[0], rows, 16 * cw)
    for p in range(npairs):
        for b in range(n):
            lo, hi, dst = a[2 * p * n + b], a[(2 * p + 1) * n + b], o[p * n + b]
            for r in range(rows):
                for k in range(cw):
                    w0, w1 = lo[r, k], hi[r, k]
                    for q in range(16):
                        v0 = (w0 >> np.uint64(4 * q)) & np.uint64(15)
                        v1 = (w1 >> np.uint64(4 * q)) & np.uint64(15)
                        dst[r, 16 * k + q] = np.uint8(v0 | (v1 << np.uint64(4)))


def pair_bytes(xp: np.ndarray, n: int) -> np.ndarray:
    """Packed activation planes uint64 (P*n, H, W, Cw), plane j of image b at j*n + b (P
    even) -> plane-pair bytes uint8 (P/2*n, H, W, 16*Cw): byte 16k + q of pair p holds nibble
    q of word k of plane 2p in its low half and of plane 2p + 1 in its high half (the index
    of :data:`PAIR_TABLES`). Zero bytes are the one-padding of both planes."""
    if xp.dtype != np.uint64 or xp.ndim != 4 or n < 1 or xp.shape[0] % (2 * n):
        raise ValueError(
            f"expected an even number of uint64 planes of {n} images, got {xp.dtype} {xp.shape}"
        )
    m, h, w, cw = xp.shape
    out = np.empty((m // 2, h, w, 16 * cw), np.uint8)
    _pair_bytes_into(np.ascontiguousarray(xp), n, out)
    return out
