"""Each quantizer's forward and pseudo-gradient against its closed form."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bcnn.quant import get_quantizer, list_quantizers

floats = st.floats(min_value=-3.0, max_value=3.0, allow_nan=False, width=32)
# Values that must be covered explicitly: 0 and the +-1 clip boundaries.
edge = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-7, -1e-7, 0.999, -0.999, 1.001, -1.001])
values = st.lists(st.one_of(floats, edge), min_size=1, max_size=32)


def _grad(alias: str, xs: list[float], **kw) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(xs, dtype=torch.float32, requires_grad=True)
    y = get_quantizer(alias, **kw)(x)
    y.sum().backward()
    return y.detach(), x.grad


def _sign(v: float) -> float:
    return 1.0 if v >= 0 else -1.0


def test_registry_has_the_aliases() -> None:
    assert {"ste_sign", "approx_sign", "swish_sign", "magnitude_aware_sign"} <= set(
        list_quantizers()
    )
    with pytest.raises(ValueError, match="unknown quantizer"):
        get_quantizer("no_such_sign")
    assert get_quantizer(None) is None


@pytest.mark.parametrize("alias", ["ste_sign", "approx_sign", "swish_sign"])
def test_sign_of_zero_is_plus_one(alias: str) -> None:
    y, _ = _grad(alias, [0.0, -0.0])
    assert y.tolist() == [1.0, 1.0]


@settings(max_examples=60, deadline=None)
@given(values, st.sampled_from([0.5, 1.0, 2.0]))
def test_ste_sign(xs: list[float], clip: float) -> None:
    y, g = _grad("ste_sign", xs, clip_value=clip)
    assert y.tolist() == [_sign(v) for v in xs]
    assert g.tolist() == [1.0 if abs(v) <= clip else 0.0 for v in xs]


@settings(max_examples=60, deadline=None)
@given(values)
def test_approx_sign(xs: list[float]) -> None:
    y, g = _grad("approx_sign", xs)
    assert y.tolist() == [_sign(v) for v in xs]
    expected = [2 - 2 * abs(v) if abs(v) <= 1 else 0.0 for v in xs]
    torch.testing.assert_close(g, torch.tensor(expected), rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(values, st.sampled_from([1.0, 5.0, 10.0]))
def test_swish_sign(xs: list[float], beta: float) -> None:
    y, g = _grad("swish_sign", xs, beta=beta)
    assert y.tolist() == [_sign(v) for v in xs]

    def d(v: float) -> float:
        bx = beta * v
        return beta * (2 - bx * math.tanh(bx / 2)) / (1 + math.cosh(bx))

    torch.testing.assert_close(g, torch.tensor([d(v) for v in xs]), rtol=1e-4, atol=1e-5)


def test_swish_sign_gradient_is_finite_far_out() -> None:
    _, g = _grad("swish_sign", [-1e4, 1e4, 100.0], beta=10.0)
    assert torch.isfinite(g).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.one_of(floats, edge), min_size=3, max_size=3), min_size=1, max_size=6))
def test_magnitude_aware_sign(rows: list[list[float]]) -> None:
    w = torch.tensor(rows, requires_grad=True)
    y = get_quantizer("magnitude_aware_sign")(w)
    y.sum().backward()
    alpha = [sum(abs(v) for v in r) / len(r) for r in rows]
    exp_y = [[a * _sign(v) for v in r] for a, r in zip(alpha, rows, strict=True)]
    exp_g = [
        [a * (1.0 if abs(v) <= 1 else 0.0) for v in r] for a, r in zip(alpha, rows, strict=True)
    ]
    torch.testing.assert_close(y.detach(), torch.tensor(exp_y), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, torch.tensor(exp_g), rtol=1e-5, atol=1e-6)
