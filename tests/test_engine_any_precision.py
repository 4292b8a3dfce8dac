"""Any-precision models on the packed engine (issue 11): the .bcnn precision sets (format
version 3), PackedModel.set_precision with per-layer maps, packed == torch at every uniform
precision and at random per-layer mixes, negative controls, and bad input."""

from __future__ import annotations

import copy
import itertools
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bcnn.engine import PackedModel, load, pack
from bcnn.models import create_model, precision_layers
from bcnn.quant import set_precision

PRECISIONS = (1, 2, 3, 4)


def _mixes(names: list[str], n: int, seed: int = 0) -> list[dict[str, tuple[int, int]]]:
    rng = random.Random(seed)
    return [{k: (rng.choice(PRECISIONS), rng.choice(PRECISIONS)) for k in names} for _ in range(n)]


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, list[dict[str, tuple[int, int]]]]:
    """A small any-precision BCNN whose BN sets saw every uniform precision and 20 random
    per-layer mixes (train-mode forwards: the running statistics of those keys)."""
    torch.manual_seed(0)
    m = create_model("bcnn_cifar", width=8, depth=1, precisions=PRECISIONS)
    names = [n for n, _ in precision_layers(m)]
    mixes = _mixes(names, 20)
    g = torch.Generator().manual_seed(1)
    m.train()
    with torch.no_grad():
        for cfg in [{"weight_bits": k, "act_bits": k} for k in PRECISIONS] + [
            {"layers": mx} for mx in mixes
        ]:
            set_precision(m, **cfg)  # type: ignore[arg-type]
            m(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g))
    set_precision(m)
    return m.eval(), mixes


