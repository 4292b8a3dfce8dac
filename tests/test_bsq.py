"""BSQ (bcnn.bsq): the bit representation, the regularizer and its gradient, re-quantization,
zero-grid layers in the bit-serial engine (exact against torch and a plain reference), the
file format, checkpoints, the trainer's BSQ stages (resume included) and the summary."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bcnn import bsq
from bcnn.bsq import BitQuantizer
from bcnn.bsq._quantizer import _sign_magnitude_bits
from bcnn.engine import PackedModel, load, pack
from bcnn.engine._bitserial import (
    BitSerialConv,
    BitSerialLinear,
    planes_from_integers,
    quantize_reference,
    reference_conv,
)
from bcnn.engine._pack import pack_signs
from bcnn.models import create_model, load_checkpoint, save_checkpoint


# ---------------------------------------------------------------- the bit representation
def _canonical(shape: tuple[int, ...], bits: int, seed: int) -> tuple[BitQuantizer, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hi = 2**bits - 1
    w = torch.randint(-hi, hi + 1, shape, generator=g).float()
    q = BitQuantizer(shape, bits)
    pos, neg = _sign_magnitude_bits(w, bits)
    with torch.no_grad():
        q.pos.copy_(pos)
        q.neg.copy_(neg)
        q.step.fill_(0.125)
        q.nbits.fill_(bits)
    return q, w


@pytest.mark.parametrize("bits", [1, 2, 5, 8])
def test_bits_round_trip_a_quantized_tensor(bits: int) -> None:
    q, w = _canonical((5, 3, 3, 7), bits, seed=bits)
    x, step = q.integer()
    assert torch.equal(x, w) and float(step.detach()) == 0.125
    # init_from a quantized tensor (max |w| on the grid's top) recovers it exactly
    w[0, 0, 0, 0] = 2**bits - 1
    r = BitQuantizer(w.shape, bits)
    r.init_from(w * 0.375, bits)
    x, step = r.integer()
    assert torch.equal(x, w) and math.isclose(float(step.detach()), 0.375, rel_tol=1e-6)
    # every bit variable is 0 or 1, sign-magnitude (never both parts of one bit set)
    assert set(r.pos.unique().tolist()) <= {0.0, 1.0} and not bool((r.pos * r.neg).any())
    # re-quantizing a canonical state changes nothing
    before = copy.deepcopy(r.state_dict())
    info = r.requantize()
    assert info == {"before": bits, "after": bits, "overflow": False}
    assert all(torch.equal(before[k], v) for k, v in r.state_dict().items())


def test_forward_rounds_half_away_with_a_straight_through_gradient() -> None:
    q = BitQuantizer((4,), 2)
    with torch.no_grad():
        q.pos[0] = torch.tensor([0.5, 0.49, 1.5, 0.0])
        q.neg[1] = torch.tensor([0.0, 0.0, 0.0, 0.25])  # -0.5
        q.step.fill_(2.0)
    x, _ = q.integer()
    assert x.tolist() == [1.0, 0.0, 2.0, -1.0]
    (q() * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    # d(step * W)/dp_b = step * 2^b, d/dn_b = -step * 2^b; bits >= N get nothing
    assert q.pos.grad[0].tolist() == [2.0, 4.0, 6.0, 8.0]
    assert q.pos.grad[1].tolist() == [4.0, 8.0, 12.0, 16.0]
    assert q.neg.grad[1].tolist() == [-4.0, -8.0, -12.0, -16.0]
    assert not bool(q.pos.grad[2:].any())


# ---------------------------------------------------------------- the regularizer
class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from bcnn.nn import BinaryConv2d, BinaryLinear

        self.conv = BinaryConv2d(2, 3, 1, input_quantizer=None, weight_quantizer="ste_sign")
        self.fc = BinaryLinear(3, 2, input_quantizer=None, weight_quantizer="ste_sign")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_group_lasso_value_and_gradient_closed_form() -> None:
    m = bsq.bsq_(_Two(), bits=2)
    g = torch.Generator().manual_seed(0)
    qa, qb = m.conv.weight_quantizer, m.fc.weight_quantizer
    with torch.no_grad():
        qb.nbits.fill_(1)
        for q in (qa, qb):
            q.pos.copy_(torch.rand(q.pos.shape, generator=g) * 2)
            q.neg.copy_(torch.rand(q.neg.shape, generator=g) * 2)
            q.clamp_()
    n_a, n_b = 6, 6  # weights per layer; N_a = 2, N_b = 1
    total = n_a + n_b

    def norm(q: BitQuantizer, b: int) -> float:
        return math.sqrt(
            1e-8 + float((q.pos[b].detach() ** 2).sum() + (q.neg[b].detach() ** 2).sum())
        )

    want = n_a * 2 / total * (norm(qa, 0) + norm(qa, 1)) + n_b * 1 / total * norm(qb, 0)
    reg = bsq.bit_group_lasso(m)
    assert math.isclose(float(reg), want, rel_tol=1e-6)
    reg.backward()
    # dR/dp_b(w) = (n_l N_l / n) * p_b(w) / ||plane b||
    for q, c, nb in ((qa, n_a * 2 / total, 2), (qb, n_b * 1 / total, 1)):
        for b in range(nb):
            expect = c * q.pos[b].detach() / norm(q, b)
            torch.testing.assert_close(q.pos.grad[b], expect, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(q.neg.grad[b], c * q.neg[b].detach() / norm(q, b))
        assert not bool(q.pos.grad[nb:].any())


def test_no_quantizable_layer_and_bad_bits() -> None:
    with pytest.raises(ValueError, match="no quantizable layer"):
        bsq.bsq_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.8"):
        bsq.bsq_(_Two(), bits=9)
    with pytest.raises(ValueError, match="no BSQ layer"):
        bsq.bit_group_lasso(_Two())


# ---------------------------------------------------------------- re-quantization
def _bsq_model(seed: int = 0, bits: int = 3, act_bits: int = 4) -> nn.Module:
    """test_engine_kbit's randomized W2 model (non-trivial batch norms, steps, shifts), its
    weights converted to BSQ bits."""
    from test_engine_kbit import _model

    m = _model(2, act_bits, seed)
    bsq.bsq_(m, bits=bits)
    return m.eval()


def _images(n: int, hw: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, hw, hw), dtype=torch.uint8, generator=g)


def _logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)


def test_requantize_keeps_the_output_and_raises_precision_on_overflow() -> None:
    m = _bsq_model(bits=3)
    x = _images(4, 32, 0)
    q = m.blocks[1].conv.weight_quantizer
    with torch.no_grad():
        q.pos.add_(torch.rand(q.pos.shape) * 0.6)  # continuous, non-canonical bits
        q.clamp_()
        q.pos[2, 0, 0, 0, 0] = 2.0  # v >= 8 + ...: past the 3-bit range
        q.neg[:, 0, 0, 0, 0] = 0.0
    w_before, _ = q.integer()
    assert float(w_before.abs().max()) > 7
    before = _logits(m, x)
    info = bsq.requantize_(m)
    assert info["blocks.1.conv"]["overflow"] and info["blocks.1.conv"]["after"] == 4
    assert torch.equal(_logits(m, x), before)
    w_after, _ = q.integer()
    assert torch.equal(w_after, w_before)
    q.check()  # canonical: bits in {0, 1}, nothing above N


def test_all_zero_planes_are_dropped_and_fix_n_and_step() -> None:
    m = _bsq_model(bits=4)
    x = _images(3, 33, 1)
    a = m.blocks[0].conv.weight_quantizer  # make its LSB plane and MSB plane zero
    b = m.blocks[2].conv.weight_quantizer  # make it all zero: a 0-bit layer
    with torch.no_grad():
        w, _ = a.integer()
        w = (torch.div(w, 2, rounding_mode="trunc") * 2).clamp(-6, 6)  # even, |w| <= 6
        a.pos.copy_(_sign_magnitude_bits(w, 4)[0])
        a.neg.copy_(_sign_magnitude_bits(w, 4)[1])
        b.pos.zero_()
        b.neg.zero_()
    step_a = float(a.step)
    before = _logits(m, x)
    bsq.requantize_(m)
    assert torch.equal(_logits(m, x), before)  # dropping zero planes changes nothing
    assert a.bits == 2 and float(a.step) == 2 * step_a  # LSB dropped: step doubled; MSB dropped
    assert b.bits == 0 and b.storage_bits == 0
    assert bsq.layer_bits(m)["blocks.2.conv"] == 0


def test_frozen_scheme_clips_and_keeps_n() -> None:
    q = BitQuantizer((3,), 2)
    with torch.no_grad():
        q.pos[0] = torch.tensor([2.0, 1.0, 0.0])
        q.pos[1] = torch.tensor([2.0, 1.0, 0.0])  # v = 6 > 3
    q.frozen.fill_(True)
    assert q.integer()[0].tolist() == [3.0, 3.0, 0.0]
    assert q.requantize(adjust=False) == {"before": 2, "after": 2, "overflow": False}


# ---------------------------------------------------------------- the engine
def _zero_planes(wi: np.ndarray) -> np.ndarray:
    n = int(np.abs(wi).max()).bit_length()
    neg = planes_from_integers(2 * wi + 1, n + 1, True)
    return np.stack([pack_signs(p) for p in neg])


@pytest.mark.parametrize(
    "cin,hw,stride,n,wb,ab,signed",
    [
        (1, 5, 1, 1, 2, 2, True),
        (63, 5, 2, 7, 1, 3, True),
        (65, 1, 1, 1, 3, 2, False),
        (65, 7, 2, 1, 0, 4, True),  # a 0-bit layer: all weights 0
        (63, 3, 2, 7, 8, 8, False),
        (1, 4, 1, 7, 4, 1, True),
    ],
)
def test_zero_grid_conv_vs_plain_reference(
    cin: int, hw: int, stride: int, n: int, wb: int, ab: int, signed: bool
) -> None:
    rng = np.random.default_rng(cin * 11 + hw + wb)
    cout, step = 37, 0.25
    x = (rng.standard_normal((n, hw, hw, cin)) * 2**ab * 0.2).astype(np.float32)
    xi = quantize_reference(x, step, ab, signed)
    hi = 2**wb - 1
    wi = rng.integers(-hi, hi + 1, (cout, 3, 3, cin))
    if wb:
        wi[0, 0, 0, 0] = hi
    planes = _zero_planes(wi)
    conv = BitSerialConv(planes, cin, ab, signed, stride, 1, zero=True)
    pad_value = 2**ab - 1 if signed else 0
    ref = reference_conv(xi, wi, stride, 1, pad_value).astype(np.float32)
    y = conv(x, step)
    assert y.dtype == np.float32 and np.array_equal(y, ref)
    assert np.array_equal(conv(x, step, weight_bits=1), ref)  # the plane knob does not apply
    lin = BitSerialLinear(_zero_planes(wi[:, 0, 0, :]), cin, ab, signed, zero=True)
    want = (xi[:, 0, 0, :] @ wi[:, 0, 0, :].T).astype(np.float32)
    assert np.array_equal(lin(x[:, 0, 0, :], step), want)


@pytest.mark.parametrize("act_bits", [1, 4])
def test_packed_bsq_model_equals_torch_with_mixed_bits(act_bits: int, tmp_path: Path) -> None:
    m = _bsq_model(seed=act_bits, bits=4, act_bits=act_bits)
    qs = [mod.weight_quantizer for mod in bsq.bsq_layers(m).values()]
    with torch.no_grad():  # mixed precisions 0..5, and one layer at 0 bits
        for i, q in enumerate(qs):
            w, _ = q.integer()
            n = [3, 0, 1, 5, 2, 4][i % 6]
            hi = 2**n - 1
            w = (w * 2**n // 8).clamp(-hi, hi) if n else w * 0
            if n:
                w.view(-1)[0] = hi
            q.nbits.fill_(max(n, 1))
            q.pos.copy_(_sign_magnitude_bits(w, max(n, 1))[0])
            q.neg.copy_(_sign_magnitude_bits(w, max(n, 1))[1])
    bsq.requantize_(m)
    bits = bsq.layer_bits(m)
    assert 0 in bits.values() and len(set(bits.values())) >= 4
    p = pack(m)
    zero = [op for op in p.graph["ops"] if op.get("weight_zero")]
    assert len(zero) == len(qs)
    assert [op["weight_bits"] for op in zero] == [n + 1 for n in bits.values()]
    for hw, n in ((32, 7), (33, 1)):
        x = _images(n, hw, hw)
        out = p(x.numpy())
        assert np.array_equal(out, _logits(m, x).numpy())  # max |diff| 0
    p.save(tmp_path / "b.bcnn")
    q = load(tmp_path / "b.bcnn")
    assert np.array_equal(q(x.numpy()), out)
    r = PackedModel(p.graph, p.tensors, backend="reference")
    assert np.array_equal(r(x.numpy()), out)


def test_negative_control_corrupt_a_bsq_weight() -> None:
    m = _bsq_model(bits=3)
    p = pack(m)
    x = _images(4, 32, 5).numpy()
    base = p(x)
    op = next(o for o in p.graph["ops"] if o["op"] == "qconv" and o.get("weight_zero"))
    t = dict(p.tensors)
    w = t[op["weight"]].copy()
    w[-1, ..., 0] ^= np.uint64((1 << op["in_channels"]) - 1)  # negate the top plane of X
    t[op["weight"]] = w
    assert not np.allclose(PackedModel(p.graph, t)(x), base)
    g = copy.deepcopy(p.graph)  # the same planes read as the odd grid: wrong logits too
    next(o for o in g["ops"] if o["name"] == op["name"]).pop("weight_zero")
    assert not np.allclose(PackedModel(g, p.tensors)(x), base)


def test_file_versions_and_weight_zero_validation(tmp_path: Path) -> None:
    from safetensors import safe_open

    m = _bsq_model(bits=2)
    p = pack(m)
    p.save(tmp_path / "b.bcnn")
    with safe_open(str(tmp_path / "b.bcnn"), "np") as f:
        assert f.metadata()["format_version"] == "2"
    plain = pack(create_model("bcnn_cifar", width=8, depth=1).eval())
    plain.save(tmp_path / "p.bcnn")
    with safe_open(str(tmp_path / "p.bcnn"), "np") as f:
        assert f.metadata()["format_version"] == "1"  # files without BSQ layers stay version 1
    from bcnn.engine._format import validate_graph

    with pytest.raises(ValueError, match="version-2 file"):
        validate_graph(p.graph, p.tensors, version=1)
    i = next(i for i, o in enumerate(p.graph["ops"]) if o.get("weight_zero"))
    for key, val, match in [
        ("weight_zero", False, "'weight_zero' must be true"),
        ("weight_zero", 1, "'weight_zero' must be true"),
        ("weight_bits", 10, "weight_bits"),
    ]:
        g = copy.deepcopy(p.graph)
        g["ops"][i][key] = val
        with pytest.raises(ValueError, match=match):
            PackedModel(g, p.tensors)


def test_corrupt_bsq_files_never_crash(tmp_path: Path) -> None:
    from _fuzz import corrupt_and_run

    pack(_bsq_model(bits=3)).save(tmp_path / "b.bcnn")
    errors, _ = corrupt_and_run(tmp_path / "b.bcnn", tmp_path, seed=1)
    assert errors >= 30


# ---------------------------------------------------------------- checkpoints, summary
def test_checkpoint_round_trip_and_out_of_range_bits(tmp_path: Path) -> None:
    m = _bsq_model(bits=3)
    x = _images(2, 32, 3)
    save_checkpoint(tmp_path / "m.pt", m)
    r, _ = load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(_logits(r, x), _logits(m, x)) and bsq.layer_bits(r) == bsq.layer_bits(m)
    assert_bad_states_rejected(
        m,
        tmp_path,
        [
            (lambda q: q.pos.data.__setitem__((0, 0), 2.5), r"outside \[0, 2\]"),
            (lambda q: q.neg.data.__setitem__((0, 0), float("nan")), r"outside \[0, 2\]"),
            (lambda q: q.pos.data.__setitem__((7, 0), 1.0), "above the layer's"),
            (lambda q: q.nbits.fill_(9), "not in 0..8"),
            (lambda q: q.step.data.fill_(0.0), "step"),
        ],
    )


def assert_bad_states_rejected(m: nn.Module, tmp_path: Path, edits: list[Any]) -> None:
    """Each (edit of blocks.0's quantizer, message) saved to a checkpoint: loading it is a
    one-line ValueError naming the layer and matching the message."""
    for edit, match in edits:
        bad = copy.deepcopy(m)
        edit(bad.blocks[0].conv.weight_quantizer)
        save_checkpoint(tmp_path / "bad.pt", bad)
        with pytest.raises(ValueError, match=match) as e:
            load_checkpoint(tmp_path / "bad.pt")
        assert "blocks.0.conv" in str(e.value) and "\n" not in str(e.value)


def test_summary_reports_bits_per_layer_and_average() -> None:
    from bcnn import summary

    m = _bsq_model(bits=3)
    q = m.blocks[1].conv.weight_quantizer
    with torch.no_grad():
        q.pos.zero_()
        q.neg.zero_()
    bsq.requantize_(m)
    d = summary(m).to_dict()
    rows = {r["name"]: r for r in d["layers"] if r["weight_bits"] is not None}
    assert rows["blocks.1.conv"]["weight_bits"] == 0 and rows["blocks.1.conv"]["bsq_bits"] == 0
    assert all(r["bsq_bits"] is not None for n, r in rows.items() if r["weight_bits"] < 32)
    n = {k: mod.weight.numel() for k, mod in bsq.bsq_layers(m).items()}
    want = sum(n[k] * (b + 1 if b else 0) for k, b in bsq.layer_bits(m).items()) / sum(n.values())
    assert math.isclose(d["avg_weight_bits"], want) and math.isclose(bsq.avg_weight_bits(m), want)
    assert math.isclose(d["weight_compression"], 32 / want)
    assert not any("weight_quantizer" in r["name"] for r in d["layers"])


# ---------------------------------------------------------------- the trainer
def _cfg(out: Path, **kw: Any) -> Any:
    """test_train's tiny synthetic run (4 iterations per epoch, 2 epochs per step), A4, with
    BSQ from 4 bits: re-quantization every 2 iterations, one fine-tuning epoch of the bit
    variables (the official mode; test_bsq_finetune runs the default, the weights)."""
    from test_train import _cfg as train_cfg

    bsq_kw: dict[str, Any] = dict(
        model_kw={"width": 8, "depth": 1, "act_bits": 4}, bsq_alpha=5.0, bsq_bits=4,
        bsq_finetune=1, bsq_lr=0.5, bsq_interval=0.5, bsq_finetune_mode="bits",
    )  # fmt: skip
    return train_cfg(out, **{**bsq_kw, **kw})


def _state(path: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = torch.load(path, weights_only=True)["state_dict"]
    return sd


@pytest.fixture(scope="module")
def bsq_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bcnn.train import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bsq")
    train(_cfg(out))
    return out


def test_bsq_run_learns_bits_and_packs_exactly(bsq_run: Path) -> None:
    m, meta = load_checkpoint(bsq_run / "final.pt")
    assert meta["steps"] == ["1", "2", "ft"]
    assert (bsq_run / "finetune" / "checkpoint.pt").is_file()
    rows = (bsq_run / "metrics.csv").read_text().splitlines()
    head = rows[0].split(",")
    bits = [float(r.split(",")[head.index("avg_weight_bits")]) for r in rows[3:]]
    assert bits[-1] < 5.0  # from 4 bits + sign: the group Lasso dropped planes
    assert bits[-1] == bits[-2]  # frozen in ft
    assert all(0 <= b <= 8 for b in bsq.layer_bits(m).values())
    x = _images(3, 8, 0)[:, :1]
    p = pack(m)
    assert np.array_equal(p(x.numpy()), _logits(m, x).numpy())


class _Crash(Exception):
    pass


def _interrupted_run(mp: pytest.MonkeyPatch, cfg: Any, at: int, mode: str) -> None:
    """Train ``cfg`` and stop it at the ``at``-th batch: a crash (nothing saved there, like
    SIGKILL) or a SIGTERM (the trainer checkpoints that batch and stops)."""
    import os
    import signal

    from bcnn.train import Trainer, TrainingInterrupted, train

    calls = {"n": 0}
    orig = Trainer._should_stop

    def stop(self: Trainer) -> int:
        calls["n"] += 1
        if calls["n"] == at:
            if mode == "crash":
                raise _Crash
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(self)

    with mp.context() as m:
        m.setattr(Trainer, "_should_stop", stop)
        with pytest.raises(_Crash if mode == "crash" else TrainingInterrupted):
            train(cfg)


# 4 iterations per epoch, re-quantization every 2: 14 is mid step 2's second epoch (after
# re-quantizations), 18 mid ft; "crash" resumes from the epoch end, "sigterm" mid-epoch
@pytest.mark.parametrize(("at", "mode"), [(14, "crash"), (14, "sigterm"), (18, "crash")])
def test_bsq_run_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bsq_run: Path, at: int, mode: str
) -> None:
    from bcnn.train import train

    torch.set_num_threads(1)
    out = tmp_path / "r"
    _interrupted_run(monkeypatch, _cfg(out), at, mode)
    train(_cfg(out, resume=True))
    a, b = _state(out / "final.pt"), _state(bsq_run / "final.pt")
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"bsq_alpha": -0.1}, "bsq_alpha must be a number >= 0"),
        ({"bsq_bits": 0}, "bsq_bits must be in 1..8"),
        ({"bsq_interval": 0}, "bsq_interval"),
        ({"steps": "float"}, "BSQ trains in step 2"),
        ({"precision": "fp8"}, "BSQ runs in fp32"),
        ({"bsq_optimizer": "lamb"}, "bsq_optimizer must be sgd or adam"),
    ],
)
def test_bad_bsq_options(tmp_path: Path, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path / "x", **kw).validate()


def test_bsq_on_a_model_without_quantizable_layers(tmp_path: Path) -> None:
    from bcnn.train import Trainer

    cfg = _cfg(tmp_path / "x", model_kw={"width": 8, "depth": 1, "weight_quantizer": None})
    with pytest.raises(ValueError, match="no quantizable layer"):
        Trainer(cfg)
    assert not (tmp_path / "x").exists()


def test_bit_variables_take_sgd_momentum_steps_and_fresh_gradients() -> None:
    from bcnn.train._bsq import BsqStage

    m = bsq.bsq_(_Two(), bits=2)
    q = m.conv.weight_quantizer
    with torch.no_grad():
        q.pos.fill_(1.0)
        q.neg.fill_(0.5)
        q.pos[2:] = 0.0
        q.neg[2:] = 0.0
    stage = BsqStage(alpha=0.0, bits=2, interval=1.0, bits_lr=0.1, finetune=False)
    opt = stage.optimizer(m, lr=1e-3)
    assert not any(p is q.pos or p is q.neg for g in opt.param_groups for p in g["params"])
    p0 = q.pos.detach().clone()
    g1, g2 = torch.full_like(p0, 0.2), torch.full_like(p0, -0.1)
    q.pos.grad = g1.clone()
    stage.step_bits(m, opt)
    assert q.pos.grad is None  # not accumulated into the next step's gradient
    mask = torch.zeros_like(p0)
    mask[:2] = 1.0  # planes >= N stay 0
    torch.testing.assert_close(q.pos.detach(), (p0 - 0.1 * g1) * mask)
    p1 = q.pos.detach().clone()
    q.pos.grad = g2.clone()
    stage.step_bits(m, opt)
    torch.testing.assert_close(q.pos.detach(), (p1 - 0.1 * (0.9 * g1 + g2)) * mask)
    stage.requantize(m)  # re-quantization restarts the momentum
    assert stage.state_dict() == {"momentum": {}}


def test_adam_mode_applies_the_group_lasso_decoupled() -> None:
    from bcnn.train._bsq import BsqStage

    m = bsq.bsq_(_Two(), bits=2)
    q = m.fc.weight_quantizer
    with torch.no_grad():
        for p in (q.pos, q.neg):
            p[:2] = torch.rand(p[:2].shape, generator=torch.Generator().manual_seed(1)) * 2
    stage = BsqStage(alpha=0.5, bits=2, interval=1.0, bits_lr=0.02, finetune=False, kind="adam")
    opt = stage.optimizer(m, lr=1e-3)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.02
    assert stage.penalty(m) is None  # not added to the loss
    before = {k: p.detach().clone() for k, p in stage._bit_params(m).items()}
    params = list(stage._bit_params(m).values())
    grads = torch.autograd.grad(bsq.bit_group_lasso(m), params)
    stage.step_bits(m, opt)  # no task gradient: only the decoupled step, lr 0.02 * alpha 0.5
    for (k, p), g in zip(stage._bit_params(m).items(), grads, strict=True):
        want = (before[k] - 0.01 * g).clamp(0, 2)
        torch.testing.assert_close(p.detach(), want)
    with pytest.raises(ValueError, match="sgd or adam"):
        BsqStage(0.1, 2, 1.0, 0.1, False, kind="lamb")


def test_adam_mode_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bcnn.train import train

    torch.set_num_threads(1)
    kw = dict(bsq_optimizer="adam", bsq_lr=0.02, bsq_alpha=1.0)
    train(_cfg(tmp_path / "a", **kw))
    _interrupted_run(monkeypatch, _cfg(tmp_path / "b", **kw), 14, "crash")
    train(_cfg(tmp_path / "b", resume=True, **kw))
    a, b = _state(tmp_path / "a" / "final.pt"), _state(tmp_path / "b" / "final.pt")
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_pack_reports_size_against_the_float_weights_not_the_bit_variables() -> None:
    from bcnn._commands.pack import float_state_dict_bytes

    m = _bsq_model(bits=3)
    twin = create_model("bcnn_cifar", width=16, depth=1, weight_bits=2, act_bits=4)
    plain, with_bits = float_state_dict_bytes(twin), float_state_dict_bytes(m)
    assert with_bits < 1.2 * plain  # the 2 x 8 bit-variable planes per weight are left out
