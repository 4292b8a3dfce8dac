"""The graph builder of ``pack`` (the model walkers and ``pack_model`` are in _pack_models.py).

The IR is described in docs/format.md. In short: a list of ops over named values; a value is
an image (uint8 NCHW, only ``input``), a float stream (float32 NHWC), a float vector (float32
(N, C)) or packed bits (uint64, channels-last, bit 1 = -1). Binary convolutions and the binary
linear layer carry an *epilogue*: the element-wise steps that follow them (batch norm, RPReLU,
residual add, ...), executed in float32 exactly in torch's order; or, when a sign follows
directly, an integer threshold per output channel (the layer then outputs bits).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["pack_signs"]


class _Unsupported(ValueError):
    pass


def pack_signs(neg: np.ndarray) -> np.ndarray:
    """bool array (..., n), True where the value is -1 -> uint64 (..., ceil(n/64)).

    Bit j of word w holds element 64*w + j (least significant bit first); tail bits are 0.
    """
    neg = np.asarray(neg, dtype=bool)
    n = neg.shape[-1]
    words = max(1, -(-n // 64))
    pad = words * 64 - n
    if pad:
        neg = np.concatenate([neg, np.zeros((*neg.shape[:-1], pad), dtype=bool)], axis=-1)
    by = np.packbits(neg, axis=-1, bitorder="little")
    return np.ascontiguousarray(by).view("<u8").astype(np.uint64).reshape(*neg.shape[:-1], words)


# --------------------------------------------------------------------------------- helpers
def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().float().numpy().astype(np.float32).copy()


def _ord(f: np.ndarray) -> np.ndarray:
    """float32 -> int64 keys with the order of the floats (+0 and -0 adjacent)."""
    i = np.asarray(f, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF) - 1, i)


def _unord(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k, dtype=np.int64)
    i = np.where(k < 0, (-(k + 1)) | np.int64(-0x80000000), k).astype(np.int32)
    return i.view(np.float32)


def _float_threshold(fn: Any, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the float threshold of ``fn(x) >= 0`` (fn: float32 (C,) -> float32 (C,),
    evaluated elementwise per channel, monotone in x). Returns (threshold, mode):
    mode 1: +1 iff x >= t; mode -1: +1 iff x <= t; mode 0: constant (+1 iff t >= 0).
    Found by bisection over all float32 values with ``fn`` as the oracle, so the comparison
    reproduces ``fn`` (torch's own arithmetic) exactly."""
    big = np.finfo(np.float32).max
    lo_k = int(_ord(np.array(-big, np.float32)))  # finite floats only: 0 * inf is NaN
    hi_k = int(_ord(np.array(big, np.float32)))

    def cond(keys: np.ndarray) -> np.ndarray:
        return np.asarray(fn(_unord(keys))) >= 0

    at_lo = cond(np.full(channels, lo_k))
    at_hi = cond(np.full(channels, hi_k))
    t = np.zeros(channels, np.float32)
    mode = np.zeros(channels, np.int8)
    inc = ~at_lo & at_hi  # smallest x with cond
    dec = at_lo & ~at_hi  # largest x with cond
    const = at_lo == at_hi
    lo = np.full(channels, lo_k, np.int64)  # cond(lo) == at_lo, cond(hi) == at_hi
    hi = np.full(channels, hi_k, np.int64)
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        c = cond(mid) == at_hi
        hi = np.where(c, mid, hi)
        lo = np.where(c, lo, mid)
    t[inc] = _unord(hi[inc])
    mode[inc] = 1
    t[dec] = _unord(lo[dec])
    mode[dec] = -1
    t[const] = np.where(at_lo[const], 1.0, -1.0)
    return t, mode


