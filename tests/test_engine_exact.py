"""The packed engine reproduces the torch model in eval mode (bit-exact signs, allclose logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bcnn.engine import PackedModel, load, pack
from bcnn.models import create_model
from bcnn.nn import BinaryConv2d, BinaryLinear, EncodedConv2d, LearnableBias, RPReLU, Scale


def randomize(model: nn.Module, seed: int = 1, in_size: int = 16) -> nn.Module:
    """Non-trivial BN statistics/affines (some negative weights, a zero one), shifts, RPReLU
    parameters and scales, so that every folding path is exercised. Running statistics are
    calibrated on random images (then perturbed), so that signs are not all saturated."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.weight.normal_(0, 1, generator=g)  # about half negative
                m.bias.normal_(0, 1, generator=g)
                m.weight[0] = 0.0  # a constant channel
                m.momentum = 1.0
            elif isinstance(m, LearnableBias):
                m.bias.normal_(0, 0.5, generator=g)
            elif isinstance(m, RPReLU):
                m.gamma.normal_(0, 0.5, generator=g)
                m.slope.normal_(0.2, 0.3, generator=g)
                m.zeta.normal_(0, 0.5, generator=g)
            elif isinstance(m, Scale):
                m.weight.normal_(0, 0.3, generator=g)
                m.bias.normal_(0, 0.3, generator=g)
        c = next(p for p in model.parameters() if p.dim() == 4).shape[1]
        c = getattr(model, "in_chans", 1 if c < 8 or c % 8 else c // 8)
        model.train()
        model(torch.randint(0, 256, (8, c, in_size, in_size), generator=g, dtype=torch.uint8))
        for m in bns:
            m.running_mean.add_(
                0.2 * torch.randn(m.num_features, generator=g) * m.running_var.sqrt()
            )
            m.running_var.mul_(torch.empty(m.num_features).uniform_(0.5, 2, generator=g))
    return model.eval()


def images(n: int, c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)


def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def assert_exact(packed: np.ndarray, ref: np.ndarray) -> None:
    assert packed.dtype == np.float32 and packed.shape == ref.shape
    np.testing.assert_allclose(packed, ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(packed.argmax(1), ref.argmax(1))


CASES = [
    ("bcnn_cifar", {"width": 8, "depth": 1}, 32),
    ("bcnn_cifar", {"width": 8, "depth": 2}, 33),  # odd sizes: partial pooling windows
    ("bcnn_imagenet", {"width": 8, "depth": 1, "num_classes": 13}, 64),
    ("bcnn_cifar", {"width": 16, "in_chans": 1}, 8),  # digits-like 1-channel 8x8
    ("bcnn_cifar", {"widths": (24, 72), "depths": (1, 1), "in_chans": 1}, 9),  # x3 widening
    ("bcnn_cifar", {"width": 8, "depth": 1, "rprelu": False, "encoder": "bitplane"}, 32),
]


@pytest.mark.parametrize(("name", "kw", "size"), CASES)
def test_packed_matches_torch(name: str, kw: dict, size: int) -> None:
    model = randomize(create_model(name, **kw))
    x = images(7, model.in_chans, size, size)
    ref = torch_logits(model, x)
    packed = pack(model)
    assert_exact(packed(x), ref)


@pytest.mark.parametrize(("name", "size"), [("bcnn_cifar", 32), ("bcnn_imagenet", 64)])
def test_default_models_match_torch(name: str, size: int) -> None:
    model = randomize(create_model(name))
    x = images(7, 3, size, size, seed=3)
    assert_exact(pack(model)(x), torch_logits(model, x))


def test_signs_are_bit_exact_inside_the_network() -> None:
    """Every float stream equals torch's bit for bit, so the signs that read it agree."""
    model = randomize(create_model("bcnn_cifar", width=8, depth=1))
    x = images(7, 3, 33, 33)
    fast = pack(model)
    packed = PackedModel(fast.graph, fast.tensors, backend="reference")
    np.testing.assert_array_equal(packed(x), fast(x))  # numba kernels == numpy reference
    (plan,) = next(iter(packed._plans.values()))  # the one idle plan of this shape
    seen: list[np.ndarray] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o)) for m in model.blocks]
    torch_logits(model, x)
    for h in hooks:
        h.remove()
    convs = [op["output"] for op in packed.graph["ops"] if op["op"] == "conv"]
    assert len(convs) == len(seen)
    for name, ref in zip(convs, seen, strict=True):
        got = plan.bufs[name].array
        np.testing.assert_array_equal(got, ref.permute(0, 2, 3, 1).numpy())


