"""The lookup-table binary GEMM (the ``lut`` kernel path: CPUs with AVX2 but no VPOPCNTDQ).

On AVX2, ``llvm.ctpop`` of a vector lowers to a nibble-table sequence with a ``vpsadbw``
reduction at every step. This kernel uses the table directly and never reduces inside the loop
(see docs/kernels.md):

* weights are stored as 4-bit nibbles, one per byte, 32 output channels per 256-bit vector:
  ``wl[block, q, c]`` = nibble q (bits 4q..4q+3) of output channel 32*block + c;
* for an activation nibble ``v`` the 16-entry table ``T_v[n] = popcount(n XOR v)``; ``vpshufb``
  looks up all 32 channels' ``popcount(w XOR a)`` for those 4 bits at once; so 128 binary MACs
  cost one ``vpshufb`` and one ``vpaddb`` (byte accumulators, widened to int32 every 63 steps);
* a micro-tile is :data:`MRL` activation rows x :data:`NBL` blocks of 32 channels: each
  table load serves NBL shuffles, each weight vector MRL rows.

``out[m, n] = K - 2 * popcount(a[m] XOR w[n])`` as :func:`._conv.bgemm` (tail bits 0 in both
operands cancel). Exactness is tested against the numpy reference at awkward sizes
(tests/test_kernels_lut.py). The intrinsic needs AVX2 (``llvm.x86.avx2.pshuf.b``):
:func:`lut_supported` says whether the compile target has it.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ._ir import counted_loop, pshufb
from ._llvm import _arg_readers, _args_ok

__all__ = ["MRL", "NBL", "LutWeights", "lut_bgemm", "lut_supported", "prepare_lut_weights"]

MRL = 2  # activation rows per micro-tile
NBL = 4  # blocks of 32 output channels per micro-tile
_CHUNK = 63  # nibbles per byte-accumulation run: 63 * 4 = 252 < 256

# T_v[n] = popcount(n ^ v), each 16-byte table repeated for both 128-bit lanes
_TABLES = np.array(
    [[bin(n ^ v).count("1") for n in list(range(16)) * 2] for v in range(16)], np.uint8
).reshape(-1)


def lut_supported() -> bool:
    """Whether numba compiles for a CPU with AVX2 (the host, or NUMBA_CPU_NAME's target)."""
    from llvmlite import binding as llvm
    from numba.core import config

    name = getattr(config, "CPU_NAME", None) or ""
    feats = getattr(config, "CPU_FEATURES", None) or ""
    if name:
        if feats:
            return "+avx2" in feats.split(",")
        return name in _AVX2_CPUS  # a named target with its own (empty: default) features
    return bool(llvm.get_host_cpu_features().get("avx2", False))


# targets known to have AVX2 (when NUMBA_CPU_NAME names one with empty features)
_AVX2_CPUS = {
    "haswell", "broadwell", "skylake", "skylake-avx512", "cascadelake", "cooperlake",
    "icelake-client", "icelake-server", "tigerlake", "alderlake", "sapphirerapids",
    "znver1", "znver2", "znver3", "znver4", "znver5", "x86-64-v3", "x86-64-v4",
}  # fmt: skip


@intrinsic
def _lut_mk(typingctx, nib, n_off, nq, q0, q1, tab, wl, w_off, w_stride, acc):  # type: ignore[no-untyped-def]
    """acc[(r*NBL + j)*32 + c] += sum_{q0 <= q < q1} T[nib[n_off + r*nq + q]][wl[w_off +
    j*w_stride + q*32 + c]] for r < MRL, j < NBL, c < 32 (q1 - q0 <= 63); ``tab`` holds the
    16 tables, 32 bytes each."""
    ints = (n_off, nq, q0, q1, w_off, w_stride)
    u8 = types.uint8
    if not _args_ok([(nib, u8), (tab, u8), (wl, u8), (acc, types.int32)], ints):
        return None
    sig = types.void(nib, n_off, nq, q0, q1, tab, wl, w_off, w_stride, acc)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        v8 = ir.VectorType(i8, 32)
        v32 = ir.VectorType(i32, 32)

        data, idx = _arg_readers(context, builder, signature, args)

        nibp, tabp, wlp, accp = data(0, i8), data(5, i8), data(6, i8), data(9, i32)
        n_off_, nq_, q0_, q1_, w_off_, w_stride_ = (idx(k) for k in (1, 2, 3, 4, 7, 8))
        shuf = pshufb(builder, 32)
        zero8 = ir.Constant(v8, None)

        def at(p, off, stride, i):  # type: ignore[no-untyped-def]
            return builder.gep(p, [builder.add(off, builder.mul(stride, ir.Constant(i64, i)))])

        rows = [at(nibp, n_off_, nq_, r) for r in range(MRL)]  # row r's nibbles
        blocks = [at(wlp, w_off_, w_stride_, j) for j in range(NBL)]  # block j's weights

        def body(q, accs):  # type: ignore[no-untyped-def]
            qoff = builder.mul(q, ir.Constant(i64, 32))
            wv = [
                builder.load(
                    builder.bitcast(builder.gep(blocks[j], [qoff]), v8.as_pointer()), align=1
                )
                for j in range(NBL)
            ]
            new = []
            for r in range(MRL):
                v = builder.zext(builder.load(builder.gep(rows[r], [q])), i64)
                tp = builder.gep(tabp, [builder.mul(v, ir.Constant(i64, 32))])
                tv = builder.load(builder.bitcast(tp, v8.as_pointer()), align=1)
                for j in range(NBL):
                    new.append(builder.add(accs[r * NBL + j], builder.call(shuf, [tv, wv[j]])))
            return new

        finals = counted_loop(builder, q0_, q1_, 1, [zero8] * (MRL * NBL), body, "lut")
        for i, ph in enumerate(finals):
            ptr = builder.bitcast(builder.gep(accp, [ir.Constant(i64, i * 32)]), v32.as_pointer())
            old = builder.load(ptr, align=4)
            builder.store(builder.add(old, builder.zext(ph, v32)), ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


class LutWeights:
    """Binary weights (N, Kw) as nibbles in the lut kernel's layout: ``wl`` uint8
    (nblocks, nq, 32) flattened, nblocks a multiple of NBL (padded channels are 0)."""

    def __init__(self, w: np.ndarray, k_bits: int) -> None:
        if not isinstance(w, np.ndarray) or w.dtype != np.uint64 or w.ndim != 2:
            raise ValueError("lut weights must be packed uint64 rows (N, Kw)")
        n, kw = w.shape
        if n < 1 or k_bits < 1 or kw != (k_bits + 63) // 64:
            raise ValueError(f"weights of shape {w.shape} do not hold {k_bits} bits per row")
        self.out_features, self.k_bits = n, int(k_bits)
        self.nq = (k_bits + 3) // 4
        nib = _nibbles(np.ascontiguousarray(w), self.nq)  # (N, nq)
        nb = -(-n // (32 * NBL)) * NBL
        full = np.zeros((nb * 32, self.nq), np.uint8)
        full[:n] = nib
        self.wl = np.ascontiguousarray(full.reshape(nb, 32, self.nq).transpose(0, 2, 1)).reshape(-1)
        self.nblocks = nb


def _nibbles(bits: np.ndarray, nq: int) -> np.ndarray:
    """uint64 rows (M, Kw) -> uint8 (M, nq): nibble q = bits 4q..4q+3 (little-endian)."""
    by = bits.view(np.uint8)  # (M, 8*Kw), byte b holds bits 8b..8b+7
    nib = np.empty((bits.shape[0], by.shape[1] * 2), np.uint8)
    nib[:, 0::2] = by & 15
    nib[:, 1::2] = by >> 4
    return np.ascontiguousarray(nib[:, :nq])


def prepare_lut_weights(w: np.ndarray, k_bits: int) -> LutWeights:
    return LutWeights(w, k_bits)


@njit(nogil=True, cache=True, boundscheck=False)
def _lut_gemm(nib, m_real, nq, tab, wl, nblocks, n_real, k_bits, out):  # type: ignore[no-untyped-def]
    """Blocks of NBL*32 output channels outer (their nibbles stay in L1/L2 across the rows),
    tiles of MRL rows inner, the reduction in runs of 63 nibbles."""
    acc = np.zeros(MRL * NBL * 32, np.int32)
    m_pad = nib.shape[0] // nq
    for jb in range(0, nblocks, NBL):
        w_off = jb * nq * 32
        for m0 in range(0, m_pad, MRL):
            acc[:] = 0
            for q0 in range(0, nq, _CHUNK):
                _lut_mk(nib, m0 * nq, nq, q0, min(q0 + _CHUNK, nq), tab, wl, w_off, nq * 32, acc)
            for r in range(MRL):
                m = m0 + r
                if m >= m_real:
                    break
                for j in range(NBL):
                    base = (jb + j) * 32
                    for c in range(32):
                        if base + c < n_real:
                            out[m, base + c] = k_bits - 2 * acc[(r * NBL + j) * 32 + c]


def lut_bgemm(a: np.ndarray, w: LutWeights) -> np.ndarray:
    """Binary GEMM on the lut path: a (M, Kw) packed uint64 rows -> int32 (M, N) with
    out[m, n] = K - 2*popcount(a[m] XOR w[n]) (tail bits beyond K must be 0)."""
    if not isinstance(a, np.ndarray) or a.dtype != np.uint64 or a.ndim != 2:
        raise ValueError("a must be packed uint64 rows (M, Kw)")
    if a.shape[1] != (w.k_bits + 63) // 64 or a.shape[0] < 1:
        raise ValueError(f"a has shape {a.shape}, the weights expect (M, {(w.k_bits + 63) // 64})")
    m = a.shape[0]
    m_pad = -(-m // MRL) * MRL
    nib = np.zeros((m_pad, w.nq), np.uint8)
    nib[:m] = _nibbles(np.ascontiguousarray(a), w.nq)
    out = np.empty((m, w.out_features), np.int32)
    _lut_gemm(nib.reshape(-1), m, w.nq, _TABLES, w.wl, w.nblocks, w.out_features, w.k_bits, out)
    return out
