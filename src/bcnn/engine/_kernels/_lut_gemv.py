"""The lookup-table GEMV: k weight planes x 8-bit activations at a cost that grows with the
weight bits only (T-MAC's idea: Wei et al., EuroSys 2025), exact in integers.

It belongs to the same family as the binary lookup-table GEMM of :mod:`._lut`: 16-entry byte
tables indexed by 4-bit nibbles of packed bits, one ``vpshufb`` per vector of lookups, byte
accumulators widened before they can overflow. There the table is popcount(nibble XOR a);
here it is a partial sum of activations. Per input vector q (integers, at most 8 bits):

* split every value as ``q = 16 h + l`` with ``l = q & 15`` and ``h = q >> 4`` (arithmetic),
  ``h' = h + 8`` when the vector is signed (so ``h'`` is in 0..15), ``h' = h`` otherwise;
* per group g of 4 consecutive inputs and per nibble pattern p (bit j of p: input 4g + j),
  ``TL_g[p] = sum_{j in p} l_{4g+j}`` and ``TH_g[p] = sum_{j in p} h'_{4g+j}``: 0..60, bytes;
* a weight plane's row, packed (bit 1 = the weight is -1), read byte by byte: byte s holds
  the nibbles of groups 2s (low) and 2s+1 (high). A vector of :data:`VB` bytes holds byte s
  of VB rows (rows in lanes), so ``vpshufb(TL_2s, byte & 15) + vpshufb(TL_2s+1, byte >> 4)``
  adds the low parts of the masked sums of 8 inputs to VB rows at once: 4 lookups (2 steps)
  fit a byte (<= 240), then the bytes are widened into 16-bit accumulators (runs of at most
  256 steps: <= 128 * 240 = 30720; the 16-bit words of byte pairs are summed whole, with the
  odd bytes on the side, and the even bytes recovered at the end of the run); at the end of
  a run the kernel adds ``2^i (L + 16 H)`` (plane i's place value) into one int32 per row;
* plane i's masked sum is ``M_i[row] = sum_{bits set} q = L_i + 16 (H_i - 8 popcount_i(row))``
  (the offset term only when signed), and with ``s = +-1`` the plane's values,
  ``s . q = sum(q) - 2 M_i``; so ``W . q = sum(q) sum_i 2^i - 2 (acc - 128 sum_i 2^i
  popcount_i)``, the last sum precomputed per row for every top-plane view.

The weights are stored in the order the kernel calls read them (one contiguous stream), and
each call prefetches the next call's weights into L2 while it works: from DRAM the GEMV runs
near its in-cache speed.

So a weight plane costs two table lookups per 4 inputs and row (one when the activations are
unsigned and at most 4 bits: no high part), whatever the activation bits, against 8 binary
dot products per plane for bit-serial activations. VB is 64 (512-bit vectors) on targets with
AVX-512BW and 32 on AVX2 targets; :func:`lut_gemv_supported` is False elsewhere (the callers
then use the bit-serial popcount GEMM). Exactness: tests/test_pbatch.py checks it against an
int64 matmul at awkward sizes, signed and unsigned, every kept plane count.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._ir import counted_loop, pshufb
from ._llvm import _arg_readers, _args_ok

__all__ = [
    "MAX_K",
    "VB",
    "LutGemvWeights",
    "lut_gemv",
    "lut_gemv_into",
    "lut_gemv_supported",
    "lut_gemv_tables",
    "lut_tables_into",
]

# the int32 row sums reach sum_i 2^i (L_i + 16 H_i) <= 255 * 255 * K: K <= 33025
MAX_K = 32768
_RUN = 256  # steps per run (even): the 16-bit accumulators reach at most 128 * 240 = 30720;
# a run's tables (64 B per step, 16 KiB) stay in L1 while every block of rows reads them


def _vector_bytes() -> int:
    """Bytes per lookup vector on numba's compile target: 64 (AVX-512BW), 32 (AVX2) or 0."""
    from .._paths import target_features

    f = target_features()
    return 64 if "avx512bw" in f else 32 if "avx2" in f else 0


