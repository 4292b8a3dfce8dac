"""Per-layer precision, parameters, MACs and packed memory (in the spirit of Larq's summary)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["LayerRow", "ModelSummary", "summary"]


def quantizer_bits(q: object) -> int:
    """Bit width of a quantizer's output: 1 for the sign family, ``q.bits`` for k-bit, else 32."""
    if q is None:
        return 32
    from .quant import is_binary_quantizer

    if is_binary_quantizer(q):
        return 1
    stored = getattr(q, "storage_bits", None)  # BSQ: sign + N magnitude bits
    return int(stored if stored is not None else getattr(q, "bits", 32))


@dataclass
class LayerRow:
    name: str
    kind: str
    input_bits: int | None
    weight_bits: int | None
    output_shape: list[int]
    binary_params: int = 0
    float_params: int = 0
    binary_macs: int = 0
    float_macs: int = 0
    packed_bytes: int = 0
    bsq_bits: int | None = None  # BSQ layers: the learned precision (zero grid: N; odd: k)
    weight_params: int = 0  # the layer's weight count (conv/linear)


@dataclass
class ModelSummary:
    """Rows per layer and totals. ``str()`` gives the table, ``to_dict()`` the JSON object."""

    model_name: str
    input_size: list[int]
    rows: list[LayerRow] = field(default_factory=list)

    def _total(self, key: str) -> int:
        return sum(getattr(r, key) for r in self.rows)

    @property
    def binary_params(self) -> int:
        return self._total("binary_params")

    @property
    def float_params(self) -> int:
        return self._total("float_params")

    @property
    def binary_macs(self) -> int:
        return self._total("binary_macs")

    @property
    def float_macs(self) -> int:
        return self._total("float_macs")

    @property
    def packed_bytes(self) -> int:
        return self._total("packed_bytes")

    @property
    def float32_bytes(self) -> int:
        return 4 * (self.binary_params + self.float_params)

    def _quantized_rows(self) -> list[LayerRow]:
        return [r for r in self.rows if r.weight_bits is not None and r.weight_bits < 32]

    @property
    def avg_weight_bits(self) -> float | None:
        """Bits per weight of the quantized conv/linear layers, weighted by their weights."""
        rows = self._quantized_rows()
        n = sum(r.weight_params for r in rows)
        return sum(r.weight_params * (r.weight_bits or 0) for r in rows) / n if n else None

    def to_dict(self) -> dict[str, Any]:
        total_macs = self.binary_macs + self.float_macs
        return {
            "model": self.model_name,
            "input_size": self.input_size,
            "binary_params": self.binary_params,
            "float_params": self.float_params,
            "binary_macs": self.binary_macs,
            "float_macs": self.float_macs,
            "binary_mac_share": self.binary_macs / total_macs if total_macs else 0.0,
            "packed_bytes": self.packed_bytes,
            "float32_bytes": self.float32_bytes,
            "compression": self.float32_bytes / self.packed_bytes if self.packed_bytes else 0.0,
            "avg_weight_bits": self.avg_weight_bits,
            "weight_compression": (
                32.0 / self.avg_weight_bits if self.avg_weight_bits else None
            ),  # quantized layers' weights vs float32
            "layers": [asdict(r) for r in self.rows],
        }

    def __str__(self) -> str:
        def bits(b: int | None) -> str:
            return "-" if b is None else str(b)

        head = ("layer", "type", "in", "w", "output", "bin params", "fp params", "bin MACs",
                "fp MACs", "memory")  # fmt: skip
        body = [
            (r.name, r.kind, bits(r.input_bits), bits(r.weight_bits),
             "x".join(map(str, r.output_shape)), f"{r.binary_params:,}", f"{r.float_params:,}",
             f"{r.binary_macs:,}", f"{r.float_macs:,}", _fmt_bytes(r.packed_bytes))
            for r in self.rows
        ]  # fmt: skip
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [f"{self.model_name}  input {'x'.join(map(str, self.input_size))}"]
        out += [line.format(*head), "-" * (sum(widths) + 2 * (len(widths) - 1))]
        out += [line.format(*row) for row in body]
        d = self.to_dict()
        out += [
            "",
            f"parameters       binary {d['binary_params']:,}   float {d['float_params']:,}",
            f"MACs             binary {d['binary_macs']:,}   float {d['float_macs']:,}"
            f"   (binary share {100 * d['binary_mac_share']:.2f}%)",
            f"packed size      {_fmt_bytes(d['packed_bytes'])}   float-32 equivalent "
            f"{_fmt_bytes(d['float32_bytes'])}   compression {d['compression']:.1f}x",
        ]
        if d["avg_weight_bits"] is not None:
            wc = d["weight_compression"]
            out.append(
                f"weight bits      {d['avg_weight_bits']:.2f} per weight (quantized layers, "
                f"weighted by weights)   vs float32 {f'{wc:.1f}x' if wc else 'inf'}"
            )
        return "\n".join(out)


