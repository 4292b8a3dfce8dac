"""BSQ on the engine's odd grid (``bsq_grid: odd``, :class:`bcnn.bsq.OddBitQuantizer`): the
sign-and-odd-magnitude representation, its straight-through gradients, the group Lasso over
the magnitude planes, re-quantization down to binary layers, exact packing with mixed widths
(a 1-bit layer included), checkpoints, bad input, and a trainer run that resumes exactly."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_bsq import (
    _cfg,
    _images,
    _interrupted_run,
    _logits,
    _state,
    _Two,
    assert_bad_states_rejected,
)

from bcnn import bsq
from bcnn.bsq import OddBitQuantizer
from bcnn.bsq._odd import _magnitude_bits
from bcnn.engine import PackedModel, load, pack
from bcnn.models import load_checkpoint, save_checkpoint


def _odd_model(seed: int = 0, bits: int = 3, act_bits: int = 4) -> torch.nn.Module:
    """test_engine_kbit's randomized W2 model, converted to odd-grid BSQ bits."""
    from test_engine_kbit import _model

    m = _model(2, act_bits, seed)
    bsq.bsq_(m, bits=bits, grid="odd")
    return m.eval()


def _set(q: OddBitQuantizer, x: torch.Tensor, k: int) -> None:
    """Write the odd integers ``x`` (|x| <= 2^k - 1) into ``q`` as canonical bits at width k."""
    with torch.no_grad():
        q.pos.copy_(_magnitude_bits((x.abs() - 1) / 2, k - 1))
        q.sign.copy_(torch.where(x > 0, 1.0, -1.0))
        q.nbits.fill_(k)


@pytest.mark.parametrize("bits", [1, 2, 5, 8])
def test_odd_bits_round_trip_every_grid_point(bits: int) -> None:
    hi = 2**bits - 1
    grid = torch.arange(-hi, hi + 1, 2).float()  # every odd integer of the k-bit grid
    q = OddBitQuantizer(grid.shape, bits)
    _set(q, grid, bits)
    assert torch.equal(q.integer()[0], grid)
    # init_from a quantized tensor (max |w| on the grid's top) recovers it exactly
    r = OddBitQuantizer(grid.shape, bits)
    r.init_from(grid * 0.375, bits)
    x, step = r.integer()
    assert torch.equal(x, grid) and math.isclose(float(step.detach()), 0.375, rel_tol=1e-6)
    assert set(r.pos.unique().tolist()) <= {0.0, 1.0}
    assert not bool(r.pos[bits - 1 :].any())  # k - 1 magnitude planes, nothing above
    before = copy.deepcopy(r.state_dict())
    assert r.requantize() == {"before": bits, "after": bits, "overflow": False}
    assert torch.equal(r.integer()[0], grid) and torch.equal(r.step, before["step"])


