"""Bit-serial GEMV/GEMM kernels of post-training PrecisionBatching (numpy + numba, no torch).

PrecisionBatching (Lam, Yedidia, Banbury, Reddi; arXiv 2003.00822) splits weights into
bit-layers accumulated with 1-bit operations while activations keep a higher precision; the
number of bit-layers is a run-time knob. Here (see docs/pbatch.md):

* **Weights**: per output row o a scale, and B = 8 signed planes on our odd grid,
  ``W[o, k] = sum_i 2^i s_i[o, k]``, ``s_i = +-1`` (packed: bit 1 = -1, along k into uint64
  words, tail bits 0). Keeping the top ``kb`` planes (drop d = B - kb) is the nearest point of
  the kb-bit odd grid with step ``2^d``: ``W_d = sum_{i >= d} 2^i s_i``. Each row stores one
  least-squares rescale per kb, ``alpha[kb, o] = <w, W_d> / <W_d, W_d>``, so a truncated row
  is as close to the float row as its integers allow.
* **Activations**: per input vector a dynamic scale, round to nearest (ties to even),
  saturate: unsigned ``0 .. 2^A - 1`` when the vector has no negative value, else signed
  two's complement ``-(2^(A-1) - 1) .. 2^(A-1) - 1``. Bit-planes ``b_j`` in {0, 1} (packed,
  bit 1 = 1) with place values ``p_j = 2^j`` (the top plane ``-2^(A-1)`` when signed).
* **The dot product**: with the activation plane's bits read as ``t_j = 1 - 2 b_j`` (+-1),
  the engine's binary GEMM gives ``D_ij = sum_k t_j s_i``, so
  ``sum_k b_j s_i = (R_i - D_ij) / 2`` (``R_i = sum_k s_i``, per row) and
  ``W_d . a = sum_{i >= d} 2^i sum_j p_j (R_i - D_ij) / 2``: all planes in one XOR-popcount
  GEMM (activation planes as rows, kept weight planes stacked as outputs), combined exactly
  in int64. Then ``y[n, o] = alpha[kb, o] * scale[n] * (W_d . a) + bias[o]`` in float64.
* **Or by lookup tables** (activations of at most 8 bits): ``_kernels/_lut_gemv.py`` splits
  each activation into 4-bit halves and looks up partial sums of 4 activations per 4 weight
  bits, so a weight plane costs 1-2 passes whatever the activation bits, against A binary
  GEMVs above. :func:`lut_pays` picks the cheaper of the two per call; both give the same
  integers.

Everything here is exact integer arithmetic up to that last line, and
:func:`reference_dot` (numpy int64 matmul of the same integers) checks it bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._kernels._lut_gemv import MAX_K as LUT_MAX_K
from ._kernels._lut_gemv import (
    LutGemvWeights,
    lut_gemv,
    lut_gemv_into,
    lut_gemv_supported,
    lut_tables_into,
)

__all__ = [
    "WEIGHT_PLANES",
    "QuantizedActs",
    "QuantizedWeights",
    "act_stats",
    "lut_linear",
    "lut_pays",
    "plane_dot",
    "reference_dot",
]

WEIGHT_PLANES = 8  # B: weights are stored at 8 bits; any 1..8 top planes run


@njit(nogil=True, cache=True, boundscheck=False)
def _combine(dots, n, d, rowsum, place, out):  # type: ignore[no-untyped-def]
    """dots int32 (A*n, kb*O): the binary GEMM of activation planes (bit 1 read as -1) with
    the kept weight planes; rowsum int64 (B, O) = sum_k s_i[o, k]; place int64 (A,).
    out int64 (n, O) = sum_{i >= d} 2^i sum_j place[j] (rowsum[i] - dots[j, i]) / 2, the
    exact integer dot products (each difference is 2 sum_k b_j s_i, even), computed as
    2^(i-1) (P rowsum[i] - sum_j place[j] dots[j, i]) with P = sum_j place[j]."""
    nb, no = rowsum.shape
    na = place.shape[0]
    ptot = place.sum()
    acc = np.empty(no, np.int64)
    for b in range(n):
        ob = out[b]
        ob[:] = 0
        for ii in range(nb - d):
            i = ii + d
            acc[:] = 0
            for j in range(na):
                p = place[j]
                row = dots[j * n + b, ii * no : (ii + 1) * no]
                for c in range(no):
                    acc[c] += p * np.int64(row[c])
            ri = rowsum[i]
            for c in range(no):
                ob[c] += ((ptot * ri[c] - acc[c]) >> np.int64(1)) << np.int64(i)


def _words(k: int) -> int:
    return (k + 63) // 64


def _pack_rows(bits: np.ndarray) -> np.ndarray:
    """bool (..., K) -> uint64 (..., ceil(K/64)), bit t of word w = element 64*w + t."""
    k = bits.shape[-1]
    kw = _words(k)
    full = np.zeros((*bits.shape[:-1], kw * 64), np.uint8)
    full[..., :k] = bits
    by = np.packbits(full, axis=-1, bitorder="little")
    return np.ascontiguousarray(by).view("<u8").reshape(*bits.shape[:-1], kw)


class QuantizedWeights:
    """A float (O, K) matrix as 8 odd-grid planes per row, with per-row rescales per kb.

    ``planes`` uint64 (8, O, Kw); ``ints`` int64 (O, K) the 8-bit odd integers;
    ``alpha`` float64 (9, O): ``alpha[kb]`` the least-squares scale of the top-kb view
    (``alpha[0]`` unused); ``rowsum`` int64 (8, O) = sum_k s_i[o, k]."""

    def __init__(self, w: np.ndarray) -> None:
        w = np.asarray(w, np.float64)
        if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
            raise ValueError(f"weights must be a non-empty (out, in) matrix, got {w.shape}")
        if not np.all(np.isfinite(w)):
            raise ValueError("weights contain NaN or inf")
        b = WEIGHT_PLANES
        top = float((1 << b) - 1)
        amax = np.abs(w).max(axis=1)
        amax[amax == 0] = 1.0
        best_q, best_err = None, None
        for c in np.linspace(1.0, 0.5, 11):  # the clip search: 11 ratios of max |w|
            s = c * amax / top  # (O,)
            v = np.clip(w / s[:, None], -top, top)
            q = 2.0 * np.floor(v / 2.0) + 1.0  # the nearest odd integer
            q = np.clip(q, -top, top)
            err = ((w - q * s[:, None]) ** 2).sum(axis=1)
            if best_q is None:
                best_q, best_err = q, err
            else:
                better = err < best_err
                best_q[better] = q[better]
                best_err = np.where(better, err, best_err)
        assert best_q is not None
        self.ints = best_q.astype(np.int64)
        self.out_features, self.in_features = w.shape
        code = (((1 << b) - 1) - self.ints) // 2  # bit i of the code: plane i is -1
        self.planes = np.stack([_pack_rows(((code >> i) & 1).astype(bool)) for i in range(b)])
        self.alpha = np.zeros((b + 1, w.shape[0]), np.float64)
        for kb in range(1, b + 1):
            wd = self.view(kb).astype(np.float64)
            den = (wd * wd).sum(axis=1)
            self.alpha[kb] = (w * wd).sum(axis=1) / den
        self.rowsum = np.asarray(w.shape[1] - 2 * np.bitwise_count(self.planes).sum(-1), np.int64)
        self._prepared: dict[int, object] = {}
        # the lookup-table layout is built now (conversion time), not on the first call
        lut_ok = lut_gemv_supported() and self.in_features <= LUT_MAX_K
        self._lut = LutGemvWeights(self.planes, self.in_features) if lut_ok else None

    def prepared(self, kb: int) -> object:
        """The top-kb planes stacked (plane-major, kb*O rows) in the binary GEMM kernel's
        layout (prepared on first use per kb, then cached)."""
        p = self._prepared.get(kb)
        if p is None:
            from ._kernels import prepare_dense_weights

            top = self.planes[WEIGHT_PLANES - kb :]
            stacked = np.ascontiguousarray(top.reshape(kb * self.out_features, -1))
            p = self._prepared[kb] = prepare_dense_weights(stacked, self.in_features)
        return p

    @property
    def has_lut(self) -> bool:
        """Whether the lookup-table layout exists (AVX2/AVX-512BW target, <= LUT_MAX_K inputs)."""
        return self._lut is not None

    def lut(self) -> LutGemvWeights:
        """The planes in the lookup-table GEMV's layout (where the target supports it)."""
        if self._lut is None:
            raise ValueError("the lookup-table GEMV needs an AVX2 or AVX-512BW compile target")
        return self._lut

    def view(self, kb: int) -> np.ndarray:
        """The integers of the top-kb planes, sum_{i >= 8-kb} 2^i s_i (int64 (O, K))."""
        d = WEIGHT_PLANES - kb
        return ((self.ints >> d) | 1) << d  # floor to the odd grid of step 2^d: exact


