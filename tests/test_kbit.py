"""k-bit uniform quantizers (closed forms, LSQ gradients), quantize_, BCNN at k bits."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bcnn.models import create_model
from bcnn.nn import BinaryConv2d
from bcnn.quant import QuantConfig, UniformQuantizer, grid_limits, quantize_

vals = st.lists(
    st.one_of(
        # no subnormals: v / 2 of the smallest ones underflows to -0.0 in float32, where the
        # float64 closed form still sees a negative value (hypothesis found -1.4e-45)
        st.floats(-20, 20, allow_nan=False, allow_subnormal=False, width=32),
        st.sampled_from([0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 15.0, -15.0, 16.0, 3.0]),
    ),
    min_size=1,
    max_size=24,
)


def _closed_form(v: float, bits: int, signed: bool) -> tuple[float, float, float]:
    """(X, dX/dv, dq/ds / step-free part) from the documented formulas."""
    lo, hi = grid_limits(bits, signed)
    g = 2 * math.floor(v / 2) + 1 if signed else math.floor(v + 0.5)
    inside = lo <= v <= hi
    X = min(max(g, lo), hi)
    return float(X), 1.0 if inside else 0.0, (X - v) if inside else float(X)


@settings(max_examples=60, deadline=None)
@given(vals, st.integers(1, 8), st.booleans(), st.sampled_from([0.25, 1.0, 3.0]))
def test_uniform_quantizer_closed_form(xs, bits, signed, step) -> None:
    q = UniformQuantizer(bits, signed=signed, init_step=step)
    q.eval()  # no LSQ gradient scaling: compare with the plain formulas
    x = (torch.tensor(xs) * step).requires_grad_(True)
    y = q(x)
    y.sum().backward()
    v = (x.detach() / step).tolist()
    exp = [_closed_form(vi, bits, signed) for vi in v]
    torch.testing.assert_close(y.detach(), torch.tensor([e[0] * step for e in exp]))
    torch.testing.assert_close(x.grad, torch.tensor([e[1] for e in exp]))
    torch.testing.assert_close(
        q.step.grad, torch.tensor(sum(e[2] for e in exp)), rtol=1e-4, atol=1e-4
    )


def test_one_bit_signed_grid_is_sign() -> None:
    q = UniformQuantizer(1, signed=True, init_step=1.0)
    x = torch.tensor([-2.0, -0.3, 0.0, 0.3, 2.0])
    assert q(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_grid_is_a_sum_of_bit_planes(bits: int, signed: bool) -> None:
    """Every grid value decomposes exactly into k planes (the bit-serial engine's premise)."""
    lo, hi = grid_limits(bits, signed)
    q = UniformQuantizer(bits, signed=signed, init_step=1.0)
    X, _ = q.integer(torch.arange(lo - 3, hi + 4, dtype=torch.float32))
    X = X.detach().long()
    if signed:  # X = sum 2^i s_i with s_i = 2 b_i - 1, b_i the bits of u = (X + 2^k - 1) / 2
        u = (X + hi) // 2
        planes = [2 * ((u >> i) & 1) - 1 for i in range(bits)]
    else:
        planes = [(X >> i) & 1 for i in range(bits)]
    rebuilt = sum((2**i) * p for i, p in enumerate(planes))
    assert torch.equal(rebuilt, X)
    assert len(X.unique()) == 2**bits


def test_lsq_initialises_from_first_batch_and_detects_sign() -> None:
    q = UniformQuantizer(4, signed=None)
    q(torch.rand(100) * 3)
    assert not q.signed and q.pad_value == 0.0
    assert q.step.item() == pytest.approx(2 * 1.5 / math.sqrt(15), rel=0.15)
    q2 = UniformQuantizer(2, signed=None)
    q2(torch.randn(100))
    assert q2.signed and q2.pad_value == 3.0  # every plane +1: 2 + 1


def test_kbit_conv_is_integer_conv_times_steps() -> None:
    conv = BinaryConv2d(
        5,
        4,
        3,
        padding=1,
        input_quantizer=UniformQuantizer(2, signed=True, init_step=0.5),
        weight_quantizer=UniformQuantizer(3, signed=True, channels=4, init_step=0.1),
    )
    with torch.no_grad():
        conv.weight_quantizer.step.copy_(torch.tensor([0.1, 0.2, 0.05, 0.3]))
    x = torch.randn(2, 5, 7, 7)
    X = (2 * torch.floor(x / 0.5 / 2) + 1).clamp(-3, 3)
    sw = conv.weight_quantizer.step.view(-1, 1, 1, 1)
    W = (2 * torch.floor(conv.weight / sw / 2) + 1).clamp(-7, 7)
    ref = F.conv2d(F.pad(X, (1,) * 4, value=3.0), W) * (0.5 * sw.view(1, -1, 1, 1))
    torch.testing.assert_close(conv(x), ref + conv.bias.view(1, -1, 1, 1), rtol=1e-6, atol=1e-6)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_quantize_arbitrary_net_forward_backward() -> None:
    net = _Net()
    ref_w = net.conv2.weight.detach().clone()
    out = quantize_(net, QuantConfig(weight_bits=2, act_bits=4))
    assert out is net
    assert isinstance(net.conv1, BinaryConv2d) and isinstance(net.conv2, BinaryConv2d)
    assert torch.equal(net.conv2.weight, ref_w)  # weights kept
    y = net(torch.randn(4, 3, 9, 9))
    F.cross_entropy(y, torch.tensor([0, 1, 2, 3])).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert not net.conv2.input_quantizer.signed  # after a ReLU: the unsigned grid
    assert net.conv2.input_quantizer.bits == 4 and net.conv2.weight_quantizer.bits == 2


def test_quantize_overrides_and_skip() -> None:
    net = quantize_(
        _Net(),
        QuantConfig(
            weight_bits=2,
            act_bits=2,
            overrides={"conv1": {"weight_bits": 8, "act_bits": 8}, "fc": None},
        ),
    )
    assert net.conv1.weight_quantizer.bits == 8
    assert type(net.fc) is nn.Linear
    net2 = quantize_(_Net(), QuantConfig(weight_bits=1, skip=lambda n, m: isinstance(m, nn.Linear)))
    assert type(net2.fc) is nn.Linear and net2.conv1.weight_quantizer.bits == 1


def test_quantize_float_twin_of_a_bcnn() -> None:
    twin = create_model("bcnn_cifar", width=8, depth=1, binary=False)
    quantize_(twin, QuantConfig(weight_bits=2, act_bits=2))
    y = twin(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in twin.parameters() if p.grad is not None)


@pytest.mark.parametrize(("w", "a"), [(1, 2), (2, 2), (2, 4), (4, 4)])
def test_bcnn_at_k_bits(w: int, a: int) -> None:
    m = create_model("bcnn_cifar", width=8, depth=1, weight_bits=w, act_bits=a)
    y = m(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8))
    y.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    conv = m.blocks[0].conv
    assert conv.input_quantizer.bits == a
    assert getattr(conv.weight_quantizer, "bits", 1) == w


