"""Bit-serial k-bit layers in the packed engine: exactness against torch, plane decomposition,
the bit-serial conv against a plain torch reference, set_precision, and format validation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bcnn.engine import PackedModel, load, pack
from bcnn.engine._bitserial import (
    BitSerialConv,
    BitSerialLinear,
    integers_from_planes,
    planes_from_integers,
    quantize_pack,
    quantize_reference,
)
from bcnn.engine._pack import pack_signs
from bcnn.models import create_model
from bcnn.quant import UniformQuantizer


def _model(w: int, a: int, seed: int = 0, unsigned_block: bool = False) -> torch.nn.Module:
    """bcnn_cifar width 16 depth 1 with initialised LSQ steps, then random non-trivial batch
    norm statistics/affines, steps and shifts."""
    torch.manual_seed(seed)
    m = create_model("bcnn_cifar", width=16, depth=1, weight_bits=w, act_bits=a)
    if unsigned_block:
        m.blocks[0].conv.input_quantizer = UniformQuantizer(a, signed=False)
    m.train()
    with torch.no_grad():
        m(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                c = mod.num_features
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                mod.weight.copy_(torch.randn(c, generator=g))
                mod.bias.copy_(torch.randn(c, generator=g) * 0.5)
            elif isinstance(mod, UniformQuantizer):
                mod.step.mul_(torch.rand(mod.step.shape, generator=g) + 0.5)
            elif type(mod).__name__ == "LearnableBias":
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.3)
    return m.eval()


def _images(n: int, hw: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, hw, hw), dtype=torch.uint8, generator=g)


def _check(m: torch.nn.Module, p: PackedModel, hw: int) -> np.ndarray:
    x = _images(7, hw, hw)
    with torch.no_grad():
        ref = m(x).numpy()
    out = p(x.numpy())
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)
    assert np.array_equal(out.argmax(1), ref.argmax(1))
    return out


@pytest.mark.parametrize("w,a", [(1, 2), (2, 2), (2, 4), (4, 4)])
def test_packed_kbit_matches_torch(w: int, a: int) -> None:
    m = _model(w, a)
    p = pack(m)
    kinds = [op["op"] for op in p.graph["ops"]]
    assert "qconv" in kinds and "qlinear" in kinds
    assert ("qstem" in kinds) == (w > 1)
    for hw in (32, 33):
        full = _check(m, p, hw)
    if w > 1:  # the run-time knob: one weight plane fewer runs and moves the logits
        x = _images(7, 33, 33).numpy()  # the images _check used last
        p.set_precision(weight_bits=w - 1)
        assert not np.allclose(p(x), full)
        p.set_precision(weight_bits=None)
        assert np.array_equal(p(x), full)


def test_mixed_and_unsigned_and_roundtrip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # k-bit weights with sign activations, and an unsigned-grid block (zero padding)
    _check(_model(3, 1), pack(_model(3, 1)), 32)
    m = _model(2, 3, unsigned_block=True)
    p = pack(m)
    assert p.graph["ops"][1]["op"] == "qconv" and p.graph["ops"][1]["act_signed"] is False
    out = _check(m, p, 33)
    p.save(tmp_path / "k.bcnn")
    q = load(tmp_path / "k.bcnn")
    assert np.array_equal(q(_images(7, 33, 33).numpy()), out)
    # the reference backend runs the same ops
    r = PackedModel(p.graph, p.tensors, backend="reference")
    assert np.array_equal(r(_images(7, 33, 33).numpy()), out)


def test_set_precision_changes_and_restores() -> None:
    p = pack(_model(4, 4))
    x = _images(3, 32, 5).numpy()
    full = p(x)
    assert p.set_precision(weight_bits=3) is None
    low3 = p(x)
    p.set_precision(weight_bits=1)
    low1 = p(x)
    assert not np.allclose(full, low3) and not np.allclose(low3, low1)
    p.set_precision(weight_bits=8)  # >= every layer's bits: full precision
    assert np.array_equal(p(x), full)
    assert p.set_precision(weight_bits=None) == 8
    assert np.array_equal(p(x), full)
    for bad in (0, 9, True, 2.0, "2"):
        with pytest.raises(ValueError):
            p.set_precision(weight_bits=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", range(1, 9))
def test_plane_decomposition_exact(bits: int) -> None:
    hi = 2**bits - 1
    signed = np.arange(-hi, hi + 1, 2)
    unsigned = np.arange(0, hi + 1)
    for vals, sg in ((signed, True), (unsigned, False)):
        neg = planes_from_integers(vals, bits, sg)
        assert neg.shape == (bits, len(vals))
        assert np.array_equal(integers_from_planes(neg, sg), vals)
        # the border (signed 2^k - 1, unsigned 0) is every plane +1: the one-padding
        pad = planes_from_integers(np.array([hi if sg else 0]), bits, sg)
        assert not pad.any()
    with pytest.raises(ValueError):
        planes_from_integers(np.array([hi + 2]), bits, True)
    if bits > 1:
        with pytest.raises(ValueError):
            planes_from_integers(np.array([0]), bits, True)  # even: not on the odd grid


@pytest.mark.parametrize("bits,signed", [(1, True), (2, True), (3, False), (8, True), (8, False)])
def test_quantize_pack_matches_torch_quantizer(bits: int, signed: bool) -> None:
    q = UniformQuantizer(bits, signed=signed, init_step=0.37, learned=False).eval()
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((2, 3, 4, 70)) * 2**bits * 0.3).astype(np.float32)
    hi = 2**bits - 1
    # values at and next to the rounding boundaries and the clamp limits
    k = np.arange(-hi - 2, hi + 3, dtype=np.float32)
    edges = np.concatenate([k, k + 0.5, np.nextafter(k + 0.5, np.float32(-9))]) * np.float32(0.37)
    x.reshape(-1)[: edges.size] = edges.astype(np.float32)
    with torch.no_grad():
        ref, _ = q.integer(torch.from_numpy(x))
    ref_i = ref.numpy().astype(np.int64)
    assert np.array_equal(quantize_reference(x, 0.37, bits, signed), ref_i)
    xp = quantize_pack(x, 0.37, bits, signed)  # (bits*N, H, W, words)
    from bcnn.engine import _kernels as K

    neg = K.unpack_bits(xp, 70).reshape(bits, *x.shape) < 0
    assert np.array_equal(integers_from_planes(neg, signed), ref_i)
    # the channels-first kernel (NCHW input) packs the same planes
    xcf = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    assert np.array_equal(quantize_pack(xcf, 0.37, bits, signed, channels_first=True), xp)
    # NaN has no grid point: code 0 (every plane's bit 0) on both kernels; +-inf clamp
    x[1, 2, 3, [5, 66, 69]] = [np.nan, np.inf, -np.inf]
    xp = quantize_pack(x, 0.37, bits, signed)
    planes = K.unpack_bits(xp, 70).reshape(bits, *x.shape) < 0
    assert not planes[:, 1, 2, 3, 5].any()
    ints = integers_from_planes(planes, signed)[1, 2, 3]
    assert (ints[66], ints[69]) == (hi, -hi if signed else 0)
    xcf = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    assert np.array_equal(quantize_pack(xcf, 0.37, bits, signed, channels_first=True), xp)


def _torch_conv(xi: np.ndarray, wi: np.ndarray, stride: int, pad: int, pad_value: float):  # type: ignore[no-untyped-def]
    xt = torch.from_numpy(xi.transpose(0, 3, 1, 2).astype(np.float64))
    wt = torch.from_numpy(wi.transpose(0, 3, 1, 2).astype(np.float64))
    xt = F.pad(xt, (pad,) * 4, value=pad_value)
    return F.conv2d(xt, wt, stride=stride).numpy().transpose(0, 2, 3, 1)


@pytest.mark.usefixtures("layout")  # the lut layout runs activation planes in pairs
@pytest.mark.parametrize(
    "cin,hw,stride,n,wb,ab,signed",
    [
        (1, 5, 1, 1, 2, 2, True),
        (63, 5, 2, 7, 1, 3, True),
        (65, 1, 1, 1, 3, 2, False),
        (65, 5, 2, 1, 4, 4, True),
        (63, 1, 2, 7, 2, 1, True),
        (1, 5, 2, 7, 8, 8, False),
    ],
)
def test_bitserial_conv_vs_torch(
    cin: int, hw: int, stride: int, n: int, wb: int, ab: int, signed: bool
) -> None:
    rng = np.random.default_rng(cin * 7 + hw)
    cout, step = 37, 0.25
    x = (rng.standard_normal((n, hw, hw, cin)) * 2**ab * 0.2).astype(np.float32)
    xi = quantize_reference(x, step, ab, signed)
    wi = 2 * rng.integers(0, 2**wb, (cout, 3, 3, cin)) - (2**wb - 1)
    neg = planes_from_integers(wi, wb, True)
    planes = np.stack([pack_signs(p) for p in neg])
    conv = BitSerialConv(planes, cin, ab, signed, stride, 1)
    pad_value = float(2**ab - 1) if signed else 0.0
    y = conv(x, step)
    assert y.dtype == np.float32
    assert np.array_equal(y, _torch_conv(xi, wi, stride, 1, pad_value))
    if wb > 1:  # drop the lowest plane: W' = sum_{i >= 1} 2^i s_i
        w1 = integers_from_planes(neg[1:], True) * 2
        assert np.array_equal(
            conv(x, step, weight_bits=wb - 1), _torch_conv(xi, w1, stride, 1, pad_value)
        )
    # a dense layer over the same integers
    lin = BitSerialLinear(np.stack([pack_signs(p) for p in neg[:, :, 0, 0, :]]), cin, ab, signed)
    xv = x[:, 0, 0, :]
    assert np.array_equal(lin(xv, step), (xi[:, 0, 0, :] @ wi[:, 0, 0, :].T).astype(np.float32))


def test_negative_control_plane_bit_flip() -> None:
    p = pack(_model(2, 2))
    x = _images(4, 32, 9).numpy()
    base = p(x)
    op = next(o for o in p.graph["ops"] if o["op"] == "qconv")
    t = dict(p.tensors)
    w = t[op["weight"]].copy()
    # negate the high plane of every weight (16 input channels: the low 16 bits); a single bit
    # may not cross a level of the 2-bit quantizers downstream
    w[1, ..., 0] ^= np.uint64((1 << op["in_channels"]) - 1)
    t[op["weight"]] = w
    assert not np.allclose(PackedModel(p.graph, t)(x), base)
    # the activation step too: the quantized planes change
    t2 = dict(p.tensors)
    t2[op["act_step"]] = t2[op["act_step"]] * np.float32(0.25)
    assert not np.allclose(PackedModel(p.graph, t2)(x), base)


def _mutate(p: PackedModel, fn) -> tuple[dict, dict]:  # type: ignore[no-untyped-def]
    g = copy.deepcopy(p.graph)
    t = dict(p.tensors)
    fn(g, t)
    return g, t


@pytest.mark.parametrize(
    "what,fn",
    [
        ("act_bits", lambda g, t: g["ops"][1].__setitem__("act_bits", 9)),
        ("act_bits", lambda g, t: g["ops"][1].__setitem__("act_bits", 0)),
        ("weight", lambda g, t: g["ops"][1].__setitem__("weight_bits", 3)),  # planes != tensor
        ("weight", lambda g, t: g["ops"][0].__setitem__("weight_bits", 1)),  # qstem
        ("act_signed", lambda g, t: g["ops"][1].__setitem__("act_signed", 1)),
        ("act_step", lambda g, t: t.__setitem__("qconv3.act_step", np.float32([-1.0]))),
        ("act_step", lambda g, t: t.__setitem__("qconv3.act_step", np.float32([np.nan]))),
        ("equal strides", lambda g, t: g["ops"][1].__setitem__("stride", [1, 2])),
        ("pre", lambda g, t: g["ops"][1]["pre"].append({"kind": "add", "input": 1})),
        ("tail bits", lambda g, t: t["qconv3.weight"].__setitem__((0, 0, 0, 0, 0), ~np.uint64(0))),
        ("weight_bits", lambda g, t: g["ops"][-1].__setitem__("weight_bits", "2")),
    ],
)
def test_malformed_kbit_rejected(what: str, fn) -> None:  # type: ignore[no-untyped-def]
    p = pack(_model(2, 2))
    assert p.graph["ops"][0]["op"] == "qstem" and p.graph["ops"][1]["name"] == "qconv3"
    p.tensors["qconv3.weight"] = p.tensors["qconv3.weight"].copy()
    g, t = _mutate(p, fn)
    with pytest.raises(ValueError, match=what):
        PackedModel(g, t)


def test_uninitialised_quantizer_refused() -> None:
    m = create_model("bcnn_cifar", width=16, depth=1, weight_bits=2, act_bits=2).eval()
    with pytest.raises(ValueError, match="not initialised"):
        pack(m)


@pytest.mark.parametrize("wa,stride", [(("2", "3"), "1"), (("1", "2"), "2")])
def test_bench_layer_bitserial_json(wa, stride, capsys) -> None:  # type: ignore[no-untyped-def]
    import json
    import warnings

    from bcnn.cli import main

    args = ["bench", "--layer", "conv3x3", "--channels", "65", "--size", "5", "--repeat", "1"]
    args += ["--stride", stride, "--wbits", wa[0], "--abits", wa[1], "--json"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bitserial_exact"] is True
    assert (res["wbits"], res["abits"]) == (int(wa[0]), int(wa[1]))
    for key in ("bitserial_ms", "bitserial_speedup_vs_float", "bitserial_speedup_vs_int8"):
        assert res[key] > 0
    assert main(["bench", "--layer", "linear", "--wbits", "2"]) == 2
    assert main(["bench", "--layer", "conv3x3", "--wbits", "9"]) == 2


def test_set_precision_equals_torch_with_dropped_planes() -> None:
    """set_precision(weight_bits=k) == the torch model whose k-bit weight integers keep only
    their k highest planes (sum_{i >= W-k} 2^i s_i), with unchanged steps."""
    m = _model(4, 2)
    p = pack(m)
    p.set_precision(weight_bits=2)
    x = _images(7, 32, 11)
    out = p(x.numpy())

    def dropped(q: UniformQuantizer, keep: int) -> None:
        orig = q.integer

        def integer(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            xi, step = orig(w)
            neg = planes_from_integers(xi.detach().numpy(), q.bits, True)
            s = 1 - 2 * neg.astype(np.int64)
            kept = sum(2**i * s[i] for i in range(q.bits - keep, q.bits))
            return torch.from_numpy(np.asarray(kept, np.float32)), step

        q.integer = integer  # type: ignore[method-assign]

    for mod in m.modules():
        if isinstance(mod, UniformQuantizer) and mod.channels:  # the weight quantizers
            dropped(mod, 2)
    with torch.no_grad():
        ref = m(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)
    assert np.array_equal(out.argmax(1), ref.argmax(1))


def test_set_precision_means_the_same_on_both_engines() -> None:
    """bcnn.quant.set_precision on the torch k-bit model == PackedModel.set_precision on its
    packed twin, for every kept plane count; None (or a cap at or above the trained bits)
    restores the trained model exactly."""
    from bcnn.quant import precision, set_precision, switchable_layers

    m = _model(4, 2)
    p = pack(m)
    x = _images(7, 32, 12)
    with torch.no_grad():
        full = m(x).numpy()
    layers = switchable_layers(m)
    assert layers and all(lay.default_precision[0] == 4 for lay in layers.values())
    for k in (3, 2, 1):
        set_precision(m, weight_bits=k)
        p.set_precision(weight_bits=k)
        with torch.no_grad():
            ref = m(x).numpy()
        out = p(x.numpy())
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)
        assert np.array_equal(out.argmax(1), ref.argmax(1))
        assert not np.allclose(ref, full)  # the knob moves the logits
    set_precision(m, weight_bits=8)  # a cap above the trained 4 bits: the full model
    with torch.no_grad():
        np.testing.assert_array_equal(m(x).numpy(), full)
    with precision(m, weight_bits=1):
        pass
    set_precision(m)
    with torch.no_grad():
        np.testing.assert_array_equal(m(x).numpy(), full)
    # 1-bit layers have no knob
    assert not switchable_layers(create_model("bcnn_cifar", width=8, depth=1))


def test_pack_after_set_precision_packs_the_trained_planes() -> None:
    from bcnn.quant import set_precision

    m = _model(4, 2)
    x = _images(3, 32, 13).numpy()
    full = pack(m)(x)
    set_precision(m, weight_bits=2)
    np.testing.assert_array_equal(pack(m)(x), full)  # the knob is the packed model's own
