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
  256 steps: <= 128 * 240 = 30720), and the runs into int32;
* ``M[row] = sum_{bits set} q = sum TL + 16 (sum TH - 8 popcount(row))`` (the offset term
  only when signed), and with ``s = +-1`` the plane's values, ``s . q = sum(q) - 2 M``.

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

from ._llvm import _arg_readers, _is_c_array

__all__ = [
    "VB",
    "LutGemvWeights",
    "lut_gemv",
    "lut_gemv_supported",
    "lut_gemv_tables",
]

_AHEAD = 4096  # bytes of weights prefetched ahead of the one being read
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


def _make_mk(vb: int, high: bool):  # type: ignore[no-untyped-def]
    """The micro-kernel for one block of ``vb`` rows over ``nsteps`` bytes (even, <= 256):
    ``acc[a_off + part*vb + e*vb/2 + t] += sum over steps of part's lookups of row 2t + e``
    (part 0 = TL, 1 = TH, only with ``high``), tables at ``tab[t_off + 64 s + 16 r]``
    (r = TL_2s, TL_2s+1, TH_2s, TH_2s+1), weights at ``wb[w_off + vb s + c]``."""
    name = "llvm.x86.avx512.pshuf.b.512" if vb == 64 else "llvm.x86.avx2.pshuf.b"
    half = vb // 2

    def typer(typingctx, wb, w_off, nsteps, tab, t_off, acc, a_off):  # type: ignore[no-untyped-def]
        ints = (w_off, nsteps, t_off, a_off)
        if not (
            _is_c_array(wb, types.uint8)
            and _is_c_array(tab, types.uint8)
            and _is_c_array(acc, types.int32)
            and all(isinstance(t, types.Integer) for t in ints)
        ):
            return None
        return types.void(wb, w_off, nsteps, tab, t_off, acc, a_off), codegen

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i8, i16, i32, i64 = (ir.IntType(n) for n in (8, 16, 32, 64))
        v8, v16, v32 = ir.VectorType(i8, vb), ir.VectorType(i16, half), ir.VectorType(i32, half)
        t16 = ir.VectorType(i8, 16)
        data, idx = _arg_readers(context, builder, signature, args)
        wbp, tabp, accp = data(0, i8), data(3, i8), data(5, i32)
        w_off, nsteps, t_off, a_off = (idx(k) for k in (1, 2, 4, 6))
        pshufb = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8, v8]), name)
        nib = ir.Constant(v8, [15] * vb)
        low8 = ir.Constant(v16, [255] * half)
        four, eight = ir.Constant(v16, [4] * half), ir.Constant(v16, [8] * half)
        bcast = ir.Constant(ir.VectorType(i32, vb), [j % 16 for j in range(vb)])
        zero16 = ir.Constant(v16, None)
        parts = 2 if high else 1
        prefetch = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32]),
            "llvm.prefetch.p0i8",
        )

        def table(s, r):  # type: ignore[no-untyped-def]
            off = builder.add(
                t_off, builder.add(builder.mul(s, ir.Constant(i64, 64)), ir.Constant(i64, 16 * r))
            )
            t = builder.load(builder.bitcast(builder.gep(tabp, [off]), t16.as_pointer()), align=1)
            return builder.shuffle_vector(t, t, bcast)  # the 16 bytes in every 128-bit lane

        entry = builder.block
        loop = builder.append_basic_block("lutv.loop")
        done = builder.append_basic_block("lutv.done")
        builder.cbranch(builder.icmp_signed(">", nsteps, ir.Constant(i64, 0)), loop, done)

        builder.position_at_end(loop)
        s = builder.phi(i64)
        s.add_incoming(ir.Constant(i64, 0), entry)
        accs = []  # (part, even/odd) 16-bit accumulators
        for _ in range(2 * parts):
            p = builder.phi(v16)
            p.add_incoming(zero16, entry)
            accs.append(p)
        sums = [None] * parts
        # the weight stream is sequential: ask for the lines _AHEAD bytes on (read, no reuse;
        # one 64-byte line per 64-byte step, one per two 32-byte steps)
        here = builder.gep(wbp, [builder.add(w_off, builder.mul(s, ir.Constant(i64, vb)))])
        c0, c1 = ir.Constant(i32, 0), ir.Constant(i32, 1)
        for line in range(0, 2 * vb, 64):
            ahead = builder.gep(here, [ir.Constant(i64, _AHEAD + line)])
            builder.call(prefetch, [ahead, c0, ir.Constant(i32, 3), c1])
        for u in range(2):  # two steps: 4 lookups per part, <= 240 per byte
            su = builder.add(s, ir.Constant(i64, u))
            wp = builder.gep(wbp, [builder.add(w_off, builder.mul(su, ir.Constant(i64, vb)))])
            w = builder.load(builder.bitcast(wp, v8.as_pointer()), align=1)
            lo = builder.and_(w, nib)
            hi = builder.and_(builder.bitcast(builder.lshr(builder.bitcast(w, v16), four), v8), nib)
            for part in range(parts):
                a = builder.call(pshufb, [table(su, 2 * part), lo])
                b = builder.call(pshufb, [table(su, 2 * part + 1), hi])
                ab = builder.add(a, b)
                sums[part] = ab if sums[part] is None else builder.add(sums[part], ab)
        new = []
        for part in range(parts):
            w16 = builder.bitcast(sums[part], v16)
            new.append(builder.add(accs[2 * part], builder.and_(w16, low8)))  # even rows
            new.append(builder.add(accs[2 * part + 1], builder.lshr(w16, eight)))  # odd rows
        s2 = builder.add(s, ir.Constant(i64, 2))
        s.add_incoming(s2, loop)
        for p, nv in zip(accs, new):
            p.add_incoming(nv, loop)
        builder.cbranch(builder.icmp_signed("<", s2, nsteps), loop, done)

        builder.position_at_end(done)
        finals = []
        for i in range(2 * parts):
            ph = builder.phi(v16)
            ph.add_incoming(zero16, entry)
            ph.add_incoming(new[i], loop)
            finals.append(ph)
        for i, ph in enumerate(finals):  # acc[a_off + i*half + t] += zext(ph[t])
            off = builder.add(a_off, ir.Constant(i64, i * half))
            ptr = builder.bitcast(builder.gep(accp, [off]), v32.as_pointer())
            old = builder.load(ptr, align=4)
            builder.store(builder.add(old, builder.zext(ph, v32)), ptr, align=4)
        return context.get_dummy_value()

    return intrinsic(typer)


