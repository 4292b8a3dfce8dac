"""Any-precision BCNNs (issue 11, torch side): nested weights, switchable activation
quantizers, batch norm per precision (switchable and transitional), per-layer run-time
precision through bcnn.quant.set_precision, and its errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def test_packing_untrained_and_exporting_any_precision_are_refused_clearly() -> None:
    from bcnn.engine import pack

    with pytest.raises(ValueError, match="not initialised") as e:  # never ran: no steps
        pack(_model())
    assert "\n" not in str(e.value)
    from bcnn.export import to_onnx

    with pytest.raises(ValueError, match="any-precision models"):
        to_onnx(_model(), "/nonexistent/x.onnx")


# ---------------------------------------------------------------- training (step 2)
def _ap_cfg(out: Path, **kw: Any) -> Any:
    from test_train import _cfg

    base: dict[str, Any] = dict(
        steps="2", model_kw={"width": 8, "depth": 1, "precisions": [1, 2, 4]}, epochs=2
    )
    base.update(kw)
    return _cfg(out, **base)


def test_schedules_draw_uniform_then_per_layer() -> None:
    from bcnn.train._any_precision import AnyPrecisionStage

    model = create_model("bcnn_cifar", width=8, depth=1, precisions=(1, 2, 4))
    n = len(precision_layers(model))

    def widths(schedule: str, it: int) -> set[int]:
        st = AnyPrecisionStage((1, 2, 4), schedule, False, seed=0)
        st.start(100)
        d = st.draw(model, it)
        assert len(d) == n and all(w == a for w, a in d.values())
        assert d == st.draw(model, it)  # deterministic per iteration: resumable
        return {w for w, _ in d.values()}

    assert all(len(widths("uniform", i)) == 1 for i in range(40))
    assert all(len(widths("bitmixer", i)) == 1 for i in range(50))  # first half: uniform
    assert any(len(widths("bitmixer", i)) > 1 for i in range(90, 100))  # late: per layer
    assert any(len(widths("layerwise", i)) > 1 for i in range(10))
    seen = {w for i in range(40) for w in widths("uniform", i)}
    assert seen == {1, 2, 4}


def test_joint_passes_run_every_precision_highest_first() -> None:
    from bcnn.train._any_precision import AnyPrecisionStage

    model = create_model("bcnn_cifar", width=8, depth=1, precisions=(1, 2, 4))
    st = AnyPrecisionStage((1, 2, 4), "uniform", True, seed=0, joint=True)
    st.start(100)
    first, *rest = st.passes(model, 3)
    assert first is None  # distilling: the default (highest) precision teaches
    assert [{w for w, _ in d.values()} for d in rest] == [{2}, {1}]  # type: ignore[union-attr]
    st = AnyPrecisionStage((1, 2, 4), "layerwise", False, seed=0, joint=True)
    st.start(100)
    ps = st.passes(model, 3)
    assert len(ps) == 3 and all(p is not None for p in ps)
    assert ps == st.passes(model, 3)  # deterministic per iteration: resumable
    assert any(len({w for w, _ in p.values()}) > 1 for p in ps)  # type: ignore[union-attr]
    one = AnyPrecisionStage((1, 2, 4), "uniform", False, seed=0)
    assert len(one.passes(model, 0)) == 1


def test_joint_training_runs_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_train import _assert_same, _Crash, _hook

    from bcnn.train import train

    torch.set_num_threads(1)
    ref = tmp_path / "ref"
    train(_ap_cfg(ref, ap_joint=True, ap_distill=True))
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _hook(m, 5, "crash")
        with pytest.raises(_Crash):
            train(_ap_cfg(out, ap_joint=True, ap_distill=True))
    train(_ap_cfg(out, ap_joint=True, ap_distill=True, resume=True))
    _assert_same(out / "final.pt", ref / "final.pt")


def test_training_reports_every_precision_and_round_trips(tmp_path: Path) -> None:
    from bcnn.models import load_checkpoint
    from bcnn.train import train

    torch.set_num_threads(1)
    out = tmp_path / "ap"
    train(_ap_cfg(out, ap_distill=True))
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert [c for c in header if c.startswith("val_top1_")] == [
        "val_top1_w1a1",
        "val_top1_w2a2",
        "val_top1_w4a4",
    ]
    model, _ = load_checkpoint(out / "final.pt")
    assert model.precisions == (1, 2, 4)
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        ys = []
        for k in (1, 2, 4):
            set_precision(model, weight_bits=k, act_bits=k)
            ys.append(model(x))
    assert all(torch.isfinite(y).all() for y in ys) and not torch.equal(ys[0], ys[2])


def test_training_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_train import _assert_same, _Crash, _hook

    from bcnn.train import train

    torch.set_num_threads(1)
    ref = tmp_path / "ref"
    train(_ap_cfg(ref))
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _hook(m, 6, "crash")  # mid epoch 2 (4 iterations per epoch)
        with pytest.raises(_Crash):
            train(_ap_cfg(out))
    train(_ap_cfg(out, resume=True))
    _assert_same(out / "final.pt", ref / "final.pt")


def test_init_from_a_one_precision_checkpoint(tmp_path: Path) -> None:
    from bcnn.train import train

    torch.set_num_threads(1)
    flt = tmp_path / "float"
    train(_ap_cfg(flt, steps="float", model_kw={"width": 8, "depth": 1}, epochs=1))
    out = tmp_path / "ap"
    model = train(_ap_cfg(out, init=str(flt / "final.pt"), epochs=0))
    src = torch.load(flt / "final.pt", weights_only=True)["state_dict"]
    got = model.state_dict()
    assert torch.equal(got["blocks.0.conv.weight"], src["blocks.0.conv.weight"])
    for key in ("1_1_1", "4_4_4"):  # every BN set starts from the single BN
        assert torch.equal(
            got[f"blocks.0.bn.sets.{key}.running_mean"], src["blocks.0.bn.running_mean"]
        )
    # the float twin's stem reads pixels, the binary one bit-planes: kept fresh, and said so
    from bcnn.train._init import init_state

    fresh = create_model(
        "bcnn_cifar", in_chans=1, num_classes=4, width=8, depth=1, precisions=(1, 2, 4)
    )
    said: list[str] = []
    state = init_state(fresh, flt / "final.pt", "the any-precision model", said.append)
    assert torch.equal(state["stem.conv.weight"], fresh.state_dict()["stem.conv.weight"])
    assert len(said) == 1 and "stem.conv.weight" in said[0]
    assert torch.equal(state["blocks.0.conv.weight"], src["blocks.0.conv.weight"])


def test_init_from_an_any_precision_checkpoint_keeps_its_sets(tmp_path: Path) -> None:
    """A continued any-precision stage takes every BN set and activation step as trained."""
    from bcnn.models import save_checkpoint
    from bcnn.train._init import init_state

    torch.manual_seed(0)
    src = _model()
    _train_at(src, (1, 2, 4))
    with torch.no_grad():  # make every set distinct from the others
        for site in _sites(src).values():
            for i, bn in enumerate(site.sets.values()):
                bn.running_mean.add_(float(i))
    save_checkpoint(tmp_path / "ap.pt", src)
    fresh = _model()
    said: list[str] = []
    state = init_state(fresh, tmp_path / "ap.pt", "the any-precision model", said.append)
    want = src.state_dict()
    assert state.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(state[k], v), k
    assert not said  # nothing kept fresh


def test_init_from_an_unrelated_checkpoint_is_an_error(tmp_path: Path) -> None:
    from bcnn.train import train
    from bcnn.train._init import init_state

    other = tmp_path / "other"
    train(_ap_cfg(other, steps="float", model_kw={"width": 16, "depth": 2}, epochs=0))
    model = create_model(
        "bcnn_cifar", in_chans=1, num_classes=4, width=8, depth=1, precisions=(1, 2)
    )
    with pytest.raises(ValueError, match="its weights do not fit the any-precision model"):
        init_state(model, other / "final.pt", "the any-precision model")


def test_any_precision_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trains in step 2 only"):
        _ap_cfg(tmp_path, steps="1,2").validate()
    with pytest.raises(ValueError, match="ap_schedule must be one of"):
        _ap_cfg(tmp_path, ap_schedule="random").validate()


def test_search_meets_an_average_bits_budget_greedily() -> None:
    from bcnn.quant import average_bits, search_precision

    model = _model()
    torch.manual_seed(1)
    model.train()
    for it in range(40):  # every transition gets statistics: layer-wise random precisions
        g = torch.Generator().manual_seed(it)
        mix = {n: (k, k) for n, _ in precision_layers(model)
               for k in [PRECISIONS[int(torch.randint(4, (1,), generator=g))]]}  # fmt: skip
        set_precision(model, layers=mix)
        with torch.no_grad():
            model(_images(2))
    _train_at(model, PRECISIONS, steps=1)  # and every uniform precision
    x, y = _images(16), torch.arange(16) % 10

    def acc(m: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
        m.eval()
        with torch.no_grad():
            return float((m(data[0]).argmax(1) == data[1]).float().mean())

    plan, score = search_precision(model, acc, (x, y), budget_bits=2.5)
    assert average_bits(model) <= 2.5 and average_bits(model, plan) == average_bits(model)
    assert all(w == a and w in PRECISIONS for w, a in plan.values())
    assert score == acc(model, (x, y))  # the model is left at the plan
    plan4, _ = search_precision(model, acc, (x, y), budget_bits=4)
    assert set(plan4.values()) == {(4, 4)}
    with pytest.raises(ValueError, match="below the lowest possible"):
        search_precision(model, acc, (x, y), budget_bits=0.5)


def test_search_meets_any_cost_budget_greedily() -> None:
    """search_precision with a cost function (what --budget-ms passes: the packed engine's
    latency model), here a fixed one: cost = sum of w * a per layer."""
    from bcnn.quant import search_precision

    model = _model("switchable")
    _train_at(model, PRECISIONS, steps=1)
    model.eval()
    x = _images(8)
    with torch.no_grad():
        ref = model(x)

    def metric(m: Any, _: Any) -> float:  # closeness to the highest precision's logits
        with torch.no_grad():
            return -float((m(x) - ref).abs().mean())

    def cost(plan: Any) -> float:
        return float(sum(w * a for w, a in plan.values()))

    n = len(precision_layers(model))
    plan, score = search_precision(model, metric, None, cost=cost, budget=9.0 * n)
    assert cost(plan) <= 9.0 * n < 16.0 * n and all(w == a for w, a in plan.values())
    assert score == pytest.approx(metric(model, None))  # the model is left at the plan
    with pytest.raises(ValueError, match="below the lowest possible"):
        search_precision(model, metric, None, cost=cost, budget=n - 0.5)
    with pytest.raises(ValueError, match="budget_bits, or cost and budget"):
        search_precision(model, metric, None, 3.0, cost=cost, budget=1.0)


def test_search_never_returns_less_than_the_best_uniform_setting_that_fits() -> None:
    """When every per-layer mix scores below the uniform settings (a model trained at uniform
    precisions last), the greedy path through mixes ends low; the search then returns the
    best uniform setting within the budget. Negative control: with the uniform settings
    scored like mixes, the greedy plan stays."""
    from bcnn.quant import search_precision

    model = _model("switchable")
    _train_at(model, PRECISIONS, steps=1)
    model.eval()
    layers = dict(precision_layers(model))

    def current() -> dict[str, tuple[int, int]]:
        return {n: tuple(m.precision) for n, m in layers.items()}  # type: ignore[misc]

    def cost(plan: Any) -> float:
        return float(sum(w * a for w, a in plan.values()))

    def metric(bonus: float) -> Any:
        def score(m: Any, _: Any) -> float:  # more bits score more; uniform gets the bonus
            plan = current()
            uniform = len(set(plan.values())) == 1
            return sum(w for w, _ in plan.values()) / 100 + (bonus if uniform else 0.0)

        return score

    n = len(layers)
    budget = 9.0 * n + 7  # greedy from W4A4 stops with one layer left at W4A4: a mix
    plan, score = search_precision(model, metric(1.0), None, cost=cost, budget=budget)
    assert plan == {k: (3, 3) for k in layers} and current() == plan
    assert score == pytest.approx(3 * n / 100 + 1.0)
    plan2, _ = search_precision(model, metric(0.0), None, cost=cost, budget=budget)
    assert cost(plan2) <= budget and len(set(plan2.values())) > 1  # greedy kept a mix


def test_cli_search_precision_and_eval_at_a_precision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from bcnn.cli import main
    from bcnn.train import train

    torch.set_num_threads(1)
    out = tmp_path / "ap"
    # switchable BN: a per-layer mix needs only each layer's own (k, k) sets, which the
    # uniform rounds train; transitional BN would need the mixes' transitions trained too
    kw = {"width": 8, "depth": 1, "precisions": [1, 2, 4], "precision_bn": "switchable"}
    train(_ap_cfg(out, epochs=2, ap_schedule="uniform", model_kw=kw))
    ckpt = str(out / "final.pt")
    # the search tries per-layer mixes; a mix training never met is skipped, not an error
    assert main(["search-precision", ckpt, "--budget-bits", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from bcnn.models import load_checkpoint

    names = [n for n, _ in precision_layers(load_checkpoint(ckpt)[0])]
    assert res["average_bits"] <= 3 and list(res["layers"]) == names
    assert main(["eval", ckpt, "--weight-bits", "2", "--act-bits", "2", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (ev["weight_bits"], ev["act_bits"]) == (2, 2) and 0 <= ev["top1"] <= 1
    # the packed engine: the same precision, the same top-1 (its logits are torch's)
    assert main(["eval", ckpt, "--engine", "packed", "--weight-bits", "2", "--act-bits", "2",
                 "--json"]) == 0  # fmt: skip
    evp = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evp["engine"] == "packed" and evp["top1"] == ev["top1"] and evp["n"] == ev["n"]
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps(res))  # a search result feeds --layers as is
    for engine in ("torch", "packed"):
        assert main(["eval", ckpt, "--engine", engine, "--layers", str(mix), "--json"]) == 0
        evl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert evl["top1"] == res["top1"] and evl["layers"] == res["layers"]
    assert main(["bench", ckpt, "--weight-bits", "1", "--act-bits", "1", "--repeat", "2",
                 "--json"]) == 0  # fmt: skip
    b = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert b["argmax_agrees"] and set(map(tuple, b["precision"].values())) == {(1, 1)}
    assert b["packed_ms"] > 0 and b["float_ms"] > 0
    for bad, match in [
        (["eval", ckpt, "--weight-bits", "3"], "weight_bits=3 is not in (1, 2, 4)"),
        (["eval", ckpt, "--engine", "packed", "--act-bits", "3"], "act_bits=3 is not in"),
        (["eval", ckpt, "--engine", "packed", "--layers", '{"x": [1, 1]}'], "unknown layer"),
        (["eval", ckpt, "--layers", "[1, 2]"], "--layers"),
    ]:
        assert main(bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and match in err, err
    # a latency budget, measured on the packed engine (timings are not asserted: the budget
    # is generous, or impossible; the search itself is tested with a fixed cost below)
    from bcnn.engine import latency_model, pack

    lat = latency_model(pack(load_checkpoint(ckpt)[0]), repeat=3)
    top = {n: (4, 4) for n in names}
    assert lat(top) == lat.base_ms > 0 and set(lat.deltas) == set(names)
    assert all(len(d) == 9 for d in lat.deltas.values())  # every (w, a) of (1, 2, 4)^2
    mixed = {**top, names[1]: (1, 2)}
    assert lat(mixed) == lat.base_ms + lat.scale * lat.deltas[names[1]][(1, 2)]
    assert set(lat.uniform_ms) == {(1, 1), (2, 2)} and lat.scale >= 0.1  # calibrated on those
    budget = f"{100 * lat.base_ms:.3f}"
    assert main(["search-precision", ckpt, "--budget-ms", budget, "--json"]) == 0
    rs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # generous: the default (W4A4), or a uniform setting that scored at least as high
    assert len({tuple(v) for v in rs["layers"].values()}) == 1 and rs["latency_ms"] > 0
    assert rs["predicted_ms"] <= float(budget)
    assert main(["search-precision", ckpt, "--budget-ms", "1e-6"]) == 2
    assert "below the lowest possible" in capsys.readouterr().err
    # transitional BN trained at uniform precisions only: no per-layer mix exists, the search
    # returns a uniform setting within the budget
    out2 = tmp_path / "ap2"
    train(_ap_cfg(out2, epochs=1, ap_schedule="uniform"))
    capsys.readouterr()
    assert main(["search-precision", str(out2 / "final.pt"), "--budget-bits", "3", "--json"]) == 0
    r2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (wa,) = {tuple(v) for v in r2["layers"].values()}
    assert wa in ((1, 1), (2, 2)) and r2["average_bits"] <= 3


def test_serving_checkpoint_stores_grid_integers_and_gives_the_same_logits(
    tmp_path: Path,
) -> None:
    """save_checkpoint(sign_weights=True): k-bit weights as int8 grid integers X, read back
    as X * step: the same integers, so the same logits at every precision."""
    from bcnn.models import load_checkpoint, save_checkpoint

    m = _model()
    _train_at(m, PRECISIONS, steps=1)
    m.eval()
    save_checkpoint(tmp_path / "s.pt", m, sign_weights=True)
    raw = torch.load(tmp_path / "s.pt", weights_only=True)
    assert raw["grid_weights"] and all(
        raw["state_dict"][k].dtype == torch.int8 for k in raw["grid_weights"]
    )
    r, _ = load_checkpoint(tmp_path / "s.pt")
    x = _images(3)
    with torch.no_grad():
        for k in PRECISIONS:
            set_precision(m, weight_bits=k, act_bits=k)
            set_precision(r, weight_bits=k, act_bits=k)
            assert torch.equal(m(x), r(x))
    raw["grid_weights"] = ["head.scale.weight"]
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a k-bit weight"):
        load_checkpoint(tmp_path / "bad.pt")


def test_search_precision_scores_a_random_sample_of_the_split() -> None:
    """--limit N takes a seeded random sample, not the first N images (a split is stored in
    class order: its head is one class)."""
    import numpy as np

    from bcnn._commands.search_precision import sample
    from bcnn.data import ArrayDataset

    labels = np.repeat(np.arange(10), 50)  # class order, as a seeded split stores it
    ds = ArrayDataset(np.zeros((500, 1, 4, 4), np.uint8), labels, [str(i) for i in range(10)])
    a, b = sample(ds, 100), sample(ds, 100)
    assert len(a) == 100 and np.array_equal(a.labels.numpy(), b.labels.numpy())
    assert len(set(a.labels.numpy().tolist())) == 10  # not the first 100 (two classes)
    assert sample(ds, 500) is ds


def test_joint_loss_weights_closed_form_and_validation(tmp_path: Path) -> None:
    from bcnn.train._any_precision import AnyPrecisionStage

    st = AnyPrecisionStage((1, 2, 4), "uniform", True, seed=0, joint=True, loss_weights={4: 2})
    assert st.weights() == [2.0, 1.0, 1.0]  # passes' order: 4, 2, 1
    ls = [torch.tensor(v, requires_grad=True) for v in (0.5, 1.5, 3.0)]
    total = st.total_loss(ls)
    assert float(total.detach()) == 2 * 0.5 + 1.5 + 3.0
    total.backward()
    assert [float(t.grad) for t in ls] == [2.0, 1.0, 1.0]  # type: ignore[arg-type]
    plain = AnyPrecisionStage((1, 2, 4), "uniform", True, seed=0, joint=True)
    assert plain.weights() is None and float(plain.total_loss(ls).detach()) == 5.0
    cfg = _ap_cfg(tmp_path / "a", ap_joint=True, ap_loss_weights={"4": "2", 1: 0.5})
    cfg.validate()
    assert cfg.ap_loss_weights == {4: 2.0, 1: 0.5}
    cfg = _ap_cfg(tmp_path / "p", ap_joint=True, ap_private=[2, 4], ap_loss_weights={4: 2})
    cfg.validate()  # a weight for a trained (private) precision is fine
    assert cfg.ap_loss_weights == {4: 2.0}
    for kw, match in (
        ({"ap_loss_weights": {4: 2}}, "weigh the passes of --ap-joint"),
        ({"ap_joint": True, "ap_loss_weights": {3: 2}}, "3 bits is not one of the precisions"),
        ({"ap_joint": True, "ap_loss_weights": {4: -1}}, "a weight must be >= 0"),
        ({"ap_joint": True, "ap_loss_weights": {"x": 1}}, "is not bits=weight"),
        (
            {"ap_joint": True, "ap_private": [2, 4], "ap_loss_weights": {1: 2}},
            r"1 bits is not trained in this run \(ap_private: \[2, 4\]",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            _ap_cfg(tmp_path / "b", **kw).validate()


def test_joint_loss_weights_change_the_training(tmp_path: Path) -> None:
    from bcnn.train import train

    torch.set_num_threads(1)
    runs = {}
    for name, w in (("plain", {}), ("w4x3", {4: 3.0})):
        train(_ap_cfg(tmp_path / name, ap_joint=True, ap_loss_weights=w))
        runs[name] = torch.load(tmp_path / name / "final.pt", weights_only=True)["state_dict"]
    a, b = runs["plain"], runs["w4x3"]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_private_training_moves_only_its_own_precision(tmp_path: Path) -> None:
    """ap_private=[2]: W2A2's own BN sets and activation steps train; every other tensor (and
    so every other precision's logits) is unchanged bit for bit."""
    from test_train import _weights

    from bcnn.models import load_checkpoint
    from bcnn.train import train

    torch.set_num_threads(1)
    base = tmp_path / "base"
    train(_ap_cfg(base, ap_joint=True, epochs=1))
    out = tmp_path / "w2"
    init = str(base / "final.pt")
    train(_ap_cfg(out, ap_joint=True, ap_distill=True, ap_private=[2], init=init, lr=0.01))
    a, b = _weights(base / "final.pt"), _weights(out / "final.pt")
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    own = [k for k in a if ".sets.2_2_2." in k or ".quantizers.2." in k]
    assert moved and moved <= set(own), sorted(moved - set(own))[:3]
    assert any(".sets.2_2_2.running_" in k for k in moved)  # its statistics were re-estimated
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    ma, _ = load_checkpoint(base / "final.pt")
    mb, _ = load_checkpoint(out / "final.pt")
    with torch.no_grad():
        for k in (1, 2, 4):
            set_precision(ma, weight_bits=k, act_bits=k)
            set_precision(mb, weight_bits=k, act_bits=k)
            same = torch.equal(ma(x), mb(x))
            assert same == (k != 2), k  # only W2A2's logits move
    with pytest.raises(ValueError, match="ap_private: 3 is not one of the precisions"):
        _ap_cfg(tmp_path / "bad", ap_private=[3]).validate()
    with pytest.raises(ValueError, match="ap_private names precisions"):
        _ap_cfg(tmp_path / "bad", model_kw={"width": 8}, ap_private=[1]).validate()