VB = _vector_bytes()


def lut_gemv_supported() -> bool:
    """Whether the compile target runs the lookup-table GEMV (AVX2 or AVX-512BW)."""
    return VB > 0


def _make_mk(vb: int, high: bool, nb: int):  # type: ignore[no-untyped-def]
    """The micro-kernel for ``nb`` blocks of ``vb`` rows over ``nsteps`` bytes (even, <= 256):
    for block j, ``acc[a_off + j*a_stride + c] += 2^shift (L + 16 H)``, L and H the sums over
    the steps of row c's TL and TH lookups (H = 0 unless ``high``), tables at
    ``tab[t_off + 64 s + 16 r]`` (r = TL_2s, TL_2s+1, TH_2s, TH_2s+1, loaded once for the nb
    blocks), weights at ``wb[w_off + j*w_stride + vb s + c]``."""
    half = vb // 2

    def typer(typingctx, wb, w_off, w_stride, nsteps, tab, t_off, acc, a_off, a_stride, shift):  # type: ignore[no-untyped-def]
        ints = (w_off, w_stride, nsteps, t_off, a_off, a_stride, shift)
        if not _args_ok([(wb, types.uint8), (tab, types.uint8), (acc, types.int32)], ints):
            return None
        sig = types.void(wb, w_off, w_stride, nsteps, tab, t_off, acc, a_off, a_stride, shift)
        return sig, codegen

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i8, i16, i32, i64 = (ir.IntType(n) for n in (8, 16, 32, 64))
        v8, v16, v32 = ir.VectorType(i8, vb), ir.VectorType(i16, half), ir.VectorType(i32, half)
        t16 = ir.VectorType(i8, 16)
        data, idx = _arg_readers(context, builder, signature, args)
        wbp, tabp, accp = data(0, i8), data(4, i8), data(6, i32)
        w_off, w_stride, nsteps, t_off, a_off, a_stride, shift = (
            idx(k) for k in (1, 2, 3, 5, 7, 8, 9)
        )
        shuf = pshufb(builder, vb)
        nib = ir.Constant(v8, [15] * vb)
        four, eight = ir.Constant(v16, [4] * half), ir.Constant(v16, [8] * half)
        bcast = ir.Constant(ir.VectorType(i32, vb), [j % 16 for j in range(vb)])
        zero16 = ir.Constant(v16, None)
        parts = 2 if high else 1
        nacc = 2 * parts  # (part, even/odd) 16-bit accumulators per block
        prefetch = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32]),
            "llvm.prefetch.p0i8",
        )
        bases = [builder.add(w_off, builder.mul(w_stride, ir.Constant(i64, j))) for j in range(nb)]

        def table(s, r):  # type: ignore[no-untyped-def]
            off = builder.add(
                t_off, builder.add(builder.mul(s, ir.Constant(i64, 64)), ir.Constant(i64, 16 * r))
            )
            t = builder.load(builder.bitcast(builder.gep(tabp, [off]), t16.as_pointer()), align=1)
            return builder.shuffle_vector(t, t, bcast)  # the 16 bytes in every 128-bit lane

        c0, c1, c2 = (ir.Constant(i32, v) for v in (0, 1, 2))
        nxt = builder.add(w_off, builder.mul(w_stride, ir.Constant(i64, nb)))

        def body(s, accs):  # type: ignore[no-untyped-def]
            # The weights of successive calls are one contiguous stream (the layout follows
            # the call order), and this call reads nb * nsteps * vb bytes of it. While it runs,
            # fetch the next call's bytes into L2 (locality 2, prefetcht1: faster from DRAM
            # than into L1, measured here), at the rate this call consumes its own: 2 * nb * vb
            # bytes per iteration. (Prefetches past the end of the array do not fault.)
            here = builder.gep(wbp, [builder.add(nxt, builder.mul(s, ir.Constant(i64, nb * vb)))])
            for line in range(0, 2 * nb * vb, 64):
                ahead = builder.gep(here, [ir.Constant(i64, line)])
                builder.call(prefetch, [ahead, c0, c2, c1])
            sums: list[list[ir.Value | None]] = [[None] * parts for _ in range(nb)]
            for u in range(2):  # two steps: 4 lookups per part, <= 240 per byte
                su = builder.add(s, ir.Constant(i64, u))
                tabs = [table(su, r) for r in range(2 * parts)]
                for j in range(nb):
                    wo = builder.add(bases[j], builder.mul(su, ir.Constant(i64, vb)))
                    w = builder.load(
                        builder.bitcast(builder.gep(wbp, [wo]), v8.as_pointer()), align=1
                    )
                    lo = builder.and_(w, nib)
                    w4 = builder.lshr(builder.bitcast(w, v16), four)
                    hi = builder.and_(builder.bitcast(w4, v8), nib)
                    for part in range(parts):
                        a = builder.call(shuf, [tabs[2 * part], lo])
                        b = builder.call(shuf, [tabs[2 * part + 1], hi])
                        ab = builder.add(a, b)
                        prev = sums[j][part]
                        sums[j][part] = ab if prev is None else builder.add(prev, ab)
            new = []
            for j in range(nb):
                for part in range(parts):
                    w16 = builder.bitcast(sums[j][part], v16)
                    k = j * nacc + 2 * part
                    # even + 256 odd (mod 2^16), and odd: even comes out at the end
                    new.append(builder.add(accs[k], w16))
                    new.append(builder.add(accs[k + 1], builder.lshr(w16, eight)))  # odd rows
            return new

        zero_i = ir.Constant(i64, 0)
        finals = counted_loop(builder, zero_i, nsteps, 2, [zero16] * (nb * nacc), body, "lutv")
        for i in range(0, nb * nacc, 2):  # even = (even + 256 odd) - 256 odd, mod 2^16
            finals[i] = builder.sub(finals[i], builder.shl(finals[i + 1], eight))
        # back to row order, L + 16 H, times 2^shift: acc[a_off + j*a_stride + c] += that
        vrow = ir.VectorType(i32, vb)
        order = ir.Constant(ir.VectorType(i32, vb), [(c >> 1) + (c & 1) * half for c in range(vb)])
        sh = builder.trunc(shift, i32)
        shv = builder.shuffle_vector(
            builder.insert_element(ir.Constant(vrow, ir.Undefined), sh, ir.Constant(i32, 0)),
            ir.Constant(vrow, ir.Undefined),
            ir.Constant(ir.VectorType(i32, vb), None),
        )
        for j in range(nb):
            tot = None
            for part in range(parts):
                k = j * nacc + 2 * part
                rows = builder.shuffle_vector(
                    builder.zext(finals[k], v32), builder.zext(finals[k + 1], v32), order
                )
                if part == 1:
                    rows = builder.shl(rows, ir.Constant(vrow, [4] * vb))
                tot = rows if tot is None else builder.add(tot, rows)
            off = builder.add(a_off, builder.mul(a_stride, ir.Constant(i64, j)))
            ptr = builder.bitcast(builder.gep(accp, [off]), vrow.as_pointer())
            builder.store(
                builder.add(builder.load(ptr, align=4), builder.shl(tot, shv)), ptr, align=4
            )
        return context.get_dummy_value()

    return intrinsic(typer)


