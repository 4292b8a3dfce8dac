"""Executor-internal bound entry points (see docs/kernels.md): each checks its shapes once and
returns a closure that, with one thread, calls the compiled serial kernel directly, without the
per-call checks, conversions and allocations of the public wrappers (which keep validating
every call). The caller guarantees that later calls pass C-contiguous arrays of exactly the
validated shapes and dtypes; the closures hold workspaces and are not reentrant. Each closure
also has ``record(...)`` (same arguments): the (group, arguments) of the serial kernel call it
makes, which the executor's plan runner replays (``bcnn.engine._runner``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit, types
from numba.extending import overload

from .. import _threads
from ._conv import (
    _B0,
    _F0,
    _F00,
    _I00,
    _MB,
    _MODE_AFFINE,
    _MODE_AFFINE_FMA,
    _MODE_PRESCALE_FMA,
    _U00,
    _conv_range,
    _out_hw,
    _prescaled,
    _run_conv,
)
from ._llvm import MR
from ._lut_conv import _conv_range_lut
from ._lut_stem import _stem_fast_range_lut
from ._packing import _pack_rows_padded
from ._pool import _avgpool2
from ._stem import (
    _fast_blocks,
    _fast_stem,
    _run_stem,
    _stem_bits,
    _stem_fast_range,
)
from ._weights import PreparedStem, PreparedWeights, _vec, _words

# (group, arguments) of the serial kernel call a bound closure makes on fixed arrays: what the
# executor's plan runner (bcnn.engine._runner) replays in one compiled call
Record = tuple[str, tuple[object, ...]]
# the pack arguments when a kernel packs nothing (never read)
_NO_PACK: tuple[np.ndarray, np.ndarray, int] = (_F0, np.zeros((0, 0, 0, 0), np.uint64), 0)
_NO_PAD = np.zeros((0, 0, 0, 0), np.uint64)  # the conv's padded workspace when it pads nothing


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _fill_padded(x, xp, pad):  # type: ignore[no-untyped-def]
    """xp[:, pad:pad + H, pad:pad + W] = x; the border of xp is left as the caller made it
    (zero: the one-padding of packed bits). No allocation, reshape or slice: the bound conv
    compiles faster without :func:`_conv._pad_bits`' (docs/kernels.md, Start-up)."""
    n_, h, w, cw = x.shape
    for n in range(n_):
        for y in range(h):
            for i in range(w):
                for c in range(cw):
                    xp[n, y + pad, i + pad, c] = x[n, y, i, c]


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _padded_input(x, xpad, pad):  # type: ignore[no-untyped-def]
    """The conv's input with its one-padding: ``x`` itself at pad 0, else ``xpad`` filled."""
    if pad > 0:
        _fill_padded(x, xpad, pad)
        return xpad
    return x


_CONV_PACK_DOC = """The serial conv (as :func:`_conv._conv_serial`; with ``pad`` > 0 the input
is copied into the interior of the caller's zero-bordered workspace ``xpad``, uint64
(N, H + 2*pad, W + 2*pad, Cw), instead of a new padded array), then (``do_pack``) the
signs of its float output ``out4`` (the same array as ``out_f``) packed into the interior of
``pk_out`` (one call: the binarize that follows a block). One entry per weight layout, chosen in
Python (:func:`_conv_serial_pack_for`). The lut entry calls its tiles inline: numba optimises
and emits a callee's code again in every caller it compiles, and types an overload's
implementation by compiling it, so each dispatch or wrapper level adds start-up time
(docs/kernels.md, Start-up). The popcount entry keeps the tiles' overload, which runs faster
there."""


