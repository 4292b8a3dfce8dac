"""Floating-point grids (E5M2, E4M3, FP16, BF16): round-to-nearest-even and stochastic rounding.

A format with ``m`` mantissa bits and smallest normal exponent ``emin`` has, for a value of
binade ``e = max(floor(log2|x|), emin)``, the grid spacing ``ulp(x) = 2^(e - m)``: the subnormal
range (``|x| < 2^emin``) keeps the spacing ``2^(emin - m)`` down to zero. Rounding is done on
``y = |x| / ulp(x)`` (exact: ``ulp`` is a power of two), then scaled back (exact again).

Overflow follows torch's casts (torch 2.13, CPU), so that round-to-nearest is bit-for-bit equal
to ``x.to(torch.float8_e5m2).to(x.dtype)`` / ``x.to(torch.float8_e4m3fn).to(x.dtype)``:

- E5M2 (IEEE-like, has infinities): a magnitude that rounds above 57344 becomes +-inf, +-inf
  stays +-inf. A loss scaler therefore *sees* a gradient overflow (``isfinite`` fails).
- E4M3 (``e4m3fn``: no infinities, one NaN): saturates; every magnitude above 448, +-inf
  included, becomes +-448.
- NaN stays NaN; the sign of zero is kept (``-0.0 -> -0.0``).

Stochastic rounding between the largest finite value and the next (missing) grid point picks the
missing point with its usual probability, and it overflows as above (+-inf in E5M2, +-448 in
E4M3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FORMATS", "FP8_FORMATS", "Format", "get_format", "round_reference"]


@dataclass(frozen=True)
class Format:
    """A binary floating-point grid: ``mbits`` mantissa bits, smallest normal exponent
    ``emin``, largest finite magnitude ``max``, ``saturate``: overflow to +-max (else +-inf)."""

    name: str
    mbits: int
    emin: int
    max: float
    saturate: bool

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin


FORMATS: dict[str, Format] = {
    "e5m2": Format("e5m2", 2, -14, 57344.0, saturate=False),
    "e4m3": Format("e4m3", 3, -6, 448.0, saturate=True),
    "fp16": Format("fp16", 10, -14, 65504.0, saturate=False),
    "bf16": Format("bf16", 7, -126, float(torch.finfo(torch.bfloat16).max), saturate=False),
}
FP8_FORMATS = ("e5m2", "e4m3")
ROUNDINGS = ("nearest", "stochastic")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def get_format(fmt: str | Format, allowed: tuple[str, ...] = tuple(FORMATS)) -> Format:
    """The :class:`Format` of a name; a one-line ``ValueError`` for an unknown one."""
    if isinstance(fmt, Format):
        return fmt
    if fmt not in allowed:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(allowed)}")
    return FORMATS[fmt]


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; known: {', '.join(ROUNDINGS)}")
    return rounding


def _pow2(k: Tensor, dtype: torch.dtype) -> Tensor:
    """2^k exactly, built from the exponent bits (k within the normal range of ``dtype``)."""
    if dtype == torch.float64:
        return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32)


_TORCH_DTYPES = {
    "e5m2": torch.float8_e5m2,
    "e4m3": torch.float8_e4m3fn,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def round_reference(
    x: Tensor,
    fmt: str | Format,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Round ``x`` onto the grid of ``fmt`` by arithmetic (any device; slower).

    nearest:    q = sign(x) * RNE(|x| / u) * u                  u = ulp(x), ties to even
    stochastic: q = sign(x) * (floor(|x| / u) + [r < frac(|x| / u)]) * u,  r ~ U[0, 1)

    so E[q] = x for every |x| <= max (subnormals included) and q is always one of the two grid
    points around x. ``r`` comes from ``generator`` (default: torch's global generator, which
    checkpoints capture, so a resumed run draws the same numbers).
    """
    f = get_format(fmt)
    check_rounding(rounding)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"expected a float32, float16 or bfloat16 tensor, got {x.dtype}")
    # bf16's subnormal spacing 2^-133 is below float32's normal range: work in float64 there.
    work = torch.float64 if f.emin - f.mbits < -126 else torch.float32
    a = x.detach().to(work).abs()
    _, e = torch.frexp(a)  # a = mant * 2^e, mant in [0.5, 1): floor(log2 a) = e - 1
    e = (e - 1).clamp_(f.emin, 127)  # 127 also tames frexp's exponent of inf/nan
    k = e - f.mbits
    y = a * _pow2(-k, work)  # |x| / ulp, exact
    if rounding == "nearest":
        r = torch.round(y)  # half to even: an even multiple of ulp has an even last mantissa bit
    else:
        lo = torch.floor(y)
        u = torch.rand(y.shape, dtype=work, device=y.device, generator=generator)
        r = lo + (u < (y - lo)).to(work)
    q = r * _pow2(k, work)
    q = q.clamp_max(f.max) if f.saturate else torch.where(q > f.max, torch.inf, q)
    return torch.copysign(q, x.detach().to(work)).to(x.dtype)


def is_representable(x: Tensor, fmt: str | Format) -> bool:
    """True when every element of ``x`` lies on the grid of ``fmt`` (NaN counts as on it;
    infinities only for formats that have them)."""
    f = get_format(fmt)
    q = round_reference(x, f, "nearest")
    same = (q == x) | (torch.isnan(q) & torch.isnan(x))
    if f.saturate:
        same &= ~torch.isinf(x)
    return bool(same.all())
