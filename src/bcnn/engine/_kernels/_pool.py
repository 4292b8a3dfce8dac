"""Pooling: max-pool on packed bits (AND), average pools of float streams."""

from __future__ import annotations

import numpy as np
from numba import njit

from ._conv import _out_hw
from ._weights import _check_packed

# ----------------------------------------------------------------------------------- pooling


@njit(nogil=True, cache=True, boundscheck=False)
def _maxpool_bits(x, k, stride, pad, out):  # type: ignore[no-untyped-def]
    n_, h, w, cw = x.shape
    _, ho, wo, _ = out.shape
    for n in range(n_):
        for oy in range(ho):
            for ox in range(wo):
                for c in range(cw):
                    out[n, oy, ox, c] = ~np.uint64(0)
                for ky in range(k):
                    iy = oy * stride - pad + ky
                    if iy < 0 or iy >= h:
                        continue
                    for kx in range(k):
                        ix = ox * stride - pad + kx
                        if ix < 0 or ix >= w:
                            continue
                        for c in range(cw):
                            out[n, oy, ox, c] &= x[n, iy, ix, c]


def maxpool_packed(
    x: np.ndarray, kernel: int, stride: int | None = None, padding: int = 0
) -> np.ndarray:
    """Max-pool of ±1 values on packed bits: max = +1 unless all are -1, i.e. the AND of the
    bits (bit 0 = +1). Padding is ignored (torch pads max-pool with -inf). Floor mode.
    x (N, H, W, Cw) uint64 -> (N, Ho, Wo, Cw); tail bits stay 0."""
    x = _check_packed(x, 4, "x")
    s = kernel if stride is None else stride
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1:
        raise ValueError(f"kernel must be an int >= 1, got {kernel!r}")
    if padding > kernel // 2:
        raise ValueError(f"padding {padding} must be at most half the kernel {kernel}")
    ho, wo = _out_hw(x.shape[1], x.shape[2], kernel, kernel, s, padding)
    out = np.empty((x.shape[0], ho, wo, x.shape[3]), np.uint64)
    _maxpool_bits(x, kernel, s, padding, out)
    return out


@njit(inline="always", nogil=True, cache=True, boundscheck=False)
def _avgpool2(h, out):  # type: ignore[no-untyped-def]
    n_, hh, ww, c_ = h.shape
    _, ho, wo, _ = out.shape
    for n in range(n_):
        for oy in range(ho):
            y0 = 2 * oy
            ny = min(2, hh - y0)
            for ox in range(wo):
                x0 = 2 * ox
                nx = min(2, ww - x0)
                cnt = np.float32(ny * nx)
                for c in range(c_):
                    s = h[n, y0, x0, c]
                    if nx == 2:
                        s = s + h[n, y0, x0 + 1, c]
                    if ny == 2:
                        s = s + h[n, y0 + 1, x0, c]
                        if nx == 2:
                            s = s + h[n, y0 + 1, x0 + 1, c]
                    out[n, oy, ox, c] = s / cnt


def avgpool2x2(h: np.ndarray) -> np.ndarray:
    """2x2 stride-2 average pool of a float32 NHWC stream, partial windows at odd sizes averaging
    only their valid elements (torch AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False));
    float32 sums in window order, then one division. -> (N, ceil(H/2), ceil(W/2), C)."""
    if not isinstance(h, np.ndarray) or h.dtype != np.float32 or h.ndim != 4:
        raise ValueError("h must be a float32 (N, H, W, C) array")
    h = np.ascontiguousarray(h)
    n, hh, ww, c = h.shape
    if hh < 1 or ww < 1:
        raise ValueError(f"cannot pool an empty {hh}x{ww} stream")
    out = np.empty((n, -(-hh // 2), -(-ww // 2), c), np.float32)
    _avgpool2(h, out)
    return out


@njit(nogil=True, cache=True, boundscheck=False)
def _gap(h, out):  # type: ignore[no-untyped-def]
    n_, p_, c_ = h.shape
    acc = np.empty(c_, np.float64)
    for n in range(n_):
        for c in range(c_):
            acc[c] = 0.0
        for p in range(p_):
            row = h[n, p]
            for c in range(c_):
                acc[c] += np.float64(row[c])
        for c in range(c_):
            out[n, c] = np.float32(acc[c] / p_)


def global_avgpool(h: np.ndarray) -> np.ndarray:
    """Mean over H and W of a float32 NHWC stream -> float32 (N, C) (float64 sum, one
    rounding: within an ulp of torch's float32 mean)."""
    if not isinstance(h, np.ndarray) or h.dtype != np.float32 or h.ndim != 4:
        raise ValueError("h must be a float32 (N, H, W, C) array")
    if h.shape[1] < 1 or h.shape[2] < 1:
        raise ValueError("cannot pool an empty stream")
    n, hh, ww, c = h.shape
    out = np.empty((n, c), np.float32)
    _gap(np.ascontiguousarray(h).reshape(n, hh * ww, c), out)
    return out