@pytest.fixture(scope="module")
def packed_file(trained: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ap") / "ap.bcnn"
    pack(trained[0]).save(path)
    return path


def _torch_logits(m: torch.nn.Module, x: np.ndarray, **cfg: Any) -> np.ndarray:
    set_precision(m, **cfg)
    try:
        with torch.no_grad():
            return m(torch.from_numpy(x)).numpy()  # type: ignore[no-any-return]
    finally:
        set_precision(m)


@pytest.mark.parametrize("size", [32, 33])
def test_packed_equals_torch_at_every_precision_and_random_mixes(
    trained: Any, packed_file: Path, size: int
) -> None:
    m, mixes = trained
    p = load(packed_file)  # through the file: the sets survive save/load
    x = np.random.default_rng(size).integers(0, 256, (7, 3, size, size), dtype=np.uint8)
    cfgs: list[dict[str, Any]] = [{"weight_bits": k, "act_bits": k} for k in PRECISIONS]
    cfgs += [{"layers": mx} for mx in mixes]
    outs = []
    for cfg in cfgs:
        p.set_precision(**cfg)
        y = p(x)
        np.testing.assert_array_equal(y, _torch_logits(m, x, **cfg), err_msg=str(cfg))
        outs.append(y)
    assert len({o.tobytes() for o in outs[:4]}) == 4  # every uniform precision its own
    x1 = x[:1]  # batch 1
    p.set_precision(layers=mixes[3])
    np.testing.assert_array_equal(p(x1), _torch_logits(m, x1, layers=mixes[3]))


def test_default_is_the_highest_and_the_context_manager_restores(
    trained: Any, packed_file: Path
) -> None:
    m, mixes = trained
    p = load(packed_file)
    x = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    top = p(x)
    np.testing.assert_array_equal(top, _torch_logits(m, x))
    assert p.precision_layers["blocks.0.conv"] == (PRECISIONS, PRECISIONS)
    assert set(p.precision_layers) == {n for n, _ in precision_layers(m)}
    with p.precision(weight_bits=1, act_bits=1) as q:
        assert q is p and set(p.current_precision.values()) == {(1, 1)}
        low = p(x)
        with p.precision(layers=mixes[0]):
            np.testing.assert_array_equal(p(x), _torch_logits(m, x, layers=mixes[0]))
        np.testing.assert_array_equal(p(x), low)
    np.testing.assert_array_equal(p(x), top)
    prev = p.set_precision(weight_bits=2, act_bits=2)
    assert set(prev.values()) == {(4, 4)}
    assert set(p.set_precision().values()) == {(2, 2)}
    np.testing.assert_array_equal(p(x), top)
    p.set_precision(weight_bits=4, act_bits=4)
    np.testing.assert_array_equal(p(x), top)


@pytest.mark.parametrize("step", [0.25, 1.0, 1.9999999, 2.0, 2.5, 3e5])
@pytest.mark.parametrize("channels", [1, 63, 65])
def test_sign_packer_is_the_code_of_x_plus_b_over_step(step: float, channels: int) -> None:
    """The W1A1 routes' packer (sign of x + b alone for steps below 2, the division above)
    gives the 1-bit codes (x + b) / step < 0 of torch's float32 arithmetic, on denormal sums
    (which a step >= 2 flushes to -0, code +1), signed zeros, NaN and infinities."""
    from bcnn.engine._kbit_ops import _sign_packer

    rng = np.random.default_rng(channels)
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    special = [-tiny, -2 * tiny, -3 * tiny, tiny, -0.0, 0.0, np.nan, -np.inf, np.inf, -1e-38, -1]
    n, h, w, pad = 2, 3, 5, 1
    x = rng.standard_normal((n, h, w, channels)).astype(np.float32)
    x[..., 0].flat[: len(special)] = special
    b = np.where(rng.random(channels) < 0.5, 0.0, rng.standard_normal(channels)).astype(np.float32)
    b[0] = 0.0  # channel 0 sums are the special values themselves
    out = np.zeros((n, h + 2 * pad, w + 2 * pad, -(-channels // 64)), np.uint64)
    _sign_packer(step)(x, b, out, pad)
    with np.errstate(invalid="ignore"):
        neg = (x + b) / np.float32(step) < 0
    want = np.zeros_like(out)
    for c in range(channels):
        want[:, pad:-pad, pad:-pad, c // 64] |= neg[..., c].astype(np.uint64) << np.uint64(c % 64)
    np.testing.assert_array_equal(out, want)
    # the case the division exists for: at step >= 2, -tiny / step is -0.0 (code +1)
    assert bool(neg[0, 0, 0, 0]) == (step < 2)


def _routes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Record every W1A1 conv or linear layer routed to the fused binary kernels (name,
    taken)."""
    from bcnn.engine import _kbit_ops

    seen: list[tuple[str, bool]] = []

    def spy(real: Any) -> Any:
        def route(v: Any, *a: Any) -> Any:
            r = real(v, *a)
            seen.append((v.op["precision"]["layer"], r is not None))
            return r

        return route

    monkeypatch.setattr(_kbit_ops, "_route", spy(_kbit_ops._route))
    monkeypatch.setattr(_kbit_ops, "_route_stem", spy(_kbit_ops._route_stem))
    monkeypatch.setattr(_kbit_ops, "_route_linear", spy(_kbit_ops._route_linear))
    return seen


@pytest.mark.parametrize("width", [8, 32])
def test_w1a1_layers_run_on_the_fused_binary_kernels(
    monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    """A conv selected at W1A1 is a binary conv, the classifier a binary linear layer, and the
    stem at W1 the binary stem: they run on the binary model's fused kernels (prescaled
    epilogue; the linear one fused sign-popcount call), with the same logits as the
    bit-serial path and as torch; width 8 exercises the partial channel tiles, width 32 the
    full ones and the widening residual."""
    from bcnn.engine import _kbit_ops

    torch.manual_seed(width)
    m = create_model("bcnn_cifar", width=width, depth=1, precisions=(1, 2))
    names = [n for n, _ in precision_layers(m)]
    mix = {n: ((1, 1) if i % 2 else (2, 2)) for i, n in enumerate(names)}
    m.train()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for cfg in (
            {"weight_bits": 1, "act_bits": 1},
            {"weight_bits": 2, "act_bits": 2},
            {"layers": mix},
        ):
            set_precision(m, **cfg)  # type: ignore[arg-type]
            for _ in range(2):
                m(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g))
    set_precision(m)
    m.eval()
    p = pack(m)
    convs = [o["precision"]["layer"] for o in p.graph["ops"] if o["op"] in ("qconv", "qlinear")]
    (stem,) = [o["precision"]["layer"] for o in p.graph["ops"] if o["op"] == "qstem"]
    # images of different brightness: an untrained net's logits differ between them
    rng = np.random.default_rng(width)
    x = (rng.integers(0, 64, (7, 3, 33, 33)) + 32 * np.arange(7)[:, None, None, None]).astype(
        np.uint8
    )
    seen = _routes(monkeypatch)
    packs = [0]  # the routes' own sign packs (the rest are packed by their producer's kernel)
    real_packer = _kbit_ops._sign_packer

    def counting_packer(step: float) -> Any:
        f = real_packer(step)

        def pack(*a: Any) -> None:
            packs[0] += 1
            f(*a)

        return pack

    monkeypatch.setattr(_kbit_ops, "_sign_packer", counting_packer)
    from bcnn.engine import _fused
    from bcnn.engine._kernels import _bound

    pool_packs = [0]  # the pools' packs of their W1A1 consumers' signs
    real_pool = _bound._avgpool_pack

    def counting_pool(*a: Any) -> None:
        pool_packs[0] += bool(a[-1])
        real_pool(*a)

    monkeypatch.setattr(_bound, "_avgpool_pack", counting_pool)

    flags: list[tuple[str, bool, bool]] = []  # the classifier call's (kernel, has_bn, has_epi)
    real_linear, real_gap = _fused.fused_sign_linear, _fused.fused_gap_sign_linear

    def spy_linear(*a: Any) -> None:
        flags.append(("linear", a[3], a[12]))
        real_linear(*a)

    def spy_gap(*a: Any) -> None:
        flags.append(("gap", a[4], a[13]))
        real_gap(*a)

    monkeypatch.setattr(_fused, "fused_sign_linear", spy_linear)
    monkeypatch.setattr(_fused, "fused_gap_sign_linear", spy_gap)
    for cfg in ({"weight_bits": 1, "act_bits": 1}, {"layers": mix}):
        seen.clear()
        p.set_precision(**cfg)  # type: ignore[arg-type]
        packs[0] = pool_packs[0] = 0
        fast = p(x)
        routed = sum(ok for n, ok in seen if n in convs[:-1])  # routed convs (not the head)
        ((plan,),) = p._plans.values()
        ops, kbit = plan._ops, plan.ref.kbit
        specs = [  # pools before a W1A1 conv whose signs the pool's kernel can pack
            kbit[b["name"]][0].binary(plan.ref.precision, kbit[b["name"]][1])
            for a, b in itertools.pairwise(ops)
            if a["op"] == "avgpool" and b["op"] == "qconv"
        ]
        assert pool_packs[0] == sum(r is not None and r.spec is not None for r in specs)
        own = packs[0] + pool_packs[0]  # packed by the conv itself or by the pool before it
        if "weight_bits" in cfg:  # W1A1 producers pack their W1A1 consumers' signs
            assert 0 < own < routed, (packs, pool_packs, routed)
        else:  # no two W1A1 convs are adjacent: each is packed by itself or a pool
            assert own == routed, (packs, pool_packs, routed)
        np.testing.assert_array_equal(fast, _torch_logits(m, x, **cfg), err_msg=str(cfg))
        assert np.ptp(fast, axis=0).max() > 0  # not a constant network
        want = {n for n in convs if p.current_precision[n] == (1, 1)}
        want |= {stem} if p.current_precision[stem][0] == 1 else set()
        assert want and {n for n, ok in seen if ok} == want, (cfg, seen)
        if p.current_precision[convs[-1]] == (1, 1):  # pool, BN, epilogue in the one call
            assert flags == [("gap", True, True)], flags
            flags.clear()  # the reference plan has no fused pool: the classifier's own call
            ref = PackedModel(p.graph, p.tensors, backend="reference")
            ref.set_precision(**cfg)  # type: ignore[arg-type]
            np.testing.assert_array_equal(ref(x), fast)
            assert flags == [("linear", True, True)], flags
        flags.clear()
        with monkeypatch.context() as mp:  # the bit-serial path of the same selection
            mp.setattr(_kbit_ops._Variants, "binary", lambda *a: None)
            slow = PackedModel(p.graph, p.tensors)
            slow.set_precision(**cfg)  # type: ignore[arg-type]
            np.testing.assert_array_equal(slow(x), fast)
    # one routed conv with its top weight plane swapped for the other: the logits move
    g2, i = _with_op(p, sorted(want - {stem})[0])
    t2 = dict(p.tensors)
    w = t2[g2["ops"][i]["weight"]]
    t2[g2["ops"][i]["weight"]] = np.ascontiguousarray(w[::-1])
    q = PackedModel(g2, t2)
    q.set_precision(layers=mix)
    assert not np.array_equal(q(x), fast)
    # the classifier's top weight plane swapped for the other, at W1A1: the logits move
    (fc,) = [o["precision"]["layer"] for o in p.graph["ops"] if o["op"] == "qlinear"]
    g3, j = _with_op(p, fc)
    t3 = dict(p.tensors)
    t3[g3["ops"][j]["weight"]] = np.ascontiguousarray(t3[g3["ops"][j]["weight"]][::-1])
    q = PackedModel(g3, t3)
    p.set_precision(weight_bits=1, act_bits=1)
    q.set_precision(weight_bits=1, act_bits=1)
    assert not np.array_equal(q(x), p(x))


def test_w1a1_residual_convs_write_over_their_input_and_the_others_do_not(
    trained: Any, packed_file: Path
) -> None:
    """On the numba engine a residual conv on its W1A1 route adds into its input's array
    (h += ..., as the binary models do; a widening one cannot); on the bit-serial path
    (whose epilogue writes the output before it adds the residual) it keeps its own array.
    Switching the setting back and forth between calls gives torch's logits each time."""
    m, mixes = trained
    p = load(packed_file)
    if p.backend != "numba":
        pytest.skip("the numba engine is not available")
    x = np.random.default_rng(5).integers(0, 256, (1, 3, 33, 33), dtype=np.uint8)
    res = [o for o in p.graph["ops"] if o["op"] == "qconv" and len(o["inputs"]) == 2]
    assert res
    cfgs: list[dict[str, Any]] = [
        {"weight_bits": 1, "act_bits": 1},
        {"weight_bits": 2, "act_bits": 2},
        {"layers": mixes[0]},
        {"weight_bits": 1, "act_bits": 1},
    ]
    for cfg in cfgs:
        p.set_precision(**cfg)
        np.testing.assert_array_equal(p(x), _torch_logits(m, x, **cfg), err_msg=str(cfg))
        ((plan,),) = p._plans.values()  # the one plan of this shape, idle again
        bufs = plan.ref.bufs
        for o in res:
            shared = np.shares_memory(bufs[o["output"]].array, bufs[o["inputs"][1]].array)
            same = o["out_channels"] == bufs[o["inputs"][1]].channels  # not a widening one
            routed = p.current_precision[o["precision"]["layer"]] == (1, 1)
            assert shared == (routed and same), (cfg, o["name"])
        assert any(bufs[o["inputs"][1]].channels == o["out_channels"] for o in res)


def test_latency_model_is_calibrated_on_the_uniform_settings(packed_file: Path) -> None:
    """The op differences are scaled by the least-squares factor fitted to whole-model times
    at the uniform settings: a closed form on fixed numbers, and on a real model a fit no
    worse than the unscaled sum on the very settings it was fitted to."""
    from bcnn.engine._latency import fit_scale, latency_model

    assert fit_scale([-1.0, -2.0], [-2.0, -4.5]) == pytest.approx(11 / 5)  # (2 + 9) / (1 + 4)
    assert fit_scale([0.0, 0.0], [1.0, 2.0]) == 1.0  # nothing to fit
    assert fit_scale([1.0], [-5.0]) == 0.1  # a sign flip by noise: floored
    p = load(packed_file)
    lat = latency_model(p, repeat=2)
    assert set(lat.uniform_ms) == {(k, k) for k in PRECISIONS[:-1]}
    names = list(p.precision_layers)
    cfgs = {wa: dict.fromkeys(names, wa) for wa in lat.uniform_ms}
    err = lambda f: sum(  # noqa: E731
        (lat.base_ms + f * lat.delta(c) - lat.uniform_ms[wa]) ** 2 for wa, c in cfgs.items()
    )
    assert err(lat.scale) <= err(1.0) + 1e-12
    for wa, c in cfgs.items():  # a uniform setting is its whole-model measurement
        assert lat(c) == lat.uniform_ms[wa]
    mixed = {**cfgs[(1, 1)], names[0]: (2, 2)}  # a mix: the calibrated sum of op differences
    assert lat(mixed) == lat.base_ms + lat.scale * lat.delta(mixed)
    assert lat.to_dict()["scale"] == round(lat.scale, 4)


def test_the_file_is_version_3_and_older_versions_refuse_sets(
    trained: Any, packed_file: Path
) -> None:
    from safetensors import safe_open

    from bcnn.engine._format import validate_graph

    with safe_open(str(packed_file), "np") as f:
        assert f.metadata()["format_version"] == "3"
    p = load(packed_file)
    with pytest.raises(ValueError, match="version 3"):
        validate_graph(p.graph, p.tensors, version=2)


def _with_op(p: PackedModel, layer: str) -> tuple[dict[str, Any], int]:
    g = copy.deepcopy(p.graph)
    i = next(i for i, o in enumerate(g["ops"]) if (o.get("precision") or {}).get("layer") == layer)
    return g, i


def test_wrong_batch_norm_set_moves_the_logits_negative_control(
    trained: Any, packed_file: Path
) -> None:
    """Relabel two epilogue sets of one layer: the mix then folds the wrong BN set and the
    logits move; a flipped weight bit of a kept plane moves them too. (Both would be invisible
    to a test that compares the engine with itself.)"""
    m, _ = trained
    p = load(packed_file)
    x = np.random.default_rng(2).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    cfg = {"weight_bits": 4, "act_bits": 4}
    ref = _torch_logits(m, x, **cfg)
    g, i = _with_op(p, "blocks.1.conv")
    sets = g["ops"][i]["precision"]["epilogues"]
    a = sets["at"].index([4, 4, 4])
    b = sets["at"].index([1, 1, 1])
    sets["at"][a], sets["at"][b] = sets["at"][b], sets["at"][a]
    wrong = PackedModel(g, p.tensors)
    wrong.set_precision(**cfg)
    assert np.abs(wrong(x) - ref).max() > 1e-3
    good = PackedModel(p.graph, p.tensors)
    good.set_precision(**cfg)
    np.testing.assert_array_equal(good(x), ref)
    t = dict(p.tensors)
    w = p.graph["ops"][i]["weight"]
    t[w] = t[w].copy()
    t[w][-1, :, 0, 0, 0] ^= np.uint64(1)  # the top plane: kept at every precision
    flipped = PackedModel(p.graph, t)
    flipped.set_precision(**cfg)
    assert np.abs(flipped(x) - ref).max() > 0


def test_bad_precision_requests_are_one_line_errors_on_both_engines(
    trained: Any, packed_file: Path
) -> None:
    m, _ = trained
    p = load(packed_file)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"weight_bits": 5}, r"layer 'stem.conv': weight_bits=5 is not in 1..4"),
        ({"act_bits": 0}, r"layer 'stem.conv': act_bits=0 is not in 1..4"),
        ({"layers": {"blocks.9.conv": (1, 1)}}, r"unknown layer 'blocks.9.conv'"),
        ({"layers": {"head.fc": (2, 7)}}, r"layer 'head.fc': act_bits=7 is not in 1..4"),
    ]
    for cfg, match in cases:
        for engine in (p.set_precision, lambda **kw: set_precision(m, **kw)):
            with pytest.raises(ValueError, match=match) as e:
                engine(**cfg)
            assert "\n" not in str(e.value)
    # a mix whose batch-norm transition was never trained: both engines refuse it
    names = [n for n, _ in precision_layers(m)]
    untrained = {n: (1, 1) if i % 2 else (3, 3) for i, n in enumerate(names)}
    with pytest.raises(ValueError, match="never trained") as e:
        p.set_precision(layers=untrained)
    assert "\n" not in str(e.value)
    x = np.zeros((1, 3, 32, 32), np.uint8)
    with pytest.raises(ValueError, match="never trained"):
        _torch_logits(m, x, layers=untrained)
    # nothing changed on a refused request
    np.testing.assert_array_equal(p(x), _torch_logits(m, x))


def test_models_without_precision_sets_refuse_act_bits_and_layers() -> None:
    p = pack(create_model("bcnn_cifar", width=8, depth=1).eval())
    assert p.precision_layers == {}
    for kw in ({"act_bits": 2}, {"layers": {"blocks.0.conv": (1, 1)}}):
        with pytest.raises(ValueError, match="no precision sets") as e:
            p.set_precision(**kw)  # type: ignore[arg-type]
        assert "\n" not in str(e.value)
    assert p.set_precision(weight_bits=2) is None  # the plane knob of k-bit layers stays


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda pr: pr.__setitem__("layer", 3), "'layer'"),
        (lambda pr: pr.__setitem__("weight_bits", [1, 2, 3, 9]), "weight_bits"),
        (lambda pr: pr.__setitem__("weight_bits", [2, 1, 4]), "weight_bits"),
        (lambda pr: pr.__setitem__("act_bits", [1, 2, 3]), "highest act_bits"),
        (lambda pr: pr["epilogues"]["key"].__setitem__(2, ["nope", "a"]), "unknown layer"),
        (lambda pr: pr["epilogues"]["key"].__setitem__(2, ["head.fc", "x"]), "'key'"),
        (lambda pr: pr["epilogues"]["at"].__setitem__(0, [1, 1, 9]), "which runs at"),
        (lambda pr: pr["epilogues"]["at"].__setitem__(1, pr["epilogues"]["at"][0]), "twice"),
        (lambda pr: pr["epilogues"]["at"].__setitem__(0, [1, 1]), "3 integers"),
        (lambda pr: pr["epilogues"]["steps"].pop(), "one step list per set"),
        (lambda pr: pr["epilogues"]["steps"][0].pop(), "'add'"),
        (lambda pr: pr.__setitem__("extra", 1), "unknown entry"),
        (lambda pr: pr.pop("act_steps"), "act_steps"),
    ],
)
def test_edited_precision_sets_are_rejected_before_anything_runs(
    packed_file: Path, edit: Any, match: str
) -> None:
    p = load(packed_file)
    g, i = _with_op(p, "blocks.1.conv")
    edit(g["ops"][i]["precision"])
    with pytest.raises(ValueError, match=match) as e:
        PackedModel(g, p.tensors)
    assert "\n" not in str(e.value)


