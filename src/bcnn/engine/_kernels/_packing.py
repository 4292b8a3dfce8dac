"""Activation packing: sign of a float stream, per-channel thresholds, unpacking."""

from __future__ import annotations

import numpy as np
from numba import njit

from ._llvm import _cmp64, _pack16_nchw, _pack64_nchw
from ._weights import _pack_bool_rows, _unpack_bool_rows, _vec, _words

# ---------------------------------------------------------------------------- packing kernels


@njit(nogil=True, cache=True, boundscheck=False)
def _pack_rows(x, bias, out):  # type: ignore[no-untyped-def]
    """out[m, j] bit i = (x[m, 64j+i] + bias[64j+i]) < 0 (float32)."""
    m_, c_ = x.shape
    cw = out.shape[1]
    full = c_ // 64
    for m in range(m_):
        for j in range(full):
            out[m, j] = _cmp64(x, m * c_ + 64 * j, bias, 64 * j, 0, 0)
        if full < cw:
            c0 = full * 64
            w = np.uint64(0)
            for i in range(c_ - c0):
                v = x[m, c0 + i] + bias[c0 + i]
                w |= np.uint64(v < 0) << np.uint64(i)
            out[m, full] = w


@njit(nogil=True, cache=True, boundscheck=False)
def _pack_nchw(x, bias, out):  # type: ignore[no-untyped-def]
    """x (N, C, P) float32 -> out (N, P, Cw): bit = x + bias[c] < 0, by blocks of pixels
    (vector loads along the pixels of each channel, 64 or 16 pixels per block), scalar for
    the last P % 16."""
    n_, c_, p_ = x.shape
    cw = out.shape[2]
    for n in range(n_):
        p0 = 0
        while p0 + 64 <= p_:
            for j in range(cw):
                _pack64_nchw(x, n * c_ * p_ + p0, p_, 64 * j, min(64, c_ - 64 * j), bias, out,
                             (n * p_ + p0) * cw + j, cw)  # fmt: skip
            p0 += 64
        while p0 + 16 <= p_:
            for j in range(cw):
                _pack16_nchw(x, n * c_ * p_ + p0, p_, 64 * j, min(64, c_ - 64 * j), bias, out,
                             (n * p_ + p0) * cw + j, cw)  # fmt: skip
            p0 += 16
        for p in range(p0, p_):
            for j in range(cw):
                w = np.uint64(0)
                for i in range(min(64, c_ - 64 * j)):
                    c = 64 * j + i
                    w |= np.uint64(x[n, c, p] + bias[c] < 0) << np.uint64(i)
                out[n, p, j] = w


@njit(nogil=True, cache=True, boundscheck=False)
def _pack_thr_rows(x, thr, flip, fwords, out):  # type: ignore[no-untyped-def]
    """bit = (x > thr[c]) if flip[c] else (x < thr[c]); fwords: flip packed as bits."""
    m_, c_ = x.shape
    cw = out.shape[1]
    full = c_ // 64
    for m in range(m_):
        for j in range(full):
            out[m, j] = _cmp64(x, m * c_ + 64 * j, thr, 64 * j, fwords[j], 1)
        if full < cw:
            c0 = full * 64
            w = np.uint64(0)
            for i in range(c_ - c0):
                v = x[m, c0 + i]
                t = thr[c0 + i]
                bit = (v > t) if flip[c0 + i] else (v < t)
                w |= np.uint64(bit) << np.uint64(i)
            out[m, full] = w


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _pack_rows_padded(x, bias, out, pad):  # type: ignore[no-untyped-def]
    """x (N, H, W, C) float32 -> the interior of out (N, H + 2*pad, W + 2*pad, Cw), bits as
    :func:`_pack_rows`; the border of ``out`` is left as it is (zero: one-padding)."""
    n_, h, w, c_ = x.shape
    cw = out.shape[3]
    full = c_ // 64
    for n in range(n_):
        for y in range(h):
            for i in range(w):
                m = (n * h + y) * w + i
                for j in range(full):
                    out[n, y + pad, i + pad, j] = _cmp64(x, m * c_ + 64 * j, bias, 64 * j, 0, 0)
                if full < cw:
                    c0 = full * 64
                    wd = np.uint64(0)
                    for k in range(c_ - c0):
                        v = x[n, y, i, c0 + k] + bias[c0 + k]
                        wd |= np.uint64(v < 0) << np.uint64(k)
                    out[n, y + pad, i + pad, full] = wd


