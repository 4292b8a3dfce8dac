"""A switchable activation quantizer: one k-bit quantizer per precision, one active.

Any-precision networks (Any-Precision DNN, Yu et al., AAAI 2021; Bit-Mixer, Bulat &
Tzimiropoulos, ICCV 2021; AdaBits) share the weights across precisions but give every
precision its own activation quantizer, because the best step of a 1-bit and of a 4-bit
activation differ. Each choice here is a :class:`UniformQuantizer` (odd grid when signed: 1 bit
is exactly sign, with sign(0) = +1, times its step):

    forward:  q(x) = s_k * X_k(x / s_k),  k = the active precision
    backward: as the active UniformQuantizer (STE inside the clip range, LSQ step gradient)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._uniform import UniformQuantizer

__all__ = ["SwitchableQuantizer"]


class SwitchableQuantizer(nn.Module):
    """One :class:`UniformQuantizer` per precision in ``bits`` (each with its own learned step);
    ``active`` (default: the highest) is the one ``forward`` / ``integer`` use."""

    def __init__(self, bits: Sequence[int] = (1, 2, 3, 4), signed: bool = True) -> None:
        super().__init__()
        choices = tuple(sorted({int(b) for b in bits}))
        if not choices or choices[0] < 1 or choices[-1] > 8:
            raise ValueError(f"precisions must be in 1..8, got {tuple(bits)}")
        self.choices = choices
        self.quantizers = nn.ModuleDict(
            {str(k): UniformQuantizer(k, signed=signed) for k in choices}
        )
        self.active = choices[-1]

    def select(self, bits: int) -> None:
        if bits not in self.choices:
            raise ValueError(f"act_bits={bits} is not one of the trained {self.choices}")
        self.active = int(bits)

    @property
    def current(self) -> UniformQuantizer:
        q = self.quantizers[str(self.active)]
        assert isinstance(q, UniformQuantizer)
        return q

    @property
    def bits(self) -> int:
        return self.active

    @property
    def signed(self) -> bool:
        return self.current.signed

    @property
    def step(self) -> Tensor:
        """The active quantizer's learned step."""
        return self.current.step

    @property
    def initialized(self) -> Tensor:
        return self.current.initialized

    @property
    def pad_value(self) -> float:
        return self.current.pad_value

    def integer(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.current.integer(x)

    def forward(self, x: Tensor) -> Tensor:
        X, step = self.integer(x)
        return X * step

    def extra_repr(self) -> str:
        return f"choices={self.choices}, active={self.active}"
