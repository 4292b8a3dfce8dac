"""What the popcount (``_conv``) and lookup-table (``_lut_conv``) conv tiles share, and the
stem too: the row offsets of a macro tile's output pixels, and the float / threshold epilogue
of unfused tiles (popcounts -> int32 dot products, an affine (+ RPReLU, + residual) float32
output, or packed threshold bits)."""

from __future__ import annotations

import numpy as np
from numba import njit

from ._llvm import LANES, MR, _epi_affine, _epi_int, _epi_res, _epi_rp, _epi_rp_res, _fma32

__all__: list[str] = []  # private: the conv and stem kernels import the names they need

_MODE_INT, _MODE_AFFINE, _MODE_THRESHOLD, _MODE_AFFINE_FMA, _MODE_PRESCALE_FMA = 0, 1, 2, 3, 4


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _tile_rows(mt0, mrows, nrows, ho, wo, hp, wp, cw, stride, roffs):  # type: ignore[no-untyped-def]
    """roffs[i], i < nrows: the first word of output pixel mt0 + i's patch in the padded input
    (N, Hp, Wp, Cw) (stride ``stride``); rows from mrows on repeat the last real one."""
    howo = ho * wo
    n = mt0 // howo  # (n, oy, ox) of pixel mt0, then stepped without divisions
    rem = mt0 - n * howo
    oy = rem // wo
    ox = rem - oy * wo
    last = 0
    for i in range(nrows):
        if i < mrows:
            last = ((n * hp + oy * stride) * wp + ox * stride) * cw
            ox += 1
            if ox == wo:
                ox = 0
                oy += 1
                if oy == ho:
                    oy = 0
                    n += 1
        roffs[i] = last


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _ctl(mode, o_):  # type: ignore[no-untyped-def]
    """The float epilogue's control word (:func:`._llvm._emit_epilogue`): 0 multiply-add,
    1 fma, 3 | (O << 2) the prescaled fma (pre[o] = scale[O + o])."""
    if mode == 3:
        return np.int64(1)
    if mode == 4:
        return np.int64(3) | (np.int64(o_) << np.int64(2))
    return np.int64(0)


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _affine_rp(x, o, scale, bias, rp_g, rp_s, rp_z, has_rp, fma):  # type: ignore[no-untyped-def]
    """One channel's scalar float epilogue: x * scale + bias (one rounding with fma), then
    RPReLU when has_rp. ``fma`` is a bool or the control word of :func:`_ctl` (prescaled:
    x * pre[o] rounded first). Shared by the conv and stem kernels' partial tiles."""
    c = np.int64(fma)
    if c & 2:
        x = x * scale[(c >> 2) + o]
    y = _fma32(x, scale[o], bias[o]) if c & 1 else x * scale[o] + bias[o]
    if has_rp:
        y = y - rp_g[o]
        y = y * rp_s[o] if y < 0 else y
        y = y + rp_z[o]
    return y


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _sum_at(acc, acc_hi, hi, i):  # type: ignore[no-untyped-def]
    """Sum i of a tile: acc[i] (int64, or a lookup-table tile's uint16), plus acc_hi[i] (int64)
    when ``hi`` (a reduction too long for uint16 sums)."""
    v = np.int64(acc[i])
    if hi:
        v += acc_hi[i]
    return v


