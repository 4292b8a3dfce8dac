"""bcnn.fp8: casts bit-exact with torch, unbiased stochastic rounding, FP8 conv/linear
gradients, representability of every FP8 operand (dispatch hooks), the loss scaler, master
weights, the layer swap, one-line errors, and an exactly resumable FP8 training run."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bcnn.fp8 import (
    FORMATS,
    FP8Divergence,
    FP8Spec,
    FP8Training,
    LossScaler,
    MasterWeights,
    fp8_conv2d,
    fp8_layers,
    fp8_linear,
    fp8_training,
    get_recipe,
    is_representable,
    quantize_fp8,
    remove_fp8,
    round_to_format,
)
from bcnn.fp8._formats import round_reference
from bcnn.models import create_model

TORCH = {"e5m2": torch.float8_e5m2, "e4m3": torch.float8_e4m3fn}
FP8 = ("e5m2", "e4m3")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal, any NaN equal to any NaN."""
    ia = a.view(torch.int16 if a.element_size() == 2 else torch.int32)
    ib = b.view(torch.int16 if b.element_size() == 2 else torch.int32)
    return bool(((ia == ib) | (torch.isnan(a) & torch.isnan(b))).all())


def _specials() -> torch.Tensor:
    """Zeros, infinities, NaN, and every FP8 grid point, midpoint and near-midpoint (ties),
    the subnormal range, the overflow thresholds and the largest float32."""
    grid = torch.cat([torch.arange(256, dtype=torch.uint8).view(d).float() for d in TORCH.values()])
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    near = torch.cat(
        [mids.nextafter(torch.tensor(float("inf"))), mids.nextafter(torch.tensor(0.0))]
    )
    edge = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 2**-17, 2**-18, 2**-10, 2**-11]
    edge += [57344.0, 61439.99, 61440.0, 448.0, 464.0, 464.01, 480.0, 3.4e38, 1e-45, 1e-40]
    v = torch.cat([grid, mids, near, torch.tensor(edge)])
    return torch.cat([v, -v])


@pytest.mark.parametrize("fmt", FP8)
def test_nearest_equals_torch_casts_bit_for_bit(fmt: str) -> None:
    torch.manual_seed(0)
    rnd = torch.randint(-(2**31), 2**31 - 1, (200_000,), dtype=torch.int64).to(torch.int32)
    cases = [
        rnd.view(torch.float32),  # random bit patterns: every magnitude, NaN payloads, inf
        torch.randn(50_000) * 10 ** torch.empty(50_000).uniform_(-8, 6),
        _specials(),
    ]
    for src in (torch.float16, torch.bfloat16):  # every 16-bit pattern
        cases.append(torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(src))
    for x in cases:
        want = x.to(TORCH[fmt]).to(x.dtype)
        # the arithmetic reference (the definition) and the public function
        assert _same_bits(round_reference(x, fmt, "nearest"), want)
        assert _same_bits(quantize_fp8(x, fmt), want)


@settings(max_examples=200, deadline=None)
@given(st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from(FP8))
def test_nearest_matches_torch_on_any_float(v: float, fmt: str) -> None:
    x = torch.tensor([v], dtype=torch.float32)
    assert _same_bits(round_reference(x, fmt), x.to(TORCH[fmt]).float())


def test_overflow_and_specials_documented() -> None:
    x = torch.tensor([60000.0, 61440.0, float("inf"), -1e9, float("nan"), -0.0])
    e5 = quantize_fp8(x, "e5m2")
    assert e5[:2].tolist() == [57344.0, float("inf")] and e5[2] == float("inf")
    assert e5[3] == -float("inf") and torch.isnan(e5[4]) and str(e5[5].item()) == "-0.0"
    e4 = quantize_fp8(x, "e4m3")
    assert e4[:4].tolist() == [448.0, 448.0, 448.0, -448.0]  # no inf in e4m3fn: saturates
    assert torch.isnan(e4[4])
    assert quantize_fp8(torch.tensor([2.0**-17 * 1.01]), "e5m2").item() == 2.0**-16  # subnormal


def test_scale_argument() -> None:
    x = torch.tensor([1e-7, 3e-6])
    assert quantize_fp8(x, "e5m2").tolist()[0] == 0.0  # below 2^-17: flushed
    q = quantize_fp8(x, "e5m2", scale=2.0**12)
    assert is_representable(q * 2.0**12, "e5m2") and bool(((q - x).abs() <= x.abs() / 8).all())


