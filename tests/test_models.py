"""Every registered model: uint8 forward, finite gradients everywhere, all matrix ops binary."""

import json
import subprocess
import sys

import pytest
import torch

import bcnn
from bcnn.models import create_model, list_models, load_checkpoint, save_checkpoint

SIZES = {"bcnn_cifar": 32, "bcnn_imagenet": 64}


def _size(name: str) -> int:
    return SIZES.get(name, 32)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("name", list_models())
def test_forward_backward_finite_everywhere(name: str, binary: bool) -> None:
    model = create_model(name, num_classes=7, binary=binary)
    model.train()
    s = _size(name)
    x = torch.randint(0, 256, (3, 3, s, s), dtype=torch.uint8)
    logits = model(x)
    assert logits.shape == (3, 7) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    nonzero = sum(int(p.grad.abs().sum() > 0) for p in model.parameters())
    assert nonzero >= 0.9 * len(list(model.parameters()))


@pytest.mark.parametrize("name", list_models())
def test_binary_models_have_no_float_macs(name: str) -> None:
    s = bcnn.summary(create_model(name, num_classes=10), (3, _size(name), _size(name)))
    assert s.float_macs == 0
    assert s.binary_macs > 0
    twin = bcnn.summary(create_model(name, num_classes=10, binary=False), (3, 32, 32))
    assert twin.binary_macs == 0 and twin.float_macs > 0


def test_float_input_holding_pixels_equals_uint8_input() -> None:
    model = create_model("bcnn_cifar", width=8, depth=1).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(model(x), model(x.float()))


@pytest.mark.parametrize("size", [8, 17, 33, 40])
def test_any_input_size_the_strides_allow(size: int) -> None:
    model = create_model("bcnn_cifar", width=8, depth=1, in_chans=1).eval()
    out = model(torch.randint(0, 256, (1, 1, size, size), dtype=torch.uint8))
    assert out.shape == (1, 10)


def test_width_depth_keywords() -> None:
    m = create_model("bcnn_cifar", width=16, depth=3)
    assert [b.conv.out_channels for b in m.blocks if hasattr(b, "conv")][-1] == 64
    assert sum(type(b).__name__ == "BCNNBlock" for b in m.blocks) == 9
    m = create_model("bcnn_imagenet", widths=(16, 32), depths=(1, 1))
    assert m.head.fc.in_features == 32


def test_wrong_input_shape_is_a_clear_error() -> None:
    model = create_model("bcnn_cifar", width=8, depth=1)
    with pytest.raises(ValueError, match="expected images"):
        model(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet_nope")


def test_checkpoint_round_trip(tmp_path) -> None:
    model = create_model("bcnn_cifar", num_classes=4, width=8, depth=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, {"classes": ["a", "b", "c", "d"]})
    loaded, meta = load_checkpoint(path)
    assert meta["classes"] == ["a", "b", "c", "d"]
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(model(x), loaded(x))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_sign_weights_checkpoint_is_smaller_with_the_same_outputs(tmp_path) -> None:
    model = create_model("bcnn_cifar", num_classes=4, width=16, depth=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.blocks[0].conv.weight[0, 0, 0, 0] = 0.0  # sign(0) = +1
        for m in model.modules():  # BN statistics of real inputs, so the logits vary
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        model.train()(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8))
        model.eval()
    save_checkpoint(tmp_path / "full.pt", model)
    save_checkpoint(tmp_path / "signs.pt", model, sign_weights=True)
    sd = torch.load(tmp_path / "signs.pt", weights_only=True)["state_dict"]
    binary = [k for k in sd if sd[k].dtype == torch.int8]
    assert "blocks.0.conv.weight" in binary and "head.fc.weight" in binary
    assert "stem.conv.weight" in binary and "stem.bn.weight" not in binary
    assert sd["blocks.0.conv.weight"][0, 0, 0, 0] == 1
    assert all(set(sd[k].unique().tolist()) <= {-1, 1} for k in binary)
    assert (tmp_path / "signs.pt").stat().st_size < 0.5 * (tmp_path / "full.pt").stat().st_size
    loaded, _ = load_checkpoint(tmp_path / "signs.pt")
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(model(x), loaded(x)) and model(x).std(0).min() > 0
    with torch.no_grad():  # negative control: a flipped sign moves the logits
        loaded.blocks[0].conv.weight.neg_()
    assert not torch.equal(model(x), loaded(x))
    twin = create_model("bcnn_cifar", binary=False, width=8, depth=1)
    save_checkpoint(tmp_path / "twin.pt", twin, sign_weights=True)  # float: nothing to sign
    sd = torch.load(tmp_path / "twin.pt", weights_only=True)["state_dict"]
    assert all(v.dtype != torch.int8 for v in sd.values())


def test_summary_counts_match_closed_form() -> None:
    m = create_model("bcnn_cifar", num_classes=10, widths=(8,), depths=(1,), in_chans=1)
    s = bcnn.summary(m, (1, 5, 5))
    rows = {r.name: r for r in s.rows}
    # stem: 8 planes x 1 channel, 3x3, 8 outputs at 5x5
    assert rows["stem.conv"].binary_macs == 8 * 8 * 9 * 25
    assert rows["stem.conv"].binary_params == 8 * 8 * 9
    assert rows["blocks.0.conv"].binary_macs == 8 * 8 * 9 * 25
    assert rows["head.fc"].binary_macs == 8 * 10
    assert s.binary_params == 8 * 8 * 9 * 2 + 80
    assert s.packed_bytes == sum((r.binary_params + 7) // 8 + 4 * r.float_params for r in s.rows)


@pytest.mark.parametrize("name", ["bcnn_cifar", "bcnn_imagenet"])
def test_cli_summary_json(name: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bcnn", "summary", name, "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    d = json.loads(out)
    assert d["float_macs"] == 0
    assert d["binary_macs"] > 0 and d["binary_params"] > 0
    assert {"float_params", "packed_bytes"} <= d.keys()


def test_cli_summary_errors_are_one_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bcnn", "summary", "no_such_model.pt"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_import_bcnn_is_light() -> None:
    code = "import sys, bcnn; print(any(m in sys.modules for m in ('torch', 'numba')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
