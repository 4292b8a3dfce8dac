"""BSQ fine-tuning through the float weights (``bsq_finetune_mode: weights``): the switch keeps
the output, the weights (not the bits) train on the frozen grid, the bits follow, the packed
model stays exact, and runs resume exactly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bsq import _bsq_model, _cfg, _images, _interrupted_run, _logits, _state

from bcnn import bsq
from bcnn.bsq import BitQuantizer
from bcnn.bsq._quantizer import _sign_magnitude_bits
from bcnn.engine import pack
from bcnn.models import load_checkpoint, save_checkpoint


def test_weights_mode_forward_and_gradients_closed_form() -> None:
    q = BitQuantizer((4,), 2)  # N = 2: the grid -3..3, step 0.5
    with torch.no_grad():
        q.step.fill_(0.5)
    q.frozen.fill_(True)
    q.latent.fill_(True)
    w = torch.tensor([0.74, -0.76, 2.9, -0.2], requires_grad=True)  # / 0.5: 1.48 -1.52 5.8 -0.4
    q.train()
    W, step = q.integer(w)
    assert W.tolist() == [1.0, -2.0, 3.0, 0.0]  # round half away, clipped to +-3
    (W * step).sum().backward()
    assert w.grad is not None and q.step.grad is not None
    # straight-through inside the range, nothing past it: d(step W)/dw = 1 or 0
    assert w.grad.tolist() == [1.0, 1.0, 0.0, 1.0]
    # LSQ: d(step W)/dstep = W - w/step inside, +-hi outside; scaled by 1/sqrt(numel * hi)
    want = ((1 - 1.48) + (-2 + 1.52) + 3.0 + (0 + 0.4)) / math.sqrt(4 * 3)
    assert math.isclose(float(q.step.grad), want, rel_tol=1e-5)
    assert q.pos.grad is None and q.neg.grad is None  # the bits do not train
    with pytest.raises(ValueError, match="pass it to integer"):
        q.integer(None)
    # per output channel (2 channels of 2): each step's LSQ scale is 1/sqrt(2 * hi)
    r = BitQuantizer((2, 2), 2)
    r.frozen.fill_(True)
    r.latent.fill_(True)
    r.per_channel_()
    with torch.no_grad():
        r.step.copy_(torch.tensor([0.5, 0.25]))
    r.train()
    w2 = torch.tensor([[0.74, -0.2], [0.3, 2.0]])  # / step: [1.48, -0.4], [1.2, 8.0]
    W2, s2 = r.integer(w2)
    assert W2.tolist() == [[1.0, 0.0], [1.0, 3.0]] and s2.shape == (2, 1)
    (W2 * s2).sum().backward()
    want2 = [((1 - 1.48) + 0.4) / math.sqrt(6), ((1 - 1.2) + 3.0) / math.sqrt(6)]
    assert torch.allclose(r.step.grad, torch.tensor(want2), rtol=1e-5)  # type: ignore[arg-type]


def test_switching_to_weights_keeps_the_output_and_trains_the_weights() -> None:
    m = _bsq_model(bits=3)
    x = _images(4, 33, 0)
    before = _logits(m, x)
    bsq.freeze_(m, weights=True)
    assert torch.equal(_logits(m, x), before)  # w = step * W exactly, every channel's step
    layers = bsq.bsq_layers(m)
    for layer in layers.values():  # one step per output channel, each the layer's
        st = layer.weight_quantizer.step
        assert st.shape == (layer.weight.shape[0],) and bool((st == st[0]).all())
    assert all(layer.weight.requires_grad for layer in layers.values())
    m.train()
    m(x).square().mean().backward()
    for layer in layers.values():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        assert layer.weight_quantizer.pos.grad is None
    # a trained weight moves W; the bits follow at the stage's end-of-stage re-quantization
    layer = layers["blocks.1.conv"]
    q = layer.weight_quantizer
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight) * q._step(q.step))
    m.eval()
    moved = _logits(m, x)
    assert not torch.equal(moved, before)
    w_latent = q.integer(layer.weight)[0].clone()
    info = bsq.requantize_(m)
    assert info["blocks.1.conv"]["after"] == info["blocks.1.conv"]["before"]  # frozen
    q.check()
    q.latent.fill_(False)  # the bits alone give the same W
    assert torch.equal(q.integer()[0], w_latent)
    q.latent.fill_(True)
    # back to the bits: the same output again, the weight mirrors them
    bsq.freeze_(m, weights=False)
    assert torch.equal(_logits(m, x), moved)
    assert not layer.weight.requires_grad
    with pytest.raises(ValueError, match="needs a frozen scheme"):
        bsq.freeze_(m, frozen=False, weights=True)


def test_weights_mode_packs_exactly_with_mixed_bits_and_a_zero_bit_layer() -> None:
    m = _bsq_model(seed=4, bits=4)
    qs = list(bsq.bsq_layers(m).values())
    with torch.no_grad():
        for i, layer in enumerate(qs):
            q = layer.weight_quantizer
            w, _ = q.integer()
            n = [2, 0, 1, 3][i % 4]
            hi = 2**n - 1
            w = (w * 2**n // 16).clamp(-hi, hi) if n else w * 0
            q.nbits.fill_(n)
            q.pos.copy_(_sign_magnitude_bits(w, n)[0])
            q.neg.copy_(_sign_magnitude_bits(w, n)[1])
    bsq.freeze_(m, weights=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "trained": weights off the grid (some past it), per-channel steps
        for layer in qs:
            q = layer.weight_quantizer
            assert q.step.shape == (layer.weight.shape[0],)
            q.step.mul_(torch.rand(q.step.shape, generator=g) + 0.5)
            layer.weight.add_(torch.randn(layer.weight.shape, generator=g) * 2 * q._step(q.step))
    assert 0 in bsq.layer_bits(m).values()
    p = pack(m)
    for hw, n in ((32, 7), (33, 1)):
        x = _images(n, hw, hw)
        assert np.array_equal(p(x.numpy()), _logits(m, x).numpy())  # max |diff| 0
    # negative control: one layer's trained weights negated (W -> -W) must move the logits
    layer = next(layer for layer in qs if layer.weight_quantizer.bits >= 1)
    with torch.no_grad():
        layer.weight.neg_()
    x = _images(3, 32, 5)
    assert not np.array_equal(pack(m)(x.numpy()), p(x.numpy()))


def test_old_files_load_and_per_channel_steps_round_trip(tmp_path: Path) -> None:
    q = BitQuantizer((2, 3), 2)
    sd = {k: v for k, v in q.state_dict().items() if k != "latent"}  # before the mode
    r = BitQuantizer((2, 3), 2)
    r.latent.fill_(True)
    r.load_state_dict(sd)
    assert not bool(r.latent)
    m = _bsq_model(bits=3)
    bsq.freeze_(m, weights=True)
    path = tmp_path / "m.pt"
    save_checkpoint(path, m)
    back, _ = load_checkpoint(path)  # a fresh model has scalar steps: they become vectors
    x = _images(2, 32, 3)
    assert torch.equal(_logits(back, x), _logits(m, x))
    with torch.no_grad():
        bsq.bsq_layers(back)["head.fc"].weight_quantizer.step.zero_()
    with pytest.raises(ValueError, match="step must be finite and non-zero"):
        bsq.check_(back)


def test_weights_mode_run_fine_tunes_weights_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bcnn.train import TrainConfig, train

    torch.set_num_threads(1)
    kw = {"bsq_finetune_mode": "weights"}
    cfg = _cfg(tmp_path / "a", **kw)
    assert cfg.lr_for("ft") == cfg.lr_for("2")  # the uniform models' QAT lr, not a tenth
    assert TrainConfig().bsq_finetune_mode == "weights"  # the default
    bits = _cfg(tmp_path / "bits", bsq_finetune_mode="bits")
    assert bits.lr_for("ft") == 0.1 * bits.lr_for("2")
    train(cfg)
    m, meta = load_checkpoint(tmp_path / "a" / "final.pt")
    assert meta["steps"] == ["1", "2", "ft"]
    step2, _ = load_checkpoint(tmp_path / "a" / "step2" / "checkpoint.pt")
    assert bsq.layer_bits(m) == bsq.layer_bits(step2)  # the scheme stayed frozen
    moved = []
    for name, layer in bsq.bsq_layers(m).items():
        q = layer.weight_quantizer
        assert bool(q.latent) and bool(q.frozen)
        w = q.integer(layer.weight)[0]
        q.check()  # the bits were re-written from W at the stage's end
        q.latent.fill_(False)
        assert torch.equal(q.integer()[0], w)
        q.latent.fill_(True)
        ref = bsq.bsq_layers(step2)[name]
        moved.append(not torch.equal(layer.weight, ref.weight))
    assert any(moved)  # the float weights trained
    x = _images(3, 8, 0)[:, :1]
    assert np.array_equal(pack(m)(x.numpy()), _logits(m, x).numpy())
    # a crash mid fine-tuning (iteration 18 of 20) resumes to the same bytes
    _interrupted_run(monkeypatch, _cfg(tmp_path / "b", **kw), 18, "crash")
    train(_cfg(tmp_path / "b", resume=True, **kw))
    a, b = _state(tmp_path / "a" / "final.pt"), _state(tmp_path / "b" / "final.pt")
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_bad_finetune_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bsq_finetune_mode must be bits or weights"):
        _cfg(tmp_path / "x", bsq_finetune_mode="float").validate()
