"""pack() side of the bit-serial k-bit layers: torch k-bit layers -> ``qstem`` / ``qconv`` /
``qlinear`` ops (docs/format.md; the executor side is :mod:`bcnn.engine._bitserial`).

Weights become signed odd-grid integer planes (``planes_from_integers``); the activation
quantizer's step and grid travel as op attributes; the output scale step_x * step_w[o] is the
first epilogue step, computed in torch exactly as the layer computes it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._bitserial import planes_from_integers

__all__ = ["build_qconv", "build_qlinear", "build_qstem", "is_kbit", "layer_is_kbit"]


def is_kbit(q: Any) -> bool:
    """A k-bit uniform quantizer (exposes ``integer``), as opposed to a sign."""
    return q is not None and callable(getattr(q, "integer", None))


def layer_is_kbit(layer: Any) -> bool:
    return is_kbit(getattr(layer, "input_quantizer", None)) or is_kbit(layer.weight_quantizer)


def _weight_planes(b: Any, layer: Any, what: str, err: type) -> tuple[np.ndarray, int, Any, bool]:
    """(neg planes bool (Wb, *torch weight shape), Wb, step_w tensor (O,) or None, zero grid).

    Zero-grid weights (BSQ's sign-magnitude integers W, 0 included) are stored as the odd-grid
    integers X = 2W + 1 on N + 1 planes (N: the fewest bits holding max |W|; 0 for an all-zero
    layer), with ``weight_zero``: the engine computes conv(A, W) = (conv(A, X) - conv(A, 1)) / 2.
    """
    import torch

    q = layer.weight_quantizer
    if is_kbit(q) and getattr(q, "zero_grid", False):
        with torch.no_grad():
            w, sw = q.integer(layer.weight.detach().float())
        wi = w.detach().cpu().numpy().astype(np.int64)
        n = int(np.abs(wi).max()).bit_length() if wi.size else 0
        if n > 8:
            raise err(f"{what}: BSQ weights need {n} bits (at most 8): re-quantize first")
        neg = planes_from_integers(2 * wi + 1, n + 1, True)
        return neg, n + 1, sw.detach().float().reshape(-1), True
    if is_kbit(q):
        if not q.signed:
            raise err(f"{what}: k-bit weights must use the signed grid")
        if not bool(q.initialized):
            raise err(f"{what}: the weight quantizer is not initialised (run one forward first)")
        # the trained planes, whatever set_precision chose for the torch model: the packed
        # model has its own knob (PackedModel.set_precision)
        keep, q.keep_bits = getattr(q, "keep_bits", None), None
        try:
            with torch.no_grad():
                x, sw = q.integer(layer.weight.detach().float())
        finally:
            q.keep_bits = keep
        neg = planes_from_integers(x.cpu().numpy(), q.bits, True)
        return neg, int(q.bits), sw.detach().float().reshape(-1), False
    neg, scale = b.binary_weight(layer, what)
    if scale is not None:
        raise err(f"{what}: scaled binary weights cannot be mixed with k-bit activations")
    return neg[None], 1, None, False


def _act_quant(b: Any, layer: Any, what: str, err: type) -> tuple[int, bool, np.ndarray, Any]:
    """(bits, signed, step float32 (1,), step tensor or None) of the layer's input quantizer;
    a sign reads as the 1-bit signed grid with step 1 (exactly sign, sign(0) = +1)."""
    q = layer.input_quantizer
    if is_kbit(q):
        if not bool(q.initialized):
            raise err(f"{what}: the input quantizer is not initialised (run one forward first)")
        if q.step.numel() != 1:
            raise err(f"{what}: per-channel activation steps are not supported")
        step = q.step.detach().float().abs().clamp_min(1e-8).reshape(())
        hi = 2**q.bits - 1
        pad = float(hi) if q.signed else 0.0
        if any(getattr(layer, "pad_hw", (0, 0))) and layer.pad_value != pad:
            raise err(f"{what}: the border must be the quantizer's pad value {pad:g}")
        st = step.cpu().numpy().reshape(1).astype(np.float32)
        return int(q.bits), bool(q.signed), st, step
    b.check_input_quantizer(layer, what)
    if any(getattr(layer, "pad_hw", (0, 0))) and layer.pad_value != 1.0:
        raise err(f"{what}: binary convolutions must use one-padding")
    return 1, True, np.ones(1, np.float32), None


def _scale(sx: Any, sw: Any, channels: int) -> np.ndarray | None:
    """step_x * step_w[o] as torch's layer computes it (a float32 product), per channel."""
    if sx is None and sw is None:
        return None
    s = sx if sw is None else (sw if sx is None else sx.reshape(()) * sw.reshape(-1))
    out = np.broadcast_to(s.detach().float().cpu().numpy().astype(np.float32), (channels,))
    return np.ascontiguousarray(out, np.float32)


def _t(steps: dict[int, np.ndarray] | None, a: int) -> Any:
    """The act step of act bits ``a`` as a torch scalar (None without switchable steps)."""
    if steps is None:
        return None
    import torch

    return torch.from_numpy(steps[a]).reshape(())


def _pre_steps(b: Any, op: str, channels: int, pre: list[Any]) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    for i, m in enumerate(pre):
        steps.extend(b.step_for(m, op, channels, 100 + i))
    return steps


# ------------------------------------------------------------------ precision sets (format v3)
def _sbn(mods: list[Any]) -> Any:
    """The SwitchableBatchNorm among ``mods`` (at most one), or None."""
    found = [m for m in mods if callable(getattr(m, "set_for", None))]
    return found[0] if found else None


def _keyed_sets(
    b: Any,
    op: str,
    tag: str,
    name: str,
    mods: list[Any],
    build: Any,
    err: type,
    what: str,
) -> dict[str, Any] | None:
    """One step list per trained key of the switchable BN in ``mods`` (else per act bits of
    the layer ``name``): {"key": [[layer, "w"|"a"], ...], "at": [values...], "steps": [...]}.
    ``build(prefix, a, mods) -> steps`` with ``a`` the layer's own act bits of that key."""
    sbn = _sbn(mods)
    if sbn is None:
        return None
    spec = [list(e) for e in sbn.key_spec()]
    keys = [k for k in sbn.keys if sbn.batches(k) > 0]
    if not keys:
        raise err(f"{what}: {sbn.site}: no precision was ever trained (no batch-norm statistics)")
    at, steps = [], []
    for j, key in enumerate(keys):
        own = [
            v for (layer, kind), v in zip(spec, key, strict=True) if (layer, kind) == (name, "a")
        ]
        chosen = [sbn.set_for(key) if m is sbn else m for m in mods]
        at.append([int(v) for v in key])
        steps.append(build(f"{op}.{tag}{j}", own[0] if own else None, chosen))
    return {"key": spec, "at": at, "steps": steps}


def _precision_entry(
    b: Any,
    layer: Any,
    op: str,
    channels: tuple[int, int],
    pre: list[Any],
    post: list[Any],
    scale_of: Any,
    act_steps: dict[int, np.ndarray] | None,
    residual: tuple[str, int] | None,
    err: type,
    what: str,
) -> dict[str, Any] | None:
    """The op's ``precision`` entry (docs/format.md, version 3) for an any-precision layer:
    its name, the trained weight and act bits, one act step per act bits, and the epilogue
    (and ``pre``) step lists of every trained batch-norm key; None for other layers.
    ``channels``: (in, out); ``scale_of(a)``: the output scale at act bits ``a``."""
    ps = getattr(layer, "any_precision", None)
    if not ps:
        return None
    name = (getattr(b, "precision_names", None) or {}).get(id(layer))
    if name is None:
        raise err(f"{what}: an any-precision layer outside a BCNN cannot be packed")
    entry: dict[str, Any] = {"layer": name, "weight_bits": list(ps), "act_bits": list(ps)}
    if act_steps is not None:
        st = np.concatenate([act_steps[a] for a in ps]).astype(np.float32)
        entry["act_steps"] = b.tensor(op, "act_steps", st)
    extra = [_ConvBiasLazy(layer.bias)] if layer.bias is not None else []

    def epilogue(prefix: str, a: int | None, mods: list[Any]) -> list[dict[str, Any]]:
        epi = b.epilogue(prefix, channels[1], scale_of(ps[-1] if a is None else a), extra + mods)
        if residual is not None:
            epi.append({"kind": "add", "input": 1, "repeat": residual[1]})
        return epi

    sets = _keyed_sets(b, op, "s", name, post, epilogue, err, what)
    if sets is None:  # no batch norm after the layer: the scale still follows its act bits
        spec = [[name, "a"]]
        sets = {
            "key": spec,
            "at": [[a] for a in ps],
            "steps": [epilogue(f"{op}.s{j}", a, post) for j, a in enumerate(ps)],
        }
    entry["epilogues"] = _dedupe(b, sets)
    pre_sets = _keyed_sets(
        b, op, "p", name, pre,
        lambda prefix, _a, mods: _pre_steps(b, prefix, channels[0], mods), err, what,
    )  # fmt: skip
    if pre_sets is not None:
        entry["pres"] = _dedupe(b, pre_sets)
    return entry


def _dedupe(b: Any, table: dict[str, Any]) -> dict[str, Any]:
    """Store equal step tensors of a table once (a set differs from the next mostly in its
    batch norm; the scale follows the act bits only, an RPReLU never changes): later sets
    reference the first copy (docs/format.md allows shared tensors inside a table)."""
    from ._format import STEP_TENSORS

    seen: dict[tuple[str, tuple[int, ...], bytes], str] = {}
    for steps in table["steps"]:
        for st in steps:
            for key in STEP_TENSORS.get(st["kind"], ()):
                name = st[key]
                arr = b.tensors[name]
                sig = (arr.dtype.str, arr.shape, arr.tobytes())
                first = seen.setdefault(sig, name)
                if first != name:
                    st[key] = first
                    del b.tensors[name]
    return table


def _act_steps(b: Any, layer: Any, what: str, err: type) -> dict[int, np.ndarray] | None:
    """{act bits: step float32 (1,)} of an any-precision layer's switchable input quantizer."""
    q = layer.input_quantizer
    if not getattr(layer, "any_precision", None) or not hasattr(q, "choices"):
        return None
    prev = q.active
    try:
        out = {}
        for a in q.choices:
            q.select(a)
            out[a] = _act_quant(b, layer, what, err)[2]
        return out
    finally:
        q.select(prev)


class _ConvBiasLazy:
    """A layer bias as an epilogue step (the builder's ``_ConvBias``, imported late)."""

    def __new__(cls, bias: Any) -> Any:
        from ._pack import _ConvBias

        return _ConvBias(bias)


def build_qconv(
    b: Any,
    layer: Any,
    src: str,
    pre: list[Any],
    post: list[Any],
    err: type,
    *,
    residual: tuple[str, int] | None = None,
    what: str = "conv",
) -> str:
    """A k-bit BinaryConv2d reading the float stream ``src`` through ``pre`` (e.g. the
    LearnableBias shift) and its input quantizer -> a ``qconv`` op (docs/format.md)."""
    from ._pack import _ConvBias, pack_signs

    kind, cin = b.kinds[src]
    if kind != "stream" or cin != layer.in_channels:
        raise err(f"{what}: a k-bit conv must read a float stream of {layer.in_channels} channels")
    if layer.groups != 1 or tuple(layer.dilation) != (1, 1):
        raise err(f"{what}: grouped or dilated convolutions are not supported")
    (sh, sw_), (ph, pw), (kh, kw) = layer.stride, layer.pad_hw, layer.kernel_size
    if sh != sw_ or ph != pw or ph >= min(kh, kw):
        raise err(f"{what}: k-bit convolutions need square strides and padding < kernel")
    abits, asigned, step, sx = _act_quant(b, layer, what, err)
    neg, wbits, swt, zero = _weight_planes(b, layer, what, err)
    cout = layer.out_channels
    op = b.name("qconv")
    planes = np.stack([pack_signs(p.transpose(0, 2, 3, 1)) for p in neg])
    extra = [_ConvBias(layer.bias)] if layer.bias is not None else []
    epi = b.epilogue(op, cout, _scale(sx, swt, cout), extra + post)
    inputs = [src]
    if residual is not None:
        rname, rep = residual
        if b.kinds[rname][1] * rep != cout:
            raise err(f"{what}: residual width does not match")
        epi.append({"kind": "add", "input": 1, "repeat": rep})
        inputs.append(rname)
    steps = _act_steps(b, layer, what, err)
    prec = _precision_entry(
        b, layer, op, (cin, cout), pre, post,
        lambda a: _scale(_t(steps, a), swt, cout), steps, residual, err, what,
    )  # fmt: skip
    out = b.name("s")
    b.ops.append(
        {
            "op": "qconv", "name": op, "inputs": inputs, "output": out,
            "in_channels": cin, "out_channels": cout, "kernel": [kh, kw],
            "stride": [sh, sh], "pad": [ph, ph],
            "act_bits": abits, "act_signed": asigned, "weight_bits": wbits,
            "pre": _pre_steps(b, op, cin, pre),
            "act_step": b.tensor(op, "act_step", step),
            "weight": b.tensor(op, "weight", planes),
            "epilogue": epi,
            **({"weight_zero": True} if zero else {}),
            **({"precision": prec} if prec else {}),
        }
    )  # fmt: skip
    b.kinds[out] = ("stream", cout)
    return out


def build_qlinear(
    b: Any, layer: Any, src: str, pre: list[Any], post: list[Any], err: type, what: str = "linear"
) -> str:
    """A k-bit BinaryLinear reading the float vector ``src`` through ``pre`` (e.g. the head's
    batch norm) and its input quantizer -> a ``qlinear`` op."""
    from ._pack import _ConvBias, pack_signs

    kind, k = b.kinds[src]
    if kind != "vector" or k != layer.in_features:
        raise err(f"{what}: a k-bit linear layer must read {layer.in_features} float features")
    abits, asigned, step, sx = _act_quant(b, layer, what, err)
    neg, wbits, swt, zero = _weight_planes(b, layer, what, err)
    cout = layer.out_features
    op = b.name("qlinear")
    planes = np.stack([pack_signs(p) for p in neg])
    extra = [_ConvBias(layer.bias)] if layer.bias is not None else []
    epi = b.epilogue(op, cout, _scale(sx, swt, cout), extra + post)
    steps = _act_steps(b, layer, what, err)
    prec = _precision_entry(
        b, layer, op, (k, cout), pre, post,
        lambda a: _scale(_t(steps, a), swt, cout), steps, None, err, what,
    )  # fmt: skip
    out = b.name("v")
    b.ops.append(
        {
            "op": "qlinear", "name": op, "inputs": [src], "output": out,
            "in_features": k, "out_features": cout,
            "act_bits": abits, "act_signed": asigned, "weight_bits": wbits,
            "pre": _pre_steps(b, op, k, pre),
            "act_step": b.tensor(op, "act_step", step),
            "weight": b.tensor(op, "weight", planes),
            "epilogue": epi,
            **({"weight_zero": True} if zero else {}),
            **({"precision": prec} if prec else {}),
        }
    )  # fmt: skip
    b.kinds[out] = ("vector", cout)
    return out


def build_qstem(b: Any, stem: Any, post: list[Any], err: type, what: str = "stem") -> str:
    """EncodedConv2d (bit-plane encoder) with k-bit weights -> a ``qstem`` op."""
    from ..nn import BitPlaneEncoder
    from ._pack import _ConvBias, pack_signs

    enc = stem.encoder
    if not isinstance(enc, BitPlaneEncoder):
        raise err(f"{what}: k-bit stem weights need the bit-plane encoder")
    if stem.groups != 1 or tuple(stem.dilation) != (1, 1):
        raise err(f"{what}: grouped or dilated convolutions are not supported")
    (sh, sw_), (ph, pw), (kh, kw) = stem.stride, stem.pad_hw, stem.kernel_size
    if sh != sw_ or ph != pw or ph >= min(kh, kw):
        raise err(f"{what}: k-bit convolutions need square strides and padding < kernel")
    c_img, planes_px = stem.image_channels, enc.bits
    pwts = enc.plane_weights.cpu().numpy().astype(np.float32).reshape(c_img, planes_px)
    if not np.all(pwts == 2.0 ** np.arange(planes_px, dtype=np.float32)):
        raise err(f"{what}: plane weights must be the place values 2^p")
    neg, wbits, swt, zero = _weight_planes(b, stem, what, err)
    cout = stem.out_channels
    op = b.name("qstem")
    planes = np.stack([pack_signs(p.transpose(0, 2, 3, 1)) for p in neg])
    extra = [_ConvBias(stem.bias)] if stem.bias is not None else []
    epi = b.epilogue(op, cout, _scale(None, swt, cout), extra + post)
    prec = _precision_entry(
        b, stem, op, (0, cout), [], post, lambda a: _scale(None, swt, cout), None, None, err, what
    )
    out = b.name("s")
    b.ops.append(
        {
            "op": "qstem", "name": op, "inputs": ["input"], "output": out,
            "in_channels": c_img, "planes": planes_px, "out_channels": cout,
            "kernel": [kh, kw], "stride": [sh, sh], "pad": [ph, ph], "weight_bits": wbits,
            "weight": b.tensor(op, "weight", planes),
            "epilogue": epi,
            **({"weight_zero": True} if zero else {}),
            **({"precision": prec} if prec else {}),
        }
    )  # fmt: skip
    b.kinds[out] = ("stream", cout)
    return out