def test_private_planes_train_weights_without_moving_shared_views(tmp_path: Path) -> None:
    """ap_private=[4] + ap_private_planes: the latent weights train too, but every W1/W2
    view (top 1 / 2 planes of the nested 4-bit weights) and so their logits stay the same;
    W4A4's lowest planes and logits move."""
    from test_train import _weights

    from bcnn.models import load_checkpoint
    from bcnn.train import train

    torch.set_num_threads(1)
    base = tmp_path / "base"
    train(_ap_cfg(base, ap_joint=True, epochs=1))
    out = tmp_path / "w4"
    init = str(base / "final.pt")
    cfg = _ap_cfg(out, ap_private=[4], ap_private_planes=True, init=init, lr=0.02)
    train(cfg)
    a, b = _weights(base / "final.pt"), _weights(out / "final.pt")
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert any(k.endswith("conv.weight") for k in moved)  # the weights trained
    ma, _ = load_checkpoint(base / "final.pt")
    mb, _ = load_checkpoint(out / "final.pt")
    n_low = 0
    for (name, la), (_, lb) in zip(precision_layers(ma), precision_layers(mb), strict=True):
        qa, qb = la.weight_quantizer, lb.weight_quantizer
        assert torch.equal(qa.step, qb.step), name  # the shared steps stay
        with torch.no_grad():
            xa, _ = qa.integer(la.weight)
            xb, _ = qb.integer(lb.weight)
        top = torch.div(xa + 15, 8, rounding_mode="floor")  # X's top 2 planes, as 0..3
        assert torch.equal(top, torch.div(xb + 15, 8, rounding_mode="floor")), name
        n_low += int((xa != xb).sum())  # only the two low planes differ
    assert n_low > 0
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        for k in (1, 2, 4):
            set_precision(ma, weight_bits=k, act_bits=k)
            set_precision(mb, weight_bits=k, act_bits=k)
            assert torch.equal(ma(x), mb(x)) == (k != 4), k  # only W4A4's logits move
    with pytest.raises(ValueError, match="add 4 to ap_private"):
        _ap_cfg(tmp_path / "bad", ap_private=[2], ap_private_planes=True).validate()
    with pytest.raises(ValueError, match="needs ap_private"):
        _ap_cfg(tmp_path / "bad", ap_private_planes=True).validate()