@njit(nogil=True, cache=True, boundscheck=False)
def _conv_serial_pack_lut(  # type: ignore[no-untyped-def]
    ntiles, x, xpad, blocks, o_, nbits, kh, kw, stride, pad, ho, wo, mode,
    out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
    out4, pk_bias, pk_out, pk_pad, do_pack,
):  # fmt: skip
    xp = _padded_input(x, xpad, pad)
    _conv_range_lut(
        0, ntiles, 0, blocks.shape[0], xp, blocks, o_, nbits, kh, kw, stride, ho, wo, mode,
        out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
    )  # fmt: skip
    if do_pack:
        _pack_rows_padded(out4, pk_bias, pk_out, pk_pad)


@njit(nogil=True, cache=True, boundscheck=False)
def _conv_serial_pack_pop(  # type: ignore[no-untyped-def]
    ntiles, x, xpad, blocks, o_, nbits, kh, kw, stride, pad, ho, wo, mode,
    out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
    out4, pk_bias, pk_out, pk_pad, do_pack,
):  # fmt: skip
    xp = _padded_input(x, xpad, pad)
    # the popcount tiles through their overload (compiled on their own, linked in): inlined
    # here they ran 3-10% slower (paired bursts, generic path on Zen 3; docs/kernels.md)
    _conv_range(
        0, ntiles, 0, blocks.shape[0], xp, blocks, o_, nbits, kh, kw, stride, ho, wo, mode,
        out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
    )  # fmt: skip
    if do_pack:
        _pack_rows_padded(out4, pk_bias, pk_out, pk_pad)


_conv_serial_pack_lut.__doc__ = _conv_serial_pack_pop.__doc__ = _CONV_PACK_DOC


def _conv_serial_pack_for(blocks: np.ndarray):  # type: ignore[no-untyped-def]
    """The bound conv entry for prepared weights ``blocks``: nibbles (uint8) or words."""
    return _conv_serial_pack_lut if blocks.dtype == np.uint8 else _conv_serial_pack_pop


def _conv_serial_pack(  # type: ignore[no-untyped-def]
    ntiles, x, xpad, blocks, o_, nbits, kh, kw, stride, pad, ho, wo, mode,
    out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
    out4, pk_bias, pk_out, pk_pad, do_pack,
):  # fmt: skip
    """Compiled code only (the plan runner): the entry of ``blocks``' layout."""
    raise NotImplementedError("compiled code only")


@overload(_conv_serial_pack, jit_options={"nogil": True})
def _conv_serial_pack_typed(  # type: ignore[no-untyped-def]
    ntiles, x, xpad, blocks, o_, nbits, kh, kw, stride, pad, ho, wo, mode,
    out_i, out_f, out_b, scale, bias, rp_g, rp_s, rp_z, has_rp, res, has_res, thr, flip,
    out4, pk_bias, pk_out, pk_pad, do_pack,
):  # fmt: skip
    lut = blocks.dtype == types.uint8
    return (_conv_serial_pack_lut if lut else _conv_serial_pack_pop).py_func


def _check_pack(
    pack: tuple[np.ndarray, np.ndarray, int] | None, n: int, ho: int, wo: int, o: int
) -> None:
    """pack = (bias float32 (O,), bits uint64 (N, Ho + 2p, Wo + 2p, Cw) C-contiguous, p)."""
    if pack is None:
        return
    b, bits, p = pack
    if (
        not isinstance(bits, np.ndarray)
        or bits.dtype != np.uint64
        or not bits.flags.c_contiguous
        or bits.shape != (n, ho + 2 * p, wo + 2 * p, _words(o))
        or p < 0
        or _vec(b, o, "pack bias") is not b
    ):
        raise ValueError(f"pack must be (float32 ({o},), uint64 ({n}, Ho+2p, Wo+2p, Cw), p)")


