"""Binary convolution, GEMM and dense kernels with fused epilogues."""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import _threads
from ._conv_epi import (
    _MODE_AFFINE,
    _MODE_AFFINE_FMA,
    _MODE_INT,
    _MODE_PRESCALE_FMA,
    _MODE_THRESHOLD,
    _ctl,
    _epilogue,
    _tile_rows,
)
from ._llvm import (
    _MB,
    _PARALLEL_MIN_WORK,
    LANES,
    MR,
    _mk,
    _mkf_affine,
    _mkf_int,
    _mkf_res,
    _mkf_rp,
    _mkf_rp_res,
)
from ._lut_conv import _conv_range_lut
from ._weights import (
    PreparedWeights,
    _blocks_ok,
    _check_packed,
    _check_prepared,
    _vec,
    _words,
    prepare_dense_weights,
)

# ------------------------------------------------------------------------ conv / GEMM kernels


@njit(nogil=True, cache=True, boundscheck=False)
def _conv_range_pop(  # type: ignore[no-untyped-def]
    t0, t1, ob0, ob1, xp, blocks, o_, nbits, kh, kw, stride, ho, wo, mode,
    out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
):  # fmt: skip
    """Macro tiles t0..t1 (MB*MR output pixels each) of a binary conv over the padded input
    ``xp``, output blocks ob0..ob1, with the epilogue. The micro-kernel reads each pixel's patch
    straight from ``xp``: KH segments (kernel rows) of KW*Cw contiguous words."""
    n_, hp, wp, cw = xp.shape
    wk = blocks.shape[1]
    m_ = n_ * ho * wo
    roffs = np.empty((_MB, MR), np.int64)
    ooffs = np.empty((_MB, MR), np.int64)
    acc = np.empty(_MB * MR * LANES, np.int64)
    noshift = np.empty(0, np.int64)
    o_out = out_i.shape[1] if mode == 0 else out_f.shape[1]
    # full tiles of 32 channels run a fused micro-kernel (epilogue from registers)
    fma = _ctl(mode, o_out)
    cr = res.shape[1]
    # a residual of Cr < O channels is read at o % Cr: fused when no 32-block wraps around
    fuse = mode == 0 or (mode != 2 and (not has_res or cr == o_out or cr % LANES == 0))
    rbase = np.empty((_MB, MR), np.int64)
    # flat views: the rows of micro tile u are roffs[u] (ooffs[u], rbase[u])
    rflat, oflat, bflat = roffs.reshape(_MB * MR), ooffs.reshape(_MB * MR), rbase.reshape(_MB * MR)
    rr = np.empty(MR, np.int64)
    sw = kw * cw
    ss = wp * cw
    for t in range(t0, t1):
        mt0 = t * _MB * MR
        mrows = min(_MB * MR, m_ - mt0)
        nmt = -(-mrows // MR)
        _tile_rows(mt0, mrows, nmt * MR, ho, wo, hp, wp, cw, stride, rflat)
        for i in range(nmt * MR):
            oflat[i] = (mt0 + i) * o_out
            bflat[i] = (mt0 + i) * cr
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
                    acc, acc, False, mrows - u0 * MR, mt0 + u0 * MR, o0, lmax, nbits, mode,
                    out_i, out_f, out_b, ob, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res,
                    thr, flip,
                )  # fmt: skip


def _conv_range(  # type: ignore[no-untyped-def]
    t0, t1, ob0, ob1, xp, blocks, o_, nbits, kh, kw, stride, ho, wo, mode,
    out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
):  # fmt: skip
    """The conv tiles of the weights' kernel path, chosen when compiled: popcounts on uint64
    words (:func:`_conv_range_pop`), lookup tables on uint8 nibbles (``_lut_conv``)."""
    raise NotImplementedError("compiled code only")


@overload(_conv_range, jit_options={"nogil": True})
def _conv_range_typed(  # type: ignore[no-untyped-def]
    t0, t1, ob0, ob1, xp, blocks, o_, nbits, kh, kw, stride, ho, wo, mode,
    out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
):  # fmt: skip
    # the tiles' Python source is the implementation (not a wrapper calling the compiled
    # tiles): numba re-emits a callee's code in every caller, so a wrapper level would cost
    # start-up time
    return (_conv_range_lut if blocks.dtype == types.uint8 else _conv_range_pop).py_func


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _pad_bits(x, pad):  # type: ignore[no-untyped-def]
    """One-padding of packed bits (words, or plane-pair bytes): a zero border (bit 0 = +1)."""
    if pad == 0:
        return x
    n_, h, w, cw = x.shape
    # np.empty and explicit loops, not np.zeros: inlined into the parallel=True conv, np.zeros
    # would become a parfor of its own, and under the conv's parallel chunk size of 1 its
    # every element a scheduled chunk (2-3x the conv's time at 2 threads, measured on Zen 3)
    xp = np.empty((n_, h + 2 * pad, w + 2 * pad, cw), x.dtype)
    flat = xp.reshape(-1)
    for i in range(flat.size):
        flat[i] = 0
    for n in range(n_):
        for y in range(h):
            for i in range(w):
                for c in range(cw):
                    xp[n, y + pad, i + pad, c] = x[n, y, i, c]
    return xp