def test_odd_forward_and_straight_through_gradients() -> None:
    q = OddBitQuantizer((4,), 3)
    with torch.no_grad():
        q.pos[0] = torch.tensor([0.5, 0.49, 1.5, 0.0])  # M = 1, 0, 2 (+2 below), 0
        q.pos[1] = torch.tensor([0.0, 0.0, 1.0, 0.0])
        q.sign.copy_(torch.tensor([0.3, -0.2, 0.0, -1.0]))  # sign(0) = +1
        q.step.fill_(2.0)
    x, _ = q.integer()
    assert x.tolist() == [3.0, -1.0, 9.0, -1.0]  # s (2M + 1); M = 4 overflows the 3-bit range
    (q() * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    # d(step X)/dp_b = step * 2^(b+1) * s; d/dz = step * (2M + 1); planes >= k - 1 get nothing
    assert q.pos.grad[0].tolist() == [4.0, -8.0, 12.0, -16.0]
    assert q.pos.grad[1].tolist() == [8.0, -16.0, 24.0, -32.0]
    assert not bool(q.pos.grad[2:].any())
    assert q.sign.grad.tolist() == [6.0, 4.0, 54.0, 8.0]


def test_odd_group_lasso_value_and_gradient_closed_form() -> None:
    m = bsq.bsq_(_Two(), bits=3, grid="odd")
    g = torch.Generator().manual_seed(0)
    qa, qb = m.conv.weight_quantizer, m.fc.weight_quantizer
    with torch.no_grad():
        qb.nbits.fill_(2)
        for q in (qa, qb):
            q.pos.copy_(torch.rand(q.pos.shape, generator=g) * 2)
            q.sign.copy_(torch.rand(q.sign.shape, generator=g) * 2 - 1)
            q.clamp_()
    total = 12  # 6 weights per layer; k_a = 3 (2 magnitude planes), k_b = 2 (1 plane)

    def norm(q: OddBitQuantizer, b: int) -> float:
        return math.sqrt(1e-8 + float((q.pos[b].detach() ** 2).sum()))

    want = 6 * 3 / total * (norm(qa, 0) + norm(qa, 1)) + 6 * 2 / total * norm(qb, 0)
    reg = bsq.bit_group_lasso(m)
    assert math.isclose(float(reg.detach()), want, rel_tol=1e-6)
    reg.backward()
    for q, c, nb in ((qa, 6 * 3 / total, 2), (qb, 6 * 2 / total, 1)):
        for b in range(nb):
            torch.testing.assert_close(q.pos.grad[b], c * q.pos[b].detach() / norm(q, b))
        assert not bool(q.pos.grad[nb:].any())
        assert q.sign.grad is None or not bool(q.sign.grad.any())  # the sign is no group


def test_odd_requantize_keeps_output_overflows_and_drops_to_binary() -> None:
    m = _odd_model(bits=3)
    x = _images(4, 33, 0)
    a = m.blocks[0].conv.weight_quantizer  # overflow
    b = m.blocks[1].conv.weight_quantizer  # every magnitude 0: binary
    c = m.blocks[2].conv.weight_quantizer  # top magnitude plane 0: 2 bits
    with torch.no_grad():
        a.pos.add_(torch.rand(a.pos.shape) * 0.4)  # continuous, non-canonical bits
        a.clamp_()
        a.pos[0, 0, 0, 0, 0] = 2.0  # M = 2 + 2 * 2 = 6 > 3: past the 3-bit range
        a.pos[1, 0, 0, 0, 0] = 2.0
        b.pos.zero_()
        c.pos[1].zero_()
    x_a = a.integer()[0]
    assert float(x_a.detach().abs().max()) > 7
    before = _logits(m, x)
    info = bsq.requantize_(m)
    assert info["blocks.0.conv"] == {"before": 3, "after": 4, "overflow": True}
    assert info["blocks.1.conv"]["after"] == 1 and info["blocks.2.conv"]["after"] == 2
    assert torch.equal(_logits(m, x), before)  # the output does not move
    assert torch.equal(a.integer()[0], x_a)
    assert set(b.integer()[0].abs().unique().tolist()) == {1.0}  # binary: +-step
    assert b.storage_bits == 1 and bsq.avg_weight_bits(m) < 4
    bsq.check_(m)
    # frozen: clipped to the width, k kept
    with torch.no_grad():
        c.pos[0, 0, 0, 0, 0] = 2.0  # M = 2 > 1
    c.frozen.fill_(True)
    assert float(c.integer()[0].detach().abs().max()) == 3.0
    assert c.requantize(adjust=False)["after"] == 2


@pytest.mark.parametrize("act_bits", [1, 4])
def test_packed_odd_bsq_model_equals_torch_with_mixed_bits(act_bits: int, tmp_path: Path) -> None:
    m = _odd_model(seed=act_bits, bits=4, act_bits=act_bits)
    qs = [mod.weight_quantizer for mod in bsq.bsq_layers(m).values()]
    g = torch.Generator().manual_seed(3)
    for i, q in enumerate(qs):  # widths 1..5, a binary layer included
        k = [3, 1, 2, 5, 4, 1][i % 6]
        hi = 2**k - 1
        x = 2 * torch.randint(0, 2**k, q.shape, generator=g).float() - hi
        _set(q, x, k)
        with torch.no_grad():
            q.sign.mul_(torch.rand(q.shape, generator=g))  # continuous signs, same sign
    bits = bsq.layer_bits(m)
    assert 1 in bits.values() and len(set(bits.values())) >= 4
    p = pack(m)
    ops = [op for op in p.graph["ops"] if "weight_bits" in op]
    assert not any(op.get("weight_zero") for op in ops)  # the odd grid: plain k-bit ops
    assert sorted(op["weight_bits"] for op in ops) == sorted(bits.values())
    for hw, n in ((32, 7), (33, 1)):
        x = _images(n, hw, hw)
        out = p(x.numpy())
        assert np.array_equal(out, _logits(m, x).numpy())  # max |diff| 0
    p.save(tmp_path / "b.bcnn")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "b.bcnn"), "np") as f:
        assert f.metadata()["format_version"] == "1"  # nothing new in the file
    assert np.array_equal(load(tmp_path / "b.bcnn")(x.numpy()), out)
    r = PackedModel(p.graph, p.tensors, backend="reference")
    assert np.array_equal(r(x.numpy()), out)
    # negative control: the classifier's signs flipped must move the logits
    with torch.no_grad():
        qs[-1].sign.neg_()
    assert not np.array_equal(pack(m)(x.numpy()), out)


def test_corrupt_odd_bsq_files_never_crash(tmp_path: Path) -> None:
    from _fuzz import corrupt_and_run

    m = _odd_model(bits=3)
    with torch.no_grad():
        m.blocks[1].conv.weight_quantizer.pos.zero_()  # a binary layer among k-bit ones
    bsq.requantize_(m)
    pack(m).save(tmp_path / "b.bcnn")
    errors, _ = corrupt_and_run(tmp_path / "b.bcnn", tmp_path, seed=2)
    assert errors >= 30


