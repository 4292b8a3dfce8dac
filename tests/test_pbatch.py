"""PrecisionBatching (bcnn.engine.pbatch): bit-serial kernels == integer reference at awkward
sizes, drop-in modules vs torch, the set_precision knob, tune_precision, and bad input."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from bcnn.engine import pbatch
from bcnn.engine._kernels._lut_gemv import lut_gemv_supported
from bcnn.engine._pbatch import PBGRU, PBLSTM, PBConv2d, PBLinear, bit_serial_matmul
from bcnn.engine._pbatch_kernels import (
    WEIGHT_PLANES,
    QuantizedActs,
    QuantizedWeights,
    lut_pays,
    plane_dot,
    reference_dot,
)
from bcnn.quant import precision, set_precision, switchable_layers, tune_precision


@pytest.mark.parametrize("k", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("m", [1, 3, 7])
@pytest.mark.parametrize("signed", [False, True])
def test_kernel_equals_integer_reference(k: int, m: int, signed: bool) -> None:
    """Both products (bit-serial popcount GEMM, lookup-table GEMV) == an int64 matmul of the
    same integers, for every kept k."""
    rng = np.random.default_rng(k * 10 + m)
    w = QuantizedWeights(rng.normal(size=(5, k)))
    x = rng.normal(size=(m, k)).astype(np.float32)
    x = np.abs(x)
    if signed:
        x[:, 0] = -x[:, 0] - 0.1  # at least one negative value per vector
    for bits in (2, 4, 5, 8, 11):
        a = QuantizedActs(x, bits)
        assert a.signed == signed
        paths = [False, True] if lut_gemv_supported() and bits <= 8 else [False]
        for kb in range(1, WEIGHT_PLANES + 1):
            ref = reference_dot(w, kb, a)
            for lut in paths:
                np.testing.assert_array_equal(plane_dot(w, kb, a, lut=lut), ref)
            np.testing.assert_array_equal(plane_dot(w, kb, a), ref)  # the chosen path


def test_weight_planes_round_trip_and_truncation_is_the_coarser_grid() -> None:
    rng = np.random.default_rng(0)
    w = QuantizedWeights(rng.normal(size=(9, 77)))
    # planes decode to the stored odd integers
    neg = np.unpackbits(w.planes.view(np.uint8), axis=-1, bitorder="little")[..., :77]
    s = 1 - 2 * neg.astype(np.int64)
    ints = sum((1 << i) * s[i] for i in range(WEIGHT_PLANES))
    np.testing.assert_array_equal(ints, w.ints)
    assert np.all(w.ints % 2 != 0) and np.abs(w.ints).max() <= 255
    for kb in range(1, WEIGHT_PLANES + 1):
        d = WEIGHT_PLANES - kb
        v = w.view(kb)
        # the top kb planes == the nearest point of the odd grid of step 2^d
        assert np.all((v >> d) % 2 != 0) and np.all(np.abs(v - w.ints) <= (1 << d) - 1)
        np.testing.assert_array_equal(v, sum((1 << i) * s[i] for i in range(d, WEIGHT_PLANES)))


def test_activation_quantization_saturates_and_rounds_to_nearest() -> None:
    x = np.array([[0.0, 1.0, 2.5, 10.0], [-1.0, 0.5, 0.25, 1.0]], np.float32)
    a = QuantizedActs(x, 4, amax=np.array([5.0, 1.0]))
    assert a.signed
    # signed 4-bit: codes -7..7; row 0 scale 5/7: 10 saturates at 7, 2.5 -> 3.5 -> 4 (even)
    np.testing.assert_array_equal(a.ints[0], [0, 1, 4, 7])
    np.testing.assert_array_equal(a.ints[1], [-7, 4, 2, 7])
    u = QuantizedActs(np.abs(x), 4)
    assert not u.signed and u.ints.max() == 15 and u.ints.min() == 0


def test_error_decreases_as_weight_bits_grow() -> None:
    rng = np.random.default_rng(1)
    wf = rng.normal(size=(64, 200))
    x = rng.normal(size=(8, 200)).astype(np.float32)
    w = QuantizedWeights(wf)
    exact = x.astype(np.float64) @ wf.T
    errs = [
        np.abs(bit_serial_matmul(x, w, kb, 12, "t") - exact).mean()
        for kb in range(1, WEIGHT_PLANES + 1)
    ]
    assert all(a > b for a, b in itertools.pairwise(errs))


def test_bit_serial_matmul_equals_float64_fake_quant() -> None:
    rng = np.random.default_rng(2)
    w = QuantizedWeights(rng.normal(size=(7, 65)))
    x = rng.normal(size=(3, 65)).astype(np.float32)
    a = QuantizedActs(x, 8)
    for kb in (1, 3, 8):
        fake = (a.ints * a.scale[:, None]) @ (w.view(kb) * w.alpha[kb][:, None]).T
        np.testing.assert_allclose(bit_serial_matmul(x, w, kb, 8, "t"), fake, rtol=1e-12)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 33), nn.ReLU(), nn.Linear(33, 5))


def test_pbatch_linear_model_is_drop_in_and_close_at_8_bits() -> None:
    model = _mlp().eval()
    x = torch.randn(7, 20)
    with torch.no_grad():
        ref = model(x)
    pb = pbatch(model, weight_bits=8, act_bits=8)
    assert isinstance(pb[0], PBLinear) and isinstance(pb[2], PBLinear)
    y = pb(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()
    assert (y.argmax(1) == ref.argmax(1)).all()


def test_set_precision_knob_and_context_manager() -> None:
    pb = pbatch(_mlp())
    x = torch.randn(4, 20)
    full = pb(x)
    prev = set_precision(pb, weight_bits=2)
    assert prev == {"0": (8, 8), "2": (8, 8)}
    low = pb(x)
    assert not torch.equal(low, full)
    set_precision(pb)  # defaults
    assert torch.equal(pb(x), full)
    with precision(pb, layers={"2": (1, None)}):
        assert pb[2].precision == (1, 8) and pb[0].precision == (8, 8)
        assert not torch.equal(pb(x), full)
    assert torch.equal(pb(x), full)
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        set_precision(pb, layers={"nope": (2, 8)})
    with pytest.raises(ValueError, match=r"layer '0': weight_bits=9 is not in 1\.\.8"):
        set_precision(pb, weight_bits=9)
    with pytest.raises(ValueError, match=r"act_bits=1 is not in 2\.\.16"):
        set_precision(pb, act_bits=1)
    assert pb[0].precision == (8, 8)  # nothing changed by the failed calls
    with pytest.raises(ValueError, match="no precision-switchable layer"):
        set_precision(_mlp(), weight_bits=2)


def test_conv2d_matches_torch_within_quantization_error() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1).eval()
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        ref = conv(x)
    y = PBConv2d(conv, 8, 8, "c")(x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() < 0.03 * ref.abs().max()


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_rnn_matches_torch_and_its_reference(kind: str) -> None:
    torch.manual_seed(4)
    rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(10, 16, num_layers=2, batch_first=True).eval()
    x = torch.randn(3, 5, 10)
    with torch.no_grad():
        ref, ref_h = rnn(x)
    pb = (PBLSTM if kind == "lstm" else PBGRU)(rnn, 8, 8, "r")  # type: ignore[arg-type]
    y, h = pb(x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() < 0.03  # tanh/sigmoid-bounded outputs
    hn = h[0] if kind == "lstm" else h
    ref_hn = ref_h[0] if kind == "lstm" else ref_h
    assert torch.allclose(hn[-1], y[:, -1], atol=0)  # the last layer's last output
    assert (hn - ref_hn).abs().max() < 0.03
    # one step equals the float64 fake-quant cell exactly (same integers, same float order)
    set_precision(pb, weight_bits=3)
    y3, _ = pb(x[:, :1])
    assert (y3 - ref[:, :1]).abs().max() > (y[:, :1] - ref[:, :1]).abs().max()


def test_tune_precision_keeps_metric_within_tolerance() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(256, 16)
    with torch.no_grad():
        labels = model(x).argmax(1)
    pb = pbatch(model)

    def acc(m: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
        return float((m(data[0]).argmax(1) == data[1]).float().mean())

    base = acc(pb, (x, labels))
    choice = tune_precision(pb, acc, (x, labels), tolerance=0.02)
    assert set(choice) == {"0", "2"}
    assert {n: m.precision for n, m in switchable_layers(pb).items()} == choice
    assert acc(pb, (x, labels)) >= base - 0.02 - 1e-9
    assert min(w for w, _ in choice.values()) < 8  # some layer got cheaper


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="cannot convert BatchNorm2d"):
        pbatch(_mlp(), layers=(nn.BatchNorm2d,))
    with pytest.raises(ValueError, match=r"weight_bits must be an int in 1\.\.8, got 0"):
        pbatch(_mlp(), weight_bits=0)
    with pytest.raises(ValueError, match=r"act_bits must be an int in 2\.\.16, got 17"):
        pbatch(_mlp(), act_bits=17)
    with pytest.raises(ValueError, match="has no layer to convert"):
        pbatch(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="has no layer to convert"):
        pbatch(_mlp(), skip=("*",))
    pb = pbatch(_mlp())
    x = torch.randn(2, 20)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="layer '0': input contains NaN or inf"):
        pb(x)
    with pytest.raises(ValueError, match="layer '0': expected 20 input features"):
        pb(torch.randn(2, 21))
    with pytest.raises(ValueError, match="bidirectional"):
        pbatch(nn.LSTM(4, 4, bidirectional=True))


def test_skip_and_subclasses_stay_float() -> None:
    from bcnn.nn import BinaryLinear

    model = nn.Sequential(nn.Linear(8, 8), BinaryLinear(8, 8), nn.Linear(8, 2))
    pb = pbatch(model, skip=("2",))
    assert isinstance(pb[0], PBLinear)
    assert type(pb[1]) is BinaryLinear and type(pb[2]) is nn.Linear
    assert list(switchable_layers(pb)) == ["0"]


def _sig(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_rnn_step_equals_the_fake_quant_reference_exactly(kind: str) -> None:
    """One step from a given state: the gate pre-activations from the same integers by an
    int64 matmul, the cell in float64: equal to the module's output bit for bit."""
    torch.manual_seed(6)
    rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(9, 12).eval()
    pb = (PBLSTM if kind == "lstm" else PBGRU)(rnn, 8, 8, "r")  # type: ignore[arg-type]
    set_precision(pb, weight_bits=5, act_bits=6)
    x = torch.randn(1, 2, 9)
    h0 = torch.randn(1, 2, 12) * 0.5
    c0 = torch.randn(1, 2, 12) * 0.5
    y, _ = pb(x, (h0, c0) if kind == "lstm" else h0)

    def mm(v: np.ndarray, q: QuantizedWeights) -> np.ndarray:
        a = QuantizedActs(v, 6)
        return q.alpha[5][None, :] * a.scale[:, None] * reference_dot(q, 5, a)

    xs, h = x[0].double().numpy(), h0[0].double().numpy()
    gi = mm(xs, pb.qih0) + pb.bih0
    gh = mm(h, pb.qhh0) + pb.bhh0
    if kind == "lstm":
        i, f, g, o = np.split(gi + gh, 4, axis=1)
        c = _sig(f) * c0[0].double().numpy() + _sig(i) * np.tanh(g)
        want = _sig(o) * np.tanh(c)
    else:
        ir_, iz, in_ = np.split(gi, 3, axis=1)
        hr, hz, hn = np.split(gh, 3, axis=1)
        r, z = _sig(ir_ + hr), _sig(iz + hz)
        want = (1.0 - z) * np.tanh(in_ + r * hn) + z * h
    np.testing.assert_array_equal(y[0].numpy(), want.astype(np.float32))


