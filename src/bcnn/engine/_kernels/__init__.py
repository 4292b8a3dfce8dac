"""Bit-packed XOR-popcount kernels of the packed engine (numba), bit-exact with training.

Conventions (a contract, tested in tests/test_kernels.py; see docs/kernels.md):

- sign(x) = +1 for x >= 0, -1 otherwise. Packed: bit 1 means -1, bit 0 means +1.
- Channels-last (NHWC), packed along the reduction axis (channels) into uint64 words: bit ``i``
  of word ``j`` is element ``64*j + i``. Unused tail bits are 0 in activations and weights, so
  they XOR to 0 and cancel.
- For n-bit vectors a·w = n - 2·popcount(a XOR w); for a convolution n = KH*KW*Cin at every
  output position, because padding is one-padding (pad value +1 = bit 0): no correction term.
- Shapes: activations (N, H, W, Cw) with Cw = ceil(C/64); canonical conv weights
  (O, KH, KW, Cw); canonical dense weights (O, Kw). The kernels use a prepared layout
  (:class:`PreparedWeights`: output channels in blocks of ``LANES`` = 32, interleaved, so the
  inner loop broadcasts one activation word and XORs it with 32 output channels' words, four
  512-bit vectors, with no horizontal sums). On the ``lut`` kernel path (AVX2) the prepared
  words are split into nibbles and the conv / dense tiles use ``vpshufb`` lookup tables
  instead of popcounts (``_lut_conv``); the results are the same bits.

The compiled kernels do not bounds-check: every public function here validates shapes and
dtypes first and raises ``ValueError``; the packed-model loader validates files before they
reach these functions. No fastmath: float epilogues round exactly like the numpy reference
(separate multiply and add, no FMA contraction), and ``x + b < 0`` is never rewritten.

The GEMM micro-kernel (:func:`_mk`) is a numba intrinsic that emits LLVM IR with explicit
``<8 x i64>`` vectors, so its 16 accumulators stay in registers (LLVM's auto-vectorizers do not
manage that from plain loops); ``llvm.ctpop.v8i64`` lowers to VPOPCNTQ where the CPU has
AVX512-VPOPCNTDQ and to a correct (slower) sequence elsewhere.
"""

from __future__ import annotations

from ._bound import bind_avgpool2x2 as bind_avgpool2x2
from ._bound import bind_conv_affine as bind_conv_affine
from ._bound import bind_pack_sign_padded as bind_pack_sign_padded
from ._bound import bind_stem_affine as bind_stem_affine
from ._conv import (
    bconv2d,
    bconv2d_affine,
    bconv2d_pairs,
    bconv2d_threshold,
    bgemm,
    blinear,
    blinear_affine,
)
from ._llvm import LANES, MR
from ._llvm import _mk as _mk
from ._lut_conv import pair_bytes
from ._packing import pack_sign, pack_threshold, unpack_bits
from ._pool import avgpool2x2, global_avgpool, maxpool_packed
from ._stem import prepare_stem_weights, stem_conv, stem_conv_affine
from ._weights import (
    PreparedStem,
    PreparedWeights,
    pack_weights,
    prepare_conv_weights,
    prepare_dense_weights,
)
from ._weights import (
    _words as _words,
)

__all__ = [
    "LANES",
    "MR",
    "PreparedStem",
    "PreparedWeights",
    "avgpool2x2",
    "bconv2d",
    "bconv2d_affine",
    "bconv2d_pairs",
    "bconv2d_threshold",
    "bgemm",
    "blinear",
    "blinear_affine",
    "global_avgpool",
    "maxpool_packed",
    "pack_sign",
    "pack_threshold",
    "pack_weights",
    "pair_bytes",
    "prepare_conv_weights",
    "prepare_dense_weights",
    "prepare_stem_weights",
    "stem_conv",
    "stem_conv_affine",
    "unpack_bits",
]