class QuantizedActs:
    """Dynamic per-vector quantization of float (N, K) activations to ``bits`` bits.

    ``ints`` int64 (N, K); ``scale`` float64 (N,); ``planes`` uint64 (bits, N, Kw) with bit 1
    where the code bit is 1 (packed on first use); ``place`` int64 (bits,): each plane's
    place value."""

    def __init__(
        self, x: np.ndarray, bits: int, amax: np.ndarray | None = None, signed: bool | None = None
    ) -> None:
        """``amax`` (N,): the value that maps to the largest code, per vector (default: each
        vector's max |x|); ``signed``: the grid (default: signed iff x has a negative)."""
        x = np.ascontiguousarray(x, np.float32)
        if signed is None or amax is None:
            _, neg, rmax = act_stats(x)
            signed = neg if signed is None else signed
            amax = rmax if amax is None else amax
        qmax = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        amax = np.asarray(amax, np.float64)
        scale = np.where(amax > 0, amax / qmax, 1.0)
        n, k = x.shape
        self.ints = np.empty((n, k), np.int64)
        _quantize(x, scale, qmax, signed, self.ints)
        self.scale = scale
        self.signed = signed
        self.bits = bits
        self.place = (1 << np.arange(bits, dtype=np.int64)).astype(np.int64)
        if signed:
            self.place[-1] = -(1 << (bits - 1))
        self._planes: np.ndarray | None = None

    @property
    def planes(self) -> np.ndarray:
        """uint64 (bits, N, Kw): bit k of plane j, row n = bit j of the code (two's complement
        when signed); packed on first use (the lookup-table path never needs them)."""
        if self._planes is None:
            n, k = self.ints.shape
            self._planes = np.zeros((self.bits, n, _words(k)), np.uint64)
            _pack_planes(self.ints, self._planes)
        return self._planes