_VBK = VB or 32  # the kernels' vector width (unused when unsupported)
_mk_low = _make_mk(_VBK, False)
_mk_both = _make_mk(_VBK, True)


@njit(nogil=True, cache=True, boundscheck=False)
def _tables(q, nsteps, signed, tab):  # type: ignore[no-untyped-def]
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
                for p in range(1, 16):
                    low = p & -p  # the lowest set bit
                    j = 0 if low == 1 else 1 if low == 2 else 2 if low == 4 else 3
                    tab[n, s, u, p] = tab[n, s, u, p ^ low] + lo[j]
                    tab[n, s, 2 + u, p] = tab[n, s, 2 + u, p ^ low] + hi[j]


@njit(nogil=True, cache=True, boundscheck=False)
def _gemv(tab, wb, nblk, nsteps, d, nplanes, high, signed, qsum, pc, out):  # type: ignore[no-untyped-def]
    """out int64 (N, O) = sum_{i=d}^{nplanes-1} 2^i (qsum[n] - 2 M_i[n, o]): the planes'
    masked sums M, run by run of the reduction (its tables stay in L1), block by block."""
    vb = _VBK
    half = vb // 2
    n_ = out.shape[0]
    o_ = out.shape[1]
    parts = 2 if high else 1
    kept = nplanes - d
    per = 2 * parts * half  # accumulator words per block
    acc = np.zeros(kept * nblk * per, np.int32)
    tflat = tab.reshape(-1)
    for n in range(n_):
        acc[:] = 0
        t_base = n * nsteps * 64
        for r0 in range(0, nsteps, _RUN):
            ns = min(_RUN, nsteps - r0)
            t_off = t_base + r0 * 64
            for i in range(kept):
                for b in range(nblk):
                    w_off = (r0 * nplanes * nblk + ((d + i) * nblk + b) * ns) * vb
                    a_off = (i * nblk + b) * per
                    if high:
                        _mk_both(wb, w_off, ns, tflat, t_off, acc, a_off)
                    else:
                        _mk_low(wb, w_off, ns, tflat, t_off, acc, a_off)
        for o in range(o_):
            b = o // vb
            c = o - b * vb
            e = c & 1
            t = c >> 1
            tot = np.int64(0)
            for i in range(kept):
                base = (i * nblk + b) * per + e * half + t
                m = np.int64(acc[base])
                if high:
                    h = np.int64(acc[base + vb])
                    if signed:
                        h -= 8 * pc[d + i, o]
                    m += 16 * h
                tot += (qsum[n] - 2 * m) << (d + i)
            out[n, o] = tot


class LutGemvWeights:
    """Weight planes in the lookup-table GEMV's layout, in the order the kernel reads them (one
    sequential stream): ``wb`` uint8 (runs, planes, nblk, steps of the run, VB), byte s of
    each row (bits 8s..8s+7) in runs of 256 steps, VB rows per vector (rows past O are 0);
    ``pc`` int64 (planes, O) each row's set bits."""

    def __init__(self, planes: np.ndarray, k: int) -> None:
        if not isinstance(planes, np.ndarray) or planes.dtype != np.uint64 or planes.ndim != 3:
            raise ValueError("weight planes must be packed uint64 (planes, O, Kw)")
        nplanes, o, kw = planes.shape
        if o < 1 or k < 1 or kw != (k + 63) // 64:
            raise ValueError(f"weight planes of shape {planes.shape} do not hold {k} inputs")
        if not lut_gemv_supported():
            raise ValueError("the lookup-table GEMV needs an AVX2 or AVX-512BW compile target")
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
        self.pc = np.bitwise_count(planes).sum(-1).astype(np.int64)


def lut_gemv_tables(q: np.ndarray, nsteps: int, signed: bool) -> np.ndarray:
    """The per-vector tables uint8 (N, nsteps, 4, 16) of integers q (N, K)."""
    tab = np.empty((q.shape[0], nsteps, 4, 16), np.uint8)
    _tables(q, nsteps, signed, tab)
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
    _gemv(tab, w.wb, w.nblk, w.nsteps, w.nplanes - kb, w.nplanes, high, signed, qsum, w.pc, out)
    return out
