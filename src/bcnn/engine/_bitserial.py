"""Bit-serial k-bit layers (1 <= k <= 8) built from the 1-bit XOR-popcount kernels.

Integer grids (as :class:`bcnn.quant.UniformQuantizer`):

* signed (odd integers): ``X = sum_i 2^i s_i``, ``s_i in {-1, +1}``, ``|X| <= 2^k - 1``. The
  packed bit of plane i (bit 1 = -1) is bit i of the *code* ``((2^k - 1) - X) / 2``; the border
  X = 2^k - 1 has code 0: every plane +1, the binary one-padding.
* unsigned: ``X = sum_j 2^j b_j``, ``b_j in {0, 1}``; code = X, plane j holds
  ``t_j = 1 - 2 b_j`` (bit 1 = -1 = b_j). Then ``X = ((2^k - 1) - sum_j 2^j t_j) / 2`` and
  ``conv(X, W) = ((2^k - 1) * sum(W[o]) - sum_j 2^j conv(t_j, W)) / 2`` (sum over all taps:
  exact because the border X = 0 has every t_j = +1, the one-padding).

Weights are signed k-bit planes ``w_i``; ``conv(X, W) = sum_i sum_j 2^(i+j) conv(a_j, w_i)``
(a_j the activation planes). One ``bconv2d`` call computes every term: activation planes are
stacked along the batch axis (plane j of image n at j*N + n), weight planes along the output
channels (plane i of channel o at i*O + o); a small numba epilogue combines the int32 results
with their place values in int64 and rounds once to float32 (exact below 2^24, as torch's float
conv of the same integers).

Weight precision can be lowered at run time (:meth:`PackedModel.set_precision`): dropping the
d lowest weight planes keeps ``X' = sum_{i >= d} 2^i s_i`` (the dropped part lies in
[-(2^d - 1), 2^d - 1], mean 0 over a symmetric grid) with the same output scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

__all__ = [
    "BitSerialConv",
    "BitSerialLinear",
    "BitSerialStem",
    "codes_from_integers",
    "integers_from_planes",
    "planes_from_integers",
    "quantize_pack",
    "quantize_reference",
    "reference_conv",
]


# ------------------------------------------------------------------ plane decomposition
def codes_from_integers(x: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Grid integers -> plane codes (bit i of the code = packed bit of plane i)."""
    xi = np.asarray(x).astype(np.int64)
    hi = (1 << bits) - 1
    lo = -hi if signed else 0
    if np.any(xi < lo) or np.any(xi > hi) or (signed and np.any(xi % 2 == 0)):
        raise ValueError(
            f"values are not on the {bits}-bit {'signed' if signed else 'unsigned'} grid"
        )
    return (hi - xi) // 2 if signed else xi