_VBK = VB or 32  # the kernels' vector width (unused when unsupported)
# blocks of rows per micro-kernel call (they share the table loads): 4 with 32 zmm registers;
# 1 on AVX2 (16 ymm registers; 2 measured no faster on the AVX2 profile, Zen 4)
_NB = 4 if _VBK == 64 else 1
_mk_low = _make_mk(_VBK, False, 1)
_mk_both = _make_mk(_VBK, True, 1)
_mk_low2 = _make_mk(_VBK, False, _NB) if _NB > 1 else _mk_low  # (one kernel when NB = 1)
_mk_both2 = _make_mk(_VBK, True, _NB) if _NB > 1 else _mk_both


_LOWBIT = np.array([0] + [(p & -p).bit_length() - 1 for p in range(1, 16)], np.int64)


@njit(nogil=True, cache=True, boundscheck=False)
def lut_tables_into(q, nsteps, signed, tab):  # type: ignore[no-untyped-def]
    """tab uint8 (N, nsteps, 4, 16) from the integers q int64 (N, K): per step s the tables
    TL_2s, TL_2s+1, TH_2s, TH_2s+1 (see the module docstring); inputs past K are 0."""
    n_, k_ = q.shape
    off = 8 if signed else 0
    lo = np.zeros(4, np.int64)
    hi = np.zeros(4, np.int64)
    for n in range(n_):
        for s in range(nsteps):
            for u in range(2):
                g = 2 * s + u
                for j in range(4):
                    k = 4 * g + j
                    if k < k_:
                        v = q[n, k]
                        lo[j] = v & 15
                        hi[j] = (v >> 4) + off
                    else:
                        lo[j] = 0
                        hi[j] = 0
                tab[n, s, u, 0] = 0
                tab[n, s, 2 + u, 0] = 0
                for p in range(1, 16):  # T[p] = T[p less its lowest bit] + that bit's value
                    j = _LOWBIT[p]
                    r = p & (p - 1)
                    tab[n, s, u, p] = tab[n, s, u, r] + lo[j]
                    tab[n, s, 2 + u, p] = tab[n, s, 2 + u, r] + hi[j]