def act_stats(x: np.ndarray) -> tuple[bool, bool, np.ndarray]:
    """One pass over float32 (N, K): (every value finite, any value negative, max |x| per
    row as float64)."""
    rmax = np.empty(x.shape[0], np.float64)
    finite, neg = _stats(np.ascontiguousarray(x, np.float32), rmax)
    return bool(finite), bool(neg), rmax


@njit(nogil=True, cache=True, boundscheck=False)
def _stats(x, rmax):  # type: ignore[no-untyped-def]
    finite = True
    neg = False
    for n in range(x.shape[0]):
        m = np.float32(0.0)
        for k in range(x.shape[1]):
            v = x[n, k]
            finite &= np.isfinite(v)
            neg |= v < 0
            m = max(m, abs(v))
        rmax[n] = m
    return finite, neg


@njit(nogil=True, cache=True, boundscheck=False)
def _quantize(x, scale, qmax, signed, ints):  # type: ignore[no-untyped-def]
    """ints[n, k] = clip(rint(x / scale[n]), lo, qmax) (float64 division, ties to even)."""
    n_, k_ = x.shape
    lo = -qmax if signed else 0
    for n in range(n_):
        s = scale[n]
        for k in range(k_):
            ints[n, k] = np.int64(min(max(np.rint(np.float64(x[n, k]) / s), lo), qmax))


@njit(nogil=True, cache=True, boundscheck=False)
def _pack_planes(ints, planes):  # type: ignore[no-untyped-def]
    """bit k of plane j, row n = bit j of ints[n, k] (two's complement)."""
    n_, k_ = ints.shape
    bits = planes.shape[0]
    mask = (np.int64(1) << np.int64(bits)) - 1
    for n in range(n_):
        for k in range(k_):
            code = ints[n, k] & mask
            word = k >> 6
            bit = np.uint64(1) << np.uint64(k & 63)
            for j in range(bits):
                if (code >> j) & 1:
                    planes[j, n, word] |= bit


