"""Model walkers: the BCNN family and ``nn.Sequential`` chains of bcnn layers (the models that
:func:`bcnn.engine.pack` takes), at 1 bit and at k bits, emitted through a LayerEmitter."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._graph import UnsupportedError
from ._layers import LayerEmitter

__all__ = ["emit_bcnn", "emit_sequential"]


def _block(e: LayerEmitter, blk: Any, h: str, what: str) -> str:
    """BCNNBlock: h + act(bn(conv(q(h + b)))); BCNNDownsample: the same on the pooled stream,
    its shortcut repeated ``repeat`` times along the channels."""
    from torch import nn

    from ..models.bcnn import BCNNDownsample

    g = e.g
    a = h
    shortcut = h
    if isinstance(blk, BCNNDownsample):
        if not isinstance(blk.pool, nn.Identity):
            a = _avgpool(e, blk.pool, h, f"{what}.pool")
        shortcut = a
        if blk.repeat > 1:
            kind, c = e.kind(a)
            reps = g.const([1, blk.repeat, 1, 1], np.int64)
            shortcut = g.node("Tile", [a, reps], f"{what}.shortcut", kind=(kind, c * blk.repeat))
    x = e.elementwise(blk.shift, a, f"{what}.shift")
    y = e.conv(blk.conv, x, f"{what}.conv")
    y = e.chain([blk.bn, blk.act], y, f"{what}.post")
    if e.kind(shortcut)[1] != e.kind(y)[1]:
        raise UnsupportedError(f"{what}: residual width does not match")
    return e.binop("Add", shortcut, y, what)


def _head(e: LayerEmitter, head: Any, h: str, what: str) -> str:
    """scale(fc(q(norm(mean(h))))): a 1-bit fc folds the norm and sign into thresholds."""
    from ..engine._bitserial_pack import is_kbit

    f = _gap(e, h, f"{what}.pool")
    if is_kbit(head.fc.input_quantizer):
        x = e.elementwise(head.norm, f, f"{what}.norm")
    else:
        x = e.bn_sign(head.norm, f, f"{what}.norm")
    y = e.linear(head.fc, x, f"{what}.fc")
    return e.elementwise(head.scale, y, f"{what}.scale")


def _avgpool(e: LayerEmitter, pool: Any, src: str, what: str) -> str:
    """AvgPool2d. Non-overlapping windows without padding (BCNN's 2x2 / 2, partial windows at
    odd sizes): sums of strided slices in torch's order, ((a + b) + c) + d, then one division
    by the window's count; onnxruntime's AveragePool kernels sum in another order (an ulp
    apart on ~1/3 of the outputs). Other settings: ONNX AveragePool."""

    def pair(v: Any) -> list[int]:
        return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]

    if e.kind(src)[0] != "stream":
        raise UnsupportedError(f"{what}: average pooling must read a float stream")
    if getattr(pool, "divisor_override", None):
        raise UnsupportedError(f"{what}: AvgPool2d with divisor_override")
    k = pair(pool.kernel_size)
    st = pair(pool.stride if pool.stride is not None else pool.kernel_size)
    ph, pw = pair(pool.padding)
    if k == st and ph == pw == 0:
        return e.window_mean(src, k, bool(pool.ceil_mode), e.pool_sizes.get(id(pool)), what)
    return e.g.node(
        "AveragePool", [src], what, kind=e.kind(src), kernel_shape=k, strides=st,
        pads=[ph, pw, ph, pw], ceil_mode=int(pool.ceil_mode),
        count_include_pad=int(pool.count_include_pad),
    )  # fmt: skip


def _gap(e: LayerEmitter, src: str, what: str) -> str:
    """mean over H, W: summed in float64, rounded once (within an ulp of torch's float32)."""
    g = e.g
    kind, c = e.kind(src)
    if kind != "stream":
        raise UnsupportedError(f"{what}: global average pooling must read a float stream")
    tp = e.onnx.TensorProto
    x = g.node("Cast", [src], f"{what}.f64", to=tp.DOUBLE)
    if g.opset >= 18:
        m = g.node("ReduceMean", [x, g.const([2, 3], np.int64)], f"{what}.mean", keepdims=0)
    else:
        m = g.node("ReduceMean", [x], f"{what}.mean", axes=[2, 3], keepdims=0)
    return g.node("Cast", [m], what, to=tp.FLOAT, kind=("vector", c))


def emit_bcnn(e: LayerEmitter, model: Any, src: str) -> str:
    from ..models.bcnn import BCNNBlock, BCNNDownsample

    if not model.binary:
        raise UnsupportedError("this is a float twin (binary=False): only binary models export")
    stem = model.stem
    h = e.stem(stem.conv, src, "stem.conv")
    h = e.chain([stem.bn, stem.act], h, "stem.post")
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, BCNNBlock | BCNNDownsample):
            raise UnsupportedError(f"blocks.{i}: unsupported module {type(blk).__name__}")
        h = _block(e, blk, h, f"blocks.{i}")
    return _head(e, model.head, h, "head")


