"""BSQ on the engine's odd grid (``bsq_grid: odd``; docs/bsq.md).

BSQ's own grid is sign-magnitude (:class:`BitQuantizer`): it has 0, and its cheapest non-zero
layer is ternary (sign and one magnitude bit, 2 stored bits). The engine's k-bit grid is the
odd integers ``X in {+-1, +-3, ..., +-(2^k - 1)}``, whose cheapest layer is binary (k = 1).
Every odd integer is a sign and an odd magnitude, ``X = s (2M + 1)`` with ``M`` in
``0 .. 2^(k-1) - 1``: k - 1 magnitude bits. BSQ's bit variables and group Lasso apply to the
magnitude bits ``M``, and the sign is one trainable variable per weight::

    v = sum_{b < k-1} 2^b p_b,  p_b in [0, 2]             M = floor(v + 1/2)
    s = sign(z),  z in [-1, 1]  (sign(0) = +1)             X = s (2M + 1),  weight = step * X
    dX/dp_b = 2^(b+1) s,  dX/dz = 2M + 1                   (straight-through rounding and sign)
    R_l = sum_{b < k-1} sqrt(sum_{w in l} p_b(w)^2)        (the group Lasso: magnitude planes)

A magnitude plane that is zero for every weight of the layer is dropped at re-quantization:
an all-zero most-significant plane lowers k by one and leaves the output unchanged; k = 1 is a
binary layer (``step * sign``), which BSQ's grid cannot express. An all-zero least-significant
plane is *not* dropped: ``|X|`` would be ``4M' + 1`` (1, 5, 9, ...), which is no odd grid of
any step. Overflow (``M`` past ``2^(k-1) - 1``) raises k as in BSQ.

``bits`` (``nbits``) is the layer's odd-grid width k: what it stores and computes, the count
the uniform k-bit models use. The packed engine serves it as any k-bit layer: no constant row,
no zero grid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._quantizer import MAX_BITS, BitQuantizer

__all__ = ["OddBitQuantizer"]


def _magnitude_bits(m: Tensor, planes: int) -> Tensor:
    """Non-negative integer tensor -> float bit-planes (MAX_BITS, *m.shape), 0 from ``planes``."""
    shifts = torch.arange(MAX_BITS, device=m.device).view(-1, *([1] * m.dim()))
    keep = (shifts < planes).to(torch.float32)
    return ((m.to(torch.int64).unsqueeze(0) >> shifts) & 1).to(torch.float32) * keep


def _odd_round(v: Tensor, hi: float) -> Tensor:
    """Nearest odd integer of ``v`` in [-hi, hi] (hi odd): the uniform signed grid."""
    v = v.clamp(-hi, hi)
    return 2.0 * torch.floor(v / 2.0) + 1.0


class OddBitQuantizer(BitQuantizer):
    """BSQ weight quantizer of one layer on the odd grid: ``integer(_) -> (X, step)``.

    Args:
        shape: the layer's weight shape.
        bits: starting odd-grid width k (1..8; k - 1 magnitude bits).

    State: ``pos`` (8, *shape), the magnitude bits in [0, 2] (planes >= k - 1 stay 0),
    ``sign`` (*shape) in [-1, 1], ``step``, ``nbits`` (k), ``frozen``, ``latent`` (as
    :class:`BitQuantizer`).
    """

    zero_grid = False  # the engine's odd grid: served as a plain k-bit layer
    grid = "odd"

    def __init__(self, shape: tuple[int, ...] | torch.Size, bits: int = 8) -> None:
        nn.Module.__init__(self)
        if isinstance(bits, bool) or not 1 <= int(bits) <= MAX_BITS:
            raise ValueError(f"odd-grid BSQ bits must be in 1..{MAX_BITS}, got {bits}")
        shape = tuple(int(s) for s in shape)
        self.pos = nn.Parameter(torch.zeros(MAX_BITS, *shape))
        self.sign = nn.Parameter(torch.ones(*shape))
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("nbits", torch.tensor(int(bits), dtype=torch.int64))
        self.register_buffer("frozen", torch.tensor(False))
        self.register_buffer("latent", torch.tensor(False))
        self.register_buffer("initialized", torch.tensor(True))

    def bit_parameters(self) -> dict[str, nn.Parameter]:
        return {"pos": self.pos, "sign": self.sign}

    @property
    def storage_bits(self) -> int:
        """Bits per weight as stored and computed: k (the sign and k - 1 magnitude bits)."""
        return self.bits

    def _place(self) -> Tensor:
        """2^b for the magnitude planes b < k - 1, else 0 (shaped over (8, *shape))."""
        b = torch.arange(MAX_BITS, device=self.pos.device)
        place = torch.where(b < self.nbits - 1, 2.0**b, 0.0).to(self.pos.dtype)
        return place.view(-1, *([1] * (self.pos.dim() - 1)))

    def continuous(self) -> Tensor:
        """v = sum_b 2^b p_b (the magnitude M before rounding), >= 0."""
        return (self.pos * self._place()).sum(0)

    def integer(self, x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(X, step): the odd integers (straight-through) and the step. ``x``: the layer's
        weight, read only in ``latent`` mode."""
        if bool(self.latent):
            return self._from_weight(x)
        v = self.continuous()
        hi = torch.where(self.frozen, 2.0 ** (self.nbits - 1) - 1.0, float(2 ** (MAX_BITS - 1) - 1))
        v = torch.minimum(v, hi.to(v.dtype))
        m = v + (torch.floor(v + 0.5) - v).detach()
        z = self.sign
        s = z + (torch.where(z >= 0, 1.0, -1.0).to(z.dtype) - z).detach()
        w = s * (2.0 * m + 1.0)
        step = self._step(self.step.abs().clamp_min(1e-8))
        if x is not None:
            w, step = w.to(x.dtype), step.to(x.dtype)
        return w, step

    @staticmethod
    def _grid_round(v: Tensor, hi: float) -> Tensor:
        """Weights fine-tuning rounds onto the k-bit odd grid (the base class's
        ``_from_weight``: straight-through, per-channel LSQ steps)."""
        return _odd_round(v, hi)

    def plane_norms(self) -> Tensor:
        """sqrt(1e-8 + sum over the layer's weights of p_b^2) per magnitude plane b < k - 1
        (0 for the others): the group Lasso's groups. The sign plane is not a group: it
        cannot be dropped."""
        sq = (self.pos**2).flatten(1).sum(1)
        b = torch.arange(MAX_BITS, device=sq.device)
        return torch.where(b < self.nbits - 1, torch.sqrt(1e-8 + sq), torch.zeros_like(sq))

    def check(self) -> None:
        """ValueError (one line) unless: k in 1..8, magnitude bits finite in [0, 2] and 0 from
        plane k - 1 on, signs finite in [-1, 1], a finite non-zero step."""
        k = int(self.nbits)
        if not 1 <= k <= MAX_BITS:
            raise ValueError(f"odd-grid BSQ precision {k} is not in 1..{MAX_BITS}")
        t = self.pos.detach()
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t > 2).any()):
            raise ValueError("BSQ magnitude bit variables outside [0, 2]")
        if bool((t[k - 1 :] != 0).any()):
            raise ValueError(f"BSQ magnitude bit variables set above the layer's {k} bits")
        z = self.sign.detach()
        if not bool(torch.isfinite(z).all()) or bool((z.abs() > 1).any()):
            raise ValueError("BSQ sign variables outside [-1, 1]")
        self._check_step()

    @torch.no_grad()
    def init_from(self, weight: Tensor, bits: int) -> None:
        """From a trained weight at ``bits`` (k): step = max|w| / (2^k - 1), X = the nearest
        odd integer of w / step; ``sign`` = w / max|w| (small weights flip easily, as a
        binary network's latent weights)."""
        if isinstance(bits, bool) or not 1 <= int(bits) <= MAX_BITS:
            raise ValueError(f"odd-grid BSQ bits must be in 1..{MAX_BITS}, got {bits}")
        w = weight.detach().float()
        s = float(w.abs().max()) if w.numel() else 0.0
        hi = 2**bits - 1
        step = s / hi if s > 0 else 1.0
        x = _odd_round(w / step, hi)
        self.pos.copy_(_magnitude_bits((x.abs() - 1) / 2, bits - 1))
        # sign(z) = sign(x): both are + exactly where w >= 0 (an all-zero weight: z = 0, x = 1)
        self.sign.copy_((w / s).clamp(-1.0, 1.0) if s > 0 else torch.zeros_like(w))
        self.step.fill_(step)
        self.nbits.fill_(bits)
        self.frozen.fill_(False)

    @torch.no_grad()
    def clamp_(self) -> None:
        """After every optimizer step: magnitude bits into [0, 2] (planes >= k - 1 back to 0),
        signs into [-1, 1]."""
        self.pos.clamp_(0.0, 2.0)
        self.pos.mul_((self._place() > 0).to(self.pos.dtype))
        self.sign.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def requantize(self, adjust: bool = True, weight: Tensor | None = None) -> dict[str, Any]:
        """The rounded magnitudes back into bits. With ``adjust``: k + 1 per overflowing
        magnitude bit (at most 8 bits), all-zero most-significant magnitude planes dropped
        (down to k = 1, binary). The output is unchanged, except that a frozen or 8-bit layer
        clips to its range. In ``latent`` mode the bits and signs follow the weights' X.
        Returns {"before": k, "after": k', "overflow": bool}."""
        before = self.bits
        latent = bool(self.latent)
        adjust = adjust and not latent
        x: Tensor = self.integer(weight)[0].detach()
        m = (x.abs() - 1) / 2
        top = int(m.max()) if m.numel() else 0
        k = before
        overflow = top > 2 ** (k - 1) - 1
        if adjust:
            k = min(MAX_BITS, max(k, top.bit_length() + 1))
        m = m.clamp(max=2 ** (k - 1) - 1)
        if adjust:
            k = (int(m.max()) if m.numel() else 0).bit_length() + 1  # drop zero MSB planes
        self.pos.copy_(_magnitude_bits(m, k - 1))
        if latent:  # the signs as well: the file's bits then give the weights' X
            self.sign.copy_(torch.where(x > 0, 1.0, -1.0))
        self.nbits.fill_(k)
        return {"before": before, "after": k, "overflow": bool(overflow)}

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits} (odd grid), frozen={bool(self.frozen)}"
