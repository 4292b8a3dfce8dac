"""The layer contract: conv(sign(x), sign(w)) with one-padding, drop-in when unquantized."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bcnn.nn import (
    BinaryConv2d,
    BinaryLinear,
    BitPlaneEncoder,
    EncodedConv2d,
    LearnableBias,
    RPReLU,
    RSign,
    ThermometerEncoder,
)


def _sgn(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0)


@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "pad", "size", "bias"),
    [
        (1, 1, 3, 1, 1, 5, False),
        (63, 65, 3, 2, 1, 7, True),
        (65, 63, 3, 1, 1, 6, False),
        (64, 8, 1, 2, 0, 9, True),
        (3, 5, 5, 1, 2, 11, False),
        (7, 4, 3, 2, 0, 10, True),
    ],
)
@pytest.mark.parametrize("batch", [1, 7])
def test_binary_conv_is_conv_of_signs_with_one_padding(
    cin, cout, k, stride, pad, size, bias, batch
):
    conv = BinaryConv2d(cin, cout, k, stride=stride, padding=pad, bias=bias)
    x = torch.randn(batch, cin, size, size)
    x[0, 0, 0, 0] = 0.0  # sign(0) = +1
    expected = F.conv2d(F.pad(_sgn(x), (pad,) * 4, value=1.0), _sgn(conv.weight), conv.bias, stride)
    assert torch.equal(conv(x), expected)
    # One-padding differs from zero-padding wherever the border is touched.
    if pad:
        zero_padded = F.conv2d(_sgn(x), _sgn(conv.weight), conv.bias, stride, pad)
        assert not torch.equal(conv(x), zero_padded)


def test_binary_conv_outputs_are_integers_in_range() -> None:
    conv = BinaryConv2d(65, 3, 3, padding=1, bias=False)
    y = conv(torch.randn(2, 65, 5, 5))
    assert torch.equal(y, y.round())
    assert y.abs().max() <= 65 * 9
    assert ((y + 65 * 9) % 2 == 0).all()  # n - 2 * popcount has the parity of n


@pytest.mark.parametrize(("stride", "pad", "bias"), [(1, 0, True), (2, 1, False), (1, 2, True)])
def test_binary_conv_without_quantizers_is_nn_conv2d(stride, pad, bias) -> None:
    torch.manual_seed(1)
    ref = nn.Conv2d(5, 6, 3, stride=stride, padding=pad, bias=bias)
    conv = BinaryConv2d(
        5, 6, 3, stride=stride, padding=pad, bias=bias, input_quantizer=None, weight_quantizer=None
    )
    conv.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 9, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(conv(x), ref(x2), rtol=0, atol=0)
    conv(x).square().sum().backward()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("fin", "fout"), [(1, 1), (63, 10), (65, 7), (130, 3)])
def test_binary_linear(fin, fout, bias) -> None:
    lin = BinaryLinear(fin, fout, bias=bias)
    x = torch.randn(7, fin)
    assert torch.equal(lin(x), F.linear(_sgn(x), _sgn(lin.weight), lin.bias))
    ref = nn.Linear(fin, fout, bias=bias)
    plain = BinaryLinear(fin, fout, bias=bias, input_quantizer=None, weight_quantizer=None)
    plain.load_state_dict(ref.state_dict())
    assert torch.equal(plain(x), ref(x))


def test_quantizers_by_alias_instance_or_none() -> None:
    from bcnn.quant import ApproxSign

    conv = BinaryConv2d(2, 2, 1, input_quantizer=ApproxSign(), weight_quantizer="approx_sign")
    assert isinstance(conv.input_quantizer, ApproxSign)
    assert isinstance(conv.weight_quantizer, ApproxSign)
    with pytest.raises(ValueError, match="unknown quantizer"):
        BinaryConv2d(2, 2, 1, input_quantizer="sgn")


def test_gradients_reach_latent_weights_and_inputs() -> None:
    conv = BinaryConv2d(4, 4, 3, padding=1, input_quantizer="approx_sign")
    x = (torch.rand(2, 4, 5, 5) - 0.5).requires_grad_(True)
    conv(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bitplane_encoder_is_exact() -> None:
    enc = BitPlaneEncoder(3)
    x = torch.randint(0, 256, (4, 3, 6, 5), dtype=torch.uint8)
    x[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    planes = enc(x)
    assert planes.shape == (4, 24, 6, 5)
    assert set(planes.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(enc.decode(planes), x.float())
    # plane c*8 + b holds 1 - 2 * bit_b: bit 1 means -1
    assert planes[0, 0:8, 0, 1].tolist() == [-1.0] * 8  # 255: all bits set
    assert planes[0, 0:8, 0, 0].tolist() == [1.0] * 8  # 0: no bit set
    # a float tensor holding 0..255 encodes identically
    assert torch.equal(enc(x.float()), planes)


def test_thermometer_encoder_counts_levels() -> None:
    enc = ThermometerEncoder(1, levels=4)
    x = torch.tensor([[[[0, 60, 103, 154, 205, 255]]]], dtype=torch.uint8)
    planes = enc(x)
    on = ((1 - planes) / 2).sum(1).flatten().tolist()
    thresholds = enc.thresholds.tolist()
    assert on == [sum(int(v) >= t for t in thresholds) for v in x.flatten().tolist()]
    assert on[0] == 0 and on[-1] == 4


@pytest.mark.parametrize("encoder", ["bitplane", "thermometer"])
def test_encoded_conv_equals_weighted_plane_convs(encoder) -> None:
    stem = EncodedConv2d(3, 5, 3, stride=2, padding=1, encoder=encoder)
    x = torch.randint(0, 256, (2, 3, 7, 9), dtype=torch.uint8)
    planes = stem.encoder(x)
    w = _sgn(stem.weight)
    pw = stem.encoder.plane_weights
    expected = sum(
        pw[k] * F.conv2d(F.pad(planes[:, k : k + 1], (1,) * 4, value=1.0), w[:, k : k + 1], None, 2)
        for k in range(planes.shape[1])
    )
    torch.testing.assert_close(stem(x), expected, rtol=0, atol=1e-3)
    y = stem(x)
    if encoder == "bitplane":  # exact integers
        assert torch.equal(y, y.round())


def test_bitplane_stem_is_binary_weight_conv_on_the_image() -> None:
    """With weights shared across a channel's planes, sum_b 2^b conv(s_b, w) = conv(255 - 2p, w)."""
    stem = EncodedConv2d(2, 4, 3, padding=1)
    with torch.no_grad():
        base = torch.randn(4, 2, 1, 3, 3)
        stem.weight.copy_(base.expand(4, 2, 8, 3, 3).reshape(4, 16, 3, 3))
    x = torch.randint(0, 256, (3, 2, 6, 6), dtype=torch.uint8)
    img = 255.0 - 2.0 * x.float()
    expected = F.conv2d(F.pad(img, (1,) * 4, value=255.0), _sgn(base[:, :, 0]))
    assert torch.equal(stem(x), expected)