@njit(nogil=True, cache=True, boundscheck=False)
def lut_gemv_into(tab, wb, nblk, nsteps, d, nplanes, high, signed, qsum, pcw, out):  # type: ignore[no-untyped-def]
    """out int64 (N, O) = sum_{i=d}^{nplanes-1} 2^i (qsum[n] - 2 M_i[n, o]) with the planes'
    masked sums M_i = L_i + 16 (H_i - 8 pc_i) (the offset only when signed): the kernel
    accumulates acc = sum_i 2^i (L_i + 16 H_i) per row, run by run of the reduction (its
    tables stay in L1), block by block; pcw[d] = sum_{i >= d} 2^i pc_i (per row)."""
    vb = _VBK
    n_ = out.shape[0]
    o_ = out.shape[1]
    acc = np.empty(nblk * vb, np.int32)
    tflat = tab.reshape(-1)
    place = (np.int64(1) << np.int64(nplanes)) - (np.int64(1) << np.int64(d))  # sum of 2^i
    for n in range(n_):
        acc[:] = 0
        t_base = n * nsteps * 64
        for r0 in range(0, nsteps, _RUN):
            ns = min(_RUN, nsteps - r0)
            t_off = t_base + r0 * 64
            for i in range(d, nplanes):
                base = r0 * nplanes * nblk + i * nblk * ns  # this plane's run, in vb bytes
                b = 0
                while b < nblk:
                    w_off = (base + b * ns) * vb
                    if b + _NB <= nblk:
                        if high:
                            _mk_both2(wb, w_off, ns * vb, ns, tflat, t_off, acc, b * vb, vb, i)
                        else:
                            _mk_low2(wb, w_off, ns * vb, ns, tflat, t_off, acc, b * vb, vb, i)
                        b += _NB
                    else:
                        if high:
                            _mk_both(wb, w_off, ns * vb, ns, tflat, t_off, acc, b * vb, vb, i)
                        else:
                            _mk_low(wb, w_off, ns * vb, ns, tflat, t_off, acc, b * vb, vb, i)
                        b += 1
        pq = place * qsum[n]
        pc_d = pcw[d]
        for o in range(o_):
            m = np.int64(acc[o])
            if signed:
                m -= 128 * pc_d[o]
            out[n, o] = pq - 2 * m