@njit(nogil=True, cache=True, boundscheck=False)
def _conv_serial(  # type: ignore[no-untyped-def]
    ntiles, x, blocks, o_, nbits, kh, kw, stride, pad, ho, wo, mode,
    out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
):  # fmt: skip
    xp = _pad_bits(x, pad)
    _conv_range(
        0, ntiles, 0, blocks.shape[0], xp, blocks, o_, nbits, kh, kw, stride, ho, wo, mode,
        out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
    )  # fmt: skip


@njit(nogil=True, cache=True, boundscheck=False, parallel=True)
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


# parallel chunks per thread, handed out dynamically: finer chunks even out a thread that
# falls behind (a shared VM's vCPU). conv3x3 256 ch 14x14 batch 8 on 2 threads, Zen 3 VM,
# same process, paired against 1 thread in each of 40-80 rounds: 4 per thread 1.69 / 1.74 /
# 1.71x, 16 per thread 1.72 / 1.79 / 1.80x, one work item per chunk 1.73 / 1.72 / 1.75x.
_CHUNKS_PER_THREAD = 16


def _chunks(ntiles: int, work: int) -> int:
    """Number of parallel chunks (0: run the serial variant); sets numba's thread count for
    the calling thread to the engine's (:mod:`bcnn.engine._threads`, default 1)."""
    t = _threads.get_num_threads()
    if t <= 1 or ntiles < 1 or work < _PARALLEL_MIN_WORK:
        return 0
    numba.set_num_threads(t)
    return min(ntiles, _CHUNKS_PER_THREAD * t)


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
    check_only: bool = False,
    pairs: bool = False,
) -> np.ndarray:
    """Check every argument, then run the kernels (``check_only``: return the unwritten
    result after the checks, compiling nothing: the bound closures' one-time check).
    ``pairs``: x holds plane-pair bytes (:func:`bconv2d_pairs`)."""
    w = _check_prepared(w)
    if pairs:
        if w.blocks.dtype != np.uint8:
            raise ValueError("plane pairs need the lut path's nibble weights")
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"x must be plane-pair bytes uint8 (N, H, W, 16*Cw), got {x!r:.80}")
        x = np.ascontiguousarray(x)
        n, h, wd, cw = (*x.shape[:3], x.shape[3] // 16)
        if x.shape[3] != 16 * cw:
            raise ValueError(f"x has {x.shape[3]} bytes per pixel, not a multiple of 16")
    else:
        x = _check_packed(x, 4, "x")
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
    elif mode in (_MODE_AFFINE, _MODE_AFFINE_FMA, _MODE_PRESCALE_FMA):
        # prescaled: scale holds (alpha, pre), 2 * O values
        scale = _vec(scale, 2 * o if mode == _MODE_PRESCALE_FMA else o, "scale")
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
    if check_only:
        return result
    ntiles = -(-m // (MR * _MB))
    nob, wk = w.blocks.shape[0], w.kh * w.kw * w.words
    nbits = w.kh * w.kw * w.in_channels * (3 if pairs else 1)  # pairs: pc0 + 2 pc1
    args = (
        x, w.blocks, o, nbits, w.kh, w.kw, int(stride), int(padding), ho, wo, mode,
        out_i, out_f, out_b, scale, bias, rp[0], rp[1], rp[2], rprelu is not None,
        res, has_res, thr, flip,
    )  # fmt: skip
    nsplit = _split(ntiles, nob)
    chunks = _chunks(ntiles * nsplit, ntiles * _MB * nob * wk)
    if chunks:
        with _threads.parallel_launch():  # one parallel region at a time
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


def bconv2d_pairs(
    xq: np.ndarray, w: PreparedWeights, stride: int = 1, padding: int = 0
) -> np.ndarray:
    """Two activation planes per lookup (lut path): ``xq`` plane-pair bytes uint8 (M, H, W,
    16*Cw) (:func:`~._lut_conv.pair_bytes`), ``w`` nibble weights -> int32 (M, Ho, Wo, O):
    ``conv(a0, W) + 2 * conv(a1, W)`` of each pair's planes a0, a1 (one table lookup serves
    both planes: half the shuffles of two :func:`bconv2d` planes)."""
    return _run_conv(xq, w, stride, padding, _MODE_INT, pairs=True)


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
    prescale: object = None,
) -> np.ndarray:
    """Binary conv2d + per-channel affine (+ RPReLU) (+ residual add), one pass, float32 NHWC.

    y = float32(acc) * scale[o] + bias[o]; with ``rprelu=(gamma, slope, zeta)``:
    y = y - gamma; y = y if y >= 0 else y * slope; y = y + zeta; with ``residual``
    (N, Ho, Wo, Cr), O % Cr == 0: y = residual[..., o % Cr] + y (Cr < O: the channel-repeated
    shortcut of a widening downsample). ``out`` may be ``residual`` itself (h += ... in place).
    ``fma=True``: y = fma(float32(acc), scale[o], bias[o]) with one rounding (how ATen's CPU
    batch norm computes x * alpha + beta in eval mode) instead of a multiply then an add.
    ``prescale`` (float32 (O,), with ``fma=True``): y = fma(float32(acc) * prescale[o],
    scale[o], bias[o]), the product rounded first: a 1-bit view of a k-bit layer (its weight
    scale, then its batch norm).
    """
    mode, sc = _MODE_AFFINE_FMA if fma else _MODE_AFFINE, scale
    if rprelu is None and residual is None and out is None and prescale is None:
        y = _affine_fast(x, w, scale, bias, stride, padding, mode)
        if y is not None:
            return y
    if prescale is not None:
        if not fma:
            raise ValueError("prescale needs fma=True")
        sc, mode = _prescaled(scale, prescale, _check_prepared(w).out_channels), _MODE_PRESCALE_FMA
    return _run_conv(
        x,
        w,
        stride,
        padding,
        mode,
        scale=sc,  # type: ignore[arg-type]
        bias=bias,  # type: ignore[arg-type]
        rprelu=rprelu,  # type: ignore[arg-type]
        residual=residual,
        out=out,
    )


_F32, _U64 = np.dtype(np.float32), np.dtype(np.uint64)


def _affine_fast(
    x: object, w: object, scale: object, bias: object, stride: object, padding: object, mode: int
) -> np.ndarray | None:
    """:func:`bconv2d_affine`'s common case on one kernel thread, checked inline: the same
    conditions as :func:`_run_conv`'s checks in a few bytecodes, so that a call from cold
    caches (after other work: every call of a layer in a Python loop) costs little beyond the
    kernel. Returns None, having run nothing, whenever any argument is not the plain case
    (then :func:`_run_conv` checks it again and raises the one-line error, or runs it)."""
    if not (
        type(x) is np.ndarray
        and type(w) is PreparedWeights
        and type(scale) is np.ndarray
        and type(bias) is np.ndarray
        and type(stride) is int
        and type(padding) is int
        and x.ndim == 4
        and x.dtype == _U64
        and x.flags.c_contiguous
        and scale.dtype == _F32
        and bias.dtype == _F32
        and scale.flags.c_contiguous
        and bias.flags.c_contiguous
    ):
        return None
    blocks, o, cin, kh, kw = w.blocks, w.out_channels, w.in_channels, w.kh, w.kw
    n, h, wd, cw = x.shape
    if (
        cw != (cin + 63) >> 6
        or not _blocks_ok(w)
        or scale.shape != (o,)
        or bias.shape != (o,)
        or stride < 1
        or padding < 0
        or (padding > 0 and padding >= max(kh, kw))
    ):
        return None
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    if n < 1 or h < 1 or wd < 1 or ho < 1 or wo < 1:
        return None
    m = n * ho * wo
    ntiles = -(-m // (MR * _MB))
    if _chunks(ntiles, ntiles * _MB * blocks.shape[0] * kh * kw * cw):
        return None  # the parallel launch (as _run_conv decides it)
    result = np.empty((n, ho, wo, o), np.float32)
    _conv_serial(
        ntiles, x, blocks, o, kh * kw * cin, kh, kw, stride, padding, ho, wo, mode,
        _I00, result.reshape(m, o), _U00, scale, bias, _F0, _F0, _F0, False, _F00, False,
        _F0, _B0,
    )  # fmt: skip
    return result


def _prescaled(scale: object, prescale: object, o: int) -> np.ndarray:
    """(alpha, pre) as one float32 (2 * O,) vector, each checked to be (O,)."""
    return np.concatenate([_vec(scale, o, "scale"), _vec(prescale, o, "prescale")])


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