def test_rsign_and_rprelu() -> None:
    rs = RSign(3)
    with torch.no_grad():
        rs.shift.bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
    x = torch.tensor([[-0.4, 0.4, 0.0]])
    assert rs(x).tolist() == [[1.0, -1.0, 1.0]]
    act = RPReLU(2)
    with torch.no_grad():
        act.gamma.copy_(torch.tensor([1.0, 0.0]))
        act.slope.copy_(torch.tensor([0.5, 0.1]))
        act.zeta.copy_(torch.tensor([0.0, 2.0]))
    y = act(torch.tensor([[0.0, -1.0], [3.0, 1.0]]))
    torch.testing.assert_close(y, torch.tensor([[-0.5, 1.9], [2.0, 3.0]]))
    lb = LearnableBias(2)
    assert lb(torch.zeros(1, 2, 3, 3)).abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 65, 5, 3), (1, 1, 4, 4), (3, 63)])
def test_prelu_fast_backward_matches_aten(shape, dtype) -> None:
    """The hand-written PReLU backward against ATen's, bitwise: zeros in x (the x > 0 branch
    boundary), negative and positive slopes, 2-D and 4-D inputs."""
    from bcnn.nn._elementwise import prelu

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g).to(dtype)
    x.view(-1)[::7] = 0.0
    slope = (torch.rand(shape[1], generator=g) * 2 - 0.5).to(dtype)
    grad = torch.randn(*shape, generator=g).to(dtype)
    outs = []
    for fn in (F.prelu, prelu):
        xi, si = x.clone().requires_grad_(), slope.clone().requires_grad_()
        y = fn(xi, si)
        y.backward(grad)
        outs.append((y, xi.grad, si.grad))
    (y0, gx0, gs0), (y1, gx1, gs1) = outs
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}.get(dtype, 1e-12)  # sums in another order
    torch.testing.assert_close(gs1.double(), gs0.double(), rtol=tol, atol=tol)
