"""bcnn.train: resume equivalence (bitwise), step chaining, clipping, distillation, schedule."""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from bcnn.models import create_model, load_checkpoint
from bcnn.train import (
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    binarised_weight_names,
    kd_loss,
    lr_lambda,
    train,
)

DATA = "synthetic:n=160,size=8,channels=1,classes=4"


def _cfg(out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        model="bcnn_cifar",
        data=DATA,
        out=str(out),
        epochs=2,
        batch_size=32,
        val_split=0.2,
        seed=3,
        model_kw={"width": 8, "depth": 1},
        quiet=True,
        workers=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"weights differ: {diff[:5]}"


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("unbroken")
    train(_cfg(out))
    return out


class _Crash(Exception):
    pass


def _hook(monkeypatch: pytest.MonkeyPatch, at: int, mode: str) -> None:
    orig = Trainer._should_stop
    calls = {"n": 0}

    def should_stop(self: Trainer) -> int:
        calls["n"] += 1
        if calls["n"] == at:
            if mode == "crash":  # like SIGKILL: nothing saved at this point
                raise _Crash
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler sets the flag
        return orig(self)

    monkeypatch.setattr(Trainer, "_should_stop", should_stop)


# 4 iterations per epoch, 2 epochs per step: iteration 6 is mid step 1 epoch 2, 14 mid step 2.
@pytest.mark.parametrize(("at", "mode"), [(6, "crash"), (14, "crash"), (6, "sigterm")])
def test_resume_reaches_the_unbroken_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unbroken: Path, at: int, mode: str
) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _hook(m, at, mode)
        with pytest.raises(_Crash if mode == "crash" else TrainingInterrupted):
            train(_cfg(out))
    assert not (out / "final.pt").exists()
    step = "step1" if at <= 8 else "step2"
    _, meta = load_checkpoint(out / step / "checkpoint.pt")
    st = meta["train_state"]
    # crash: the last epoch-end checkpoint; SIGTERM: saved right at the interrupted batch
    assert (st["epoch"], st["batch"]) == ((1, 0) if mode == "crash" else (1, 2))
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored
    train(_cfg(out, resume=True))
    _assert_same(out / "final.pt", unbroken / "final.pt")
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == len((unbroken / "metrics.csv").read_text().splitlines()) == 5


def test_save_every_and_resume_finished_run(tmp_path: Path, unbroken: Path) -> None:
    out = tmp_path / "r"
    train(_cfg(out, save_every=3))
    _assert_same(out / "final.pt", unbroken / "final.pt")
    train(_cfg(out, resume=True))  # everything finished: nothing retrained
    _assert_same(out / "final.pt", unbroken / "final.pt")
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(out))


def test_step2_alone_starts_from_step1(tmp_path: Path, unbroken: Path) -> None:
    out = tmp_path / "s"
    train(_cfg(out, steps="1"))
    model, _ = load_checkpoint(out / "final.pt")
    assert model.bcnn_config["kwargs"]["weight_quantizer"] is None
    train(_cfg(out, steps="2"))
    _assert_same(out / "final.pt", unbroken / "final.pt")


def test_outputs_and_latent_clipping(unbroken: Path) -> None:
    for f in (
        "final.pt",
        "metrics.csv",
        "curves.png",
        "step1/checkpoint.pt",
        "step1/metrics.csv",
        "step2/checkpoint.pt",
    ):
        assert (unbroken / f).is_file(), f
    model, meta = load_checkpoint(unbroken / "final.pt")
    assert meta["classes"] == ["class0", "class1", "class2", "class3"]
    assert (meta["data"], meta["val_split"], meta["seed"]) == (DATA, 0.2, 3)
    assert 0 <= meta["metrics"]["val_top1"] <= 1
    assert "weight_quantizer" not in model.bcnn_config["kwargs"]  # the default binary weights
    names = binarised_weight_names(model)
    # every matrix op: stem, 3 block convs, 2 downsampling 1x1 convs, the classifier
    assert names == {"stem.conv.weight", "head.fc.weight"} | {
        f"blocks.{i}.conv.weight" for i in range(5)
    }
    sd = model.state_dict()
    assert all(sd[n].abs().max() <= 1.0 for n in names)
    header = (unbroken / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("step,epoch,iteration,train_loss,train_acc,val_loss,val_top1")


@pytest.mark.parametrize("step", ["1", "2"])
def test_latent_clipping_at_a_huge_lr(tmp_path: Path, step: str) -> None:
    kw = dict(steps=step, epochs=1, lr=0.5, warmup=0.0)
    m = train(_cfg(tmp_path / "c", **kw))
    names = binarised_weight_names(create_model("bcnn_cifar", width=8, depth=1, in_chans=1))
    sd = m.state_dict()
    assert max(float(sd[n].abs().max()) for n in names) == 1.0
    free = train(_cfg(tmp_path / "f", clip_latent=False, **kw)).state_dict()
    assert max(float(free[n].abs().max()) for n in names) > 1.0


def test_schedule() -> None:
    f = lr_lambda(100, 10, "cosine")
    assert f(0) == pytest.approx(1 / 11) and f(10) == 1.0 and f(100) == pytest.approx(0.0)
    assert [f(i) for i in range(10, 100)] == sorted((f(i) for i in range(10, 100)), reverse=True)
    g = lr_lambda(100, 0, "linear")
    assert g(0) == 1.0 and g(50) == pytest.approx(0.5)


def test_kd_loss() -> None:
    s = torch.randn(4, 5, requires_grad=True)
    assert float(kd_loss(s, s.detach(), 2.0).detach()) == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(4, 5)
    loss = kd_loss(s, t, 3.0)
    loss.backward()
    assert float(loss.detach()) > 0 and s.grad is not None and s.grad.abs().sum() > 0


def test_float_twin_then_distillation(tmp_path: Path) -> None:
    tdir = tmp_path / "teacher"
    train(_cfg(tdir, steps="float", epochs=1))
    teacher, _ = load_checkpoint(tdir / "final.pt")
    assert teacher.bcnn_config["binary"] is False
    a = train(_cfg(tmp_path / "a", steps="1", epochs=1))
    b = train(_cfg(tmp_path / "b", steps="1", epochs=1, teacher=str(tdir / "final.pt")))
    c = train(_cfg(tmp_path / "c", steps="1", epochs=1), teacher=teacher)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)  # the teacher changed the training
    assert all(torch.equal(sb[k], sc[k]) for k in sb)  # path and module teachers agree


