"""Any-precision BCNNs (issue 11, torch side): nested weights, switchable activation
quantizers, batch norm per precision (switchable and transitional), per-layer run-time
precision through bcnn.quant.set_precision, and its errors."""

from __future__ import annotations

import pytest
import torch

from bcnn.models import create_model, precision_layers
from bcnn.nn import SwitchableBatchNorm, bn_keys
from bcnn.quant import SwitchableQuantizer, precision, set_precision, switchable_layers

PRECISIONS = (1, 2, 3, 4)


def _model(bn: str = "transitional") -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("bcnn_cifar", width=8, depth=1, precisions=PRECISIONS, precision_bn=bn)


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _sites(model: torch.nn.Module) -> dict[str, SwitchableBatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SwitchableBatchNorm)}


def _train_at(model: torch.nn.Module, ks: tuple[int, ...], steps: int = 2) -> None:
    model.train()
    for k in ks:
        set_precision(model, weight_bits=k, act_bits=k)
        for _ in range(steps):
            model(_images()).sum().backward()


def test_every_matrix_op_is_switchable_with_nested_weights() -> None:
    model = _model()
    names = [n for n, _ in precision_layers(model)]
    assert list(switchable_layers(model)) == names
    assert names[0] == "stem.conv" and names[-1] == "head.fc"
    _train_at(model, (4,), steps=1)  # initialises the LSQ steps
    for k in PRECISIONS:
        set_precision(model, weight_bits=k, act_bits=k)
        for name, layer in precision_layers(model):
            q = layer.weight_quantizer
            X, _ = q.integer(layer.weight)
            d = 4 - k
            # the top k planes: odd multiples of 2^d, within the 4-bit grid
            assert torch.all(torch.remainder(X / 2**d, 2) == 1), name
            assert X.abs().max() <= 15, name
            if name != "stem.conv":
                assert layer.input_quantizer.bits == k


def test_switchable_quantizer_keeps_one_step_per_precision() -> None:
    q = SwitchableQuantizer((1, 2, 4))
    x = torch.randn(64) * 3
    outs = {}
    for k in (1, 2, 4):
        q.select(k)
        X, step = q.integer(x)
        assert torch.all(torch.remainder(X, 2) == 1) and X.abs().max() <= 2**k - 1
        outs[k] = (X * step).detach()
    assert len({q.quantizers[str(k)].step.data_ptr() for k in (1, 2, 4)}) == 3
    assert not torch.equal(outs[1], outs[4])
    assert outs[1].abs().unique().numel() == 1  # 1 bit: +-step
    with pytest.raises(ValueError, match="not one of the trained"):
        q.select(3)


@pytest.mark.parametrize("bn", ["transitional", "switchable"])
def test_bn_key_selection_and_independent_statistics(bn: str) -> None:
    model = _model(bn)
    sites = _sites(model)
    assert len(sites) == len(precision_layers(model))  # after the stem and each conv; head norm
    assert all(len(s.keys) == len(bn_keys(PRECISIONS, bn)) for s in sites.values())
    before = {n: {k: s.sets["_".join(map(str, k))].running_mean.clone() for k in s.keys}
              for n, s in sites.items()}  # fmt: skip
    _train_at(model, (2,), steps=1)
    key = (2, 2) if bn == "switchable" else (2, 2, 2)
    for n, s in sites.items():
        for k in s.keys:
            m = s.sets["_".join(map(str, k))]
            moved = not torch.equal(m.running_mean, before[n][k])
            assert moved == (k == key), (n, k)
            assert int(m.num_batches_tracked) == (1 if k == key else 0)


def test_per_layer_mix_selects_each_sites_transition() -> None:
    model = _model("transitional")
    layers = precision_layers(model)
    mix = {name: (1 + i % 4, 1 + (i + 1) % 4) for i, (name, _) in enumerate(layers)}
    set_precision(model, layers=mix)
    sites = list(_sites(model).values())
    assert len(sites) == len(layers)
    for i, s in enumerate(sites):
        # site i sits between layer i and layer i+1; the head's norm (the last site) between
        # the last block and the classifier, as the last block's own BN
        p = min(i, len(layers) - 2)
        w, a = mix[layers[p][0]]
        assert s.active_key == (w, a, mix[layers[p + 1][0]][1]), s.site


def test_wrong_bn_set_changes_the_logits_negative_control() -> None:
    model = _model()
    _train_at(model, (2, 4))
    model.eval()
    x = _images(3)
    with torch.no_grad(), precision(model, weight_bits=2, act_bits=2):
        right = model(x)
        site = next(iter(_sites(model).values()))
        site.bind(lambda: (4, 4, 4), site.site)  # the 4-bit statistics at a 2-bit layer
        wrong = model(x)
    assert not torch.allclose(right, wrong)


def test_each_precision_gives_different_finite_logits_with_gradients() -> None:
    model = _model()
    _train_at(model, PRECISIONS, steps=1)
    x = _images(2)
    logits = {}
    for k in PRECISIONS:
        model.zero_grad()
        model.train()
        set_precision(model, weight_bits=k, act_bits=k)
        y = model(x)
        y.square().mean().backward()
        for name, layer in precision_layers(model):
            assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
            assert layer.weight.grad.abs().sum() > 0, name
        model.eval()
        with torch.no_grad():
            logits[k] = model(x)
        assert torch.isfinite(logits[k]).all()
    assert len({tuple(v.flatten().tolist()) for v in logits.values()}) == len(PRECISIONS)


def test_bad_precisions_are_one_line_errors() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"layer 'stem.conv': weight_bits=5 is not in 1..4"):
        set_precision(model, weight_bits=5)
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        set_precision(model, layers={"nope": (2, 2)})
    _train_at(model, (2,), steps=1)
    model.eval()
    set_precision(model, weight_bits=3, act_bits=3)
    with pytest.raises(ValueError, match=r"stem.conv: precision \(3, 3, 3\) was never trained"):
        model(_images(1))
    with pytest.raises(ValueError, match=r"precisions must be in 1\.\.8"):
        create_model("bcnn_cifar", width=8, depth=1, precisions=(0, 2))
    with pytest.raises(ValueError, match="precision_bn must be"):
        create_model("bcnn_cifar", width=8, depth=1, precisions=(1, 2), precision_bn="x")
    with pytest.raises(ValueError, match="binary model"):
        create_model("bcnn_cifar", binary=False, width=8, depth=1, precisions=(1, 2))


def test_packing_an_any_precision_model_is_refused_clearly() -> None:
    from bcnn.engine import pack

    with pytest.raises(ValueError, match="any-precision models"):
        pack(_model())