def bind_conv_affine(
    x_shape: tuple[int, ...],
    w: PreparedWeights,
    scale: object,
    bias: object,
    *,
    stride: int = 1,
    padding: int = 0,
    rprelu: tuple[object, object, object] | None = None,
    residual_channels: int | None = None,
    fma: bool = False,
    pack: tuple[np.ndarray, np.ndarray, int] | None = None,
    prescale: object = None,
) -> Callable[[np.ndarray, np.ndarray | None, np.ndarray], np.ndarray]:
    """:func:`bconv2d_affine` for a fixed input shape, checked once: returns
    ``run(x, residual, out) -> out``. Internal (the executor's hot path): the caller
    guarantees that every call passes C-contiguous arrays of exactly the shapes and dtypes
    validated here (x uint64 ``x_shape``; residual None on every call or on none, else float32
    (N, Ho, Wo, residual_channels), possibly ``out`` itself; out float32 (N, Ho, Wo, O)). With
    one thread it calls the compiled serial kernel without the per-call checks; otherwise it
    runs the checked :func:`bconv2d_affine`. ``pack=(bias, bits, p)``: each call also packs
    sign(out + bias) (as :func:`pack_sign`) into the interior of ``bits`` (uint64
    (N, Ho + 2p, Wo + 2p, Cw), zero border kept), in the same compiled call. ``prescale``
    (with ``fma=True``): as :func:`bconv2d_affine`'s."""
    mode = _MODE_AFFINE_FMA if fma else _MODE_AFFINE
    n, h, wd, _ = x_shape
    ho, wo = _out_hw(h, wd, w.kh, w.kw, stride, padding)
    o = w.out_channels
    sc, bi = _vec(scale, o, "scale"), _vec(bias, o, "bias")
    if prescale is not None:
        if not fma:
            raise ValueError("prescale needs fma=True")
        sc, mode = _prescaled(sc, prescale, o), _MODE_PRESCALE_FMA
    rp = (_F0, _F0, _F0) if rprelu is None else tuple(_vec(v, o, "rprelu") for v in rprelu)
    has_rp = rprelu is not None
    cr = 1 if residual_channels is None else int(residual_channels)
    # the full check once, on zero inputs of these shapes (compiling only what run() calls)
    _run_conv(
        np.zeros(x_shape, np.uint64), w, stride, padding, mode, scale=sc, bias=bi,
        rprelu=rp if rprelu is not None else None,  # type: ignore[arg-type]
        residual=None if residual_channels is None else np.zeros((n, ho, wo, cr), np.float32),
        out=np.zeros((n, ho, wo, o), np.float32), check_only=True,
    )  # fmt: skip
    _check_pack(pack, n, ho, wo, o)
    m = n * ho * wo
    ntiles = -(-m // (MR * _MB))
    nbits = w.kh * w.kw * w.in_channels
    blocks, kh, kw, stride, padding = w.blocks, w.kh, w.kw, int(stride), int(padding)
    g, s, z = rp
    get_threads = _threads.get_num_threads
    pk = pack if pack is not None else _NO_PACK
    do_pack = pack is not None
    conv_pack = _conv_serial_pack_for(blocks)
    # the padded input's workspace (its border stays zero), or a stand-in never read
    xpad = (
        np.zeros((n, h + 2 * padding, wd + 2 * padding, x_shape[3]), np.uint64)
        if padding > 0
        else _NO_PAD
    )

    def run(x: np.ndarray, residual: np.ndarray | None, out: np.ndarray) -> np.ndarray:
        if get_threads() != 1:
            _run_conv(
                x, w, stride, padding, mode, scale=sc, bias=bi,
                rprelu=rp if has_rp else None,  # type: ignore[arg-type]
                residual=residual, out=out,
            )  # fmt: skip
            if pack is not None:
                _pack_rows_padded(out, pack[0], pack[1], pack[2])
            return out
        conv_pack(
            ntiles, x, xpad, blocks, o, nbits, kh, kw, stride, padding, ho, wo, mode,
            _I00, out.reshape(m, o), _U00, sc, bi, g, s, z, has_rp,
            _F00 if residual is None else residual.reshape(m, cr), residual is not None,
            _F0, _B0, out, pk[0], pk[1], pk[2], do_pack,
        )  # fmt: skip
        return out

    def record(x: np.ndarray, residual: np.ndarray | None, out: np.ndarray) -> Record:
        """The serial call ``run`` makes on these arrays, for the plan runner."""
        res = _F00 if residual is None else residual.reshape(m, cr)
        return "conv", (
            ntiles, x, xpad, blocks, o, nbits, kh, kw, stride, padding, ho, wo, mode,
            _I00, out.reshape(m, o), _U00, sc, bi, g, s, z, has_rp, res, residual is not None,
            _F0, _B0, out, pk[0], pk[1], pk[2], do_pack,
        )  # fmt: skip

    run.record = record  # type: ignore[attr-defined]
    return run


_STEM_PACK_DOC = """The first layer's fast path with its workspaces: ``cp`` uint8 (G*N*(H +
2*pad)*(W + 2*pad),), flat planes with a zero border (their interior is rewritten), ``patch``
uint64 (G, N*Ho*Wo); then (``do_pack``) the signs of its float output ``out4`` (the same array
as ``out_f``) packed into the interior of ``pk_out``. One entry per weight layout, each calling
its steps inline, and its path's tiles as in :data:`_CONV_PACK_DOC`."""


@njit(nogil=True, cache=True, boundscheck=False)
def _stem_fast_pack_lut(  # type: ignore[no-untyped-def]
    x, bit, cg, kh, kw, stride, pad, ho, wo, blocks, shifts, const, o_, mode,
    out_i, out_f, scale, bias, rp_g, rp_s, rp_z, has_rp, cp, patch,
    out4, pk_bias, pk_out, pk_pad, do_pack,
):  # fmt: skip
    _stem_bits(x, bit, pad, cg, kh, kw, stride, ho, wo, cp, patch)
    _stem_fast_range_lut(
        0, -(-(x.shape[0] * ho * wo) // MR), patch, blocks, shifts, const, o_, mode, out_i,
        out_f, scale, bias, rp_g, rp_s, rp_z, has_rp,
    )  # fmt: skip
    if do_pack:
        _pack_rows_padded(out4, pk_bias, pk_out, pk_pad)


@njit(nogil=True, cache=True, boundscheck=False)
def _stem_fast_pack_pop(  # type: ignore[no-untyped-def]
    x, bit, cg, kh, kw, stride, pad, ho, wo, blocks, shifts, const, o_, mode,
    out_i, out_f, scale, bias, rp_g, rp_s, rp_z, has_rp, cp, patch,
    out4, pk_bias, pk_out, pk_pad, do_pack,
):  # fmt: skip
    _stem_bits(x, bit, pad, cg, kh, kw, stride, ho, wo, cp, patch)
    # through the overload, as _conv_serial_pack_pop's tiles
    _stem_fast_range(
        0, -(-(x.shape[0] * ho * wo) // MR), patch, blocks, shifts, const, o_, mode, out_i,
        out_f, scale, bias, rp_g, rp_s, rp_z, has_rp,
    )  # fmt: skip
    if do_pack:
        _pack_rows_padded(out4, pk_bias, pk_out, pk_pad)


_stem_fast_pack_lut.__doc__ = _stem_fast_pack_pop.__doc__ = _STEM_PACK_DOC


def _stem_fast_pack_for(blocks: np.ndarray):  # type: ignore[no-untyped-def]
    """The bound stem entry for the fast stem's weights ``blocks``: nibbles (uint8) or words."""
    return _stem_fast_pack_lut if blocks.dtype == np.uint8 else _stem_fast_pack_pop


def _stem_fast_pack(  # type: ignore[no-untyped-def]
    x, bit, cg, kh, kw, stride, pad, ho, wo, blocks, shifts, const, o_, mode,
    out_i, out_f, scale, bias, rp_g, rp_s, rp_z, has_rp, cp, patch,
    out4, pk_bias, pk_out, pk_pad, do_pack,
):  # fmt: skip
    """Compiled code only (the plan runner): the entry of ``blocks``' layout."""
    raise NotImplementedError("compiled code only")


@overload(_stem_fast_pack, jit_options={"nogil": True})
def _stem_fast_pack_typed(  # type: ignore[no-untyped-def]
    x, bit, cg, kh, kw, stride, pad, ho, wo, blocks, shifts, const, o_, mode,
    out_i, out_f, scale, bias, rp_g, rp_s, rp_z, has_rp, cp, patch,
    out4, pk_bias, pk_out, pk_pad, do_pack,
):  # fmt: skip
    lut = blocks.dtype == types.uint8
    return (_stem_fast_pack_lut if lut else _stem_fast_pack_pop).py_func


def bind_stem_affine(
    x_shape: tuple[int, int, int, int],
    w: PreparedStem,
    scale: object,
    bias: object,
    *,
    stride: int = 1,
    padding: int = 0,
    rprelu: tuple[object, object, object] | None = None,
    fma: bool = False,
    pack: tuple[np.ndarray, np.ndarray, int] | None = None,
    prescale: object = None,
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """:func:`stem_conv_affine` for a fixed input shape, checked once: returns
    ``run(x, out) -> result`` (``out`` float32 (N, Ho, Wo, O), or a new array when the fast
    path does not apply). Internal (the executor's hot path): the caller guarantees that every
    call passes a C-contiguous uint8 array of shape ``x_shape``. With one thread, bit-planes on
    the fast path run with workspaces allocated here (so ``run`` is not reentrant).
    ``pack=(bias, bits, p)``: each call also packs sign(result + bias) into the interior of
    ``bits``, as :func:`bind_conv_affine`. ``prescale``: as :func:`stem_conv_affine`'s."""
    mode = _MODE_AFFINE_FMA if fma else _MODE_AFFINE
    n, c, h, wd = (int(d) for d in x_shape)
    if not isinstance(w, PreparedStem):
        raise ValueError("weights must be PreparedStem (see prepare_stem_weights)")
    o = w.out_channels
    sc, bi = _vec(scale, o, "scale"), _vec(bias, o, "bias")
    if prescale is not None:
        if not fma:
            raise ValueError("prescale needs fma=True")
        sc, mode = _prescaled(sc, prescale, o), _MODE_PRESCALE_FMA
    _run_stem(
        np.zeros((n, c, h, wd), np.uint8), w, stride, padding, mode, sc, bi, rprelu,
        check_only=True,
    )  # fmt: skip
    ho, wo = _out_hw(h, wd, w.kh, w.kw, stride, padding)
    _check_pack(pack, n, ho, wo, o)
    has_rp = rprelu is not None
    rp: tuple[np.ndarray, np.ndarray, np.ndarray] = (_F0, _F0, _F0)
    if rprelu is not None:
        rp = (
            _vec(rprelu[0], o, "rprelu"),
            _vec(rprelu[1], o, "rprelu"),
            _vec(rprelu[2], o, "rprelu"),
        )
    stride, padding = int(stride), int(padding)
    g_ = w.plane_bits.shape[0]
    cp = np.zeros(g_ * n * (h + 2 * padding) * (wd + 2 * padding), np.uint8)  # flat planes
    patch = np.empty((g_, n * ho * wo), np.uint64)
    cg = w.image_channels * w.group_planes
    fast = _fast_stem(w)
    fblocks = _fast_blocks(w)  # nibbles on the lut path
    stem_pack = _stem_fast_pack_for(fblocks)
    get_threads = _threads.get_num_threads
    pk = pack if pack is not None else _NO_PACK

    def run(x: np.ndarray, out: np.ndarray) -> np.ndarray:
        if not fast or get_threads() != 1:
            y = _run_stem(x, w, stride, padding, mode, sc, bi, rp if has_rp else None)
            if pack is not None:
                _pack_rows_padded(y, pack[0], pack[1], pack[2])
            return y
        stem_pack(
            x, w.plane_bits, cg, w.kh, w.kw, stride, padding, ho, wo, fblocks, w.shifts,
            w.const, o, mode, _I00, out.reshape(n * ho * wo, o), sc, bi, rp[0], rp[1], rp[2],
            has_rp, cp, patch, out, pk[0], pk[1], pk[2], pack is not None,
        )  # fmt: skip
        return out

    def record(out: np.ndarray) -> Record | None:
        """The serial call ``run`` makes (less its image argument), for the plan runner."""
        if not fast:
            return None
        return "stem", (
            w.plane_bits, cg, w.kh, w.kw, stride, padding, ho, wo, fblocks, w.shifts,
            w.const, o, mode, _I00, out.reshape(n * ho * wo, o), sc, bi, rp[0], rp[1], rp[2],
            has_rp, cp, patch, out, pk[0], pk[1], pk[2], pack is not None,
        )  # fmt: skip

    run.record = record  # type: ignore[attr-defined]
    return run


def bind_pack_sign_padded(
    x_shape: tuple[int, int, int, int], bias: object, pad: int
) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`pack_sign` of float32 (N, H, W, C) for a fixed shape, into a zero-bordered
    buffer: returns ``run(x) -> out`` with out uint64 (N, H + 2*pad, W + 2*pad, Cw) (the same
    array on every call: its interior is rewritten, its border stays 0 = one-padding), ready
    for a convolution with padding 0. Internal (the executor's hot path): the caller
    guarantees that every call passes a C-contiguous float32 array of shape ``x_shape``."""
    n, h, w, c = (int(d) for d in x_shape)
    if min(n, h, w, c) < 1 or pad < 0:
        raise ValueError(f"bad shape {x_shape} or padding {pad}")
    b = _vec(bias, c, "bias")
    out = np.zeros((n, h + 2 * pad, w + 2 * pad, _words(c)), np.uint64)
    _pack_rows_padded(np.zeros((n, h, w, c), np.float32), b, out, pad)  # compile, check

    def run(x: np.ndarray) -> np.ndarray:
        _pack_rows_padded(x, b, out, pad)
        return out

    run.record = lambda x: ("pack", (x, b, out, int(pad)))  # type: ignore[attr-defined]
    return run


@njit(nogil=True, cache=True, boundscheck=False)
def _avgpool_pack(h, out, pk_bias, pk_out, pk_pad, do_pack):  # type: ignore[no-untyped-def]
    _avgpool2(h, out)
    if do_pack:
        _pack_rows_padded(out, pk_bias, pk_out, pk_pad)


def bind_avgpool2x2(
    shape: tuple[int, int, int, int], *, pack: tuple[np.ndarray, np.ndarray, int] | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`avgpool2x2` for a fixed input shape into one output buffer: returns
    ``run(h) -> out`` (the same array on every call). Internal (the executor's hot path): the
    caller guarantees that every call passes a C-contiguous float32 array of ``shape``.
    ``pack``: as :func:`bind_conv_affine` (the signs of the pooled stream, same call)."""
    n, hh, ww, c = (int(d) for d in shape)
    if min(n, hh, ww, c) < 1:
        raise ValueError(f"cannot pool a stream of shape {shape}")
    ho, wo = -(-hh // 2), -(-ww // 2)
    _check_pack(pack, n, ho, wo, c)
    out = np.empty((n, ho, wo, c), np.float32)
    pk = pack if pack is not None else _NO_PACK
    do_pack = pack is not None

    def run(h: np.ndarray) -> np.ndarray:
        _avgpool_pack(h, out, pk[0], pk[1], pk[2], do_pack)
        return out

    def record(h: np.ndarray) -> Record:
        return "pool", (h, out, pk[0], pk[1], pk[2], do_pack)

    run.record = record  # type: ignore[attr-defined]
    return run