def _neighbours(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid points just below and above |x| (test's own formula: ulp from frexp)."""
    f = FORMATS[fmt]
    a = x.double().abs()
    e = (torch.frexp(a)[1] - 1).clamp(min=f.emin)
    ulp = torch.pow(2.0, (e - f.mbits).double())
    lo = torch.floor(a / ulp) * ulp
    return lo, lo + ulp


@pytest.mark.parametrize("fmt", [*FP8, "fp16", "bf16"])
def test_stochastic_rounding_is_a_neighbour_and_unbiased(fmt: str) -> None:
    f = FORMATS[fmt]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100_000, generator=g) * 10 ** torch.empty(100_000).uniform_(-9, 2, generator=g)
    x = x[x.abs() <= f.max]
    for impl in (round_to_format, round_reference):
        q = impl(x, fmt, "stochastic", g)
        lo, hi = _neighbours(x, fmt)
        mag = q.double().abs()
        assert bool(((mag == lo) | (mag == hi)).all()), impl.__name__
        assert bool((torch.sign(q) * torch.sign(x) >= 0).all()) and is_representable(q, fmt)
    # unbiased: mean of n draws within 5 standard errors (<= ulp / (2 sqrt n)), subnormals too
    n = 200_000
    for v in (0.3, -1.7e-3, 3e-6, 2e-5, 7.1e-7, 300.0):
        lo, hi = _neighbours(torch.tensor([v]), fmt)
        if hi.item() > f.max or v == 0:
            continue
        m = round_to_format(torch.full((n,), v), fmt, "stochastic", g).double().mean().item()
        assert abs(m - v) <= 5 * (hi - lo).item() / (2 * n**0.5), (fmt, v, m)


def test_stochastic_rounding_follows_torch_rng() -> None:
    x = torch.randn(1000) * 1e-4
    torch.manual_seed(5)
    a = quantize_fp8(x, rounding="stochastic")
    torch.manual_seed(5)
    assert torch.equal(a, quantize_fp8(x, rounding="stochastic"))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: quantize_fp8(torch.ones(2), "e3m4"), "unknown format 'e3m4'"),
        (lambda: quantize_fp8(torch.ones(2), rounding="down"), "unknown rounding 'down'"),
        (lambda: quantize_fp8(torch.ones(2, dtype=torch.int32)), "expected a float32"),
        (lambda: FP8Spec(forward="fp16"), "unknown format 'fp16'"),
        (lambda: get_recipe("fp4"), "unknown fp8 recipe 'fp4'"),
        (lambda: get_recipe("fp8", loss_scale=3), "unknown fp8 recipe keys: loss_scale"),
        (lambda: get_recipe("fp8", loss_scaling="auto"), "unknown loss_scaling 'auto'"),
        (lambda: fp8_training(nn.Sequential(nn.ReLU())), "no Conv2d/Linear layer"),
        (lambda: fp8_training(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))), "all skipped"),
    ],
)
def test_one_line_errors(call: Any, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match) as e:
        call()
    assert "\n" not in str(e.value)


NEAREST = FP8Spec(error_rounding="nearest", wgrad_rounding="nearest")


def test_fp8_linear_closed_form() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    y = fp8_linear(x, w, b, NEAREST)
    g = torch.randn_like(y)
    y.backward(g)
    xq, wq, gq = (quantize_fp8(t.detach()) for t in (x, w, g))
    assert torch.allclose(y, xq @ wq.T + b, rtol=1e-6, atol=1e-5)
    assert torch.allclose(x.grad, gq @ wq, rtol=1e-6, atol=1e-5)
    gw = gq.reshape(-1, 4).T @ xq.reshape(-1, 16)
    assert torch.equal(w.grad, quantize_fp8(gw)) or torch.allclose(w.grad, quantize_fp8(gw))
    assert torch.allclose(b.grad, gq.sum((0, 1)))
    # within FP8 bounds of FP32: each operand off by at most 2^-3 relative (e5m2 RNE)
    y32 = x.detach() @ w.detach().T + b.detach()
    bound = 2 * 2.0**-3 * (x.detach().abs() @ w.detach().abs().T) + 1e-5
    assert bool(((y.detach() - y32).abs() <= bound).all())