# the lookup-table GEMV at awkward sizes and at its accumulators' extremes: every input at
# its largest magnitude, every weight bit set or clear, more than one 256-byte run (K > 2048)
_LUT_PROBE = r"""
import json
import numpy as np
from bcnn.engine._kernels._lut_gemv import VB
from bcnn.engine._pbatch_kernels import QuantizedActs, QuantizedWeights, plane_dot, reference_dot
ok = True
rng = np.random.default_rng(0)
for k, o in [(1, 1), (63, 65), (65, 63), (130, 7), (4113, 65)]:
    wf = rng.normal(size=(o, k))
    wf[0], wf[-1] = -1.0, 1.0  # all bits set / all clear
    w = QuantizedWeights(wf)
    for x in (np.ones((2, k)), np.concatenate([np.ones((1, k)), -np.ones((1, k))]),
              -np.ones((1, k)), rng.normal(size=(3, k))):
        for bits in (2, 4, 5, 8):
            a = QuantizedActs(x.astype(np.float32), bits)
            for kb in (1, 2, 4, 8):
                ok &= bool(np.array_equal(plane_dot(w, kb, a, lut=True), reference_dot(w, kb, a)))
print(json.dumps({"vb": VB, "exact": ok}))
"""


@pytest.mark.skipif(not lut_gemv_supported(), reason="the compile target has no AVX2")
def test_lut_gemv_extremes_and_runs_are_exact() -> None:
    ns: dict[str, object] = {}
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(_LUT_PROBE, ns)
    assert json.loads(out.getvalue())["exact"]