@njit(nogil=True, cache=True, boundscheck=False)
def _epilogue(  # type: ignore[no-untyped-def]
    acc, acc_hi, hi, rows, m0, o0, lmax, nbits, mode, out_i, out_f, out_b, ob,
    scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
):  # fmt: skip
    """Sums rows 0..rows-1 (LANES each: acc, plus acc_hi when ``hi``, :func:`_sum_at`) ->
    outputs m0.., channels o0..o0+lmax-1. Full rows of 32 channels go through the vector
    intrinsics; a partial last block of channels through the scalar loops (same
    arithmetic)."""
    cr = res.shape[1]
    o_ = out_i.shape[1] if mode == 0 else out_f.shape[1]
    fma = _ctl(mode, o_)
    full = lmax == LANES
    for r in range(rows):
        m = m0 + r
        base = r * LANES
        if mode == 0:
            if full:
                _epi_int(acc, acc_hi, hi, base, nbits, out_i, m * o_ + o0, scale, bias, rp_g,
                         rp_s, rp_z, res, 0, o0, fma)  # fmt: skip
            else:
                for l in range(lmax):
                    out_i[m, o0 + l] = nbits - 2 * _sum_at(acc, acc_hi, hi, base + l)
        elif mode != 2:
            # a full block reads res[m, o % cr] contiguously unless it wraps (cr % 32 != 0)
            if full and (not has_res or cr == o_ or cr % LANES == 0):
                oo = m * o_ + o0
                ro = m * cr + o0 % cr
                if not has_rp and not has_res:
                    _epi_affine(acc, acc_hi, hi, base, nbits, out_f, oo, scale, bias, rp_g,
                                rp_s, rp_z, res, 0, o0, fma)  # fmt: skip
                elif not has_res:
                    _epi_rp(acc, acc_hi, hi, base, nbits, out_f, oo, scale, bias, rp_g, rp_s,
                            rp_z, res, 0, o0, fma)  # fmt: skip
                elif not has_rp:
                    _epi_res(acc, acc_hi, hi, base, nbits, out_f, oo, scale, bias, rp_g, rp_s,
                             rp_z, res, ro, o0, fma)  # fmt: skip
                else:
                    _epi_rp_res(acc, acc_hi, hi, base, nbits, out_f, oo, scale, bias, rp_g,
                                rp_s, rp_z, res, ro, o0, fma)  # fmt: skip
            else:
                for l in range(lmax):
                    o = o0 + l
                    x = np.float32(nbits - 2 * _sum_at(acc, acc_hi, hi, base + l))
                    y = _affine_rp(x, o, scale, bias, rp_g, rp_s, rp_z, has_rp, fma)
                    if has_res:
                        y = res[m, o % cr] + y
                    out_f[m, o] = y
        else:
            word = np.uint64(0)
            for l in range(lmax):
                o = o0 + l
                v = np.float32(nbits - 2 * _sum_at(acc, acc_hi, hi, base + l))
                bit = (v > thr[o]) if flip[o] else (v < thr[o])
                word |= np.uint64(bit) << np.uint64(l)
            out_b[m, ob] = np.uint32(word)


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _store_tile(  # type: ignore[no-untyped-def]
    acc, rows, m0, o0, lmax, mode, const, out_i, out_f, scale, bias, rp_g, rp_s, rp_z, has_rp,
    fma,
):  # fmt: skip
    """Write a (rows, lmax) tile of XOR-popcount counts: mode 0 the integer dot products
    const - 2 * count, else the float affine (+ RPReLU) of them."""
    for r in range(rows):
        m = m0 + r
        base = r * LANES
        if mode == 0:
            for l in range(lmax):
                out_i[m, o0 + l] = const - 2 * acc[base + l]
        else:
            for l in range(lmax):
                xv = np.float32(const - 2 * acc[base + l])
                out_f[m, o0 + l] = _affine_rp(
                    xv, o0 + l, scale, bias, rp_g, rp_s, rp_z, has_rp, fma
                )


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _stem_tile(t, m_, o_, roffs, ooffs):  # type: ignore[no-untyped-def]
    """The fast stem's micro tile t of MR output pixels: roffs[r] its pixels (the last real
    one repeated past m_), ooffs[r] their output rows' offsets; returns (first pixel, rows)."""
    m0 = t * MR
    for r in range(MR):
        mm = min(m0 + r, m_ - 1)
        roffs[r] = mm
        ooffs[r] = mm * o_
    return m0, min(MR, m_ - m0)