def test_private_planes_projection_keeps_the_cells() -> None:
    """A stage private to {3, 4} of a (1, 2, 3, 4) model: each latent weight may move within
    the cell of its 2-bit view (width 8 steps); project() pulls far-moved weights back."""
    from bcnn.train._any_precision import AnyPrecisionStage

    model = _model()
    st = AnyPrecisionStage(PRECISIONS, "uniform", False, seed=0, private=(3, 4), planes=True)
    with pytest.raises(ValueError, match="untrained weight step"):
        st.freeze_shared(model)
    _train_at(model, (4,), steps=1)  # initialises the steps
    st.freeze_shared(model)
    layers = precision_layers(model)
    assert all(m.weight.requires_grad for _, m in layers)

    def view2() -> list[torch.Tensor]:
        out = []
        with precision(model, weight_bits=2, act_bits=2), torch.no_grad():
            for _, m in layers:
                out.append(m.weight_quantizer.integer(m.weight)[0].clone())
        return out

    before = view2()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in layers:
            s = m.weight_quantizer.step.abs().view(-1, *([1] * (m.weight.dim() - 1)))
            m.weight.add_(torch.randn(m.weight.shape, generator=g) * 6 * s)
    assert any(not torch.equal(a, b) for a, b in zip(before, view2(), strict=True))  # control
    st.project()
    assert all(torch.equal(a, b) for a, b in zip(before, view2(), strict=True))
    with pytest.raises(ValueError, match="need private precisions"):
        AnyPrecisionStage(PRECISIONS, "uniform", False, seed=0, planes=True)
    shared_top = AnyPrecisionStage(PRECISIONS, "uniform", False, seed=0, private=(2,), planes=True)
    with pytest.raises(ValueError, match="the top precision 4 is shared"):
        shared_top.freeze_shared(_model())


def test_private_stage_freezes_all_but_its_own_parameters() -> None:
    from bcnn.train._any_precision import AnyPrecisionStage

    model = _model()
    st = AnyPrecisionStage(PRECISIONS, "layerwise", True, seed=0, joint=True, private=(3, 4))
    n = st.freeze_shared(model)
    train = {name for name, p in model.named_parameters() if p.requires_grad}
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    for name in train:  # BN sets keyed by 3s and 4s only, and the 3- and 4-bit act steps
        key = name.split(".sets.")[1].split(".")[0] if ".sets." in name else None
        ok = key is not None and set(key.split("_")) <= {"3", "4"}
        assert ok or ".quantizers.3." in name or ".quantizers.4." in name, name
    assert any(".sets.3_4_3." in name for name in train)  # mixes of the private precisions
    st.start(10)
    teacher, *rest = st.passes(model, 0)
    assert teacher is not None and set(teacher.values()) == {(4, 4)}  # uniform
    assert len(rest) == 1 and {w for w, _ in rest[0].values()} <= {3, 4}  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="not all in"):
        AnyPrecisionStage(PRECISIONS, "uniform", False, seed=0, private=(5,))
