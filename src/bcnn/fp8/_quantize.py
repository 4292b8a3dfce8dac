"""``quantize_fp8``: the one public cast of ``bcnn.fp8``."""

from __future__ import annotations

import torch
from torch import Tensor

from ._formats import FP8_FORMATS, check_rounding, get_format
from ._round import round_to_format

__all__ = ["quantize_fp8"]


def quantize_fp8(
    x: Tensor,
    fmt: str = "e5m2",
    rounding: str = "nearest",
    scale: float | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Round ``x`` onto an 8-bit floating-point grid; the result keeps ``x``'s dtype.

    \[
    q(x) = \frac{1}{s}\,\mathrm{round}_{\mathrm{fmt}}(s\,x), \qquad
    \mathrm{round}(x) = \operatorname{sign}(x)\, R\!\left(\frac{|x|}{u(x)}\right) u(x), \quad
    u(x) = 2^{\max(\lfloor \log_2 |x| \rfloor,\, e_{\min}) - m}
    \]

    with ``R`` = round-half-to-even (``rounding="nearest"``) or
    ``R(y) = floor(y) + [r < y - floor(y)]``, ``r ~ U[0, 1)`` (``"stochastic"``: unbiased,
    ``E[q(x)] = x``, always one of the two grid neighbours of ``x``, subnormals included).

    | fmt    | bits (s-e-m) | m | e_min | max    | smallest subnormal | overflow        |
    |--------|--------------|---|-------|--------|--------------------|-----------------|
    | `e5m2` | 1-5-2        | 2 | -14   | 57344  | 2^-16              | +-inf           |
    | `e4m3` | 1-4-3 (fn)   | 3 | -6    | 448    | 2^-9               | saturates +-448 |

    ``rounding="nearest"`` equals ``x.to(torch.float8_e5m2).to(x.dtype)`` (or
    ``torch.float8_e4m3fn``) bit for bit, overflow and NaN included: E5M2 overflows to +-inf
    (so loss scaling sees it), E4M3 has no infinity and saturates (+-inf too); NaN stays NaN.

    ``scale``: a power of two keeps the rounding exact on both sides; the result times
    ``scale`` lies on the grid (per-tensor scaling, as loss scaling does for gradients).
    ``generator``: random source of stochastic rounding (default: torch's global one).

    References: Mellempudi, Srinivasan, Das, Kaul, "Mixed Precision Training With 8-bit
    Floating Point" (arXiv:1905.12334, 2019): the 1-5-2 format, RNE forward and stochastic
    rounding for gradients; Micikevicius et al., "FP8 Formats for Deep Learning"
    (arXiv:2209.05433, 2022): E4M3 / E5M2 encodings.

    >>> import torch
    >>> quantize_fp8(torch.tensor([0.3, 1000.0, 1e5]), "e5m2").tolist()
    [0.3125, 1024.0, inf]
    >>> quantize_fp8(torch.tensor([0.3, 1000.0, 1e5]), "e4m3").tolist()
    [0.3125, 448.0, 448.0]
    """
    f = get_format(fmt, FP8_FORMATS)
    check_rounding(rounding)
    if scale is None:
        return round_to_format(x, f, rounding, generator)
    return round_to_format(x * scale, f, rounding, generator) / scale