class _BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, written out (torchvision is not a dependency)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class _ResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(_BasicBlock(16, 16, 1), _BasicBlock(16, 16, 1))
        self.layer2 = nn.Sequential(_BasicBlock(16, 32, 2), _BasicBlock(32, 32, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_quantize_torchvision_style_resnet_keeping_first_and_last_at_8_bits() -> None:
    net = _ResNet()
    quantize_(
        net,
        QuantConfig(
            weight_bits=2,
            act_bits=4,
            overrides={
                "conv1": {"weight_bits": 8, "act_bits": 8},
                "fc": {"weight_bits": 8, "act_bits": 8},
            },
        ),
    )
    convs = {n: m for n, m in net.named_modules() if isinstance(m, BinaryConv2d)}
    assert len(convs) == 10  # every conv, the 1x1 shortcut projection included
    assert convs["conv1"].weight_quantizer.bits == 8
    assert convs["layer2.0.downsample.0"].weight_quantizer.bits == 2
    assert net.fc.weight_quantizer.bits == 8 and net.fc.input_quantizer.bits == 8
    y = net(torch.randn(2, 3, 32, 32))
    F.cross_entropy(y, torch.tensor([1, 2])).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("b_max", range(2, 9))
def test_top_planes_are_the_nearest_coarser_grid_point(b_max: int) -> None:
    """The run-time knob's k-bit view of a b_max-bit odd-grid weight (its top k planes) is,
    for every grid value and every k, the nearest point of the k-bit odd grid of step
    2^(b_max - k) (unique: the dropped planes sum to at most 2^d - 1 < half the spacing); k = 1
    is the sign of the top plane. Exhaustive over the grid."""
    from bcnn.engine._bitserial import integers_from_planes, planes_from_integers
    from bcnn.quant import UniformQuantizer

    hi = 2**b_max - 1
    x = torch.arange(-hi, hi + 1, 2, dtype=torch.float32)  # every b_max-bit grid point
    planes = planes_from_integers(x.numpy().astype(np.int64), b_max, True)
    for k in range(1, b_max + 1):
        d = b_max - k
        top = integers_from_planes(planes[d:], True) * 2**d  # sum_{i >= d} 2^i s_i
        coarse = np.arange(-(2**k - 1), 2**k, 2) * 2**d  # the k-bit grid, step 2^d
        dist = np.abs(x.numpy()[:, None] - coarse[None, :])
        assert np.array_equal(top, coarse[dist.argmin(1)])
        assert np.all(np.sort(dist, 1)[:, 0] < np.sort(dist, 1)[:, 1])  # nearest is unique
        if k == 1:
            assert np.array_equal(np.sign(top), np.where(x.numpy() > 0, 1, -1))
        q = UniformQuantizer(b_max, signed=True, init_step=1.0, learned=False)
        q.keep_bits = k if k < b_max else None
        got, _ = q.integer(x)
        assert np.array_equal(got.numpy(), top.astype(np.float32))
