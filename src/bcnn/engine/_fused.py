"""The executor's fused float epilogue (numba; imported on first use of the fast plan).

After an integer accumulator: [x * scale] [x + bias] [batch norm] [RPReLU] [residual add], in
torch's eval-mode order and rounding: batch norm is fma(x, alpha, beta) as ATen computes it on
the CPU (emulated exactly: the float64 product of two float32 values is exact, then one
rounding to float64 and one to float32), every other step a float32 operation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["fused_epilogue"]


@njit(cache=True, boundscheck=False)
def fused_epilogue(
    acc, pre, has_pre, cb, has_cb, al, be, has_bn, g, sl, z, has_rp, res, has_res, out
):  # type: ignore[no-untyped-def]
    """acc int32 (M, O) -> out float32 (M, O); res float32 (M, Cr), channel o reads o % Cr.
    One simple (vectorizable) pass per step over each L1-resident row."""
    m_, o_ = acc.shape
    cr = res.shape[1]
    for m in range(m_):
        y = out[m]
        a = acc[m]
        for o in range(o_):
            y[o] = np.float32(a[o])
        if has_pre:
            for o in range(o_):
                y[o] = y[o] * pre[o]
        if has_cb:
            for o in range(o_):
                y[o] = y[o] + cb[o]
        if has_bn:
            for o in range(o_):
                y[o] = np.float32(np.float64(y[o]) * al[o] + be[o])
        if has_rp:
            for o in range(o_):
                v = y[o] - g[o]
                v = v if v >= 0 else v * sl[o]
                y[o] = v + z[o]
        if has_res:
            r = res[m]
            for o0 in range(0, o_, cr):
                for c in range(cr):
                    y[o0 + c] = r[c] + y[o0 + c]