def test_odd_weights_finetuning_switch_keeps_output_and_packs() -> None:
    m = _odd_model(seed=2, bits=3)
    x = _images(3, 32, 4)
    before = _logits(m, x)
    bsq.freeze_(m, weights=True)
    assert torch.equal(_logits(m, x), before)  # starts from exactly step * X
    g = torch.Generator().manual_seed(1)
    layers = list(bsq.bsq_layers(m).values())
    with torch.no_grad():  # "trained": weights off the grid, per-channel steps
        for layer in layers:
            q = layer.weight_quantizer
            q.step.mul_(torch.rand(q.step.shape, generator=g) + 0.5)
            layer.weight.add_(torch.randn(layer.weight.shape, generator=g) * q._step(q.step))
    out = _logits(m, x)
    assert np.array_equal(pack(m)(x.numpy()), out.numpy())
    bsq.requantize_(m)  # the bits and signs follow the weights' X (the stage's end)
    for layer in layers:
        q = layer.weight_quantizer
        want = q.integer(layer.weight)[0]
        q.latent.fill_(False)
        assert torch.equal(q.integer()[0], want)
        q.latent.fill_(True)
        q.check()


def test_odd_checkpoint_round_trip_and_bad_state(tmp_path: Path) -> None:
    m = _odd_model(bits=3)
    x = _images(2, 32, 3)
    save_checkpoint(tmp_path / "m.pt", m)
    r, _ = load_checkpoint(tmp_path / "m.pt")
    assert isinstance(r.blocks[0].conv.weight_quantizer, OddBitQuantizer)
    assert torch.equal(_logits(r, x), _logits(m, x)) and bsq.layer_bits(r) == bsq.layer_bits(m)
    assert_bad_states_rejected(
        m,
        tmp_path,
        [
            (lambda q: q.pos.data.__setitem__((0, 0), 2.5), r"outside \[0, 2\]"),
            (lambda q: q.sign.data.__setitem__(0, 1.5), r"sign variables outside \[-1, 1\]"),
            (lambda q: q.sign.data.__setitem__(0, float("nan")), "sign variables"),
            (lambda q: q.pos.data.__setitem__((2, 0), 1.0), "above the layer's"),
            (lambda q: q.nbits.fill_(0), "not in 1..8"),
            (lambda q: q.step.data.fill_(0.0), "step"),
        ],
    )
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    for bad in ("even", ["odd"]):
        obj["config"]["bsq_grid"] = bad
        torch.save(obj, tmp_path / "grid.pt")
        with pytest.raises(ValueError, match="BSQ grid must be one of"):
            load_checkpoint(tmp_path / "grid.pt")
    with pytest.raises(ValueError, match=r"odd-grid BSQ bits must be in 1\.\.8"):
        OddBitQuantizer((2,), 0)
    with pytest.raises(ValueError, match="use the 'odd' grid, not 'zero'"):
        bsq.bsq_(m, bits=3)


def test_odd_summary_counts_k_bits_per_weight() -> None:
    from bcnn import summary

    m = _odd_model(bits=3)
    with torch.no_grad():
        m.blocks[1].conv.weight_quantizer.pos.zero_()
    bsq.requantize_(m)
    d = summary(m).to_dict()
    rows = {r["name"]: r for r in d["layers"] if r["weight_bits"] is not None}
    assert rows["blocks.1.conv"]["weight_bits"] == 1 and rows["blocks.1.conv"]["bsq_bits"] == 1
    n = {k: mod.weight.numel() for k, mod in bsq.bsq_layers(m).items()}
    want = sum(n[k] * b for k, b in bsq.layer_bits(m).items()) / sum(n.values())
    assert math.isclose(d["avg_weight_bits"], want) and math.isclose(bsq.avg_weight_bits(m), want)


def _odd_cfg(out: Path, **kw: Any) -> Any:
    return _cfg(out, **{"bsq_grid": "odd", "bsq_finetune_mode": "weights", **kw})


def test_odd_run_learns_bits_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bcnn.train import train

    torch.set_num_threads(1)
    train(_odd_cfg(tmp_path / "a"))
    m, meta = load_checkpoint(tmp_path / "a" / "final.pt")
    assert meta["steps"] == ["1", "2", "ft"]
    layers = bsq.bsq_layers(m)
    assert all(isinstance(mod.weight_quantizer, OddBitQuantizer) for mod in layers.values())
    assert bsq.avg_weight_bits(m) < 4.0  # from 4 bits: the group Lasso dropped planes
    x = _images(3, 8, 0)[:, :1]
    assert np.array_equal(pack(m)(x.numpy()), _logits(m, x).numpy())
    # a crash mid step 2 (after re-quantizations) resumes to the same bytes
    _interrupted_run(monkeypatch, _odd_cfg(tmp_path / "b"), 14, "crash")
    train(_odd_cfg(tmp_path / "b", resume=True))
    a, b = _state(tmp_path / "a" / "final.pt"), _state(tmp_path / "b" / "final.pt")
    assert a.keys() == b.keys() and any(k.endswith(".sign") for k in a)
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_bad_grid_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bsq_grid must be zero or odd"):
        _odd_cfg(tmp_path / "x", bsq_grid="even").validate()