class _AutocastSpy(torch.nn.Module):
    """A teacher that records whether CPU autocast was on when it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(1, 4)  # DATA has 4 classes
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return self.fc(x.float().mean(dim=(1, 2, 3))[:, None])


@pytest.mark.parametrize("teacher_amp", [True, False])
def test_teacher_fp32_runs_the_teacher_outside_autocast(tmp_path: Path, teacher_amp: bool) -> None:
    """Under --amp the teacher runs in bf16 autocast like the student, unless teacher_amp is
    False (--teacher-fp32: a binary teacher's signs flip in bf16)."""
    spy = _AutocastSpy()
    cfg = _cfg(tmp_path / "r", steps="1", epochs=1, amp="on", teacher_amp=teacher_amp)
    train(cfg, teacher=spy)
    assert spy.seen and set(spy.seen) == {teacher_amp}


def test_init_continues_a_float_run(tmp_path: Path) -> None:
    """--init starts the first step of any run (here the float twin) from a checkpoint."""
    a = train(_cfg(tmp_path / "a", steps="float", epochs=1))
    tiny = dict(steps="float", epochs=1, lr=1e-12, warmup=0.0)
    b = train(_cfg(tmp_path / "b", init=str(tmp_path / "a" / "final.pt"), **tiny))
    fresh = train(_cfg(tmp_path / "c", **tiny))  # negative control: no --init
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, fresh))
    assert all(torch.allclose(pa[k], pb[k], atol=1e-6) for k in pa)
    assert any(not torch.allclose(pa[k], pc[k], atol=1e-3) for k in pa)
    train(_cfg(tmp_path / "w", steps="1", epochs=1, model_kw={"width": 16, "depth": 1}))
    with pytest.raises(ValueError, match="do not fit step float"):
        train(_cfg(tmp_path / "d", init=str(tmp_path / "w" / "final.pt"), **tiny))


def test_zero_val_split_and_bad_config(tmp_path: Path) -> None:
    train(_cfg(tmp_path / "z", val_split=0.0, epochs=1, steps="1"))
    _, meta = load_checkpoint(tmp_path / "z" / "final.pt")
    assert meta["metrics"]["val_top1"] is None
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps="3").validate()
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"epoch": 3})
    m = create_model("bcnn_cifar", width=8, depth=1)
    assert binarised_weight_names(m) == binarised_weight_names(
        create_model("bcnn_cifar", width=8, depth=1, weight_quantizer="ste_sign")
    )


def test_split_seed_keeps_the_split_and_changes_the_run(tmp_path: Path) -> None:
    """split_seed: another training seed on the same validation split (meta records the
    split's seed, which bcnn eval re-makes); None keeps the old behaviour (seed for both)."""
    a = Trainer(_cfg(tmp_path / "a", seed=3))
    b = Trainer(_cfg(tmp_path / "b", seed=4, split_seed=3))
    c = Trainer(_cfg(tmp_path / "c", seed=4))
    assert torch.equal(a.val_set.images, b.val_set.images)  # same split
    assert not torch.equal(a.val_set.images, c.val_set.images)  # seed alone moves it
    train(_cfg(tmp_path / "a", seed=3, steps="1", epochs=1))
    train(_cfg(tmp_path / "b", seed=4, split_seed=3, steps="1", epochs=1))
    _, ma = load_checkpoint(tmp_path / "a" / "final.pt")
    _, mb = load_checkpoint(tmp_path / "b" / "final.pt")
    assert ma["seed"] == mb["seed"] == 3 and mb["train_config"]["seed"] == 4
    wa, wb = _weights(tmp_path / "a" / "final.pt"), _weights(tmp_path / "b" / "final.pt")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # a different run
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="split_seed must be an integer >= 0"):
            _cfg(tmp_path / "x", split_seed=bad).validate()


def test_compiled_training_step_matches_eager(tmp_path: Path) -> None:
    """compile=True: the compiled forward/backward gives the eager loss and gradients (to float
    rounding: fused element-wise ops), and the trainer saves the eager module's keys (no
    torch.compile wrapper prefix). Whole runs are not compared: Adam amplifies 1e-7 gradient
    differences into a different trajectory within a few steps."""
    torch.manual_seed(0)
    m = create_model("bcnn_cifar", width=8, depth=1, in_chans=1).train()
    m2 = copy.deepcopy(m)
    x, y = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 4, (16,))
    l1 = F.cross_entropy(m(x), y)
    l1.backward()
    l2 = F.cross_entropy(torch.compile(m2)(x), y)
    l2.backward()
    torch.testing.assert_close(l2, l1)
    for (n, p), q in zip(m.named_parameters(), m2.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None and p.grad.abs().sum() > 0, n
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
    train(_cfg(tmp_path / "c", compile=True, steps="1", epochs=1))
    model, meta = load_checkpoint(tmp_path / "c" / "final.pt")
    assert meta["train_config"]["compile"] is True
    assert set(model.state_dict()) == set(m.state_dict())
    assert torch.isfinite(model(x)).all()
