"""BSQ's bit-level weight representation (Yang, Duan, Chen, Li, ICLR 2021, "BSQ: Exploring
Bit-Level Sparsity for Mixed-Precision Neural Network Quantization"; official code
github.com/yanghr/BSQ).

Every weight of a layer is ``step * W`` with an integer ``W`` built from trainable per-bit
variables: positive and negative parts ``p_b, n_b in [0, 2]`` for the ``N`` bits of the layer::

    v = sum_{b < N} 2^b (p_b - n_b)                       (continuous)
    W = sign(v) * floor(|v| + 1/2)                        (forward: round half away from zero)
    dW/dp_b = 2^b,  dW/dn_b = -2^b                         (backward: straight-through)

After re-quantization (:meth:`BitQuantizer.requantize`) ``p_b, n_b`` are the bits of the
sign-magnitude integer (``p_b = bit b of max(W, 0)``, ``n_b = bit b of max(-W, 0)``), so a
bit-plane that is zero for every weight of the layer can be dropped without changing it. The
grid includes 0 (sign-magnitude), unlike the odd grid of :class:`bcnn.quant.UniformQuantizer`;
the engine serves it exactly as ``W = (X - 1) / 2`` with ``X = 2W + 1`` on the (N+1)-bit odd
grid (docs/bsq.md).

Two deliberate differences from the official code, both documented in docs/bsq.md:

* the step is learned directly (``weight = step * W``; BSQ learns ``s = step * (2^N - 1)``,
  the same thing), so dropping an all-zero LSB plane doubles the step and nothing else;
* while the scheme is free, the forward pass does not clip ``v`` to the N-bit range
  (only to the format's 8-bit range): a value past it is BSQ's *overflow*, and the next
  re-quantization raises the layer's precision so that its output does not change. Once the
  scheme is frozen (fine-tuning), ``v`` is clipped to ``+-(2^N - 1)`` as in the official code.

Fine-tuning can also train the layer's float weight instead of the bits (``latent``, the
trainer's ``bsq_finetune_mode: weights``): the scheme stays frozen, and the weight is
quantized onto the same N-bit sign-magnitude grid with a straight-through rounding and an
LSQ step per output channel (Esser et al., ICLR 2020; the uniform models' quantizer)::

    W = round_half_away(clip(w / step_o, -(2^N - 1), 2^N - 1))  dW/dw = 1/step_o inside

It starts from ``w = step * W`` with every ``step_o`` = the layer's step (the bits' weights:
nothing changes at the switch), and the bits are re-written from ``W`` when the stage ends,
so a file holds both forms consistently. ``step`` is then a vector (O,).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..quant._uniform import _grad_scale

__all__ = ["MAX_BITS", "BitQuantizer"]

MAX_BITS = 8  # bit variables stored per weight (the .bcnn format's widest weight)


def _round_away(v: Tensor) -> Tensor:
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def _sign_magnitude_bits(w: Tensor, nbits: int) -> tuple[Tensor, Tensor]:
    """Integer tensor (|w| < 2^nbits) -> (pos, neg) float bit-planes (MAX_BITS, *w.shape)."""
    mag_p = w.clamp_min(0).to(torch.int64)
    mag_n = (-w).clamp_min(0).to(torch.int64)
    shifts = torch.arange(MAX_BITS, device=w.device).view(-1, *([1] * w.dim()))
    keep = (shifts < nbits).to(torch.float32)
    pos = ((mag_p.unsqueeze(0) >> shifts) & 1).to(torch.float32) * keep
    neg = ((mag_n.unsqueeze(0) >> shifts) & 1).to(torch.float32) * keep
    return pos, neg


class BitQuantizer(nn.Module):
    """BSQ weight quantizer of one layer: ``integer(_) -> (W, step)`` (the k-bit quantizer
    protocol of :class:`bcnn.nn.BinaryConv2d`; the layer's own ``weight`` is not read).

    Args:
        shape: the layer's weight shape.
        bits: starting precision N (0..8).

    State: ``pos``, ``neg`` (8, *shape) in [0, 2] (planes >= N stay 0), ``step`` (scalar,
    learned), ``nbits`` (N), ``frozen`` (fine-tuning: N fixed, v clipped to the N-bit range),
    ``latent`` (fine-tuning through the layer's float weight, passed as ``integer``'s argument,
    instead of the bits).
    """

    signed = True  # for the engine: a signed weight grid (with 0: see ``zero_grid``)
    zero_grid = True  # sign-magnitude integers, 0 included (not the odd grid)
    grid = "zero"  # the trainer's ``bsq_grid``
    bsq = True  # a BSQ bit quantizer (either grid), for code that must not import torch

    step: Tensor
    nbits: Tensor
    frozen: Tensor
    latent: Tensor
    initialized: Tensor

    def __init__(self, shape: tuple[int, ...] | torch.Size, bits: int = 8) -> None:
        super().__init__()
        if not 0 <= int(bits) <= MAX_BITS:
            raise ValueError(f"BSQ bits must be in 0..{MAX_BITS}, got {bits}")
        shape = tuple(int(s) for s in shape)
        self.pos = nn.Parameter(torch.zeros(MAX_BITS, *shape))
        self.neg = nn.Parameter(torch.zeros(MAX_BITS, *shape))
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("nbits", torch.tensor(int(bits), dtype=torch.int64))
        self.register_buffer("frozen", torch.tensor(False))
        self.register_buffer("latent", torch.tensor(False))
        self.register_buffer("initialized", torch.tensor(True))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        key = prefix + "latent"  # files written before the weights fine-tuning mode existed
        if key not in state_dict:
            state_dict[key] = torch.tensor(False)
        step = state_dict.get(prefix + "step")
        if isinstance(step, Tensor) and step.dim() == 1 and self.step.dim() == 0:
            self.per_channel_()  # a fine-tuned layer's per-channel steps (shape checked below)
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def shape(self) -> tuple[int, ...]:
        """The layer's weight shape."""
        return tuple(self.pos.shape[1:])

    @torch.no_grad()
    def per_channel_(self) -> None:
        """One step per output channel (weights fine-tuning), each the layer's step."""
        if self.step.dim() == 0:
            step = self.step.detach().expand(self.shape[0]).clone()
            self.step = nn.Parameter(step, requires_grad=self.step.requires_grad)

    def _step(self, step: Tensor) -> Tensor:
        """A per-channel step (O,) viewed to broadcast over the weight (O, ...)."""
        return step.view(-1, *([1] * (self.pos.dim() - 2))) if step.dim() else step

    # ------------------------------------------------------------------ state
    @property
    def bits(self) -> int:
        """The layer's current precision N (0 when every weight is 0)."""
        return int(self.nbits)

    @property
    def storage_bits(self) -> int:
        """Bits per weight as stored and computed: the sign and N magnitude bits (N + 1
        planes of X = 2W + 1 in the engine); 0 for an all-zero layer."""
        n = self.bits
        return n + 1 if n else 0

    @property
    def numel(self) -> int:
        return int(self.pos[0].numel())

    def bit_parameters(self) -> dict[str, nn.Parameter]:
        """The bit variables that BSQ's optimizer trains, by attribute name."""
        return {"pos": self.pos, "neg": self.neg}

    def _place(self) -> Tensor:
        """2^b for b < N, else 0, shaped to broadcast over (8, *shape) (no host sync)."""
        b = torch.arange(MAX_BITS, device=self.pos.device)
        place = torch.where(b < self.nbits, 2.0**b, 0.0).to(self.pos.dtype)
        return place.view(-1, *([1] * (self.pos.dim() - 1)))

    def continuous(self) -> Tensor:
        """v = sum_b 2^b (p_b - n_b), before rounding."""
        return ((self.pos - self.neg) * self._place()).sum(0)

    def integer(self, x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(W, step): the integer weights (straight-through rounding) and the step (). ``x``
        is the layer's weight: read only in ``latent`` mode (otherwise only its dtype)."""
        if bool(self.latent):
            return self._from_weight(x)
        v = self.continuous()
        hi = torch.where(self.frozen, 2.0**self.nbits - 1.0, float(2**MAX_BITS - 1))
        v = torch.maximum(torch.minimum(v, hi.to(v.dtype)), -hi.to(v.dtype))
        w = v + (_round_away(v) - v).detach()
        step = self._step(self.step.abs().clamp_min(1e-8))
        if x is not None:
            w, step = w.to(x.dtype), step.to(x.dtype)
        return w, step

    def _from_weight(self, x: Tensor | None) -> tuple[Tensor, Tensor]:
        if x is None:
            raise ValueError("this BSQ layer fine-tunes its float weight: pass it to integer()")
        hi = 2.0 ** int(self.nbits) - 1.0
        step = self.step.abs().clamp_min(1e-8)
        if self.training and self.step.requires_grad:
            n = x[0].numel() if step.dim() else x.numel()  # weights per step
            step = _grad_scale(step, 1.0 / math.sqrt(n * max(hi, 1.0)))
        step = self._step(step).to(x.dtype)
        v = (x / step).clamp(-hi, hi)
        return v + (self._grid_round(v, hi) - v).detach(), step

    @staticmethod
    def _grid_round(v: Tensor, hi: float) -> Tensor:
        """The grid's nearest point of ``v`` (already within +-hi): sign-magnitude integers."""
        return _round_away(v)

    def _check_step(self) -> None:
        st = self.step.detach().abs()
        if st.shape not in ((), (self.shape[0],)):
            raise ValueError(f"BSQ step must be a scalar or one per output channel, got {st.shape}")
        if not bool(torch.isfinite(st).all()) or bool((st == 0).any()):
            raise ValueError("BSQ step must be finite and non-zero")

    def forward(self, x: Tensor | None = None) -> Tensor:
        w, step = self.integer(x)
        return w * step

    def plane_norms(self) -> Tensor:
        """sqrt(1e-8 + sum over the layer's weights of p_b^2 + n_b^2), per bit b < N: the
        groups of BSQ's bit-level group Lasso (planes >= N give sqrt(1e-8) and are masked)."""
        sq = (self.pos**2 + self.neg**2).flatten(1).sum(1)
        b = torch.arange(MAX_BITS, device=sq.device)
        return torch.where(b < self.nbits, torch.sqrt(1e-8 + sq), torch.zeros_like(sq))

    def check(self) -> None:
        """ValueError (one line) unless the state is one BSQ can produce: N in 0..8, p_b and
        n_b finite in [0, 2] and 0 from plane N on, a finite non-zero step."""
        n = int(self.nbits)
        if not 0 <= n <= MAX_BITS:
            raise ValueError(f"BSQ precision {n} is not in 0..{MAX_BITS}")
        for what, param in (("positive", self.pos), ("negative", self.neg)):
            t = param.detach()
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t > 2).any()):
                raise ValueError(f"BSQ {what} bit variables outside [0, 2]")
            if bool((t[n:] != 0).any()):
                raise ValueError(f"BSQ {what} bit variables set above the layer's {n} bits")
        self._check_step()

    # ------------------------------------------------------------------ BSQ operations
    @torch.no_grad()
    def init_from(self, weight: Tensor, bits: int) -> None:
        """BSQ's initialisation from a trained weight at ``bits`` bits: step = max|w| /
        (2^bits - 1), W = round(w / step) in sign-magnitude bits. An all-zero weight gives a
        0-bit layer."""
        if not 0 <= int(bits) <= MAX_BITS:
            raise ValueError(f"BSQ bits must be in 0..{MAX_BITS}, got {bits}")
        w = weight.detach().float()
        s = float(w.abs().max()) if w.numel() else 0.0
        if bits == 0 or s == 0.0:
            self.pos.zero_()
            self.neg.zero_()
            self.nbits.fill_(0)
            return
        hi = 2**bits - 1
        step = s / hi
        q = _round_away(w / step).clamp(-hi, hi)
        pos, neg = _sign_magnitude_bits(q, bits)
        self.pos.copy_(pos)
        self.neg.copy_(neg)
        self.step.fill_(step)
        self.nbits.fill_(bits)
        self.frozen.fill_(False)

    @torch.no_grad()
    def clamp_(self) -> None:
        """After every optimizer step: p_b, n_b into [0, 2]; planes >= N back to 0."""
        self.pos.clamp_(0.0, 2.0)
        self.neg.clamp_(0.0, 2.0)
        keep = (self._place() > 0).to(self.pos.dtype)
        self.pos.mul_(keep)
        self.neg.mul_(keep)

    @torch.no_grad()
    def requantize(self, adjust: bool = True, weight: Tensor | None = None) -> dict[str, Any]:
        """BSQ's periodic re-quantization: the rounded weights W back into sign-magnitude
        bits. With ``adjust`` (the scheme is not frozen) also: precision +1 per overflowing bit
        (|W| > 2^N - 1; at most 8 bits), all-zero MSB planes dropped, and all-zero LSB planes
        dropped with the step doubled. The layer's output is unchanged (the step doubles
        exactly), except that a frozen or 8-bit layer clips W to its range. ``weight``: the
        layer's weight (read in ``latent`` mode, which never adjusts: the bits follow W).
        Returns {"before": N, "after": N', "overflow": bool}."""
        before = self.bits
        adjust = adjust and not bool(self.latent)
        w: Tensor = self.integer(weight)[0].detach()
        m = int(w.abs().max()) if w.numel() else 0
        n = before
        overflow = m > 2**n - 1
        if adjust:
            n = min(MAX_BITS, max(n, m.bit_length()))
        hi = 2**n - 1
        w = w.clamp(-hi, hi)
        if adjust:
            n = int(w.abs().max()).bit_length() if w.numel() else 0  # drop zero MSB planes
            step = self.step.abs()
            while n > 0 and bool(torch.all(torch.remainder(w, 2) == 0)):
                w = w / 2  # the LSB plane is zero everywhere: drop it, double the step
                step = step * 2
                n -= 1
            self.step.copy_(step)
        pos, neg = _sign_magnitude_bits(w, n)
        self.pos.copy_(pos)
        self.neg.copy_(neg)
        self.nbits.fill_(n)
        return {"before": before, "after": n, "overflow": bool(overflow)}

    def extra_repr(self) -> str:
        return f"shape={tuple(self.pos.shape[1:])}, bits={self.bits}, frozen={bool(self.frozen)}"
