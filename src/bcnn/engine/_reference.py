"""Plain numpy reference of every kernel in :mod:`bcnn.engine._kernels` (slow, obvious, exact).

Same conventions and signatures (canonical packed layouts instead of prepared weights):
bit 1 = -1, bit i of word j = element 64*j + i, tail bits 0, one-padding, dot = n - 2*popcount.
Float steps are float32 operations in the same order as the kernels (separate multiply and
add), so results are equal, not just close.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "avgpool2x2",
    "bconv2d",
    "bconv2d_affine",
    "bconv2d_threshold",
    "bgemm",
    "blinear",
    "blinear_affine",
    "global_avgpool",
    "maxpool_packed",
    "pack_bits",
    "pack_sign",
    "pack_threshold",
    "stem_conv",
    "stem_conv_affine",
    "stem_planes",
    "unpack_bits",
]


def pack_bits(neg: np.ndarray) -> np.ndarray:
    """bool (..., n), True = -1 -> uint64 (..., ceil(n/64)); bit i of word j = element 64j+i."""
    neg = np.asarray(neg, dtype=bool)
    n = neg.shape[-1]
    words = max(1, -(-n // 64))
    out = np.zeros((*neg.shape[:-1], words), np.uint64)
    for i in range(n):
        out[..., i // 64] |= neg[..., i].astype(np.uint64) << np.uint64(i % 64)
    return out


def unpack_bits(packed: np.ndarray, n: int) -> np.ndarray:
    """uint64 (..., Cw) -> int8 (..., n) in {-1, +1}."""
    out = np.empty((*packed.shape[:-1], n), np.int8)
    for i in range(n):
        bit = (packed[..., i // 64] >> np.uint64(i % 64)) & np.uint64(1)
        out[..., i] = 1 - 2 * bit.astype(np.int8)
    return out


def pack_sign(x: np.ndarray, bias: np.ndarray | None = None, channels_first: bool = False):
    x = np.asarray(x, np.float32)
    if channels_first:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    if bias is not None:
        x = x + np.asarray(bias, np.float32)
    return pack_bits(x < 0)


def pack_threshold(x: np.ndarray, thr: np.ndarray, flip: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    thr = np.asarray(thr, np.float32)
    flip = np.asarray(flip, bool)
    return pack_bits(np.where(flip, x > thr, x < thr))


def _dots(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """a (M, W), b (O, W) packed -> int64 (M, O) = n - 2*popcount(a XOR b)."""
    pop = np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(-1, dtype=np.int64)
    return n - 2 * pop


def bgemm(a: np.ndarray, b: np.ndarray, k: int | None = None) -> np.ndarray:
    kk = 64 * a.shape[1] if k is None else k
    return _dots(a, b, kk).astype(np.int32)


def blinear(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    return _dots(x, w, k).astype(np.int32)


def _fma32(x, a, b):  # type: ignore[no-untyped-def]
    """float32 fma with one rounding, via x87 extended precision: the product of two float32
    values is exact in its 64-bit significand; the sum is rounded there, then to float32."""
    ld = np.longdouble
    return (
        x.astype(ld) * np.asarray(a, np.float32).astype(ld) + np.asarray(b, np.float32).astype(ld)
    ).astype(np.float32)


def _affine(acc, scale, bias, rprelu=None, fma=False):  # type: ignore[no-untyped-def]
    if fma:
        y = _fma32(acc.astype(np.float32), scale, bias)
    else:
        y = acc.astype(np.float32) * np.asarray(scale, np.float32)
        y = y + np.asarray(bias, np.float32)
    if rprelu is not None:
        g, s, z = (np.asarray(v, np.float32) for v in rprelu)
        y = y - g
        y = np.where(y < 0, y * s, y).astype(np.float32)
        y = y + z
    return y


def blinear_affine(x, w, k, scale, bias, fma=False):  # type: ignore[no-untyped-def]
    return _affine(_dots(x, w, k), scale, bias, fma=fma)


def _im2col(x: np.ndarray, kh: int, kw: int, stride: int, pad: int) -> np.ndarray:
    """packed (N, H, W, Cw) -> (N, Ho, Wo, KH*KW*Cw), padded taps 0 (= +1)."""
    n, h, w, cw = x.shape
    xp = np.zeros((n, h + 2 * pad, w + 2 * pad, cw), np.uint64)
    xp[:, pad : pad + h, pad : pad + w] = x
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (w + 2 * pad - kw) // stride + 1
    cols = [
        xp[:, ky : ky + stride * (ho - 1) + 1 : stride, kx : kx + stride * (wo - 1) + 1 : stride]
        for ky in range(kh)
        for kx in range(kw)
    ]
    return np.concatenate(cols, axis=-1)


def bconv2d(x: np.ndarray, w: np.ndarray, cin: int, stride: int = 1, padding: int = 0):
    """x (N, H, W, Cw), canonical w (O, KH, KW, Cw) -> int32 (N, Ho, Wo, O)."""
    o, kh, kw, _ = w.shape
    cols = _im2col(x, kh, kw, stride, padding)
    n, ho, wo, wk = cols.shape
    d = _dots(cols.reshape(-1, wk), w.reshape(o, -1), kh * kw * cin)
    return d.reshape(n, ho, wo, o).astype(np.int32)


def bconv2d_affine(  # type: ignore[no-untyped-def]
    x, w, cin, scale, bias, stride=1, padding=0, rprelu=None, residual=None, fma=False
):
    y = _affine(bconv2d(x, w, cin, stride, padding), scale, bias, rprelu, fma)
    if residual is not None:
        reps = y.shape[-1] // residual.shape[-1]
        y = np.tile(residual, (1, 1, 1, reps)) + y
    return y.astype(np.float32)


def bconv2d_threshold(x, w, cin, thr, flip, stride=1, padding=0):  # type: ignore[no-untyped-def]
    acc = bconv2d(x, w, cin, stride, padding).astype(np.float32)
    return pack_threshold(acc, thr, flip)


def stem_planes(x: np.ndarray, planes: int, encoding: str, thresholds=None) -> np.ndarray:  # type: ignore[no-untyped-def]
    """uint8 (N, C, H, W) -> bool (N, H, W, C*P), True where the plane is -1 (bit 1); channel
    c*P + p = plane p of channel c (bcnn.nn encoders' order)."""
    x = np.asarray(x).astype(np.int64)
    if encoding == "bitplane":
        b = [(x >> (8 - planes + p)) & 1 for p in range(planes)]
    else:
        b = [np.asarray(x >= int(t)) for t in thresholds]
    bits = np.stack([np.asarray(v, bool) for v in b], axis=2)  # (N, C, P, H, W)
    n, c, p, h, w = bits.shape
    return bits.reshape(n, c * p, h, w).transpose(0, 2, 3, 1)


def stem_conv(  # type: ignore[no-untyped-def]
    x, w, planes, encoding="bitplane", thresholds=None, stride=1, padding=0
):
    """Canonical w (O, KH, KW, Cw) over C*P planes -> int64 S (N, Ho, Wo, O): per plane a
    one-padded binary conv, weighted 2^p (bitplane) or 1 (thermometer), summed."""
    c = x.shape[1]
    neg = stem_planes(x, planes, encoding, thresholds)
    wbits = unpack_bits(w, c * planes) < 0  # (O, KH, KW, C*P)
    total = None
    for p in range(planes):
        xp = pack_bits(neg[..., p::planes])
        wp = pack_bits(wbits[..., p::planes])
        d = bconv2d(xp, wp, c, stride, padding).astype(np.int64)
        d = d << p if encoding == "bitplane" else d
        total = d if total is None else total + d
    assert total is not None
    return total.astype(np.int32)


def maxpool_packed(x: np.ndarray, kernel: int, stride: int | None = None, padding: int = 0):
    s = kernel if stride is None else stride
    n, h, w, cw = x.shape
    ones = ~np.zeros((), np.uint64)
    xp = np.full((n, h + 2 * padding, w + 2 * padding, cw), ones, np.uint64)
    xp[:, padding : padding + h, padding : padding + w] = x
    ho = (h + 2 * padding - kernel) // s + 1
    wo = (w + 2 * padding - kernel) // s + 1
    out = np.full((n, ho, wo, cw), ones, np.uint64)
    for ky in range(kernel):
        for kx in range(kernel):
            out &= xp[:, ky : ky + s * (ho - 1) + 1 : s, kx : kx + s * (wo - 1) + 1 : s]
    return out


def avgpool2x2(h: np.ndarray) -> np.ndarray:
    n, hh, ww, c = h.shape
    out = np.empty((n, -(-hh // 2), -(-ww // 2), c), np.float32)
    for oy in range(out.shape[1]):
        for ox in range(out.shape[2]):
            win = [
                h[:, y, x]
                for y in range(2 * oy, min(2 * oy + 2, hh))
                for x in range(2 * ox, min(2 * ox + 2, ww))
            ]
            s = win[0]
            for v in win[1:]:
                s = s + v
            out[:, oy, ox] = s / np.float32(len(win))
    return out


def global_avgpool(h: np.ndarray) -> np.ndarray:
    return h.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)


def stem_conv_affine(  # type: ignore[no-untyped-def]
    x, w, planes, scale, bias, encoding="bitplane", thresholds=None, stride=1, padding=0,
    rprelu=None, fma=False,
):  # fmt: skip
    s = stem_conv(x, w, planes, encoding, thresholds, stride, padding)
    return _affine(s, scale, bias, rprelu, fma)