def _as_f32(x: object, name: str) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous:
        return x  # the common case, checked cheaply
    a = np.asarray(x)
    if a.dtype == np.bool_ or not (
        np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a float or integer array, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.integer) and a.size and np.abs(a).max() > 2**24:
        raise ValueError(f"{name}: integers beyond 2^24 are not exact in float32")
    return np.ascontiguousarray(a, dtype=np.float32)


_F32 = np.dtype(np.float32)
_ZEROS: dict[int, np.ndarray] = {}


def _zeros(c: int) -> np.ndarray:
    """A float32 (c,) zero bias, kept per channel count (read by the packers, never written)."""
    z = _ZEROS.get(c)
    if z is None:
        z = np.zeros(c, np.float32)
        if len(_ZEROS) < 64:
            _ZEROS[c] = z
    return z


def pack_sign(x: object, bias: object = None, *, channels_first: bool = False) -> np.ndarray:
    """Signs of ``x + bias`` packed along the last axis: bit = (x + bias[c]) < 0 in float32.

    x: (..., C) float (or integer) array; bias: (C,) or None. The sum is rounded to float32
    as torch does for ``sign(h + b)`` on float32 tensors, so the bits match training exactly.
    ``channels_first=True``: x is (N, C, H, W) (e.g. NCHW float input) and the result is the
    channels-last (N, H, W, ceil(C/64)).
    """
    if (
        channels_first
        and bias is None
        and type(x) is np.ndarray
        and x.dtype == _F32
        and x.ndim == 4
        and x.flags.c_contiguous
        and x.shape[1] >= 1
    ):  # the common case (a layer's float NCHW input), checked in few bytecodes
        n, c, h, w = x.shape
        cw = (c + 63) >> 6
        out = np.empty((n, h * w, cw), np.uint64)
        if out.size:
            _pack_nchw(x.reshape(n, c, h * w), _zeros(c), out)
        return out.reshape(n, h, w, cw)
    a = _as_f32(x, "x")
    if channels_first:
        if a.ndim != 4:
            raise ValueError(f"channels_first input must be (N, C, H, W), got shape {a.shape}")
        n, c, h, w = a.shape
    else:
        if a.ndim < 1:
            raise ValueError("x must have at least one dimension (the channels)")
        c = a.shape[-1]
    if c < 1:
        raise ValueError("x has no channels")
    b = _zeros(c) if bias is None else _vec(bias, c, "bias")
    if channels_first:
        out = np.empty((n, h * w, _words(c)), np.uint64)
        if out.size:
            _pack_nchw(a.reshape(n, c, h * w), b, out)
        return out.reshape(n, h, w, _words(c))
    rows = a.reshape(-1, c)
    out = np.empty((rows.shape[0], _words(c)), np.uint64)
    if out.size:
        _pack_rows(rows, b, out)
    return out.reshape(*a.shape[:-1], _words(c))


def pack_threshold(x: object, thr: object, flip: object) -> np.ndarray:
    """Per-channel threshold packing: bit = (x > thr[c]) if flip[c] else (x < thr[c]).

    So with ``flip[c]`` False the value is +1 iff x >= thr[c] (sign(BN(x)) with a positive BN
    scale), with ``flip[c]`` True it is +1 iff x <= thr[c] (a negative scale). Constant
    channels: thr = -inf, flip False -> always +1; thr = +inf, flip False -> always -1 (for
    finite x). NaN compares false (+1). x: (..., C) float32; thr: (C,) float32; flip: (C,) bool.
    """
    a = _as_f32(x, "x")
    if a.ndim < 1 or a.shape[-1] < 1:
        raise ValueError(f"x must be (..., C) with C >= 1, got shape {a.shape}")
    c = a.shape[-1]
    t = _vec(thr, c, "thr")
    f = _vec(flip, c, "flip", np.bool_)
    rows = a.reshape(-1, c)
    out = np.empty((rows.shape[0], _words(c)), np.uint64)
    if out.size:
        _pack_thr_rows(rows, t, f, _pack_bool_rows(f), out)
    return out.reshape(*a.shape[:-1], _words(c))


def unpack_bits(packed: np.ndarray, n: int) -> np.ndarray:
    """uint64 (..., Cw) -> int8 (..., n) in {-1, +1} (bit 1 -> -1)."""
    p = np.asarray(packed)
    if p.dtype != np.uint64 or p.ndim < 1:
        raise ValueError(f"packed must be uint64 (..., Cw), got {p.dtype} {p.shape}")
    if n < 0 or n > p.shape[-1] * 64:
        raise ValueError(f"cannot unpack {n} values from {p.shape[-1]} words")
    return (1 - 2 * _unpack_bool_rows(p, n).astype(np.int8)).astype(np.int8)