@pytest.mark.slow
@pytest.mark.skipif(not lut_gemv_supported(), reason="the compile target has no AVX2")
def test_lut_gemv_on_the_avx2_target_is_exact() -> None:
    """The 256-bit variant (compiled for haswell, the AVX2 profile), on any AVX2 machine."""
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""}
    r = subprocess.run(
        [sys.executable, "-c", _LUT_PROBE], capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"vb": 32, "exact": True}


@pytest.mark.skipif(not lut_gemv_supported(), reason="the compile target has no AVX2")
@pytest.mark.parametrize("n", [1, 3])
def test_fused_lookup_linear_equals_the_step_by_step_path(n: int) -> None:
    """PBLinear's one-call lookup-table path gives the float32 bits of quantize -> plane_dot
    (either product) -> float64 epilogue -> + bias -> float32, signed and unsigned inputs."""
    torch.manual_seed(n)
    lin = nn.Linear(130, 67)
    layer = PBLinear(lin, 8, 8, "l")
    assert layer.qw.has_lut and lut_pays(n, 8, True)  # the fused path runs below
    for signed in (False, True):
        x = torch.rand(n, 130) * 3
        if signed:
            x[:, 5] = -1.0
        for kb in (1, 3, 8):
            layer.set_precision(kb, 8)
            with torch.no_grad():
                got = layer(x).numpy()
            xs = x.numpy()
            for lut in (False, True):
                a = QuantizedActs(xs, 8)
                dot = plane_dot(layer.qw, kb, a, lut=lut)
                y = layer.qw.alpha[kb][None, :] * a.scale[:, None] * dot + layer.b
                np.testing.assert_array_equal(got, y.astype(np.float32))
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(torch.full((1, 130), float("nan")))


def test_warm_step_runs_the_pbatch_kernels_without_torch() -> None:
    """`python -m bcnn.engine._warm` (the venv step) compiles the pbatch kernels into numba's
    cache, and stays torch-free like the rest of the packed path."""
    code = (
        "import sys; from bcnn.engine._warm import warm_pbatch; warm_pbatch(); "
        "print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "False"
