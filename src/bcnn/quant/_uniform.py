"""k-bit uniform quantizers (1 <= k <= 8) with a learned step size (LSQ) or a fixed one.

Two integer grids, both chosen so that a k-bit value is a sum of k binary planes and the
packed engine can run it bit-serially with the 1-bit XOR-popcount kernels:

* signed (weights, and activations read from a real-valued stream): the 2^k odd integers
  ``X in {-(2^k - 1), ..., -3, -1, 1, 3, ..., 2^k - 1}``, ``X = sum_i 2^i s_i`` with
  ``s_i in {-1, +1}``. k = 1 is exactly sign (sign(0) = +1). Border padding: every plane +1,
  i.e. X = 2^k - 1 (the one-padding of the binary kernels, plane by plane).
* unsigned (activations after a ReLU): ``X in {0, 1, ..., 2^k - 1}``, ``X = sum_i 2^i b_i``
  with ``b_i in {0, 1}``. Border padding: X = 0 (zero padding).

forward:  q(x) = s * X(x / s),  with X(v) = nearest grid point of clip(v, lo, hi)
          nearest odd integer: 2*floor(v/2) + 1; nearest integer: floor(v + 1/2)
backward: dq/dx = 1 inside [lo*s, hi*s], 0 outside (straight-through estimator);
          dq/ds = X - v inside, X outside (LSQ: Esser et al., "Learned Step Size
          Quantization", ICLR 2020, arXiv 1902.08153), scaled by 1/sqrt(numel * hi).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._registry import register_quantizer

__all__ = ["UniformQuantizer", "grid_limits", "quantize_to_grid"]


def grid_limits(bits: int, signed: bool) -> tuple[int, int]:
    """(lo, hi) of the integer grid."""
    if signed:
        return -(2**bits - 1), 2**bits - 1
    return 0, 2**bits - 1


def quantize_to_grid(v: Tensor, bits: int, signed: bool) -> Tensor:
    """Nearest grid point of v (no gradient logic): the reference the engine reproduces."""
    lo, hi = grid_limits(bits, signed)
    v = v.clamp(lo, hi)
    return 2.0 * torch.floor(v / 2.0) + 1.0 if signed else torch.floor(v + 0.5)


def _grad_scale(t: Tensor, g: float) -> Tensor:
    """Identity forward, gradient multiplied by g (LSQ's step-size gradient scale)."""
    return (t - t * g).detach() + t * g


@register_quantizer("lsq")
class UniformQuantizer(nn.Module):
    """k-bit uniform quantizer with a learned (LSQ) or fixed step size.

    Args:
        bits: 1..8.
        signed: odd-integer grid (True), unsigned grid (False), or ``None``: decided on the first
            batch (unsigned if it has no negative value); stored in the state dict.
        channels: number of per-channel steps along dim 0 (weights: out channels); 0 = one step.
        learned: learn the step (LSQ); otherwise it stays at its initial value.
        init_step: initial step; default: LSQ's 2*mean(|x|)/sqrt(hi) from the first batch.

    ``integer(x) -> (X, step)`` gives the integer grid values and the step, so that layers can
    compute ``step_x * step_w * conv(X, W)`` with exact integer arithmetic (as the engine does).
    """

    step: Tensor
    initialized: Tensor
    signed_flag: Tensor

    def __init__(
        self,
        bits: int,
        signed: bool | None = True,
        channels: int = 0,
        learned: bool = True,
        init_step: float | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= int(bits) <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits}")
        self.bits = int(bits)
        # run-time weight-plane knob (bcnn.quant.set_precision): keep only the top planes
        self.keep_bits: int | None = None
        self.auto_sign = signed is None
        self.channels = int(channels)
        self.learned = learned
        shape = (channels,) if channels else ()
        init = 1.0 if init_step is None else float(init_step)
        if learned:
            self.step = nn.Parameter(torch.full(shape, init))
        else:
            self.register_buffer("step", torch.full(shape, init))
        self.register_buffer("initialized", torch.tensor(init_step is not None))
        self.register_buffer(
            "signed_flag", torch.tensor(bool(signed) if signed is not None else True)
        )

    @property
    def signed(self) -> bool:
        return bool(self.signed_flag)

    @property
    def pad_value(self) -> float:
        """Grid value of the border: 2^k - 1 on the odd grid (every plane +1: one-padding),
        0 on the unsigned one (every plane's bit 0: zero padding)."""
        return float(2**self.bits - 1) if self.signed else 0.0

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        return t.view(-1, *([1] * (x.dim() - 1))) if self.channels else t

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        if self.auto_sign:
            self.signed_flag.fill_(bool((x < 0).any()))
        _, hi = grid_limits(self.bits, self.signed)
        dims = tuple(range(1, x.dim()))
        mean_abs = x.abs().mean(dim=dims) if self.channels else x.abs().mean()
        self.step.copy_((2.0 * mean_abs / math.sqrt(hi)).clamp_min(1e-8))
        self.initialized.fill_(True)

    def integer(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(X, step): X on the integer grid (with STE gradients), step broadcastable to x."""
        if not bool(self.initialized):
            self._initialize(x.detach().float())
        lo, hi = grid_limits(self.bits, self.signed)
        step = self.step.abs().clamp_min(1e-8)
        if self.learned and self.training:
            step = _grad_scale(
                step, 1.0 / math.sqrt(x[0].numel() * hi if self.channels else x.numel() * hi)
            )
        step = self._view(step, x).to(x.dtype)
        v = (x / step).clamp(lo, hi)
        g = 2.0 * torch.floor(v / 2.0) + 1.0 if self.signed else torch.floor(v + 0.5)
        keep = self.keep_bits
        if keep is not None and keep < self.bits and self.signed:
            # the top `keep` planes: sum_{i >= d} 2^i s_i = ((X >> d) | 1) << d, the nearest
            # point of the keep-bit odd grid of step 2^d (the run-time knob; no retraining)
            p = float(2 ** (self.bits - keep))
            t = torch.floor(g / p)
            g = (t + 1.0 - torch.remainder(t, 2.0)) * p
        X = v + (g - v).detach()  # round with a straight-through gradient
        return X, step

    def forward(self, x: Tensor) -> Tensor:
        X, step = self.integer(x)
        return X * step

    def extra_repr(self) -> str:
        sg = "auto" if self.auto_sign else self.signed
        return f"bits={self.bits}, signed={sg}, channels={self.channels}, learned={self.learned}"
