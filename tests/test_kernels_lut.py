"""The lookup-table binary GEMM (the lut kernel path in progress) equals the popcount GEMM and
the numpy reference bit for bit at awkward sizes; it runs wherever the compile target has
AVX2 (every x86 machine we test on; skipped elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

from bcnn.engine import _kernels as K
from bcnn.engine._kernels._lut import MRL, NBL, lut_bgemm, lut_supported, prepare_lut_weights

pytestmark = pytest.mark.skipif(not lut_supported(), reason="the compile target has no AVX2")


def _rows(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    """m random rows of k bits, packed (tail bits 0)."""
    bits = rng.integers(0, 2, (m, k)).astype(bool)
    full = np.zeros((m, 64 * ((k + 63) // 64)), bool)
    full[:, :k] = bits
    return np.packbits(full, axis=-1, bitorder="little").view("<u8").reshape(m, -1)


def _reference(a: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    return (k - 2 * np.bitwise_count(a[:, None, :] ^ w[None]).sum(-1)).astype(np.int32)


@pytest.mark.parametrize("k", [1, 3, 63, 64, 65, 130, 252, 253, 1000])
@pytest.mark.parametrize("m", [1, MRL + 1, 7])
@pytest.mark.parametrize("n", [1, 63, 65, 32 * NBL + 1])
def test_lut_gemm_is_exact(k: int, m: int, n: int) -> None:
    rng = np.random.default_rng(k * 1000 + m * 10 + n)
    a, w = _rows(rng, m, k), _rows(rng, n, k)
    got = lut_bgemm(a, prepare_lut_weights(w, k))
    np.testing.assert_array_equal(got, _reference(a, w, k))
    np.testing.assert_array_equal(got, K.bgemm(a, w, k))


def test_lut_gemm_extremes_and_bad_input() -> None:
    """All-equal and all-opposite rows (the byte accumulators' largest runs), then errors."""
    k = 4 * 63 * 3 + 5  # several 63-nibble runs and a tail
    ones = _rows(np.random.default_rng(0), 1, k)
    ones[:] = 0
    ones_w = ones.copy()
    neg = _rows(np.random.default_rng(0), 1, k)
    neg[:] = np.uint64(2**64 - 1)
    neg[:, -1] &= np.uint64((1 << (k % 64)) - 1)
    lw = prepare_lut_weights(np.concatenate([ones_w, neg]), k)
    np.testing.assert_array_equal(lut_bgemm(np.concatenate([ones, neg]), lw), [[k, -k], [-k, k]])
    with pytest.raises(ValueError, match="expect"):
        lut_bgemm(np.zeros((2, 3), np.uint64), lw)
    with pytest.raises(ValueError, match="do not hold"):
        prepare_lut_weights(np.zeros((2, 3), np.uint64), 64)