def test_thermometer_and_magnitude_aware_weights() -> None:
    """Non-integer plane weights and per-channel weight scales fold into the affines (equal up
    to float rounding)."""
    model = randomize(
        create_model(
            "bcnn_cifar",
            width=8,
            depth=1,
            encoder="thermometer",
            weight_quantizer="magnitude_aware_sign",
        )
    )
    x = images(7, 3, 16, 16)
    ref = torch_logits(model, x)
    out = pack(model)(x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-3)
    scales = [op for op in pack(model).graph["ops"] for s in op.get("epilogue", [])]
    assert scales  # the weight scales are epilogue steps


def chain(num_classes: int = 5) -> nn.Sequential:
    """encoder conv -> BN -> [sign] conv -> BN -> sign -> conv -> BN -> RPReLU -> GAP -> BN1d ->
    sign -> binary linear -> Scale."""
    return nn.Sequential(
        EncodedConv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        BinaryConv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        BinaryConv2d(32, 24, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(24),
        RPReLU(24),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.BatchNorm1d(24),
        BinaryLinear(24, num_classes, bias=False),
        Scale(num_classes),
    )


def test_sequential_chain_folds_bn_sign_into_integer_thresholds() -> None:
    model = randomize(chain())
    with torch.no_grad():  # strictly monotone activations before the folded sign
        model[6].slope.abs_()
    x = images(7, 1, 11, 11)
    packed = pack(model)
    ops = [op["op"] for op in packed.graph["ops"]]
    assert ops == ["encode_conv", "binarize", "conv", "conv", "gap", "binarize", "linear"]
    assert "threshold" in packed.graph["ops"][2]  # conv -> BN -> sign became a threshold
    assert_exact(packed(x), torch_logits(model, x))


def test_integer_threshold_flips_negative_scale_channels() -> None:
    model = randomize(chain())
    with torch.no_grad():
        model[3].weight.copy_(torch.linspace(-1, 1, 32))
        model[3].weight[5] = 0.0
        model[3].bias[5] = -1.0  # constant channel, always -1
        model[3].bias[6] = 1.0
        model[3].weight[6] = 0.0  # constant channel, always +1
    x = images(7, 1, 12, 10)
    assert_exact(pack(model)(x), torch_logits(model, x))


def test_save_load_round_trip(tmp_path) -> None:
    model = randomize(create_model("bcnn_cifar", width=8, depth=1, num_classes=3))
    packed = pack(model, classes=["cat", "dog", "eel"])
    x = images(7, 3, 32, 32)
    path = tmp_path / "m.bcnn"
    packed.save(path)
    loaded = load(path)
    np.testing.assert_array_equal(loaded(x), packed(x))
    assert loaded.classes == ["cat", "dog", "eel"]
    assert loaded.graph == packed.graph
    assert sorted(loaded.tensors) == sorted(packed.tensors)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_flipping_weight_bits_changes_logits() -> None:
    model = randomize(create_model("bcnn_cifar", width=8, depth=1))
    packed = pack(model)
    x = images(7, 3, 32, 32)
    base = packed(x)
    for op in packed.graph["ops"]:
        if op["op"] in ("conv", "linear", "encode_conv"):
            tensors = dict(packed.tensors)
            w = tensors[op["weight"]].copy()
            w.reshape(-1)[: max(1, w.size // 4)] ^= np.uint64(1)
            tensors[op["weight"]] = w
            changed = PackedModel(packed.graph, tensors)(x)
            assert not np.allclose(changed, base, rtol=1e-4, atol=1e-3), op["name"]


def test_pack_rejects_unsupported_models() -> None:
    with pytest.raises(ValueError, match="float twin"):
        pack(create_model("bcnn_cifar", width=8, depth=1, binary=False))
    with pytest.raises(ValueError, match="ReLU"):
        pack(nn.Sequential(EncodedConv2d(3, 8, 3, padding=1), nn.ReLU()))
    with pytest.raises(ValueError, match="cannot pack"):
        pack(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="weights must be binarized"):
        m = chain()
        m[2].weight_quantizer = None
        pack(m)


def test_input_validation() -> None:
    packed = pack(create_model("bcnn_cifar", width=8, depth=1))
    with pytest.raises(ValueError, match="dtype float32"):
        packed(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="shape"):
        packed(np.zeros((1, 1, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="numpy"):
        packed([[1, 2]])
    with pytest.raises(ValueError, match="too small"):
        pack(create_model("bcnn_imagenet", width=8, depth=1))(np.zeros((1, 3, 1, 1), np.uint8))
