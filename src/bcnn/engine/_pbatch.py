"""``pbatch``: post-training bit-serial modules swapped into any torch model (PrecisionBatching).

No retraining, no calibration data: weights are quantized once (per-row scale, odd-grid planes,
a clip search per row), activations dynamically per vector at every call; the number of weight
planes is a run-time knob (:func:`bcnn.quant.set_precision`). The arithmetic is in
:mod:`._pbatch_kernels`; this module is the torch side (imports torch).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._pbatch_kernels import (
    WEIGHT_PLANES,
    QuantizedActs,
    QuantizedWeights,
    act_stats,
    lut_linear,
    lut_pays,
    plane_dot,
)

__all__ = ["PBGRU", "PBLSTM", "PBConv2d", "PBLinear", "bit_serial_matmul", "pbatch"]

WEIGHT_BITS = tuple(range(1, WEIGHT_PLANES + 1))
ACT_BITS = tuple(range(2, 17))


def _bits(name: str, v: Any, allowed: tuple[int, ...]) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v not in allowed:
        raise ValueError(f"{name} must be an int in {allowed[0]}..{allowed[-1]}, got {v!r}")
    return v


def bit_serial_matmul(
    x: np.ndarray,
    w: QuantizedWeights,
    weight_bits: int,
    act_bits: int,
    where: str,
    amax: np.ndarray | None = None,
) -> np.ndarray:
    """float (N, K) @ W^T with W's top ``weight_bits`` planes and ``act_bits`` dynamic
    activations -> float64 (N, O). ``where`` names the layer in errors."""
    x = np.ascontiguousarray(x, np.float32)
    finite, neg, rmax = act_stats(x)
    if not finite:
        raise ValueError(f"layer {where!r}: input contains NaN or inf")
    a = QuantizedActs(x, act_bits, amax=rmax if amax is None else amax, signed=neg)
    dot = plane_dot(w, weight_bits, a)
    return w.alpha[weight_bits][None, :] * a.scale[:, None] * dot


class _Switchable(nn.Module):
    """The precision protocol of bcnn.quant.set_precision, shared by the modules below."""

    def _init_precision(self, weight_bits: int, act_bits: int, name: str) -> None:
        self._default = (weight_bits, act_bits)
        self._prec = (weight_bits, act_bits)
        self.layer_name = name

    @property
    def precision(self) -> tuple[int, int]:
        return self._prec

    @property
    def default_precision(self) -> tuple[int, int]:
        return self._default

    @property
    def allowed_precision(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return WEIGHT_BITS, ACT_BITS

    def set_precision(self, weight_bits: int, act_bits: int) -> None:
        self._prec = (
            _bits("weight_bits", weight_bits, WEIGHT_BITS),
            _bits("act_bits", act_bits, ACT_BITS),
        )

    def _mm(self, x: np.ndarray, w: QuantizedWeights, amax: np.ndarray | None = None) -> np.ndarray:
        return bit_serial_matmul(x, w, self._prec[0], self._prec[1], self.layer_name, amax)

    @property
    def packed_bytes(self) -> int:
        """Bytes of weight planes the current precision reads per call."""
        return sum(
            q.planes[WEIGHT_PLANES - self._prec[0] :].nbytes
            for q in self.__dict__.values()
            if isinstance(q, QuantizedWeights)
        )


def _np(x: torch.Tensor) -> np.ndarray:
    """float32 numpy view or copy of x (few torch calls: each costs at batch 1)."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        x = x.to("cpu", torch.float32)
    return (x.detach() if x.requires_grad else x).numpy()