def lut_pays(n: int, bits: int, signed: bool) -> bool:
    """Whether the lookup-table GEMV beats the bit-serial popcount GEMM for ``n`` vectors of
    ``bits``-bit activations.

    Per weight plane the popcount GEMM does one binary GEMV per activation bit (A of them);
    the lookup table does one pass per 4-bit half of the activations (2, or 1 when unsigned
    with at most 4 bits), each :data:`_LUT_COST` times a binary GEMV's cost: about 3.6 where
    VPOPCNTDQ makes popcounts cheap, 1.4 on AVX2 (measured on Zen 4, docs/pbatch.md)."""
    if not lut_gemv_supported() or bits > 8 or n < 1:
        return False
    parts = 2 if (signed or bits > 4) else 1
    return parts * _LUT_COST < bits


def lut_linear(
    x: np.ndarray, w: QuantizedWeights, kb: int, bits: int, bias: np.ndarray | None
) -> np.ndarray | None:
    """The whole linear layer on the lookup-table path in one compiled call (few Python steps
    matter at batch 1: with cold caches each costs memory misses): float32 (N, K) ->
    float32 (N, O) = float32(alpha_kb * scale * dot + bias), the same arithmetic as
    :func:`plane_dot` with the float64 epilogue of ``bit_serial_matmul``. Returns None when
    x holds NaN or inf (the caller names the layer)."""
    lw = w.lut()
    out = np.empty((x.shape[0], w.out_features), np.float32)
    b = _NO_BIAS if bias is None else bias
    ok = _lut_linear(
        x,
        bits,
        lw.wb,
        lw.nblk,
        lw.nsteps,
        lw.nplanes,
        kb,
        lw.pcw,
        w.alpha[kb],
        b,
        bias is not None,
        out,
    )
    return out if ok else None


_NO_BIAS = np.zeros(0, np.float64)


@njit(nogil=True, cache=True, boundscheck=False)
def _lut_linear(x, bits, wb, nblk, nsteps, nplanes, kb, pc, alpha, bias, has_bias, out):  # type: ignore[no-untyped-def]
    n, k = x.shape
    rmax = np.empty(n, np.float64)
    finite, signed = _stats(x, rmax)
    if not finite:
        return False
    qmax = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    scale = np.empty(n, np.float64)
    for i in range(n):
        scale[i] = rmax[i] / qmax if rmax[i] > 0 else 1.0
    ints = np.empty((n, k), np.int64)
    _quantize(x, scale, qmax, signed, ints)
    tab = np.empty((n, nsteps, 4, 16), np.uint8)
    lut_tables_into(ints, nsteps, signed, tab)
    qsum = np.empty(n, np.int64)
    for i in range(n):
        qsum[i] = ints[i].sum()
    dot = np.empty(out.shape, np.int64)
    high = signed or bits > 4
    lut_gemv_into(tab, wb, nblk, nsteps, nplanes - kb, nplanes, high, signed, qsum, pc, dot)
    for i in range(n):
        for o in range(out.shape[1]):
            y = alpha[o] * scale[i] * np.float64(dot[i, o])
            if has_bias:
                y = y + bias[o]
            out[i, o] = np.float32(y)
    return True


def _lut_cost() -> float:
    from ._paths import kernel_path

    return 3.6 if kernel_path() == "vpopcnt" else 1.4


_LUT_COST = _lut_cost()


def plane_dot(
    w: QuantizedWeights, kb: int, a: QuantizedActs, lut: bool | None = None
) -> np.ndarray:
    """int64 (N, O): the exact integer dot products of the top-kb weight view with the
    activation integers. ``lut`` None chooses by :func:`lut_pays`: the lookup-table GEMV
    (cost by weight bits), or one binary GEMM (XOR-popcount, the engine's kernel) of the
    activation planes against the kept weight planes, then :func:`_combine`."""
    from ._kernels import blinear

    n = a.ints.shape[0]
    if lut is None:
        lut = w.has_lut and lut_pays(n, a.bits, a.signed)
    if lut:
        return lut_gemv(w.lut(), kb, a.ints, a.bits, a.signed)
    dots = blinear(a.planes.reshape(-1, a.planes.shape[2]), w.prepared(kb))  # type: ignore[arg-type]
    out = np.empty((n, w.out_features), np.int64)
    _combine(dots, n, WEIGHT_PLANES - kb, w.rowsum, a.place, out)
    return out


def reference_dot(w: QuantizedWeights, kb: int, a: QuantizedActs) -> np.ndarray:
    """The same integers by a plain int64 matmul (the test oracle of :func:`plane_dot`)."""
    return a.ints @ w.view(kb).T
