"""``pack_model``: a torch model -> graph IR + packed tensors, through the model walkers here
(the BCNN family and ``nn.Sequential`` chains of bcnn layers), each emitting graph ops through a
:class:`_pack._Builder` (1-bit layers) and :mod:`._bitserial_pack` (k-bit layers)."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _bitserial_pack as BS
from ._pack import _Builder, _pair, _Unsupported

__all__ = ["pack_model"]


def _build_bcnn(b: _Builder, model: Any) -> str:
    from torch import nn

    from ..models.bcnn import BCNNBlock, BCNNDownsample

    if not model.binary:
        raise _Unsupported("this is a float twin (binary=False): only binary models can be packed")
    stem = model.stem
    if BS.is_kbit(stem.conv.weight_quantizer):  # k-bit layers: bit-serial ops (_bitserial)
        h = BS.build_qstem(b, stem.conv, [stem.bn, stem.act], _Unsupported)
    else:
        h = b.encode_conv(stem.conv, [stem.bn, stem.act])
    for i, blk in enumerate(model.blocks):
        if isinstance(blk, BCNNBlock | BCNNDownsample) and BS.layer_is_kbit(blk.conv):
            a = h
            if isinstance(blk, BCNNDownsample) and not isinstance(blk.pool, nn.Identity):
                a = b.avgpool(h, blk.pool)
            rep = blk.repeat if isinstance(blk, BCNNDownsample) else 1
            h = BS.build_qconv(
                b, blk.conv, a, [blk.shift], [blk.bn, blk.act], _Unsupported,
                residual=(a, rep), what=f"blocks.{i}",
            )  # fmt: skip
        elif isinstance(blk, BCNNBlock):
            bits = b.sign(h, blk.shift, f"blocks.{i}")
            h = b.conv(blk.conv, bits, [blk.bn, blk.act], residual=(h, 1), what=f"blocks.{i}")
        elif isinstance(blk, BCNNDownsample):
            a = h if isinstance(blk.pool, nn.Identity) else b.avgpool(h, blk.pool)
            bits = b.sign(a, blk.shift, f"blocks.{i}")
            h = b.conv(
                blk.conv, bits, [blk.bn, blk.act], residual=(a, blk.repeat), what=f"blocks.{i}"
            )
        else:
            raise _Unsupported(f"blocks.{i}: unsupported module {type(blk).__name__}")
    head = model.head
    f = b.gap(h)
    if BS.layer_is_kbit(head.fc):
        return BS.build_qlinear(b, head.fc, f, [head.norm], [head.scale], _Unsupported, "head.fc")
    fb = b.bn_sign(f, head.norm, "head")
    return b.linear(head.fc, fb, [head.scale], "head.fc")


def _flatten_modules(model: Any) -> list[tuple[str, Any]]:
    from torch import nn

    out: list[tuple[str, Any]] = []
    for name, m in model.named_children():
        if isinstance(m, nn.Sequential):
            out.extend((f"{name}.{n}", mm) for n, mm in _flatten_modules(m))
        else:
            out.append((name, m))
    return out


def _build_sequential(b: _Builder, model: Any) -> str:
    """A chain: encoder-conv / binary conv / BN / bias / RPReLU / Scale / pooling / GAP /
    flatten / binary linear / BCNN blocks; a sign (quantizer module or the next layer's input
    quantizer) after an integer conv + element-wise chain folds into thresholds."""
    from torch import nn

    from ..models.bcnn import BCNNBlock, BCNNDownsample, BCNNHead, BCNNStem
    from ..nn import BinaryConv2d, BinaryLinear, EncodedConv2d, LearnableBias, RPReLU, Scale
    from ..quant import MagnitudeAwareSign, is_binary_quantizer

    mods = _flatten_modules(model)
    elementwise = (nn.BatchNorm1d, nn.BatchNorm2d, LearnableBias, RPReLU, Scale, nn.Identity)
    cur = "input"
    i = 0
    pending_shift: Any = None  # a LearnableBias directly before a sign

    def take_post(j: int) -> tuple[list[Any], int]:
        post: list[Any] = []
        while j < len(mods) and isinstance(mods[j][1], elementwise):
            post.append(mods[j][1])
            j += 1
        return post, j

    def next_reads_sign(j: int) -> bool:
        if j >= len(mods):
            return False
        m = mods[j][1]
        if is_binary_quantizer(m) and not isinstance(m, MagnitudeAwareSign):
            return True
        if isinstance(m, BinaryConv2d) and not isinstance(m, EncodedConv2d):
            return m.input_quantizer is not None
        return isinstance(m, BinaryLinear) and m.input_quantizer is not None

    def to_bits(src: str, what: str) -> str:
        kind, _ = b.kinds[src]
        if kind == "bits":
            return src
        return b.sign(src, None, what)

    while i < len(mods):
        name, m = mods[i]
        kind = b.kinds[cur][0]
        if isinstance(m, EncodedConv2d | BCNNStem):
            if cur != "input":
                raise _Unsupported(f"{name}: an encoder convolution must come first")
            conv = m.conv if isinstance(m, BCNNStem) else m
            if isinstance(m, BCNNStem):
                if not m.binary:
                    raise _Unsupported(f"{name}: float stem")
                post, i = [m.bn, m.act], i + 1
            else:
                post, i = take_post(i + 1)
            cur = b.encode_conv(conv, post, name)
            continue
        if cur == "input":
            raise _Unsupported(f"{name}: the first layer must be an encoder convolution")
        if isinstance(m, BinaryConv2d):
            src = cur
            if kind != "bits":
                src = b.sign(cur, pending_shift, name)
            pending_shift = None
            post, j = take_post(i + 1)
            fold = next_reads_sign(j)
            cur = b.conv(m, src, post, to_bits=fold, what=name)
            i = j
            if fold and is_binary_quantizer(mods[i][1]):
                i += 1  # the explicit sign module is consumed by the threshold
            continue
        if isinstance(m, BinaryLinear):
            if kind == "stream":
                raise _Unsupported(f"{name}: flatten or pool before a linear layer")
            src = cur if kind == "bits" else b.sign(cur, pending_shift, name)
            pending_shift = None
            post, j = take_post(i + 1)
            cur = b.linear(m, src, post, name)
            i = j
            continue
        if isinstance(m, LearnableBias) and next_reads_sign(i + 1) and kind != "bits":
            pending_shift = m
            i += 1
            continue
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) and next_reads_sign(i + 1):
            if kind == "bits":
                raise _Unsupported(f"{name}: batch norm on binary values")
            cur = b.bn_sign(cur, m, name)
            i += 1
            if is_binary_quantizer(mods[i][1]):
                i += 1
            continue
        if is_binary_quantizer(m) and not isinstance(m, MagnitudeAwareSign):
            if kind != "bits":
                cur = b.sign(cur, pending_shift, name)
                pending_shift = None
            i += 1
            continue
        if isinstance(m, nn.AvgPool2d):
            cur = b.avgpool(cur, m)
            i += 1
            continue
        if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1):
            cur = b.gap(cur)
            i += 1
            if i < len(mods) and isinstance(mods[i][1], nn.Flatten):
                i += 1
            continue
        if isinstance(m, BCNNBlock):
            bits = b.sign(cur, m.shift, name)
            cur = b.conv(m.conv, bits, [m.bn, m.act], residual=(cur, 1), what=name)
            i += 1
            continue
        if isinstance(m, BCNNDownsample):
            a = cur if isinstance(m.pool, nn.Identity) else b.avgpool(cur, m.pool)
            bits = b.sign(a, m.shift, name)
            cur = b.conv(m.conv, bits, [m.bn, m.act], residual=(a, m.repeat), what=name)
            i += 1
            continue
        if isinstance(m, BCNNHead):
            f = b.gap(cur)
            fb = b.bn_sign(f, m.norm, name)
            cur = b.linear(m.fc, fb, [m.scale], name)
            i += 1
            continue
        if isinstance(m, nn.Identity):
            i += 1
            continue
        raise _Unsupported(f"{name}: unsupported module {type(m).__name__}")
    if b.kinds[cur][0] != "vector" or pending_shift is not None:
        raise _Unsupported("the model must end with a binary linear classifier")
    return cur


def pack_model(
    model: Any,
    *,
    classes: list[str] | None = None,
    meta: dict[str, Any] | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Return (graph, tensors) for a supported torch model (see docs/format.md)."""
    from torch import nn

    from ..models.bcnn import BCNN

    if not isinstance(model, nn.Module):
        raise TypeError(f"pack() expects a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    restore = None
    try:
        b = _Builder()
        if getattr(model, "precisions", None):  # any-precision: every set, packed at the top
            from ..models import precision_layers
            from ..quant import set_precision

            if not isinstance(model, BCNN):
                raise _Unsupported("any-precision models pack from the BCNN family only")
            restore = set_precision(model)
            b.precision_names = {id(m): n for n, m in precision_layers(model)}
        if isinstance(model, BCNN):
            out = _build_bcnn(b, model)
            in_chans = model.in_chans
        elif isinstance(model, nn.Sequential):
            out = _build_sequential(b, model)
            first = b.ops[0]
            in_chans = int(first["in_channels"])
        else:
            raise _Unsupported(
                f"cannot pack a {type(model).__name__}: supported are the BCNN family and "
                "nn.Sequential chains of bcnn binary layers"
            )
    except _Unsupported as e:
        raise ValueError(f"pack: {e}") from None
    finally:
        model.train(was_training)
        if restore is not None:
            set_precision(model, layers=restore)
    size = input_size or getattr(model, "default_input_size", None)
    num_classes = b.kinds[out][1]
    if classes is not None and len(classes) != num_classes:
        classes = None
    graph: dict[str, Any] = {
        "input": {
            "channels": int(in_chans),
            "size": [int(size[1]), int(size[2])] if size is not None else None,
        },
        "num_classes": int(num_classes),
        "classes": list(classes) if classes is not None else None,
        "ops": b.ops,
        "output": out,
        "source": dict(getattr(model, "bcnn_config", None) or {}),
    }
    if meta:
        graph["meta"] = dict(meta)
    return graph, b.tensors