def planes_from_integers(x: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Grid integers (...) -> bool planes (bits, ...), True where plane value is -1."""
    code = codes_from_integers(x, bits, signed)
    return np.stack([((code >> i) & 1).astype(bool) for i in range(bits)])


def integers_from_planes(neg: np.ndarray, signed: bool) -> np.ndarray:
    """Inverse of :func:`planes_from_integers` (int64)."""
    neg = np.asarray(neg, dtype=bool)
    s = 1 - 2 * neg.astype(np.int64)  # plane values in {-1, +1}
    place = (1 << np.arange(neg.shape[0], dtype=np.int64)).reshape(-1, *([1] * (neg.ndim - 1)))
    total = (place * s).sum(axis=0)
    if signed:
        return total
    return (((1 << neg.shape[0]) - 1) - total) // 2


def quantize_reference(
    x: np.ndarray, step: float, bits: int, signed: bool, bias: np.ndarray | None = None
) -> np.ndarray:
    """torch's k-bit quantizer in numpy float32: v = clamp((x + b) / step, lo, hi), then
    2*floor(v/2)+1 (signed) or floor(v + 1/2) (unsigned). Returns int64 grid values."""
    x = np.asarray(x, np.float32)
    if bias is not None:
        x = x + np.asarray(bias, np.float32)
    hi = np.float32((1 << bits) - 1)
    lo = -hi if signed else np.float32(0)
    v = np.minimum(np.maximum(x / np.float32(step), lo), hi)
    if signed:
        g = np.float32(2) * np.floor(v / np.float32(2)) + np.float32(1)
    else:
        g = np.floor(v + np.float32(0.5))
    return g.astype(np.int64)


def reference_conv(
    x: np.ndarray, w: np.ndarray, stride: int, pad: int, pad_value: int
) -> np.ndarray:
    """Plain integer conv: x int (N, H, W, C), w int (O, kh, kw, C) -> int64 (N, Ho, Wo, O),
    the border filled with ``pad_value``."""
    x = np.asarray(x, np.int64)
    w = np.asarray(w, np.int64)
    n, h, wd, _ = x.shape
    o, kh, kw, _ = w.shape
    xp = np.full((n, h + 2 * pad, wd + 2 * pad, x.shape[3]), pad_value, np.int64)
    xp[:, pad : pad + h, pad : pad + wd] = x
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, ho, wo, o), np.int64)
    for ky in range(kh):
        for kx in range(kw):
            patch = xp[
                :,
                ky : ky + stride * (ho - 1) + 1 : stride,
                kx : kx + stride * (wo - 1) + 1 : stride,
            ]
            out += patch @ w[:, ky, kx, :].T
    return out


# ------------------------------------------------------------------ numba kernels
@njit(nogil=True, cache=True, boundscheck=False)
def _qpack_cl(x, bias, step, lo, hi, signed, hint, bits, out):  # type: ignore[no-untyped-def]
    """x float32 (N, P, C) channels-last -> out uint64 (bits*N, P, Cw) in one pass. The plane
    code of v = (x + b) / step (float32): clamp to [lo, hi], round as torch (signed: the odd
    grid point g = 2*floor(v/2) + 1, code (hint - g) / 2; unsigned: floor(v + 1/2)), NaN ->
    code 0 (no grid point); bit j of the code is plane j's bit. The codes of each pixel's
    64-channel word (0 past C) go through a small buffer, then one word per plane."""
    n, p, c = x.shape
    cw = out.shape[2]
    codes = np.zeros(64, np.int32)
    hint = np.int32(hint)
    two = np.float32(2.0)
    one = np.float32(1.0)
    half = np.float32(0.5)
    for b in range(n):
        for i in range(p):
            for w in range(cw):
                c0 = 64 * w
                m = min(64, c - c0)
                if signed:  # branch-free (as _qpack_cf): the loop vectorizes
                    for k in range(m):
                        v = (x[b, i, c0 + k] + bias[c0 + k]) / step
                        v = lo if v < lo else v
                        v = hi if v > hi else v
                        code = (hint - np.int32(two * np.floor(v / two) + one)) >> 1
                        codes[k] = code if v == v else np.int32(0)
                else:
                    for k in range(m):
                        v = (x[b, i, c0 + k] + bias[c0 + k]) / step
                        v = lo if v < lo else v
                        v = hi if v > hi else v
                        code = np.int32(np.floor(v + half))
                        codes[k] = code if v == v else np.int32(0)
                for k in range(m, 64):
                    codes[k] = 0
                for j in range(bits):
                    acc = np.uint64(0)
                    for k in range(64):
                        acc |= np.uint64((codes[k] >> j) & 1) << np.uint64(k)
                    out[j * n + b, i, w] = acc


@njit(nogil=True, cache=True)
def _qpack_cf(x, bias, step, lo, hi, signed, hint, bits, tmp, out):  # type: ignore[no-untyped-def]
    """x float32 (N, C, P) channels-first -> out uint64 (bits*N, P, Cw), through tmp uint64
    (bits, Cw, P): the inner loop runs over contiguous pixels (vectorized) for each channel."""
    n, c, p = x.shape
    cw = tmp.shape[1]
    row = np.empty(p, np.int32)
    hint = np.int32(hint)
    two = np.float32(2.0)
    one = np.float32(1.0)
    half = np.float32(0.5)
    for b in range(n):
        tmp[:] = 0
        for ch in range(c):
            bc = bias[ch]
            w = ch >> 6
            sh = np.uint64(ch & 63)
            if signed:
                for i in range(p):
                    v = (x[b, ch, i] + bc) / step
                    v = lo if v < lo else v
                    v = hi if v > hi else v
                    g = two * np.floor(v / two) + one
                    code = (hint - np.int32(g)) >> 1
                    row[i] = code if v == v else np.int32(0)
            else:
                for i in range(p):
                    v = (x[b, ch, i] + bc) / step
                    v = lo if v < lo else v
                    v = hi if v > hi else v
                    code = np.int32(np.floor(v + half))
                    row[i] = code if v == v else np.int32(0)
            for j in range(bits):
                tj = tmp[j, w]
                for i in range(p):
                    tj[i] |= np.uint64((row[i] >> j) & 1) << sh
        for j in range(bits):
            for i in range(p):
                for w in range(cw):
                    out[j * n + b, i, w] = tmp[j, w, i]


@njit(nogil=True, cache=True, boundscheck=False)
def _pack_sign_step(x, bias, step, out, pad):  # type: ignore[no-untyped-def]
    """The 1-bit signed codes of x float32 (N, H, W, C), packed into the interior of out
    uint64 (N, H + 2*pad, W + 2*pad, Cw) (border kept): bit = (x + b) / step < 0 in float32,
    the 1-bit grid point -1 of :func:`_qpack_cl` (v >= 0, -0.0 and NaN included, give +1)."""
    n_, h, w, c_ = x.shape
    cw = out.shape[3]
    for n in range(n_):
        for y in range(h):
            for i in range(w):
                for j in range(cw):
                    c0 = 64 * j
                    wd = np.uint64(0)
                    for k in range(min(64, c_ - c0)):
                        v = (x[n, y, i, c0 + k] + bias[c0 + k]) / step
                        wd |= np.uint64(v < 0) << np.uint64(k)
                    out[n, y + pad, i + pad, j] = wd


@njit(nogil=True, cache=True)
def _combine(
    r, nact, jstep, n, nw, o, shift0, signed, amax, wsum, affine, scale, bias, ones, ntaps, out
):  # type: ignore[no-untyped-def]
    """r int32 (nact*n, P, nw*o [+ 1]) -> out float32 (n, P, o):
    sum_j sum_i 2^(i + jstep*j + shift0) r[j*n + b, p, i*o + c] (``jstep`` 2: each r row
    holds a pair of activation planes, conv(a_2j) + 2 conv(a_2j+1)); unsigned:
    (amax*wsum[c] - s) / 2;
    with ``affine``: then float32 ``y * scale[c] + bias[c]`` (two roundings).
    Zero-grid weights W = (X - 1) / 2 (``ones`` >= 0: r's channel of the all-(+1) row, whose
    ``ntaps`` taps are summed the same way): (conv(A, X) - conv(A, 1)) / 2, exact (even)."""
    npx = r.shape[1]
    tmp = np.zeros(o, np.int64)
    zero = ones >= 0
    for b in range(n):
        for q in range(npx):
            for c in range(o):
                tmp[c] = 0
            corr = np.int64(0)
            for j in range(nact):
                row = r[j * n + b, q]
                if zero:
                    corr += np.int64(row[ones]) << (jstep * j)
                for i in range(nw):
                    sh = i + jstep * j + shift0
                    base = i * o
                    for c in range(o):
                        tmp[c] += np.int64(row[base + c]) << sh
            if not signed:
                corr = (amax * ntaps - corr) >> 1
                for c in range(o):
                    tmp[c] = (amax * wsum[c] - tmp[c]) >> 1
            if zero:
                for c in range(o):
                    tmp[c] = (tmp[c] - corr) >> 1
            dst = out[b, q]
            if affine:
                for c in range(o):
                    dst[c] = np.float32(tmp[c]) * scale[c] + bias[c]
            else:
                for c in range(o):
                    dst[c] = np.float32(tmp[c])


_E32 = np.zeros(0, np.float32)


def _words(n: int) -> int:
    return max(1, -(-n // 64))


def quantize_pack(
    x: np.ndarray,
    step: float,
    bits: int,
    signed: bool,
    bias: np.ndarray | None = None,
    *,
    channels_first: bool = False,
) -> np.ndarray:
    """float32 (N, H, W, C) (``channels_first``: (N, C, H, W)) -> packed activation planes
    uint64 (bits*N, H, W, ceil(C/64)), plane j of image n at j*N + n; the quantization is
    torch's float32 arithmetic (see :func:`quantize_reference`)."""
    if x.dtype != np.float32 or x.ndim != 4:
        raise ValueError(f"expected float32 (N, H, W, C), got {x.dtype} {x.shape}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    x = np.ascontiguousarray(x)
    if channels_first:
        n, c, h, w = x.shape
    else:
        n, h, w, c = x.shape
    b = np.zeros(c, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
    if b.shape != (c,):
        raise ValueError(f"bias must have shape ({c},), got {b.shape}")
    hi = (1 << bits) - 1
    cw = _words(c)
    args = (b, np.float32(step), np.float32(-hi if signed else 0), np.float32(hi), bool(signed))
    out = np.empty((bits * n, h * w, cw), np.uint64)
    if channels_first:
        tmp = np.empty((bits, cw, h * w), np.uint64)
        _qpack_cf(x.reshape(n, c, h * w), *args, np.int64(hi), bits, tmp, out)
    else:
        _qpack_cl(x.reshape(n, h * w, c), *args, np.int64(hi), bits, out)
    return out.reshape(bits * n, h, w, cw)


# ------------------------------------------------------------------ layers
def _plane_convs(xp: np.ndarray, n: int, pw: Any, stride: int, pad: int) -> tuple[np.ndarray, int]:
    """(r int32, jstep) for :meth:`_Planes.combine`: the binary conv of every activation plane
    of ``xp`` (planes*n, H, W, Cw) with the prepared weight planes ``pw`` (jstep 1), or on the
    lut path's nibble weights, of every pair of planes at once (one table lookup for two
    planes, :func:`~._kernels.bconv2d_pairs`; jstep 2, an odd last plane alone)."""
    from . import _kernels as K

    nact = xp.shape[0] // n
    if nact < 2 or pw.blocks.dtype != np.uint8:
        return K.bconv2d(xp, pw, stride, pad), 1
    even = nact - nact % 2
    r = K.bconv2d_pairs(K.pair_bytes(xp[: even * n], n), pw, stride, pad)
    if even < nact:  # the last plane's place 2^(nact - 1) = 2^(2 * npairs): jstep 2 still
        r = np.concatenate([r, K.bconv2d(xp[even * n :], pw, stride, pad)])
    return r, 2


class _Planes:
    """Weight planes (Wb, O, ...) uint64 with the prepared layout cached per dropped count.
    ``zero``: zero-grid weights W = (X - 1) / 2 (the planes hold X; see ``_combine``):
    one all-(+1) row rides after the planes, and the run-time plane knob does not apply."""

    def __init__(
        self,
        planes: np.ndarray,
        nbits_per_row: int,
        act_bits: int,
        act_signed: bool,
        zero: bool = False,
    ):
        self.planes = np.ascontiguousarray(planes, np.uint64)
        self.bits = int(planes.shape[0])
        self.out = int(planes.shape[1])
        self.nbits = nbits_per_row  # bits per output channel row (taps * channels)
        self.act_bits = act_bits
        self.act_signed = act_signed
        self.zero = bool(zero)
        self._cache: dict[int, tuple[Any, np.ndarray]] = {}

    def drop_for(self, weight_bits: int | None) -> int:
        if self.zero or weight_bits is None or weight_bits >= self.bits:
            return 0
        return self.bits - weight_bits

    def _wsum(self, d: int) -> np.ndarray:
        """sum over taps of the kept weight planes' integers, per output channel (int64)."""
        rows = self.planes[d:].reshape(self.bits - d, self.out, -1)
        pc = np.bitwise_count(rows).sum(axis=-1, dtype=np.int64)  # (Wk, O)
        s = self.nbits - 2 * pc
        place = (1 << np.arange(d, self.bits, dtype=np.int64))[:, None]
        return np.ascontiguousarray((place * s).sum(axis=0), np.int64)

    def get(self, d: int, prepare: Any) -> tuple[Any, np.ndarray]:
        hit = self._cache.get(d)
        if hit is None:
            kept = self.planes[d:]
            stacked = kept.reshape((self.bits - d) * self.out, *kept.shape[2:])
            if self.zero:  # the all-(+1) row: packed bits 0
                stacked = np.concatenate([stacked, np.zeros_like(stacked[:1])])
            hit = (prepare(stacked), self._wsum(d))
            self._cache[d] = hit
        return hit

    def combine(
        self,
        r: np.ndarray,
        n: int,
        d: int,
        wsum: np.ndarray,
        affine: tuple[np.ndarray, np.ndarray] | None = None,
        act_bits: int | None = None,
        jstep: int = 1,
    ) -> np.ndarray:
        """The float32 conv from ``r``, the int32 results of every (activation plane, weight
        plane), or with ``jstep`` 2 of every (activation plane pair, weight plane)."""
        out = np.empty((n, r.shape[1], r.shape[2], self.out), np.float32)
        ab = self.act_bits if act_bits is None else act_bits
        amax = np.int64((1 << ab) - 1)
        sc, bi = affine if affine is not None else (_E32, _E32)
        m, ho, wo, cc = r.shape
        _combine(
            r.reshape(m, ho * wo, cc), m // n, jstep, n, self.bits - d, self.out, d,
            self.act_signed, amax, wsum, affine is not None, sc, bi,
            np.int64(self.bits * self.out if self.zero else -1), np.int64(self.nbits),
            out.reshape(n, ho * wo, self.out),
        )  # fmt: skip
        return out


class BitSerialConv:
    """k-bit conv: ``planes`` uint64 (Wb, O, kh, kw, ceil(Cin/64)) signed weight planes;
    call with a float32 NHWC input (quantized here) -> float32 (N, Ho, Wo, O) = conv(X, W)."""

    def __init__(
        self,
        planes: np.ndarray,
        in_channels: int,
        act_bits: int,
        act_signed: bool,
        stride: int = 1,
        padding: int = 0,
        zero: bool = False,
    ) -> None:
        _, _, kh, kw, _ = planes.shape
        self.cin = int(in_channels)
        self.w = _Planes(planes, kh * kw * self.cin, act_bits, act_signed, zero)
        self.stride, self.padding = int(stride), int(padding)

    def conv_planes(
        self,
        xp: np.ndarray,
        n: int,
        weight_bits: int | None = None,
        affine: tuple[np.ndarray, np.ndarray] | None = None,
        act_bits: int | None = None,
    ) -> np.ndarray:
        """Packed activation planes (act_bits*N, H, W, Cw) -> float32 conv(X, W) (then
        ``* scale + bias`` per channel with ``affine=(scale, bias)``); ``act_bits``: the
        planes' count when it is not the layer's own (any-precision layers)."""
        from . import _kernels as K

        d = self.w.drop_for(weight_bits)
        pw, wsum = self.w.get(d, lambda a: K.prepare_conv_weights(a, self.cin))
        r, jstep = _plane_convs(xp, n, pw, self.stride, self.padding)
        return self.w.combine(r, n, d, wsum, affine, act_bits, jstep)

    def __call__(
        self,
        x: np.ndarray,
        step: float,
        bias: np.ndarray | None = None,
        weight_bits: int | None = None,
        affine: tuple[np.ndarray, np.ndarray] | None = None,
        act_bits: int | None = None,
    ) -> np.ndarray:
        ab = self.w.act_bits if act_bits is None else act_bits
        xp = quantize_pack(x, step, ab, self.w.act_signed, bias)
        return self.conv_planes(xp, x.shape[0], weight_bits, affine, ab)


class BitSerialLinear:
    """k-bit dense layer: ``planes`` uint64 (Wb, O, ceil(K/64)); float32 (N, K) in."""

    def __init__(
        self,
        planes: np.ndarray,
        in_features: int,
        act_bits: int,
        act_signed: bool,
        zero: bool = False,
    ):
        self.k = int(in_features)
        self.w = _Planes(planes, self.k, act_bits, act_signed, zero)

    def __call__(
        self,
        x: np.ndarray,
        step: float,
        bias: np.ndarray | None = None,
        weight_bits: int | None = None,
        act_bits: int | None = None,
    ) -> np.ndarray:
        from . import _kernels as K

        n = x.shape[0]
        ab = self.w.act_bits if act_bits is None else act_bits
        xp = quantize_pack(x.reshape(n, 1, 1, -1), step, ab, self.w.act_signed, bias)
        d = self.w.drop_for(weight_bits)
        pw, wsum = self.w.get(d, lambda a: K.prepare_dense_weights(a, self.k))
        r, jstep = _plane_convs(xp, n, pw, 1, 0)  # dense weights: a 1x1 conv of 1x1 images
        out = self.w.combine(r, n, d, wsum, None, ab, jstep)
        return out.reshape(n, -1)


class BitSerialStem:
    """Bit-plane stem with k-bit weights: ``planes`` uint64 (Wb, O, kh, kw, ceil(C*P/64)) over
    plane-channels c*P + p; uint8 NCHW in -> float32 sum_i 2^i stem_conv(x, w_i)."""

    def __init__(
        self,
        planes: np.ndarray,
        image_channels: int,
        pixel_planes: int,
        stride: int,
        padding: int,
        zero: bool = False,
    ) -> None:
        _, _, kh, kw, _ = planes.shape
        self.c, self.p = int(image_channels), int(pixel_planes)
        self.w = _Planes(planes, kh * kw * self.c * self.p, 1, True, zero)
        self.stride, self.padding = int(stride), int(padding)

    def __call__(self, x: np.ndarray, weight_bits: int | None = None) -> np.ndarray:
        from . import _kernels as K

        d = self.w.drop_for(weight_bits)
        pw, wsum = self.w.get(d, lambda a: K.prepare_stem_weights(a, self.c, self.p))
        r = K.stem_conv(x, pw, self.stride, self.padding)
        return self.w.combine(r, x.shape[0], d, wsum)
