"""The first layer: bit-plane / thermometer planes convolved with binary weights, exact."""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import _threads
from ._conv import (
    _F0,
    _F00,
    _I00,
    _MODE_AFFINE,
    _MODE_AFFINE_FMA,
    _MODE_INT,
    _MODE_PRESCALE_FMA,
    _chunks,
    _out_hw,
    _prescaled,
)
from ._conv_epi import _ctl, _stem_tile, _store_tile
from ._llvm import LANES, MR, _mk_shift, _mkf_shift_affine, _mkf_shift_int, _mkf_shift_rp
from ._lut_stem import _stem_fast_range_lut, stem_nibbles
from ._weights import (
    PreparedStem,
    _aligned,
    _blocks_from_rows,
    _check_packed,
    _check_tail_zero,
    _layout_path,
    _pack_bool_rows,
    _unpack_bool_rows,
    _vec,
    _words,
)

# ------------------------------------------------------------------------------- first layer


@njit(nogil=True, cache=True, boundscheck=False)
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


@njit(nogil=True, cache=True, boundscheck=False)
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


@njit(nogil=True, cache=True, boundscheck=False)
def _put_bits(patch, r, k, off, v, nbits):  # type: ignore[no-untyped-def]
    """OR the low nbits of v into patch row r at word k, bit offset off (may cross a word)."""
    patch[r, k] |= v << np.uint64(off)
    if off + nbits > 64:
        patch[r, k + 1] |= v >> np.uint64(64 - off)


@njit(nogil=True, cache=True, boundscheck=False)
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
    fma = _ctl(mode, o_)
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
            _store_tile(acc, rows, m0, o0, lmax, mode, const, out_i, out_f, scale, bias,
                        rp_g, rp_s, rp_z, has_rp, fma)  # fmt: skip


@njit(nogil=True, cache=True, boundscheck=False)
def _stem_serial(  # type: ignore[no-untyped-def]
    ntiles, codes, rowc, cg, kh, kw, stride, pad, ho, wo, blocks, wg, shifts, const,
    o_, mode, out_i, out_f, scale, bias, rp_g, rp_s, rp_z, has_rp,
):  # fmt: skip
    _stem_range(
        0, ntiles, codes, rowc, cg, kh, kw, stride, pad, ho, wo, blocks, wg, shifts, const, o_,
        mode, out_i, out_f, scale, bias, rp_g, rp_s, rp_z, has_rp,
    )  # fmt: skip


@njit(nogil=True, cache=True, boundscheck=False, parallel=True)
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


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _stem_planes(x, bit, pad, cp):  # type: ignore[no-untyped-def]
    """Bit-planes, one byte per pixel, into the flat workspace ``cp`` uint8 (G*N*Hp*Wp,)
    (Hp, Wp = H + 2*pad, W + 2*pad): cp[g, n, y + pad, x + pad] = OR_c ((pixel[n, c, y, x]
    >> bit[g]) & 1) << c (uint8; C <= 8). The interior is overwritten, the border (the
    one-padding) is left as the caller made it (zero). Inner loops run along rows, on 1-D
    views (no reshapes or multi-dimensional slices: numba's IR for them is long, and this
    body is compiled into every stem entry; docs/kernels.md, Start-up)."""
    n_, c_, h, w = x.shape
    g_ = bit.shape[0]
    hp, wp = h + 2 * pad, w + 2 * pad
    for g in range(g_):
        b = np.uint8(bit[g])
        for n in range(n_):
            for y in range(h):
                r0 = ((g * n_ + n) * hp + y + pad) * wp + pad
                row = cp[r0 : r0 + w]  # 1-D views: indices the vectorizer sees as >= 0
                src = x[n, 0, y]
                for i in range(w):
                    row[i] = (src[i] >> b) & np.uint8(1)
                for c in range(1, c_):
                    sh = np.uint8(c)
                    src = x[n, c, y]
                    for i in range(w):
                        row[i] |= ((src[i] >> b) & np.uint8(1)) << sh


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _stem_patches(cp, n_, hp, wp, cg, kh, kw, stride, ho, wo, patch):  # type: ignore[no-untyped-def]
    """patch[g, m] = the dense KH*KW*cg-bit patch of group g at output pixel m (one word):
    OR over taps of cp[g, n, oy*stride + ky, ox*stride + kx] << ((ky*KW + kx) * cg), from
    the flat planes ``cp`` (G*N*Hp*Wp,) of :func:`_stem_planes`, on 1-D views as there."""
    g_ = patch.shape[0]
    if stride == 1:
        # on the padded grid: position j = oy*Wp + ox' (ox' < Wp; ox' >= Wo is never read),
        # every tap is one long contiguous loop per plane
        span = (ho - 1) * wp + wo
        grid = np.empty(span, np.uint64)
        for g in range(g_):
            for n in range(n_):
                src = (g * n_ + n) * hp * wp
                for i in range(span):
                    grid[i] = 0
                for ky in range(kh):
                    for kx in range(kw):
                        sh = np.uint64((ky * kw + kx) * cg)
                        s0 = src + ky * wp + kx
                        s1 = cp[s0 : s0 + span]
                        for i in range(span):
                            grid[i] |= np.uint64(s1[i]) << sh
                pg = patch[g]
                for oy in range(ho):
                    p0, g0 = (n * ho + oy) * wo, oy * wp
                    for ox in range(wo):
                        pg[p0 + ox] = grid[g0 + ox]
        return
    for g in range(g_):
        pg = patch[g]
        for n in range(n_):
            for oy in range(ho):
                base = (n * ho + oy) * wo
                prow = pg[base : base + wo]
                for ox in range(wo):
                    prow[ox] = 0
                for ky in range(kh):
                    r0 = ((g * n_ + n) * hp + oy * stride + ky) * wp
                    src = cp[r0 : r0 + wp]
                    for kx in range(kw):
                        sh = np.uint64((ky * kw + kx) * cg)
                        for ox in range(wo):
                            prow[ox] |= np.uint64(src[ox * stride + kx]) << sh


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _stem_bits(x, bit, pad, cg, kh, kw, stride, ho, wo, cp, patch):  # type: ignore[no-untyped-def]
    """The fast stem's inputs: bit-planes of ``x`` into ``cp`` (:func:`_stem_planes`), then
    one-word group patches into ``patch`` (:func:`_stem_patches`)."""
    n_, _, h, w = x.shape
    _stem_planes(x, bit, pad, cp)
    _stem_patches(cp, n_, h + 2 * pad, w + 2 * pad, cg, kh, kw, stride, ho, wo, patch)


