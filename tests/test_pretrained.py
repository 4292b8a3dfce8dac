"""Pretrained names resolve offline to files shipped in the package (bcnn/pretrained/)."""

import json
from pathlib import Path

import numpy as np
import pytest

import bcnn._pretrained as pre
from bcnn.cli import main
from bcnn.engine import load, load_any
from bcnn.models import create_model, pretrained_checkpoint, save_checkpoint


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    model = create_model("bcnn_cifar", num_classes=10, in_chans=1, width=8, depth=1).eval()
    meta = {"classes": [str(i) for i in range(10)], "data": "digits", "val_split": 0.1, "seed": 0}
    save_checkpoint(tmp_path / "tiny_pre.pt", model, meta)
    load_any(tmp_path / "tiny_pre.pt").save(tmp_path / "tiny_pre.bcnn")
    monkeypatch.setattr(pre, "PRETRAINED_DIR", tmp_path)
    return "tiny_pre"


def test_pretrained_name_loads_both_engines(shipped: str, capsys) -> None:
    assert pretrained_checkpoint(shipped) is not None
    assert pretrained_checkpoint("no_such_model") is None
    assert pretrained_checkpoint("../etc") is None
    packed = load(shipped)
    assert packed.classes == [str(i) for i in range(10)]
    x = np.random.default_rng(0).integers(0, 256, (3, 1, 8, 8), np.uint8)
    assert packed(x).shape == (3, 10)
    tops = {}
    for engine in ("torch", "packed"):
        assert main(["eval", shipped, "--engine", engine, "--json"]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["engine"] == engine and out["data"] == "digits" and out["n"] == 180
        tops[engine] = out["top1"]
    assert tops["torch"] == tops["packed"]


def test_unknown_pretrained_name_is_a_one_line_error(shipped: str, capsys) -> None:
    assert main(["eval", "bcnn_nothing_here", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bcnn_nothing_here" in err[0]


def test_shipped_bcnn_cifar10_runs_offline_on_both_engines(tmp_path: Path, capsys) -> None:
    """The packed model in the package and its torch checkpoint agree, with CIFAR-10 names."""
    import torch
    from PIL import Image

    from bcnn.models import load_checkpoint

    ckpt = pretrained_checkpoint("bcnn_cifar10")
    assert ckpt is not None, "bcnn_cifar10.pt must ship in src/bcnn/pretrained"
    packed = load("bcnn_cifar10")
    model, meta = load_checkpoint(ckpt)
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship"]
    assert packed.classes == [*cifar, "truck"] == meta["classes"]
    x = np.random.default_rng(1).integers(0, 256, (7, 3, 32, 32), np.uint8)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = packed(x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)
    assert (out.argmax(1) == ref.argmax(1)).all()
    img = tmp_path / "img.png"
    Image.fromarray(x[0].transpose(1, 2, 0)).save(img)
    assert main(["predict", "bcnn_cifar10", str(img), "--json"]) == 0
    text = capsys.readouterr().out
    assert any(name in text for name in [*cifar, "truck"])


def test_running_a_pretrained_packed_model_does_not_import_torch() -> None:
    """load(name) + a call stay on the torch-free path (fast start, no torch needed), and
    one thread compiles (or loads) only the bound kernels the plan calls: not the public
    wrappers' serial kernels, whose code the bound ones hold again (docs/kernels.md,
    Start-up)."""
    import ast
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from bcnn.engine import load; "
        "from bcnn.engine._kernels import _bound, _conv, _stem; "
        "m = load('bcnn_cifar10'); y = m(np.zeros((1, 3, 32, 32), np.uint8)); "
        "print(y.shape, 'torch' in sys.modules); "
        "n = lambda *fs: sum(len(f.signatures) for f in fs); "
        "print([n(_conv._conv_serial), n(_stem._stem_fast_serial), "
        "n(_bound._conv_serial_pack_lut, _bound._conv_serial_pack_pop), "
        "n(_bound._stem_fast_pack_lut, _bound._stem_fast_pack_pop)])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, compiled = out.stdout.strip().splitlines()
    assert first == "(1, 10) False"
    n_serial, n_stem_serial, n_pack, n_stem_pack = ast.literal_eval(compiled)
    assert (n_serial, n_stem_serial) == (0, 0), compiled
    assert n_pack >= 1 and n_stem_pack == 1, compiled


def test_predict_on_a_packed_model_does_not_import_torch(tmp_path: Path) -> None:
    """`bcnn predict NAME img` reads the image and runs the packed engine without torch."""
    import subprocess
    import sys

    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(img)  # resized to 32x32
    code = (
        "import sys; from bcnn.cli import main; "
        f"rc = main(['predict', 'bcnn_cifar10', {str(img)!r}, '--json']); "
        "print(rc, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 False"


def test_shipped_bcnn_cifar10_any_switches_every_precision_without_a_repack() -> None:
    """The shipped any-precision model (docs/models/bcnn_cifar10_any.md; its torch checkpoint
    is not shipped: packed == torch was checked by the card's script on every validation
    image, and at small scale by tests/test_engine_any_precision.py): W1A1..W4A4 and a
    searched per-layer mix each give their own logits, and switching back restores them."""
    packed = load("bcnn_cifar10_any")
    layers = packed.precision_layers
    assert all(ws == (1, 2, 3, 4) for ws, _ in layers.values())
    # a per-layer mix whose transitions the bitmixer stage trained (its searched mix at
    # 2.35 ms, before the uniform closing stage)
    bits = [1, 1, 1, 3, 2, 1, 1, 4, 3, 4]
    mix = {n: (k, k) for n, k in zip(layers, bits, strict=True)}
    x = np.random.default_rng(2).integers(0, 256, (7, 3, 32, 32), np.uint8)
    cfgs = [{"weight_bits": k, "act_bits": k} for k in (1, 2, 3, 4)] + [{"layers": mix}]
    outs = []
    for cfg in cfgs:
        packed.set_precision(**cfg)
        outs.append(packed(x))
    assert len({o.tobytes() for o in outs}) == len(outs)
    for cfg, want in zip(cfgs, outs, strict=True):  # switching back: the same logits
        packed.set_precision(**cfg)
        np.testing.assert_array_equal(packed(x), want)