def _torch(y: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(y)
    return t if like.dtype == torch.float32 else t.to(like.dtype)


def _bias(b: torch.Tensor | None) -> np.ndarray | None:
    return None if b is None else b.detach().to(torch.float64).cpu().numpy()


class PBLinear(_Switchable):
    """Drop-in for ``nn.Linear`` (inference): y = x W'^T + b with bit-serial W'."""

    def __init__(
        self, m: nn.Linear, weight_bits: int = 8, act_bits: int = 8, name: str = ""
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = m.in_features, m.out_features
        self.qw = QuantizedWeights(_np(m.weight))
        self.b = _bias(m.bias)
        self._init_precision(weight_bits, act_bits, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"layer {self.layer_name!r}: expected {self.in_features} input features, "
                f"got shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        xs = np.ascontiguousarray(_np(x).reshape(-1, self.in_features))
        wb, ab = self._prec
        # 8-bit or wider activations: the lookup table's cost does not depend on their sign
        if ab > 4 and self.qw.has_lut and lut_pays(xs.shape[0], ab, True):
            y32 = lut_linear(xs, self.qw, wb, ab, self.b)
            if y32 is None:
                raise ValueError(f"layer {self.layer_name!r}: input contains NaN or inf")
        else:
            y = self._mm(xs, self.qw)
            if self.b is not None:
                y = y + self.b
            y32 = y.astype(np.float32)
        return _torch(y32.reshape(*lead, self.out_features), x)

    def extra_repr(self) -> str:
        w, a = self._prec
        return f"{self.in_features}, {self.out_features}, weight_bits={w}, act_bits={a}"


class PBConv2d(_Switchable):
    """Drop-in for ``nn.Conv2d`` (groups 1, zero padding): im2col + bit-serial GEMM, one
    activation scale per image."""

    def __init__(
        self, m: nn.Conv2d, weight_bits: int = 8, act_bits: int = 8, name: str = ""
    ) -> None:
        super().__init__()
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(
                f"layer {name!r}: only groups=1, zero, numeric padding convolutions are supported"
            )
        self.conv = dict(
            kernel_size=m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride
        )
        self.out_channels = m.out_channels
        self.qw = QuantizedWeights(_np(m.weight).reshape(m.out_channels, -1))
        self.b = _bias(m.bias)
        self._init_precision(weight_bits, act_bits, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        kh, kw = self.conv["kernel_size"]
        (sh, sw), (ph, pw), (dh, dw) = (
            self.conv["stride"],
            self.conv["padding"],
            self.conv["dilation"],
        )
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x.to(torch.float32), **self.conv)  # (N, C*kh*kw, L)
        p = _np(cols.transpose(1, 2))  # (N, L, K)
        amax = np.repeat(np.abs(p).reshape(n, -1).max(axis=1), p.shape[1])
        y = self._mm(p.reshape(-1, p.shape[2]), self.qw, amax=amax)  # (N*L, O)
        if self.b is not None:
            y = y + self.b
        y32 = y.astype(np.float32).reshape(n, ho, wo, self.out_channels)
        return torch.from_numpy(y32).permute(0, 3, 1, 2).contiguous().to(x.dtype)


class _PBRNN(_Switchable):
    """Shared by PBLSTM / PBGRU: per layer, the input and hidden gate GEMVs run bit-serially
    (each with its own dynamic activation scale), the cell arithmetic in float."""

    gates: int  # 4 (LSTM: returns (h, c)) or 3 (GRU: returns h)

    def __init__(self, m: nn.LSTM | nn.GRU, weight_bits: int, act_bits: int, name: str) -> None:
        super().__init__()
        if m.bidirectional or int(getattr(m, "proj_size", 0) or 0):
            raise ValueError(f"layer {name!r}: bidirectional or projected RNNs are not supported")
        self.num_layers, self.hidden_size = m.num_layers, m.hidden_size
        self.input_size, self.batch_first = m.input_size, m.batch_first
        for layer in range(m.num_layers):
            setattr(self, f"qih{layer}", QuantizedWeights(_np(getattr(m, f"weight_ih_l{layer}"))))
            setattr(self, f"qhh{layer}", QuantizedWeights(_np(getattr(m, f"weight_hh_l{layer}"))))
            for k in ("ih", "hh"):
                b = getattr(m, f"bias_{k}_l{layer}", None) if m.bias else None
                setattr(self, f"b{k}{layer}", _bias(b) if b is not None else 0.0)
        self._init_precision(weight_bits, act_bits, name)

    def _cell(self, gi: np.ndarray, gh: np.ndarray, h: np.ndarray, c: np.ndarray) -> Any:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, hx: Any = None) -> Any:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"layer {self.layer_name!r}: expected (seq, batch, {self.input_size}) input "
                f"(batch_first={self.batch_first}), got shape {tuple(x.shape)}"
            )
        seq = _np(x.transpose(0, 1) if self.batch_first else x).astype(np.float64)  # (T, B, I)
        t_len, bsz = seq.shape[:2]
        hs = np.zeros((self.num_layers, bsz, self.hidden_size))
        cs = np.zeros_like(hs)
        if hx is not None:
            h0 = hx[0] if isinstance(hx, tuple) else hx
            hs = _np(h0).astype(np.float64).copy()
            if isinstance(hx, tuple):
                cs = _np(hx[1]).astype(np.float64).copy()
        out = seq
        for layer in range(self.num_layers):
            qih, qhh = getattr(self, f"qih{layer}"), getattr(self, f"qhh{layer}")
            bih, bhh = getattr(self, f"bih{layer}"), getattr(self, f"bhh{layer}")
            # input projections of every step in one small GEMM (one scale per vector)
            gi = self._mm(out.reshape(t_len * bsz, -1), qih).reshape(t_len, bsz, -1) + bih
            h, c = hs[layer], cs[layer]
            ys = np.empty((t_len, bsz, self.hidden_size))
            for t in range(t_len):
                gh = self._mm(h, qhh) + bhh
                h, c = self._cell(gi[t], gh, h, c)
                ys[t] = h
            hs[layer], cs[layer] = h, c
            out = ys
        y = torch.from_numpy(out.astype(np.float32))
        if self.batch_first:
            y = y.transpose(0, 1)
        h_n = torch.from_numpy(hs.astype(np.float32))
        if self.gates == 4:
            return y, (h_n, torch.from_numpy(cs.astype(np.float32)))
        return y, h_n


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


class PBLSTM(_PBRNN):
    """Drop-in for ``nn.LSTM`` (inference, unidirectional, no projection)."""

    gates = 4

    def __init__(self, m: nn.LSTM, weight_bits: int = 8, act_bits: int = 8, name: str = "") -> None:
        super().__init__(m, weight_bits, act_bits, name)

    def _cell(self, gi: np.ndarray, gh: np.ndarray, h: np.ndarray, c: np.ndarray) -> Any:
        i, f, g, o = np.split(gi + gh, 4, axis=1)  # torch's gate order
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        return _sigmoid(o) * np.tanh(c), c


class PBGRU(_PBRNN):
    """Drop-in for ``nn.GRU`` (inference, unidirectional)."""

    gates = 3

    def __init__(self, m: nn.GRU, weight_bits: int = 8, act_bits: int = 8, name: str = "") -> None:
        super().__init__(m, weight_bits, act_bits, name)

    def _cell(self, gi: np.ndarray, gh: np.ndarray, h: np.ndarray, c: np.ndarray) -> Any:
        ir_, iz, in_ = np.split(gi, 3, axis=1)
        hr, hz, hn = np.split(gh, 3, axis=1)
        r, z = _sigmoid(ir_ + hr), _sigmoid(iz + hz)
        n = np.tanh(in_ + r * hn)
        return (1.0 - z) * n + z * h, c


_SWAP: dict[type[nn.Module], type[_Switchable]] = {
    nn.Linear: PBLinear,
    nn.Conv2d: PBConv2d,
    nn.LSTM: PBLSTM,
    nn.GRU: PBGRU,
}


def pbatch(
    model: nn.Module,
    weight_bits: int = 8,
    act_bits: int = 8,
    layers: Iterable[type[nn.Module]] = (nn.Linear, nn.LSTM, nn.GRU, nn.Conv2d),
    skip: Iterable[str] = (),
) -> nn.Module:
    """Swap ``model``'s layers of the types in ``layers`` (exact types: bcnn's binary layers
    and other subclasses are left alone) for bit-serial modules, in place; returns the model
    (or the replacement, when ``model`` itself is such a layer). ``skip``: module names or
    fnmatch patterns to keep in float. The model is switched to eval mode."""
    _bits("weight_bits", weight_bits, WEIGHT_BITS)
    _bits("act_bits", act_bits, ACT_BITS)
    kinds = tuple(layers)
    for k in kinds:
        if k not in _SWAP:
            name = getattr(k, "__name__", repr(k))
            raise ValueError(
                f"pbatch cannot convert {name} layers; supported: Linear, Conv2d, LSTM, GRU"
            )
    skips = tuple(skip)
    model.eval()
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if type(m) in kinds and not any(fnmatch.fnmatchcase(n, p) for p in skips)
    ]
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no layer to convert "
            f"(looked for {', '.join(k.__name__ for k in kinds)}, skip={list(skips)})"
        )
    for name, m in targets:
        new = _SWAP[type(m)](m, weight_bits, act_bits, name or type(m).__name__)  # type: ignore[arg-type]
        if name == "":
            return new
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    return model
