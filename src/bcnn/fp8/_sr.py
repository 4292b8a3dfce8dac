"""Fast stochastic rounding of float32 onto a coarser float grid: one numba pass over the bits.

For a float32 magnitude with bit pattern ``a`` (exponent field ``E``, binade
``e = max(E, 1) - 127``), the target grid keeps the top bits of the pattern: it drops
``d = (23 - m) + max(emin - e, 0)`` low bits (more in the target's subnormal range). Adding a
uniform random integer ``r`` in ``[0, 2^d)`` and clearing the low ``d`` bits rounds up with
probability exactly ``(a mod 2^d) / 2^d``: unbiased, and a carry into the exponent lands on the
next binade's first grid point. Below the smallest subnormal ``s`` (``d > 23``) the neighbours
are 0 and ``s``: up with probability ``ceil(2^23 |x| / s) / 2^23`` (bias < 2^-23 s).

The random integers come from a counter-based hash (splitmix64 of ``seed + index``), with
``seed`` drawn from torch's generator once per call: results depend only on torch's RNG state,
which checkpoints capture, so a resumed run rounds exactly as an unbroken one.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

from ._formats import Format

__all__ = ["stochastic_round_fast"]


@njit(nogil=True, cache=True, boundscheck=False)
def _sr_kernel(
    src: np.ndarray,
    srcf: np.ndarray,
    out: np.ndarray,
    mbits: int,
    emin: int,
    max_bits: int,
    sub_bits: int,
    tiny_scale: float,
    saturate: bool,
    seed: int,
) -> None:  # pragma: no cover - compiled
    ts = np.float32(tiny_scale)
    for i in range(src.size):
        b = src[i]
        sign = b & np.uint32(0x80000000)
        a = b & np.uint32(0x7FFFFFFF)
        if a >= np.uint32(0x7F800000):  # inf / nan
            q = a
            if saturate and a == np.uint32(0x7F800000):
                q = np.uint32(max_bits)
            out[i] = q | sign
            continue
        z = np.uint64(seed) + np.uint64(i) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        r = np.uint32(z >> np.uint64(41))  # 23 random bits
        field = np.int64(a >> np.uint32(23))
        e = (field if field > 1 else np.int64(1)) - 127
        below = emin - e
        d = (23 - mbits) + (below if below > 0 else 0)
        if d <= 23:
            mask = np.uint32((1 << d) - 1)
            q = (a + (r & mask)) & ~mask
        else:
            q = np.uint32(sub_bits) if np.float32(r) < abs(srcf[i]) * ts else np.uint32(0)
        if q > np.uint32(max_bits):
            q = np.uint32(max_bits) if saturate else np.uint32(0x7F800000)
        out[i] = q | sign


def stochastic_round_fast(x: Tensor, f: Format, generator: torch.Generator | None = None) -> Tensor:
    """Stochastic rounding of a CPU float32/float16/bfloat16 tensor onto ``f`` (see the module
    docstring); the same dtype and shape."""
    src = x.detach().to(torch.float32).contiguous()
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    out = torch.empty_like(src)
    max_bits = int(np.float32(f.max).view(np.uint32))
    tiny = f.emin - f.mbits >= -126  # the smallest subnormal is a float32 normal (not bf16)
    flat = src.view(-1).numpy()
    _sr_kernel(
        flat.view(np.uint32),
        flat,
        out.view(-1).numpy().view(np.uint32),
        f.mbits,
        f.emin,
        max_bits,
        (f.emin - f.mbits + 127) << 23 if tiny else 0,
        2.0 ** (23 - (f.emin - f.mbits)) if tiny else 0.0,
        f.saturate,
        seed,
    )
    return out.to(x.dtype)
