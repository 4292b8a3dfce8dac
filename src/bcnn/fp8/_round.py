"""``round_to_format``: the fast rounding paths (torch's casts for round-to-nearest, the numba
kernel of ``_sr.py`` for stochastic rounding on the CPU), above the format definitions and
the arithmetic reference of ``_formats.py``."""

from __future__ import annotations

import torch
from torch import Tensor

from ._formats import (
    _FLOAT_DTYPES,
    _TORCH_DTYPES,
    Format,
    check_rounding,
    get_format,
    round_reference,
)
from ._sr import stochastic_round_fast

__all__ = ["round_to_format"]


def round_to_format(
    x: Tensor,
    fmt: str | Format,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Round ``x`` (float32/float16/bfloat16) onto the grid of ``fmt``; same dtype and shape.

    The fast paths: ``nearest`` is torch's cast (``x.to(float8_e5m2).to(x.dtype)``...),
    ``stochastic`` a one-pass numba kernel on CPU (``_sr.py``). Both are tested against
    :func:`round_reference`, the arithmetic definition:
    """
    f = get_format(fmt)
    check_rounding(rounding)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"expected a float32, float16 or bfloat16 tensor, got {x.dtype}")
    if rounding == "nearest":
        return x.detach().to(_TORCH_DTYPES[f.name]).to(x.dtype)
    if x.device.type == "cpu":
        return stochastic_round_fast(x, f, generator)
    return round_reference(x, f, rounding, generator)
