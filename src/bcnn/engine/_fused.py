"""The executor's fused float epilogue (numba; imported on first use of the fast plan).

After an integer accumulator: [x * scale] [x + bias] [batch norm] [RPReLU] [residual add], in
torch's eval-mode order and rounding: batch norm is fma(x, alpha, beta) as ATen computes it on
the CPU (emulated exactly: the float64 product of two float32 values is exact, then one
rounding to float64 and one to float32), every other step a float32 operation.

Also the classifier head (global average pool, sign, binary linear, affine) in one call.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._kernels._pool import _gap

__all__ = ["fused_epilogue", "fused_gap_sign_linear", "fused_head", "fused_sign_linear"]


@njit(nogil=True, cache=True, boundscheck=False)
def _epilogue_block(
    acc, pre, has_pre, cb, has_cb, al, be, has_bn, g, sl, z, has_rp, res, has_res, out
):  # type: ignore[no-untyped-def]
    """:func:`fused_epilogue` on a block of rows: one pass per step over the whole block,
    indexed flat (each loop vectorizes; per-row loops of O = 64 ran at half the speed)."""
    m_, o_ = acc.shape
    a = acc.reshape(-1)
    y = out.reshape(-1)
    for i in range(m_ * o_):
        y[i] = np.float32(a[i])
    if has_pre:
        for m in range(m_):
            b = m * o_
            for o in range(o_):
                y[b + o] = y[b + o] * pre[o]
    if has_cb:
        for m in range(m_):
            b = m * o_
            for o in range(o_):
                y[b + o] = y[b + o] + cb[o]
    if has_bn:
        for m in range(m_):
            b = m * o_
            for o in range(o_):
                y[b + o] = np.float32(np.float64(y[b + o]) * al[o] + be[o])
    if has_rp:
        for m in range(m_):
            b = m * o_
            for o in range(o_):
                v = y[b + o] - g[o]
                v = v if v >= 0 else v * sl[o]
                y[b + o] = v + z[o]
    if has_res:
        cr = res.shape[1]
        r = res.reshape(-1)
        if cr == o_:
            for i in range(m_ * o_):
                y[i] = r[i] + y[i]
        else:
            for m in range(m_):
                b = m * o_
                rb = m * cr
                for o0 in range(0, o_, cr):
                    for c in range(cr):
                        y[b + o0 + c] = r[rb + c] + y[b + o0 + c]


@njit(nogil=True, cache=True, boundscheck=False)
def fused_epilogue(
    acc, pre, has_pre, cb, has_cb, al, be, has_bn, g, sl, z, has_rp, res, has_res, out
):  # type: ignore[no-untyped-def]
    """acc int32 or float32 (M, O) -> out float32 (M, O); res float32 (M, Cr), channel o reads
    o % Cr. Blocks of about 8K values (L1-resident), each step one pass over the block."""
    m_, o_ = acc.shape
    step = max(1, 8192 // max(1, o_))
    for m0 in range(0, m_, step):
        m1 = min(m_, m0 + step)
        _epilogue_block(
            acc[m0:m1], pre, has_pre, cb, has_cb, al, be, has_bn, g, sl, z, has_rp,
            res[m0:m1] if has_res else res, has_res, out[m0:m1],
        )  # fmt: skip


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _popcount64(v):  # type: ignore[no-untyped-def]
    v = v - ((v >> np.uint64(1)) & np.uint64(0x5555555555555555))
    v = (v & np.uint64(0x3333333333333333)) + ((v >> np.uint64(2)) & np.uint64(0x3333333333333333))
    v = (v + (v >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((v * np.uint64(0x0101010101010101)) >> np.uint64(56))


@njit(nogil=True, cache=True, boundscheck=False)
def fused_head(h, neg, w, nbits, scale, bias, out, bits, acc):  # type: ignore[no-untyped-def]
    """The classifier head in one call: h float32 (N, P, C) -> out float32 (N, O).

    Global average pool (float64 sum, one rounding: ``_kernels.global_avgpool``), sign bits
    (v + neg[c]) < 0 in float32 (``_kernels.pack_sign``), binary linear over the canonical
    packed weights w uint64 (O, Kw) (tail bits 0), then float32(nbits - 2*popcount) * scale[o]
    + bias[o] as two float32 operations (``_kernels.blinear_affine``, fma=False).
    Workspaces: bits uint64 (Kw,), acc float64 (C,)."""
    n_, p_, c_ = h.shape
    o_, kw = w.shape
    for n in range(n_):
        for c in range(c_):
            acc[c] = 0.0
        for p in range(p_):
            row = h[n, p]
            for c in range(c_):
                acc[c] += np.float64(row[c])
        for j in range(kw):
            bits[j] = 0
        for c in range(c_):
            v = np.float32(acc[c] / p_)
            if v + neg[c] < 0:
                bits[c >> 6] |= np.uint64(1) << np.uint64(c & 63)
        for o in range(o_):
            pc = 0
            for j in range(kw):
                pc += _popcount64(bits[j] ^ w[o, j])
            out[n, o] = np.float32(nbits - 2 * pc) * scale[o] + bias[o]


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _sign_linear_row(
    xv, alpha, beta, has_bn, bias, step, w, nbits, shift, scale, aw, ab, has_epi, out, bits
):  # type: ignore[no-untyped-def]
    """One row of :func:`fused_sign_linear`: xv float32 (C,) -> out float32 (O,)."""
    o_, kw = w.shape
    for j in range(kw):
        bits[j] = 0
    for c in range(xv.shape[0]):
        x = xv[c]
        if has_bn:
            x = np.float32(np.float64(x) * alpha[c] + beta[c])
        v = (x + bias[c]) / step
        if v < 0:
            bits[c >> 6] |= np.uint64(1) << np.uint64(c & 63)
    for o in range(o_):
        pc = 0
        for j in range(kw):
            pc += _popcount64(bits[j] ^ w[o, j])
        y = np.float32(np.int64(nbits - 2 * pc) << np.int64(shift))
        if has_epi:
            y = y * scale[o]
            y = y * aw[o]
            y = y + ab[o]
        out[o] = y


@njit(nogil=True, cache=True, boundscheck=False)
def fused_sign_linear(
    x, alpha, beta, has_bn, bias, step, w, nbits, shift, scale, aw, ab, has_epi, out, bits
):  # type: ignore[no-untyped-def]
    """A k-bit linear layer at W1A1 in one call: x float32 (N, C) -> out float32 (N, O).

    An optional batch norm first (has_bn: float32(float64(x) * alpha[c] + beta[c]), alpha and
    beta float64, as ``_epilogue._Epilogue``'s ``bn``), the 1-bit signed activation codes as
    ``_bitserial._pack_sign_step`` computes them (bit 1 = -1 iff (v + bias[c]) / step < 0 in
    float32), the binary linear over one weight plane w uint64 (O, Kw) (tail bits 0), then
    float32((nbits - 2*popcount) << shift): the plane's place value 2^shift, one rounding, as
    ``_bitserial._combine`` for one plane of each. With has_epi, the epilogue ``scale``,
    ``affine`` in float32, torch's order: (y * scale[o]) * aw[o] + ab[o], two roundings
    each. Workspace: bits uint64 (Kw,)."""
    for n in range(x.shape[0]):
        _sign_linear_row(
            x[n], alpha, beta, has_bn, bias, step, w, nbits, shift, scale, aw, ab, has_epi,
            out[n], bits,
        )  # fmt: skip


@njit(nogil=True, cache=True, boundscheck=False)
def fused_gap_sign_linear(
    h, mean, alpha, beta, has_bn, bias, step, w, nbits, shift, scale, aw, ab, has_epi, out, bits
):  # type: ignore[no-untyped-def]
    """Global average pool then :func:`fused_sign_linear`, one call: h float32 (N, P, C) ->
    out float32 (N, O). The mean is ``_kernels.global_avgpool``'s kernel (float64 sum, one
    rounding). Workspaces: mean float32 (N, C), bits uint64 (Kw,)."""
    _gap(h, mean)
    for n in range(h.shape[0]):
        _sign_linear_row(
            mean[n], alpha, beta, has_bn, bias, step, w, nbits, shift, scale, aw, ab, has_epi,
            out[n], bits,
        )  # fmt: skip
