"""Weight packing and the prepared (interleaved) weight layouts of the kernels."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._llvm import LANES

# --------------------------------------------------------------------------- prepared weights


class PreparedWeights(NamedTuple):
    """Binary weights in the kernels' layout (build with :func:`prepare_conv_weights` or
    :func:`prepare_dense_weights`).

    ``blocks[j, k, l]`` is word ``k`` of the canonical packed weights of output channel
    ``32*j + l`` (``k`` runs over (ky, kx, channel word): the canonical (O, KH, KW, Cw) layout
    flattened); padded channels (``32*j + l >= out_channels``) are 0. On the ``lut`` kernel
    path (reductions of ``_LUT_MIN_WORDS`` words or more: all by default) the words are split
    into nibbles, one per byte: uint8 ``blocks[j, 16*k + q, l]`` = bits 4q..4q+3 of that word
    (``_lut_conv.lut_blocks``); the kernels dispatch on the dtype.
    """

    blocks: np.ndarray  # uint64 (ceil(O/32), KH*KW*Cw, 32); lut: uint8 (.., 16*KH*KW*Cw, 32)
    out_channels: int
    in_channels: int  # Cin of a conv, K of a dense layer (bits per tap)
    kh: int
    kw: int

    @property
    def words(self) -> int:
        """Words per tap: ceil(in_channels / 64)."""
        return _words(self.in_channels)


class PreparedStem(NamedTuple):
    """First-layer weights and encoder in the kernels' layout (:func:`prepare_stem_weights`).

    Planes are split into groups of equal place value; group g covers ``group_planes``
    planes per image channel. Per output pixel and group the patch is packed densely:
    bit ``(ky*KW + kx) * C*group_planes + c*group_planes + p`` (p: plane within the group).
    """

    blocks: np.ndarray  # uint64 (ceil(O/32), G*Wg, 32), groups word-major: word g*Wg + k
    lut: np.ndarray  # uint64 (G, 256): plane bits of one channel's pixel value, per group
    lutc: np.ndarray  # uint64 (C, 256, G): lut[g, v] << (c * group_planes)
    plane_bits: np.ndarray  # int64 (G,): bit-planes: the pixel bit of group g; thermometer: ()
    shifts: np.ndarray  # int64 (G*Wg,): place value 2^shift of each word's group
    const: int  # sum_g 2^shift_g * (bits per patch of group g)
    out_channels: int
    image_channels: int
    group_planes: int
    groups: int
    group_words: int  # Wg
    kh: int
    kw: int
    # the lut path's fast-stem weights (``_lut_stem.stem_nibbles``), uint8 (nob, G*nq, 32);
    # (0, 0, 32) elsewhere
    nibbles: np.ndarray = np.zeros((0, 0, 32), np.uint8)


def _words(n: int) -> int:
    return max(1, -(-int(n) // 64))


def _check_packed(x: np.ndarray, ndim: int, name: str) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype == np.uint64 and x.ndim == ndim and x.flags.c_contiguous:
        return x  # the common case, checked cheaply
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.uint64:
        raise ValueError(f"{name} must be packed bits (uint64), got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    return np.ascontiguousarray(x)


def _vec(v: object, n: int, name: str, dtype: type = np.float32) -> np.ndarray:
    if type(v) is np.ndarray and v.dtype == dtype and v.shape == (n,) and v.flags.c_contiguous:
        return v  # the common case, checked cheaply
    a: np.ndarray = np.ascontiguousarray(np.asarray(v, dtype=dtype))
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
    return a


def _pack_bool_rows(neg: np.ndarray) -> np.ndarray:
    """bool (..., n), True = -1 -> uint64 (..., ceil(n/64)), little-endian bit order."""
    n = neg.shape[-1]
    words = _words(n)
    pad = words * 64 - n
    if pad:
        neg = np.concatenate([neg, np.zeros((*neg.shape[:-1], pad), dtype=bool)], axis=-1)
    by = np.packbits(neg, axis=-1, bitorder="little")
    return np.ascontiguousarray(by).view("<u8").astype(np.uint64).reshape(*neg.shape[:-1], words)


def _unpack_bool_rows(packed: np.ndarray, n: int) -> np.ndarray:
    by = np.ascontiguousarray(packed.astype("<u8")).view(np.uint8)
    bits = np.unpackbits(by.reshape(*packed.shape[:-1], -1), axis=-1, bitorder="little")
    return bits[..., :n].astype(bool)


def pack_weights(w: object) -> np.ndarray:
    """Signs of weights -> canonical packed layout (sign(0) = +1, bit 1 = -1).

    (O, Cin, KH, KW) (torch conv layout) -> uint64 (O, KH, KW, ceil(Cin/64));
    (O, K) (torch linear layout) -> uint64 (O, ceil(K/64)). Accepts numpy arrays or torch
    tensors (anything ``np.asarray`` takes).
    """
    a = np.asarray(w)
    if a.ndim == 4:
        return _pack_bool_rows(np.transpose(a, (0, 2, 3, 1)) < 0)
    if a.ndim == 2:
        return _pack_bool_rows(a < 0)
    raise ValueError(f"weights must be (O, Cin, KH, KW) or (O, K), got shape {a.shape}")


def _aligned(a: np.ndarray, align: int = 64) -> np.ndarray:
    """A C-contiguous copy of ``a`` whose data starts at a multiple of ``align`` bytes (a view
    into a slightly larger byte buffer). numpy aligns large arrays to 16 bytes only, so a
    prepared weight block's 32-byte (AVX2) or 64-byte (AVX-512) vector loads could straddle
    two cache lines, each such load costing two: 4-5% of the lut conv3x3 on a Zen 3."""
    a = np.ascontiguousarray(a)
    buf = np.empty(a.nbytes + align, np.uint8)
    start = -buf.ctypes.data % align
    out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _blocks_from_rows(rows: np.ndarray) -> np.ndarray:
    """uint64 (O, Wk) -> (ceil(O/32), Wk, 32), zero-padded channels."""
    o, wk = rows.shape
    nob = -(-o // LANES)
    padded = np.zeros((nob * LANES, wk), np.uint64)
    padded[:o] = rows
    return np.ascontiguousarray(padded.reshape(nob, LANES, wk).transpose(0, 2, 1))


# On the lut path, layers whose reduction is shorter than this many words would keep the
# popcount layout. 0: every layer takes nibbles. A 1x1 conv over 64 channels alone ran
# 0.7-0.9x on tables, but a whole bcnn_cifar10 ran 1.02x with nibbles everywhere (against
# words below 8), and one layout compiles one conv specialisation instead of two (about 3 s
# of an empty-cache start) and lets the whole-plan runner take the model (docs/kernels.md).
_LUT_MIN_WORDS = 0


def _layout_path(path: str | None, nwords: int = _LUT_MIN_WORDS) -> str:
    """The kernel path whose weight layout to prepare: ``path``, checked, or (None) the active
    :func:`kernel_path`, where the lut path keeps words for reductions < _LUT_MIN_WORDS."""
    from .._paths import PATHS, kernel_path, target_features

    if path is None:
        path = kernel_path()
        if path == "lut" and nwords < _LUT_MIN_WORDS:
            path = "generic"
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r} (use one of {PATHS})")
    if path == "lut" and "avx2" not in target_features():
        raise ValueError("the lut kernel path needs a compile target with AVX2")
    return path


def _kernel_blocks(words: np.ndarray, path: str | None) -> np.ndarray:
    """Prepared words in the layout of ``path`` (:func:`_layout_path`): nibbles on lut; 64-byte
    aligned (:func:`_aligned`)."""
    if _layout_path(path, words.shape[1]) != "lut":
        return _aligned(words)
    from ._lut_conv import lut_blocks

    return _aligned(lut_blocks(words))


def _check_tail_zero(w: np.ndarray, n: int, name: str) -> None:
    tail = w.shape[-1] * 64 - n
    if tail:
        mask = np.uint64(((1 << tail) - 1) << (64 - tail))
        if np.any(w[..., -1] & mask):
            raise ValueError(f"{name}: unused tail bits (past {n} channels) must be 0")


def prepare_conv_weights(
    w_packed: np.ndarray, in_channels: int, *, path: str | None = None
) -> PreparedWeights:
    """Canonical packed conv weights (O, KH, KW, Cw) uint64 -> :class:`PreparedWeights` in
    the layout of kernel path ``path`` (default: the active one, ``bcnn.engine.kernel_path``)."""
    w = _check_packed(w_packed, 4, "conv weights")
    o, kh, kw, cw = w.shape
    if in_channels < 1 or cw != _words(in_channels):
        raise ValueError(
            f"conv weights have {cw} words per tap, {in_channels} input channels need "
            f"{_words(in_channels)}"
        )
    if o < 1 or kh < 1 or kw < 1:
        raise ValueError(f"conv weights shape {w.shape} is empty")
    _check_tail_zero(w, in_channels, "conv weights")
    blocks = _kernel_blocks(_blocks_from_rows(w.reshape(o, kh * kw * cw)), path)
    return PreparedWeights(blocks, o, in_channels, kh, kw)


def prepare_dense_weights(
    w_packed: np.ndarray, in_features: int, *, path: str | None = None
) -> PreparedWeights:
    """Canonical packed dense weights (O, Kw) uint64 -> :class:`PreparedWeights` (``path``:
    as :func:`prepare_conv_weights`)."""
    w = _check_packed(w_packed, 2, "dense weights")
    o, kw_ = w.shape
    if in_features < 1 or kw_ != _words(in_features):
        raise ValueError(
            f"dense weights have {kw_} words, {in_features} input features need "
            f"{_words(in_features)}"
        )
    if o < 1:
        raise ValueError("dense weights have no output features")
    _check_tail_zero(w, in_features, "dense weights")
    return PreparedWeights(_kernel_blocks(_blocks_from_rows(w), path), o, in_features, 1, 1)


_PER_WORD = {np.dtype(np.uint64): 1, np.dtype(np.uint8): 16}  # lut: a word's 16 nibbles


def _blocks_ok(w: PreparedWeights) -> bool:
    """Whether ``w.blocks`` is the kernels' layout for its channels and kernel size."""
    b = w.blocks
    per = _PER_WORD.get(b.dtype, 0)
    return (
        bool(per)
        and b.flags.c_contiguous
        and b.shape
        == (
            (w.out_channels + LANES - 1) // LANES,
            per * w.kh * w.kw * ((w.in_channels + 63) >> 6),
            LANES,
        )
    )


def _check_prepared(w: object) -> PreparedWeights:
    if not isinstance(w, PreparedWeights):
        raise ValueError("weights must be PreparedWeights (see prepare_conv_weights)")
    if not _blocks_ok(w):
        raise ValueError(f"inconsistent PreparedWeights: blocks {w.blocks.dtype} {w.blocks.shape}")
    return w