@pytest.mark.parametrize("padding", [1, 0, "same"])
def test_fp8_conv2d_matches_conv_on_quantized_operands(padding: Any) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 6, 7, 9, requires_grad=True)
    w = torch.randn(8, 3, 3, 3, requires_grad=True)  # groups=2
    b = torch.randn(8, requires_grad=True)
    y = fp8_conv2d(x, w, b, 1, padding, 1, 2, NEAREST)
    g = torch.randn_like(y)
    y.backward(g)
    xr = quantize_fp8(x.detach()).requires_grad_()
    wr = quantize_fp8(w.detach()).requires_grad_()
    br = b.detach().clone().requires_grad_()
    yr = F.conv2d(xr, wr, br, 1, padding, 1, 2)
    yr.backward(quantize_fp8(g))
    assert torch.allclose(y, yr, atol=1e-5)
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)
    assert torch.allclose(w.grad, quantize_fp8(wr.grad), rtol=0.13)  # = up to one FP8 rounding
    assert is_representable(w.grad, "e5m2") and torch.allclose(b.grad, br.grad, atol=1e-5)


class _RecordOperands(TorchDispatchMode):
    """Records the operands of every matrix product (conv, conv backward, mm), with the phase
    (``fwd`` / ``bwd``) set by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "fwd"
        self.calls: list[tuple[str, str, list[torch.Tensor]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in ("convolution", "convolution_backward", "mm", "addmm", "bmm"):
            ts = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
            self.calls.append((self.phase, name, [t.detach().clone() for t in ts]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("recipe", "binary"), [("fp8", False), ("fp8-hybrid", False), ("fp8", True)]
)
def test_every_fp8_operand_is_representable(recipe: str, binary: bool) -> None:
    torch.manual_seed(0)
    model = create_model("bcnn_cifar", num_classes=5, binary=binary, in_chans=1, width=4, depth=1)
    # every conv/linear in FP8, so that every matrix product must take FP8 operands
    names = fp8_training(model, get_recipe(recipe, skip_first=binary, skip_last=False))
    fwd, bwd = get_recipe(recipe).forward_format, get_recipe(recipe).backward_format
    wgrads: list[torch.Tensor] = []
    mods = dict(model.named_modules())
    for n in names:
        mods[n].weight.register_hook(lambda g: wgrads.append(g.clone()) or g)  # type: ignore[union-attr,operator]
    x = torch.randint(0, 256, (3, 1, 8, 8)).float()
    with _RecordOperands() as rec:
        loss = model(x).square().sum().mul(1e-3)
        rec.phase = "bwd"
        loss.backward()
    kinds = {(p, k) for p, k, _ in rec.calls}
    assert {("fwd", "convolution"), ("bwd", "convolution_backward"), ("bwd", "mm")} <= kinds
    n_checked = 0
    for phase, kind, ops in rec.calls:
        if binary and ops[0 if kind == "convolution" else 1].shape[1] == 8:
            continue  # the exempt stem (bit-plane input, 8 planes)
        if phase == "bwd":  # conv: (error, input, weight); linear: (error, weight or input)
            assert is_representable(ops[0], bwd), f"{kind}: error not on the {bwd} grid"
            ops = ops[1:]
        for t in ops:
            assert is_representable(t, fwd), f"{phase} {kind}: operand not on the {fwd} grid"
            n_checked += 1
    assert n_checked >= 2 * len(names)
    assert len(wgrads) == len(names)
    assert all(is_representable(g, bwd) for g in wgrads)
    if binary:  # the +-1 operands of binary layers are exact: the forward is unchanged
        plain = create_model("bcnn_cifar", num_classes=5, binary=True, in_chans=1, width=4, depth=1)
        plain.load_state_dict(model.state_dict())
        assert torch.equal(plain(x), model(x))


def test_swap_defaults_and_removal() -> None:
    m = create_model("bcnn_cifar", num_classes=10, binary=True, width=8, depth=1)
    keys = list(m.state_dict())
    names = fp8_training(m, "fp8")
    assert "stem.conv" not in names and "head.fc" not in names and len(names) == 5
    assert set(fp8_layers(m)) == set(names) and list(m.state_dict()) == keys
    assert type(m.stem.conv).__name__ == "EncodedConv2d" and type(m.head.norm) is nn.BatchNorm1d
    assert isinstance(m.blocks[0].conv, nn.Conv2d)
    assert fp8_training(m, get_recipe("fp8", skip_first=False, skip_last=False)) == [
        "stem.conv",
        "head.fc",
    ]
    remove_fp8(m)
    assert not fp8_layers(m) and type(m.blocks[0].conv).__name__ == "BinaryConv2d"
    m2 = create_model("bcnn_cifar", num_classes=10, binary=False, width=8, depth=1)
    assert "blocks.1.conv" not in fp8_training(m2, get_recipe("fp8", skip=("blocks.1.*",)))


def test_loss_scaler_backoff_growth_floor_and_resume() -> None:
    kw: dict[str, Any] = dict(growth_interval=2, min_scale=4.0, floor_schedule=((0.5, 16.0),))
    s = LossScaler("dynamic", 64.0, total_steps=20, **kw)
    s.update(True, 0)
    assert s.scale == 32.0 and s.overflows == 1
    for i in range(1, 4):
        s.update(True, i)
    assert s.scale == 4.0 and s.floor_hits == 0  # 32 -> 16 -> 8 -> 4: reached the floor
    s.update(True, 4)
    assert s.scale == 4.0 and s.floor_hits == 1  # an overflow at the floor
    s.update(False, 5)
    s.update(False, 6)
    assert s.scale == 8.0 and s.floor_hits == 0  # grew after 2 finite steps
    s.update(True, 9)  # the floor rose to 16 at step 10 (fraction 0.5)
    assert s.scale == 16.0
    # state round trip: a restored scaler continues exactly like the original
    events = [
        bool(b) for b in torch.randint(0, 2, (30,), generator=torch.Generator().manual_seed(0))
    ]
    t = LossScaler("dynamic", 64.0, total_steps=20, **kw)
    t.load_state_dict(s.state_dict())
    for i, ev in enumerate(events, start=10):
        s.update(ev, i)
        t.update(ev, i)
        assert (s.scale, s.good_steps, s.floor_hits) == (t.scale, t.good_steps, t.floor_hits)
    c = LossScaler("constant", 128.0)
    c.update(True, 0)
    assert c.scale == 128.0 and c.overflows == 1
    assert LossScaler("none", 128.0).scale == 1.0
    with pytest.raises(ValueError, match="this run uses"):
        c.load_state_dict(s.state_dict())


def test_master_weights_fp16_stochastic_updates() -> None:
    p = nn.Parameter(torch.full((20_000,), 1.0))
    opt = torch.optim.SGD([p], lr=1.0)
    mw = MasterWeights(opt, "fp16", "stochastic")
    for _ in range(20):  # 1e-4 per step: under half the fp16 spacing at 1.0 (2^-10)
        p.grad = torch.full_like(p, 1e-4)
        opt.step()
    assert bool((p.half().float() == p).all())  # on the fp16 grid
    assert abs(p.mean().item() - (1.0 - 20e-4)) < 5e-5  # moved in expectation
    mw.remove()
    q = nn.Parameter(torch.full((10,), 1.0))
    opt = torch.optim.SGD([q], lr=1.0)
    MasterWeights(opt, "fp16", "nearest")
    for _ in range(20):
        q.grad = torch.full_like(q, 1e-4)
        opt.step()
    assert bool((q == 1.0).all())  # round to nearest loses every small update


def _tiny() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    return m, torch.optim.SGD(m.parameters(), lr=0.1)


def test_session_backs_off_warns_and_stops_naming_the_step() -> None:
    m, opt = _tiny()
    logs: list[str] = []
    rec = get_recipe("fp8", init_scale=2.0**20, min_scale=2.0**20, floor_warn=2, floor_stop=3)
    s = FP8Training(m, opt, rec, log=logs.append)
    x = torch.randn(16, 4)
    before = m[1].weight.detach().clone()
    with pytest.raises(FP8Divergence, match="step 3: gradients overflowed 3 times"):
        for i in range(5):
            opt.zero_grad()
            assert not s.step(m(x).pow(2).sum() * 1e6, i)  # overflows E5M2 at any scale >= 1
    assert torch.equal(m[1].weight, before)  # every step skipped
    assert len(logs) == 1 and "minimum loss scale" in logs[0] and "step 2" in logs[0]
    m, opt = _tiny()
    s = FP8Training(m, opt, "fp8", log=logs.append)
    with pytest.raises(FP8Divergence, match="step 3: the loss is nan"):
        for i in range(5):
            s.step(torch.tensor(float("nan")), i)
    s.close()
    assert not fp8_layers(m)


def test_session_trains_and_unscales() -> None:
    m, opt = _tiny()
    s = FP8Training(m, opt, get_recipe("fp8", master="fp32", stochastic_rounding=False))
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    first = F.cross_entropy(m(x), y).item()
    for i in range(30):
        opt.zero_grad()
        assert s.step(F.cross_entropy(m(x), y), i)
    assert F.cross_entropy(m(x), y).item() < first
    assert s.metrics() == {"loss_scale": 2.0**16, "overflows": 0}


DATA = "synthetic:n=96,size=8,channels=1,classes=3"


def _cfg(out: Path, **kw: Any) -> Any:
    from bcnn.train import TrainConfig

    base: dict[str, Any] = dict(
        model="bcnn_cifar",
        data=DATA,
        out=str(out),
        epochs=2,
        batch_size=24,
        val_split=0.25,
        seed=2,
        model_kw={"width": 4, "depth": 1},
        quiet=True,
        workers=0,
        precision="fp8",
        # a scale that overflows and backs off, and grows again: the state has to resume
        fp8={"init_scale": 2.0**24, "growth_interval": 2},
    )
    base.update(kw)
    return TrainConfig(**base)


def test_trainer_fp8_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bcnn.train import Trainer, TrainingInterrupted, train

    torch.set_num_threads(1)
    train(_cfg(tmp_path / "a"))
    rows = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    assert "loss_scale,overflows" in rows[0] and len(rows) == 5
    col = rows[0].split(",").index("overflows")
    assert int(rows[-1].split(",")[col]) > 0  # overflows happened: the scale moved
    calls = {"n": 0}
    orig = Trainer._should_stop

    def stop_at_6(self: Trainer) -> int:
        calls["n"] += 1
        if calls["n"] == 6:  # mid step 1, epoch 2 (3 iterations per epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(self)

    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "_should_stop", stop_at_6)
        with pytest.raises(TrainingInterrupted):
            train(_cfg(tmp_path / "b"))
    train(_cfg(tmp_path / "b", resume=True))
    wa = torch.load(tmp_path / "a" / "final.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "b" / "final.pt", weights_only=True)["state_dict"]
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    rows_b = (tmp_path / "b" / "metrics.csv").read_text().splitlines()

    def untimed(lines: list[str]) -> list[list[str]]:  # drop seconds, images_per_s
        return [r.split(",")[:9] + r.split(",")[11:] for r in lines]

    assert untimed(rows_b) == untimed(rows)
    # the saved model is a plain model; its weights lie on the FP16 master grid
    params = {
        n for n, _ in create_model("bcnn_cifar", 3, in_chans=1, width=4, depth=1).named_parameters()
    }
    assert all(torch.equal(wa[k], wa[k].half().float()) for k in params)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown precision 'fp4'"):
        _cfg(Path("x"), precision="fp4").validate()
    with pytest.raises(ValueError, match="unknown fp8 recipe keys: sr"):
        _cfg(Path("x"), fp8={"sr": True}).validate()
    with pytest.raises(ValueError, match="without --amp on and --compile"):
        _cfg(Path("x"), amp="on").validate()


def test_cli_flags_reach_the_config() -> None:
    from bcnn._commands.train import resolve_config
    from bcnn.cli import build_parser

    argv = ["train", "--precision", "fp8-hybrid", "--fp8", "loss_scaling=none", "master=bf16"]
    cfg = resolve_config(build_parser().parse_args(argv))
    assert cfg.precision == "fp8-hybrid" and cfg.fp8 == {"loss_scaling": "none", "master": "bf16"}
    with pytest.raises(ValueError, match="unknown master 'fp8'"):
        resolve_config(
            build_parser().parse_args(["train", "--precision", "fp8", "--fp8", "master=fp8"])
        )