def _fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.2f} MiB"


def _own_params(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(m.named_parameters(recurse=False))


def summary(
    model: nn.Module, input_size: tuple[int, ...] | None = None, name: str | None = None
) -> ModelSummary:
    """Summarise ``model`` for one input of ``input_size`` (C, H, W) (default: the model's own).

    Matrix ops (conv, linear) count as binary when both operands are 1 bit (an encoded first
    layer's planes count as 1-bit inputs); ``float_macs`` counts those with any wider operand.
    Packed memory: 1 bit per binary weight, k bits per k-bit weight, 32 bits per other parameter.
    """
    from .nn import BinaryConv2d, BinaryLinear, EncodedConv2d

    if input_size is None:
        input_size = tuple(getattr(model, "default_input_size", (3, 32, 32)))
    if len(input_size) == 4:
        input_size = input_size[1:]
    cfg = getattr(model, "bcnn_config", None)
    res = ModelSummary(
        name or (cfg["name"] if cfg else type(model).__name__), list(input_size), rows=[]
    )
    hooks = []

    def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        mname = names[mod]
        out_shape = list(output.shape[1:]) if isinstance(output, torch.Tensor) else []
        row = LayerRow(mname, type(mod).__name__, None, None, out_shape)
        wbits = 32
        if isinstance(mod, nn.Conv2d | nn.Linear):
            if isinstance(mod, EncodedConv2d):
                ib = 1
                wb = quantizer_bits(mod.weight_quantizer)
            elif isinstance(mod, BinaryConv2d | BinaryLinear):
                ib = quantizer_bits(mod.input_quantizer)
                wb = quantizer_bits(mod.weight_quantizer)
            else:
                ib = wb = 32
            row.input_bits, row.weight_bits = ib, wb
            row.weight_params = mod.weight.numel()
            wq: Any = getattr(mod, "weight_quantizer", None)
            if getattr(wq, "bsq", False):  # BSQ's own count (zero grid: N; odd grid: k)
                row.bsq_bits = int(wq.bits)
            out_per_sample = math.prod(out_shape)
            if isinstance(mod, nn.Conv2d):
                k = math.prod(mod.kernel_size) * mod.in_channels // mod.groups
            else:
                k = mod.in_features
            macs = out_per_sample * k
            if ib == 1 and wb == 1:
                row.binary_macs = macs
            else:
                row.float_macs = macs
            wbits = wb
        for pname, p in _own_params(mod):
            if pname == "weight" and wbits == 1:
                row.binary_params += p.numel()
                row.packed_bytes += math.ceil(p.numel() / 8)
            elif pname == "weight" and wbits < 32:  # k-bit weights: k bit-planes
                row.float_params += p.numel()
                row.packed_bytes += math.ceil(p.numel() * wbits / 8)
            else:
                row.float_params += p.numel()
                row.packed_bytes += 4 * p.numel()
        if row.binary_macs or row.float_macs or row.binary_params or row.float_params:
            res.rows.append(row)

    names: dict[nn.Module, str] = {}
    for n, m in model.named_modules():
        if getattr(m, "bsq", False):  # BSQ bit variables: the layer's weight counts
            continue
        if not list(m.children()) or _own_params(m):
            names[m] = n or type(m).__name__
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        x = torch.randint(0, 256, (1, *input_size), dtype=torch.uint8, device=device)
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return res