# --------------------------------------------------------------------------------- builder
class _Builder:
    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.ops: list[dict[str, Any]] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.kinds: dict[str, tuple[str, int]] = {"input": ("image", 0)}
        self._n = 0
        # any-precision models: id(layer) -> its name for set_precision (precision sets)
        self.precision_names: dict[int, str] = {}

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def tensor(self, op: str, key: str, arr: np.ndarray) -> str:
        name = f"{op}.{key}"
        self.tensors[name] = np.ascontiguousarray(arr)
        return name

    # ---- weights
    def binary_weight(self, layer: Any, what: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(neg bool array in torch layout, per-output scale or None)."""
        from ..nn import BinaryConv2d, BinaryLinear  # noqa: F401
        from ..quant import is_binary_quantizer

        q = layer.weight_quantizer
        if q is None or not is_binary_quantizer(q):
            raise _Unsupported(
                f"{what}: weights must be binarized by a sign quantizer "
                f"(got {type(q).__name__ if q is not None else 'None'})"
            )
        with self.torch.no_grad():
            qw = q(layer.weight.detach().float())
        a = qw.abs().reshape(qw.shape[0], -1)
        amax = a.amax(dim=1)
        if not bool((a == amax[:, None]).all()):
            raise _Unsupported(f"{what}: quantized weights are not +-alpha per output channel")
        neg = (qw < 0).cpu().numpy()
        scale = amax.cpu().numpy().astype(np.float32)
        return neg, (None if bool(np.all(scale == 1.0)) else scale)

    def check_input_quantizer(self, layer: Any, what: str) -> None:
        from ..quant import MagnitudeAwareSign, is_binary_quantizer

        q = layer.input_quantizer
        if q is None or not is_binary_quantizer(q) or isinstance(q, MagnitudeAwareSign):
            raise _Unsupported(
                f"{what}: inputs must be binarized by a sign quantizer "
                f"(got {type(q).__name__ if q is not None else 'None'})"
            )

    # ---- element-wise steps
    def step_for(self, m: Any, op: str, channels: int, idx: int) -> list[dict[str, Any]]:
        from torch import nn

        from ..nn import LearnableBias, RPReLU, Scale

        k = f"e{idx}"
        if callable(getattr(m, "set_for", None)):  # a SwitchableBatchNorm: its active set
            m = m.active()
        if isinstance(m, nn.Identity):
            return []
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            if m.num_features != channels:
                raise _Unsupported(
                    f"{type(m).__name__}({m.num_features}) after {channels} channels"
                )
            alpha, beta = _bn_alpha_beta(m)
            return [
                {
                    "kind": "bn",
                    "alpha": self.tensor(op, k + ".alpha", alpha),
                    "beta": self.tensor(op, k + ".beta", beta),
                }
            ]
        if isinstance(m, LearnableBias):
            return [{"kind": "bias", "bias": self.tensor(op, k + ".bias", _np(m.bias))}]
        if isinstance(m, Scale):
            return [
                {
                    "kind": "affine",
                    "weight": self.tensor(op, k + ".weight", _np(m.weight)),
                    "bias": self.tensor(op, k + ".bias", _np(m.bias)),
                }
            ]
        if isinstance(m, RPReLU):
            return [
                {
                    "kind": "rprelu",
                    "gamma": self.tensor(op, k + ".gamma", _np(m.gamma)),
                    "slope": self.tensor(op, k + ".slope", _np(m.slope)),
                    "zeta": self.tensor(op, k + ".zeta", _np(m.zeta)),
                }
            ]
        raise _Unsupported(f"unsupported module {type(m).__name__} in an element-wise chain")

    # ---- ops
    def conv(
        self,
        layer: Any,
        src: str,
        post: list[Any],
        *,
        residual: tuple[str, int] | None = None,
        to_bits: bool = False,
        what: str = "conv",
    ) -> str:
        """A BinaryConv2d reading packed bits ``src``, then the modules ``post`` in order
        (then the residual add). ``to_bits``: a sign follows (fold into thresholds)."""
        self.check_input_quantizer(layer, what)
        cin, cout = layer.in_channels, layer.out_channels
        if layer.groups != 1 or tuple(layer.dilation) != (1, 1):
            raise _Unsupported(f"{what}: grouped or dilated binary convolutions are not supported")
        if layer.pad_value != 1.0 and any(layer.pad_hw):
            raise _Unsupported(f"{what}: binary convolutions must use one-padding")
        neg, scale = self.binary_weight(layer, what)
        kh, kw = layer.kernel_size
        op = self.name("conv")
        neg = np.transpose(neg, (0, 2, 3, 1))  # (Cout, kh, kw, Cin)
        extra = [_ConvBias(layer.bias)] if layer.bias is not None else []
        if to_bits:
            thr, flip = self.int_threshold(layer, kh * kw * cin, scale, extra + post, what)
            neg = neg ^ flip[:, None, None, None]
            out = self.name("b")
            self.ops.append(
                {
                    "op": "conv",
                    "name": op,
                    "inputs": [src],
                    "output": out,
                    "in_channels": cin,
                    "out_channels": cout,
                    "kernel": [kh, kw],
                    "stride": list(layer.stride),
                    "pad": list(layer.pad_hw),
                    "weight": self.tensor(op, "weight", pack_signs(neg)),
                    "threshold": self.tensor(op, "threshold", thr),
                    "epilogue": [],
                }
            )
            self.kinds[out] = ("bits", cout)
            return out
        epi = self.epilogue(op, cout, scale, extra + post)
        inputs = [src]
        if residual is not None:
            rname, rep = residual
            if self.kinds[rname][1] * rep != cout:
                raise _Unsupported(f"{what}: residual width does not match")
            epi.append({"kind": "add", "input": 1, "repeat": rep})
            inputs.append(rname)
        out = self.name("s")
        self.ops.append(
            {
                "op": "conv",
                "name": op,
                "inputs": inputs,
                "output": out,
                "in_channels": cin,
                "out_channels": cout,
                "kernel": [kh, kw],
                "stride": list(layer.stride),
                "pad": list(layer.pad_hw),
                "weight": self.tensor(op, "weight", pack_signs(neg)),
                "epilogue": epi,
            }
        )
        self.kinds[out] = ("stream", cout)
        return out

    def epilogue(
        self, op: str, channels: int, scale: np.ndarray | None, post: list[Any]
    ) -> list[dict[str, Any]]:
        epi: list[dict[str, Any]] = []
        if scale is not None:
            epi.append({"kind": "scale", "scale": self.tensor(op, "wscale", scale)})
        for i, m in enumerate(post):
            if isinstance(m, _ConvBias):
                epi.append({"kind": "bias", "bias": self.tensor(op, f"e{i}.bias", _np(m.bias))})
            else:
                epi.extend(self.step_for(m, op, channels, i))
        return epi

    def int_threshold(
        self, layer: Any, k: int, scale: np.ndarray | None, chain: list[Any], what: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """sign(chain(scale * acc)) for every integer acc in [-k, k] (evaluated in torch) ->
        per channel int32 threshold T and flip: +1 iff (flip ? -acc : acc) >= T."""
        torch = self.torch
        c = layer.out_channels
        acc = torch.arange(-k, k + 1, dtype=torch.float32)
        x = acc.view(1, 1, 1, -1).expand(1, c, 1, 2 * k + 1).clone()
        if scale is not None:
            x = x * torch.from_numpy(scale).view(1, -1, 1, 1)
        with torch.no_grad():
            for m in chain:
                x = m(x)
        on = (x >= 0).view(c, -1).cpu().numpy()  # (C, 2k+1), acc ascending
        thr = np.zeros(c, np.int32)
        flip = np.zeros(c, bool)
        for ch in range(c):
            row = on[ch]
            if row.all():
                thr[ch] = -(k + 1)
            elif not row.any():
                thr[ch] = k + 1
            elif not row[0] and row[-1]:
                first = int(np.argmax(row))
                if not row[first:].all():
                    raise _Unsupported(f"{what}: the activation before the sign is not monotone")
                thr[ch] = first - k
            else:  # decreasing: +1 iff acc <= last  <=>  -acc >= -last
                last = int(len(row) - 1 - np.argmax(row[::-1]))
                if not row[: last + 1].all():
                    raise _Unsupported(f"{what}: the activation before the sign is not monotone")
                thr[ch] = -(last - k)
                flip[ch] = True
        return thr, flip

    def sign(self, src: str, shift: Any | None, what: str = "sign") -> str:
        """binarize a float stream / vector: +1 iff (x + b) >= 0 <=> x >= -b (exact in float)."""
        kind, c = self.kinds[src]
        if kind not in ("stream", "vector"):
            raise _Unsupported(f"{what}: a sign must read a float value")
        op = self.name("sign")
        t = np.zeros(c, np.float32) if shift is None else -_np(shift.bias)
        if t.shape != (c,):
            raise _Unsupported(f"{what}: bias width does not match")
        t = np.where(t == 0, np.float32(-0.0), t).astype(np.float32)
        return self.binarize(op, src, t, np.ones(c, np.int8))

    def binarize(self, op: str, src: str, t: np.ndarray, mode: np.ndarray) -> str:
        _, c = self.kinds[src]
        out = self.name("b")
        self.ops.append(
            {
                "op": "binarize",
                "name": op,
                "inputs": [src],
                "output": out,
                "channels": c,
                "threshold": self.tensor(op, "threshold", t.astype(np.float32)),
                "mode": self.tensor(op, "mode", mode.astype(np.int8)),
            }
        )
        self.kinds[out] = ("bits", c)
        return out

    def bn_sign(self, src: str, bn: Any, what: str) -> str:
        """sign(BN(x)) on a float value -> per-channel float threshold (exact: torch's BN is
        the bisection oracle)."""
        _, c = self.kinds[src]
        if bn.num_features != c:
            raise _Unsupported(f"{what}: batch norm width {bn.num_features} != {c}")
        t, mode = _float_threshold(lambda x: _call_bn(bn, x), c)
        return self.binarize(self.name("sign"), src, t, mode)

    def encode_conv(self, stem: Any, post: list[Any], what: str = "stem") -> str:
        from ..nn import BitPlaneEncoder, ThermometerEncoder

        enc = stem.encoder
        c_img = stem.image_channels
        if isinstance(enc, BitPlaneEncoder):
            encoder, planes = "bitplane", enc.bits
            thresholds = np.zeros(planes, np.int32)
        elif isinstance(enc, ThermometerEncoder):
            encoder, planes = "thermometer", enc.levels
            thresholds = enc.thresholds.cpu().numpy().astype(np.int32)
        else:  # pragma: no cover - EncodedConv2d checks this
            raise _Unsupported(f"{what}: unsupported encoder {type(enc).__name__}")
        if stem.groups != 1 or tuple(stem.dilation) != (1, 1):
            raise _Unsupported(f"{what}: grouped or dilated convolutions are not supported")
        neg, scale = self.binary_weight(stem, what)
        cout = stem.out_channels
        kh, kw = stem.kernel_size
        # torch weight (Cout, C*P, kh, kw), plane-channel c*P + p -> (Cout, kh, kw, C*P)
        neg = neg.transpose(0, 2, 3, 1)
        pw = enc.plane_weights.cpu().numpy().astype(np.float32).reshape(c_img, planes)
        if not np.all(pw == pw[:1]):
            raise _Unsupported(f"{what}: plane weights must not depend on the image channel")
        op = self.name("stem")
        extra = [_ConvBias(stem.bias)] if stem.bias is not None else []
        epi = self.epilogue(op, cout, scale, extra + post)
        out = self.name("s")
        self.ops.append(
            {
                "op": "encode_conv",
                "name": op,
                "inputs": ["input"],
                "output": out,
                "encoder": encoder,
                "in_channels": c_img,
                "planes": planes,
                "out_channels": cout,
                "kernel": [kh, kw],
                "stride": list(stem.stride),
                "pad": list(stem.pad_hw),
                "weight": self.tensor(op, "weight", pack_signs(neg)),
                "plane_weights": self.tensor(op, "plane_weights", pw[0].copy()),
                "plane_thresholds": self.tensor(op, "plane_thresholds", thresholds),
                "epilogue": epi,
            }
        )
        self.kinds[out] = ("stream", cout)
        return out

    def avgpool(self, src: str, pool: Any) -> str:
        k = _pair(pool.kernel_size)
        s = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
        if _pair(pool.padding) != (0, 0) or getattr(pool, "divisor_override", None):
            raise _Unsupported("AvgPool2d: only padding=0 without divisor_override is supported")
        kind, c = self.kinds[src]
        if kind != "stream":
            raise _Unsupported("AvgPool2d must read a float stream")
        out = self.name("s")
        self.ops.append(
            {
                "op": "avgpool",
                "name": self.name("pool"),
                "inputs": [src],
                "output": out,
                "kernel": list(k),
                "stride": list(s),
                "ceil_mode": bool(pool.ceil_mode),
            }
        )
        self.kinds[out] = ("stream", c)
        return out

    def gap(self, src: str) -> str:
        kind, c = self.kinds[src]
        if kind != "stream":
            raise _Unsupported("global average pooling must read a float stream")
        out = self.name("v")
        self.ops.append({"op": "gap", "name": self.name("gap"), "inputs": [src], "output": out})
        self.kinds[out] = ("vector", c)
        return out

    def linear(self, layer: Any, src: str, post: list[Any], what: str = "linear") -> str:
        self.check_input_quantizer(layer, what)
        kind, c = self.kinds[src]
        if kind != "bits" or c != layer.in_features:
            raise _Unsupported(f"{what}: expects {layer.in_features} binary features")
        neg, scale = self.binary_weight(layer, what)
        op = self.name("linear")
        extra = [_ConvBias(layer.bias)] if layer.bias is not None else []
        epi = self.epilogue(op, layer.out_features, scale, extra + post)
        out = self.name("v")
        self.ops.append(
            {
                "op": "linear",
                "name": op,
                "inputs": [src],
                "output": out,
                "in_features": layer.in_features,
                "out_features": layer.out_features,
                "weight": self.tensor(op, "weight", pack_signs(neg)),
                "epilogue": epi,
            }
        )
        self.kinds[out] = ("vector", layer.out_features)
        return out


class _ConvBias:
    """Marker: the bias of a binary conv/linear layer, added to the integer accumulator."""

    def __init__(self, bias: Any) -> None:
        self.bias = bias

    def __call__(self, x: Any) -> Any:
        return x + self.bias.detach().float().view(1, -1, *([1] * (x.dim() - 2)))


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def _bn_alpha_beta(bn: Any) -> tuple[np.ndarray, np.ndarray]:
    """torch's eval batch norm as y = fma(x, alpha, beta) (as ATen computes it on the CPU):
    invstd = 1/sqrt(var + eps) in float32; alpha = w*invstd; beta = fma(-mean, alpha, b)."""
    if not bn.track_running_stats or bn.running_mean is None:
        raise _Unsupported("batch norm without running statistics is not supported")
    c = bn.num_features
    var = bn.running_var.detach().float().cpu().numpy()
    mean = bn.running_mean.detach().float().cpu().numpy()
    w = _np(bn.weight) if bn.weight is not None else np.ones(c, np.float32)
    b = _np(bn.bias) if bn.bias is not None else np.zeros(c, np.float32)
    invstd = np.float32(1.0) / np.sqrt(var + np.float32(bn.eps))
    alpha = (w * invstd).astype(np.float32)
    beta = (b.astype(np.float64) - mean.astype(np.float64) * alpha.astype(np.float64)).astype(
        np.float32
    )
    return alpha, beta


def _call_bn(bn: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(1, -1)
        if isinstance(bn, torch.nn.BatchNorm2d):
            return bn(t.view(1, -1, 1, 1)).view(-1).numpy()
        return bn(t).view(-1).numpy()