def _stem_fast_range(  # type: ignore[no-untyped-def]
    t0, t1, patch, blocks, shifts, const, o_, mode, out_i, out_f, scale, bias, rp_g, rp_s,
    rp_z, has_rp,
):  # fmt: skip
    """The fast stem's tiles on the weights' kernel path, chosen when compiled: popcounts on
    uint64 words (:func:`_stem_fast_range_pop`), lookup tables on uint8 nibbles
    (``_lut_stem``)."""
    raise NotImplementedError("compiled code only")


# not inline="always": numba would compile the chosen implementation once more just to type it
@overload(_stem_fast_range, jit_options={"nogil": True})
def _stem_fast_range_typed(  # type: ignore[no-untyped-def]
    t0, t1, patch, blocks, shifts, const, o_, mode, out_i, out_f, scale, bias, rp_g, rp_s,
    rp_z, has_rp,
):  # fmt: skip
    return (_stem_fast_range_lut if blocks.dtype == types.uint8 else _stem_fast_range_pop).py_func


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _stem_fast_range_pop(  # type: ignore[no-untyped-def]
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
    fma = _ctl(mode, o_)
    for t in range(t0, t1):
        m0, rows = _stem_tile(t, m_, o_, roffs, ooffs)
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
            _store_tile(acc, rows, m0, o0, lmax, mode, const, out_i, out_f, scale, bias,
                        rp_g, rp_s, rp_z, has_rp, fma)  # fmt: skip


@njit(nogil=True, cache=True, boundscheck=False)
def _stem_fast_serial(  # type: ignore[no-untyped-def]
    x, bit, cg, kh, kw, stride, pad, ho, wo, blocks, shifts, const, o_, mode,
    out_i, out_f, scale, bias, rp_g, rp_s, rp_z, has_rp,
):  # fmt: skip
    n_, _, h, w = x.shape
    g_ = bit.shape[0]
    hp, wp = h + 2 * pad, w + 2 * pad
    cp = np.zeros(g_ * n_ * hp * wp, np.uint8)
    patch = np.empty((g_, n_ * ho * wo), np.uint64)
    _stem_bits(x, bit, pad, cg, kh, kw, stride, ho, wo, cp, patch)
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
    *,
    path: str | None = None,
) -> PreparedStem:
    """First-layer weights -> :class:`PreparedStem`.

    w_packed: canonical packed weights (O, KH, KW, Cw) of the binary conv over the encoded
    planes, Cin = image_channels * planes, input channel c*planes + p = plane p of image
    channel c (as ``bcnn.nn.BitPlaneEncoder`` / ``ThermometerEncoder``).

    - ``"bitplane"``: planes = bits (1..8); plane p is bit (8 - planes + p) of the pixel and
      has place value 2^p; one group per plane (word shifts p).
    - ``"thermometer"``: plane p is ``pixel >= thresholds[p]`` (thresholds: ints, (planes,));
      all place values 1 (the model multiplies by its step); one group of all planes.

    ``path``: the kernel path whose layout to add (default: the active one): on ``lut``,
    bit-planes whose patch fits one word per plane also carry nibble weights (``nibbles``).
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
    on_lut = _layout_path(path) == "lut"
    prepared = PreparedStem(
        _aligned(_blocks_from_rows(rows)),
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
    if on_lut and _fast_stem(prepared):  # the lut path's fast stem looks up nibbles
        prepared = prepared._replace(nibbles=_aligned(stem_nibbles(prepared.blocks, kg)))
    return prepared


def _nibbles_ok(w: PreparedStem) -> bool:
    """No nibbles, or the layout :func:`stem_nibbles` makes for a fast stem's words."""
    nb = w.nibbles
    if not isinstance(nb, np.ndarray) or nb.dtype != np.uint8 or not nb.flags.c_contiguous:
        return False
    if nb.size == 0:
        return True
    kg = w.kh * w.kw * w.image_channels * w.group_planes
    nob, g_ = w.blocks.shape[0], w.groups
    return bool(
        _fast_stem(w) and nb.ndim == 3 and nb.shape[0] == nob and nb.shape[2] == LANES
        and nb.shape[1] % g_ == 0 and 4 * (nb.shape[1] // g_) >= kg
        and nb.shape[1] // g_ <= 16 and (nb.shape[1] // g_) % 4 == 0
    )  # fmt: skip


def _fast_blocks(w: PreparedStem) -> np.ndarray:
    """The fast stem's weights: nibbles on the lut path, else words."""
    return w.nibbles if w.nibbles.size else w.blocks


def _fast_stem(w: PreparedStem) -> bool:
    """Bit-planes whose patches are one word per plane (and codes fit a byte)."""
    cg = w.image_channels * w.group_planes
    return bool(w.plane_bits.size and w.group_words == 1 and cg <= 8 and w.kh * w.kw * cg <= 64)


def _run_stem(
    x: np.ndarray,
    w: PreparedStem,
    stride: int,
    padding: int,
    mode: int,
    scale: object = None,
    bias: object = None,
    rprelu: tuple[object, object, object] | None = None,
    check_only: bool = False,
) -> np.ndarray:
    """Check every argument, then run the kernels (``check_only``: return the unwritten
    result after the checks, compiling nothing: the bound closures' one-time check)."""
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
        or not _nibbles_ok(w)
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
        # prescaled: scale holds (alpha, pre), 2 * O values
        sc = _vec(scale, 2 * o if mode == _MODE_PRESCALE_FMA else o, "scale")
        bi = _vec(bias, o, "bias")
        if rprelu is not None:
            rp = tuple(_vec(v, o, "rprelu") for v in rprelu)  # type: ignore[assignment]
        result = out_f = np.empty((m, o), np.float32)
    if check_only:
        return result.reshape(n, ho, wo, o)
    if _fast_stem(w) and _threads.get_num_threads() == 1:
        # bit-planes whose patches are one word per plane: built with row-wise vector loops
        _stem_fast_serial(
            np.ascontiguousarray(x), w.plane_bits, cg, w.kh, w.kw, int(stride),
            int(padding), ho, wo, _fast_blocks(w), w.shifts, w.const, o, mode, out_i, out_f, sc, bi,
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
        with _threads.parallel_launch():  # one parallel region at a time
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
    prescale: object = None,
) -> np.ndarray:
    """:func:`stem_conv` + float32(S) * scale + bias (+ RPReLU) -> float32 (N, Ho, Wo, O)
    (``fma=True``: one rounding; ``prescale``: fma(float32(S) * prescale, scale, bias); see
    :func:`bconv2d_affine`)."""
    mode, sc = _MODE_AFFINE_FMA if fma else _MODE_AFFINE, scale
    if prescale is not None:
        if not fma:
            raise ValueError("prescale needs fma=True")
        if not isinstance(w, PreparedStem):
            raise ValueError("weights must be PreparedStem (see prepare_stem_weights)")
        sc, mode = _prescaled(scale, prescale, w.out_channels), _MODE_PRESCALE_FMA
    return _run_stem(x, w, stride, padding, mode, sc, bias, rprelu)