class LutGemvWeights:
    """Weight planes in the lookup-table GEMV's layout, in the order the kernel reads them (one
    sequential stream): ``wb`` uint8 (runs, planes, nblk, steps of the run, VB), byte s of
    each row (bits 8s..8s+7) in runs of 256 steps, VB rows per vector (rows past O are 0);
    ``pcw`` int64 (planes, O): per row, the place-value-weighted sums of the planes' set bits
    over the top planes (``pcw[d] = sum_{i >= d} 2^i popcount_i``)."""

    def __init__(self, planes: np.ndarray, k: int) -> None:
        if not isinstance(planes, np.ndarray) or planes.dtype != np.uint64 or planes.ndim != 3:
            raise ValueError("weight planes must be packed uint64 (planes, O, Kw)")
        nplanes, o, kw = planes.shape
        if o < 1 or k < 1 or kw != (k + 63) // 64:
            raise ValueError(f"weight planes of shape {planes.shape} do not hold {k} inputs")
        if not lut_gemv_supported():
            raise ValueError("the lookup-table GEMV needs an AVX2 or AVX-512BW compile target")
        if k > MAX_K or nplanes > 8:
            raise ValueError(f"the lookup-table GEMV takes at most {MAX_K} inputs and 8 planes")
        self.k, self.out_features, self.nplanes = int(k), o, nplanes
        self.nsteps = 2 * ((k + 15) // 16)  # bytes per row used (an even count)
        self.nblk = -(-o // VB)
        by = np.ascontiguousarray(planes).view(np.uint8)[:, :, : self.nsteps]  # (P, O, S)
        full = np.zeros((nplanes, self.nblk * VB, self.nsteps), np.uint8)
        full[:, :o] = by
        w = full.reshape(nplanes, self.nblk, VB, self.nsteps).transpose(0, 1, 3, 2)  # (P,B,S,VB)
        self.wb = np.concatenate(
            [w[:, :, r0 : r0 + _RUN].reshape(-1) for r0 in range(0, self.nsteps, _RUN)]
        )
        # pcw[d] = sum_{i >= d} 2^i pc_i, pc_i each row's set bits in plane i: the signed
        # offset's term of every top-plane view
        pc = np.bitwise_count(planes).sum(-1).astype(np.int64)
        place = (1 << np.arange(nplanes, dtype=np.int64))[:, None]
        self.pcw = np.ascontiguousarray(np.cumsum((place * pc)[::-1], axis=0)[::-1])


def lut_gemv_tables(q: np.ndarray, nsteps: int, signed: bool) -> np.ndarray:
    """The per-vector tables uint8 (N, nsteps, 4, 16) of integers q (N, K)."""
    tab = np.empty((q.shape[0], nsteps, 4, 16), np.uint8)
    lut_tables_into(q, nsteps, signed, tab)
    return tab


def lut_gemv(w: LutGemvWeights, kb: int, q: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """int64 (N, O): ``q @ W_kb^T`` for integer activations q (N, K) of ``bits`` bits (1..8;
    signed: -(2^(bits-1)-1)..2^(bits-1)-1, else 0..2^bits-1) and the top ``kb`` planes of
    ``w`` (plane i has place value 2^i, its bits read as -1)."""
    q = np.ascontiguousarray(q, np.int64)
    if q.ndim != 2 or q.shape[1] != w.k:
        raise ValueError(f"activations of shape {q.shape}, the weights expect (N, {w.k})")
    if not 1 <= bits <= 8 or not 1 <= kb <= w.nplanes:
        raise ValueError(f"bits {bits} / kept planes {kb} out of range")
    tab = lut_gemv_tables(q, w.nsteps, signed)
    high = signed or bits > 4
    out = np.empty((q.shape[0], w.out_features), np.int64)
    qsum = q.sum(axis=1)
    lut_gemv_into(
        tab, w.wb, w.nblk, w.nsteps, w.nplanes - kb, w.nplanes, high, signed, qsum, w.pcw, out
    )
    return out