def test_bad_act_steps_and_duplicate_layer_names_are_rejected(packed_file: Path) -> None:
    p = load(packed_file)
    g, i = _with_op(p, "blocks.1.conv")
    t = dict(p.tensors)
    name = g["ops"][i]["precision"]["act_steps"]
    for bad in (-1.0, float("nan"), 0.0):
        t[name] = p.tensors[name].copy()
        t[name][0] = bad
        with pytest.raises(ValueError, match="act_steps"):
            PackedModel(g, t)
    g2, j = _with_op(p, "blocks.2.conv")
    g2["ops"][j]["precision"]["layer"] = "blocks.1.conv"
    with pytest.raises(ValueError, match="defined twice"):
        PackedModel(g2, p.tensors)
    # equal tensors inside a table are stored once (shared); one of the op's own may not be
    op = p.graph["ops"][i]
    table = op["precision"]["epilogues"]["steps"]
    names = [st[k] for steps in table for st in steps for k in ("scale", "gamma") if k in st]
    assert len(set(names)) < len(names)  # shared: the scale per act bits, one RPReLU
    g3, _ = _with_op(p, "blocks.1.conv")
    epi = g3["ops"][i]["precision"]["epilogues"]["steps"][0]
    epi[0]["scale"] = op["epilogue"][0]["scale"]
    with pytest.raises(ValueError, match="referenced twice"):
        PackedModel(g3, p.tensors)


def test_corrupt_any_precision_files_never_crash(packed_file: Path, tmp_path: Path) -> None:
    """Truncated or bit-flipped files (header and tensor data), loaded, run and switched
    through every uniform precision: a one-line ValueError or a run, never a crash."""
    from _fuzz import corrupt_and_run

    errors, _ = corrupt_and_run(packed_file, tmp_path, seed=3, size=33, switch=True)
    assert errors >= 20


def test_torch_only_commands_name_a_bcnn_file_clearly(
    packed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bcnn.cli import main

    for cmd in (["summary", str(packed_file)], ["search-precision", str(packed_file),
                                                 "--budget-bits", "2"]):  # fmt: skip
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert "a packed .bcnn model, not a torch checkpoint" in err and "\n" not in err