def _flatten(model: Any, prefix: str = "") -> list[tuple[str, Any]]:
    from torch import nn

    out: list[tuple[str, Any]] = []
    for name, m in model.named_children():
        if isinstance(m, nn.Sequential):
            out.extend(_flatten(m, f"{prefix}{name}."))
        else:
            out.append((f"{prefix}{name}", m))
    return out


def emit_sequential(e: LayerEmitter, model: Any, src: str) -> str:
    """A chain: encoder conv first, then binary / k-bit convs and linear layers, element-wise
    modules, signs, pooling, flatten, BCNN blocks and heads. A 1-bit conv whose element-wise
    chain ends in a sign (a sign module or the next layer's input) folds into thresholds; so
    does a batch norm directly before a sign."""
    from torch import nn

    from ..engine._bitserial_pack import is_kbit, layer_is_kbit
    from ..models.bcnn import BCNNBlock, BCNNDownsample, BCNNHead, BCNNStem
    from ..nn import BinaryConv2d, BinaryLinear, EncodedConv2d, LearnableBias, RPReLU, Scale
    from ..quant import MagnitudeAwareSign, is_binary_quantizer

    mods = _flatten(model)
    elementwise = (nn.BatchNorm1d, nn.BatchNorm2d, LearnableBias, RPReLU, Scale, nn.Identity)

    def is_sign(m: Any) -> bool:
        return is_binary_quantizer(m) and not isinstance(m, MagnitudeAwareSign)

    def reads_sign(j: int) -> bool:
        """Whether module j binarizes its input with a sign."""
        if j >= len(mods):
            return False
        m = mods[j][1]
        if isinstance(m, BinaryConv2d | BinaryLinear) and not isinstance(m, EncodedConv2d):
            return is_sign(m.input_quantizer)
        return is_sign(m)

    cur = src
    i = 0
    while i < len(mods):
        name, m = mods[i]
        kind = e.kind(cur)[0]
        if isinstance(m, EncodedConv2d | BCNNStem):
            if kind != "image":
                raise UnsupportedError(f"{name}: an encoder convolution must come first")
            if isinstance(m, BCNNStem):
                if not m.binary:
                    raise UnsupportedError(f"{name}: a float stem cannot be exported")
                cur = e.stem(m.conv, cur, f"{name}.conv")
                cur = e.chain([m.bn, m.act], cur, f"{name}.post")
            else:
                cur = e.stem(m, cur, name)
            i += 1
            continue
        if kind == "image":
            raise UnsupportedError(f"{name}: the first layer must be an encoder convolution")
        if isinstance(m, BinaryConv2d):
            j = i + 1
            while j < len(mods) and isinstance(mods[j][1], elementwise):
                j += 1
            post = [mm for _, mm in mods[i + 1 : j]]
            if not layer_is_kbit(m) and reads_sign(j):
                cur = e.conv_sign(m, cur, post, name)
                j += 1 if is_sign(mods[j][1]) else 0
            else:
                cur = e.chain(post, e.conv(m, cur, name), f"{name}.post")
            i = j
            continue
        if isinstance(m, BinaryLinear):
            cur = e.linear(m, cur, name)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) and reads_sign(i + 1):
            if kind in ("pm1", "vpm1"):
                raise UnsupportedError(f"{name}: batch norm on binary values")
            cur = e.bn_sign(m, cur, name)
            i += 1 if is_sign(mods[i + 1][1]) else 0
        elif isinstance(m, elementwise):
            cur = e.elementwise(m, cur, name)
        elif is_sign(m):
            cur = cur if kind in ("pm1", "vpm1") else e.sign(cur, name)
        elif isinstance(m, nn.AvgPool2d):
            cur = _avgpool(e, m, cur, name)
        elif isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1), [1, 1]):
            cur = _gap(e, cur, name)
            if i + 1 < len(mods) and isinstance(mods[i + 1][1], nn.Flatten):
                i += 1
        elif isinstance(m, nn.Flatten) and kind in ("vector", "vpm1"):
            pass
        elif isinstance(m, BCNNBlock | BCNNDownsample):
            cur = _block(e, m, cur, name)
        elif isinstance(m, BCNNHead):
            cur = _head(e, m, cur, name)
        elif is_kbit(m):
            raise UnsupportedError(f"{name}: a stand-alone k-bit quantizer (use it in a layer)")
        else:
            raise UnsupportedError(f"{name}: unsupported module {type(m).__name__}")
        i += 1
    if e.kind(cur)[0] != "vector":
        raise UnsupportedError("the chain must end with a linear classifier (float logits)")
    return cur
