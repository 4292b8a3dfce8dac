"""bcnn.export: ONNX (onnxruntime) and QONNX (qonnx's executor) reproduce torch's logits.

Needs the export extra (``make test`` installs it). Models are small (width 8, depth 1) with
non-trivial batch-norm statistics, shifts and RPReLUs, some channels exactly zero (sign(0) = +1
must hold) and some with negative batch-norm scales (flipped thresholds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.cleanup import cleanup_model
from torch import nn

from bcnn.cli import main
from bcnn.export import build, to_onnx, to_qonnx
from bcnn.models import create_model, save_checkpoint
from bcnn.nn import BinaryConv2d, BinaryLinear, EncodedConv2d, LearnableBias, RPReLU, Scale
from bcnn.quant import SteSign, UniformQuantizer

RTOL = ATOL = 1e-4


def _images(n: int, h: int = 32, w: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def _perturb(model: nn.Module, h: int = 32, w: int = 32) -> nn.Module:
    """Train-mode passes (BN statistics, LSQ steps), then random shifts / RPReLUs, negative
    BN scales on some channels and exactly-zero outputs on others."""
    model.train()
    with torch.no_grad():
        for s in range(3):
            model(_images(16, h, w, seed=10 + s))
        for m in model.modules():
            if isinstance(m, RPReLU):
                m.gamma.normal_(0, 0.3)
                m.zeta.normal_(0, 0.3)
                m.slope.uniform_(-0.5, 0.5)
            elif isinstance(m, LearnableBias):
                m.bias.normal_(0, 0.3)
            elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                c = m.num_features
                m.weight.mul_(torch.where(torch.arange(c) % 3 == 1, -1.0, 1.0))
            elif isinstance(m, Scale):
                m.bias.normal_(0, 0.1)
        stem = getattr(model, "stem", None) or getattr(model, "0", None)
        if getattr(stem, "bn", None) is not None:  # stream exactly 0 on two channels, read
            stem.bn.weight[:2] = 0.0  # through sign(0 + 0) = +1 by the first block
            stem.bn.bias[:2] = 0.0
            stem.act.gamma[:2] = 0.0
            stem.act.zeta[:2] = 0.0
            blocks = getattr(model, "blocks", None) or [getattr(model, "1", None)]
            blocks[0].shift.bias[:2] = 0.0
    return model.eval()


def _bcnn(**kw: object) -> nn.Module:
    torch.manual_seed(0)
    return _perturb(create_model("bcnn_cifar", width=8, depth=1, **kw))


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def _ort_value(path: Path, x: torch.Tensor, name: str) -> np.ndarray:
    """An intermediate value of the graph (made an extra output)."""
    proto = onnx.load(str(path))
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    )
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([name], {"input": x.numpy()})[0]


def _assert_same(y: np.ndarray, ref: np.ndarray) -> None:
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)
    assert (y.argmax(1) == ref.argmax(1)).all()


def _torch(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.parametrize("bits", [1, 2], ids=["w1a1", "w2a2"])
def test_onnx_logits_equal_torch(tmp_path: Path, bits: int) -> None:
    model = _bcnn(weight_bits=bits, act_bits=bits)
    x = _images(7)
    ref = _torch(model, x)
    assert np.ptp(ref) > 0.1  # the logits depend on the image
    for batch in (1, 7, "dynamic"):
        path = to_onnx(model, tmp_path / f"m{batch}.onnx", batch=batch)
        if batch == 1:
            y = np.concatenate([_ort(path, x[i : i + 1]) for i in range(7)])
        else:
            y = _ort(path, x)
        _assert_same(y, ref)
    # The stream is continuous (the logits, after binary signs, are not): the stream before
    # global pooling (stem, one-padding, batch norms, RPReLUs, shortcuts, 2x2 pooling) is equal
    # to torch's bit for bit; the pooled features (float64 mean) within an ulp.
    with torch.no_grad():
        h = model.blocks(model.stem(x))
    last = f"blocks.{len(model.blocks) - 1}"
    np.testing.assert_array_equal(_ort_value(path, x, last), h.numpy())
    feats = h.mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(_ort_value(path, x, "head.pool"), feats, rtol=1e-6, atol=1e-7)


def test_onnx_odd_spatial_size(tmp_path: Path) -> None:
    model = _bcnn()
    x = _images(3, 13, 15)
    path = to_onnx(model, tmp_path / "odd.onnx", batch="dynamic", input_size=(13, 15))
    _assert_same(_ort(path, x), _torch(model, x))
    path = to_onnx(model, tmp_path / "dyn.onnx", batch="dynamic", input_size="dynamic")
    _assert_same(_ort(path, x), _torch(model, x))


@pytest.mark.parametrize("opset", [13, 18, 21])
def test_onnx_opsets(tmp_path: Path, opset: int) -> None:
    model = _bcnn(weight_bits=2, act_bits=2)
    x = _images(2)
    path = to_onnx(model, tmp_path / "m.onnx", batch=2, opset=opset)
    assert onnx.load(str(path)).opset_import[0].version == opset
    _assert_same(_ort(path, x), _torch(model, x))


def test_bcnn_imagenet_mixed_bits_odd_size(tmp_path: Path) -> None:
    """Stride-2 stem, four stages, W3A2, 45x45 images (partial pooling windows)."""
    torch.manual_seed(0)
    m = create_model("bcnn_imagenet", width=8, depth=1, num_classes=20, weight_bits=3, act_bits=2)
    model = _perturb(m, 45, 45)
    x = _images(3, 45, 45)
    path = to_onnx(model, tmp_path / "inet.onnx", batch=3, input_size=(45, 45))
    _assert_same(_ort(path, x), _torch(model, x))
    qpath = to_qonnx(model, tmp_path / "inet.qonnx.onnx", batch=3, input_size=(45, 45))
    _assert_same(_qonnx_run(ModelWrapper(str(qpath)), x), _torch(model, x))


def test_onnx_nodes_and_weights(tmp_path: Path) -> None:
    """Standard opset only; no ONNX Sign (Sign(0) = 0); binary weights stored as int8."""
    proto = build(_bcnn(), format="onnx")
    ops = {n.op_type for n in proto.graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert "Sign" not in ops and {"BitShift", "Conv", "Pad", "Where", "MatMul"} <= ops
    conv_w = [i for i in proto.graph.initializer if i.name.endswith(("conv.weight", "fc.weight"))]
    assert conv_w and all(i.data_type == onnx.TensorProto.INT8 for i in conv_w)
    conv_in = {n.input[0] for n in proto.graph.node if n.op_type == "Conv"}
    pads = [n for n in proto.graph.node if n.op_type == "Pad" and n.output[0] in conv_in]
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert pads and all(float(consts[p.input[2]]) == 1.0 for p in pads)  # one-padding


def _flip_one(path: Path, name: str, index: tuple[int, ...], out: Path) -> Path:
    proto = onnx.load(str(path))
    init = next(i for i in proto.graph.initializer if i.name == name)
    w = onnx.numpy_helper.to_array(init).copy()
    assert w[index] in (-1, 1)
    w[index] *= -1
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(out))
    return out


def test_negative_control_flipped_weight_changes_logits(tmp_path: Path) -> None:
    """One flipped sign in the file: the logits (classifier weight) or the pooled features
    (stem weight: the logits, after the head's signs, may absorb it) no longer match."""
    model = _bcnn()
    x = _images(7)
    ref = _torch(model, x)
    path = to_onnx(model, tmp_path / "m.onnx", batch=7)
    _assert_same(_ort(path, x), ref)
    feats = _ort_value(path, x, "head.pool")
    bad = _flip_one(path, "head.fc.weight", (5, 3), tmp_path / "fc.onnx")  # MatMul (in, out)
    y = _ort(bad, x)
    assert not np.allclose(y, ref, rtol=RTOL, atol=ATOL)
    assert np.allclose(np.delete(y, 3, axis=1), np.delete(ref, 3, axis=1))  # only class 3
    # output channel 4 (not one of the zeroed ones), red channel's top bit-plane, centre tap
    bad = _flip_one(path, "stem.conv.weight", (4, 7, 1, 1), tmp_path / "stem.onnx")
    assert not np.allclose(_ort_value(bad, x, "head.pool"), feats, rtol=RTOL, atol=ATOL)


def _chain(bits: int = 1) -> nn.Sequential:
    torch.manual_seed(0)
    if bits == 3:  # unsigned 3-bit activations (zero-padded), per-channel 3-bit weights
        return _perturb(
            nn.Sequential(
                EncodedConv2d(3, 16, 3, padding=1),
                nn.BatchNorm2d(16),
                BinaryConv2d(
                    16,
                    16,
                    3,
                    padding=1,
                    bias=False,
                    input_quantizer=UniformQuantizer(3, signed=False),
                    weight_quantizer=UniformQuantizer(3, channels=16),
                ),
                nn.BatchNorm2d(16),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                BinaryLinear(16, 10, bias=False),
                Scale(10),
            )
        )  # type: ignore[return-value]
    if bits > 1:  # the k-bit BCNN's own modules, as a chain
        m = create_model("bcnn_cifar", width=8, depth=1, weight_bits=bits, act_bits=bits)
        seq = nn.Sequential(m.stem, *m.blocks, m.head)
        return _perturb(seq)  # type: ignore[return-value]
    seq = nn.Sequential(
        EncodedConv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        BinaryConv2d(16, 16, 3, padding=1, bias=False),  # BN + sign module fold to thresholds
        nn.BatchNorm2d(16),
        SteSign(),
        BinaryConv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        RPReLU(32),
        nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
        LearnableBias(32),
        BinaryConv2d(32, 32, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.BatchNorm1d(32),
        BinaryLinear(32, 10, bias=False),
        Scale(10),
    )
    return _perturb(seq)  # type: ignore[return-value]


@pytest.mark.parametrize("bits", [1, 2, 3], ids=["w1a1", "w2a2", "w3a3-unsigned"])
def test_sequential_chain(tmp_path: Path, bits: int) -> None:
    seq = _chain(bits)
    x = _images(5)
    ref = _torch(seq, x)
    path = to_onnx(seq, tmp_path / "seq.onnx", batch="dynamic", input_size=(32, 32))
    _assert_same(_ort(path, x), ref)
    qpath = to_qonnx(seq, tmp_path / "seq.qonnx.onnx", batch=5, input_size=(32, 32))
    _assert_same(_qonnx_run(ModelWrapper(str(qpath)), x), ref)


def _qonnx_run(mw: ModelWrapper, x: torch.Tensor) -> np.ndarray:
    out = execute_onnx(mw, {mw.graph.input[0].name: x.numpy()})
    return np.asarray(out[mw.graph.output[0].name])


@pytest.mark.parametrize("bits", [1, 2], ids=["w1a1", "w2a2"])
def test_qonnx_executes_cleans_and_infers_shapes(tmp_path: Path, bits: int) -> None:
    model = _bcnn(weight_bits=bits, act_bits=bits)
    x = _images(4)
    ref = _torch(model, x)
    path = to_qonnx(model, tmp_path / "m.qonnx.onnx", batch=4)
    mw = ModelWrapper(str(path))
    ops = {n.op_type for n in mw.graph.node}
    assert "BipolarQuant" in ops  # weights / activations / the stem's planes
    assert ("Quant" in ops) == (bits > 1)
    assert ("MultiThreshold" in ops) == (bits == 1)  # the head's BN + sign
    assert all(
        n.domain == "qonnx.custom_op.general"
        for n in mw.graph.node
        if n.op_type in ("BipolarQuant", "Quant", "MultiThreshold")
    )
    _assert_same(_qonnx_run(mw, x), ref)
    clean = cleanup_model(mw).transform(InferShapes())
    _assert_same(_qonnx_run(clean, x), ref)


def test_unsupported_module_one_line_error() -> None:
    seq = nn.Sequential(EncodedConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(ValueError, match=r"^export: 2: unsupported module ReLU$"):
        build(seq)
    twin = create_model("bcnn_cifar", width=8, depth=1, binary=False)
    with pytest.raises(ValueError, match="float twin") as e:
        build(twin)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="first layer must be an encoder"):
        build(nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(ValueError, match="cannot export a Conv2d"):
        build(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="batch must be"):
        build(_bcnn(), batch=0)


def test_missing_extra_one_line_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from bcnn.export import _graph

    real = importlib.import_module

    def fake(name: str, *a: object) -> object:
        if name.split(".")[0] in ("onnx", "qonnx"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(_graph.importlib, "import_module", fake)
    with pytest.raises(ImportError, match=r"^exporting needs the 'onnx' package: pip install "):
        build(_bcnn())


def test_cli_export_checkpoint(tmp_path: Path) -> None:
    model = _bcnn()
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model, {"classes": [f"c{i}" for i in range(10)]})
    out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "-o", str(out), "--batch", "dynamic"]) == 0
    x = _images(3)
    _assert_same(_ort(out, x), _torch(model, x))
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert '"c9"' in meta["bcnn_classes"]
    qout = tmp_path / "m.qonnx.onnx"
    assert main(["export", str(ckpt), "-o", str(qout), "--format", "qonnx", "--check", "2"]) == 0


def test_cli_bad_input_leaves_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    twin = create_model("bcnn_cifar", width=8, depth=1, binary=False)
    ckpt = tmp_path / "twin.pt"
    save_checkpoint(ckpt, twin)
    out = tmp_path / "out" / "twin.onnx"
    assert main(["export", str(ckpt), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bcnn export: error:") and "float twin" in err and "\n" not in err
    assert not out.exists()
    assert not list(tmp_path.glob("**/*.tmp"))
    assert main(["export", str(tmp_path / "missing.pt"), "-o", str(out)]) == 2
    assert not out.exists()


@pytest.mark.parametrize("grid", ["zero", "odd"])
def test_bsq_model_exports_exactly(tmp_path: Path, grid: str) -> None:
    """BSQ layers (bcnn.bsq: a per-layer step, zero-grid integers, mixed bits with a 0-bit
    layer; or odd-grid integers with a binary layer) export to ONNX and QONNX with torch's
    logits."""
    from bcnn import bsq

    model = _bcnn(weight_bits=2, act_bits=4)
    bsq.bsq_(model, bits=3, grid=grid)
    q = model.blocks[1].conv.weight_quantizer
    with torch.no_grad():
        for p in q.bit_parameters().values():
            if p is q.pos or grid == "zero":
                p.zero_()
    bsq.requantize_(model)
    assert (0 if grid == "zero" else 1) in bsq.layer_bits(model).values()
    x = _images(3)
    ref = _torch(model, x)
    np.testing.assert_array_equal(_ort(to_onnx(model, tmp_path / "b.onnx", batch=3), x), ref)
    mw = ModelWrapper(str(to_qonnx(model, tmp_path / "b.qonnx.onnx", batch=3)))
    _assert_same(_qonnx_run(mw, x), ref)
