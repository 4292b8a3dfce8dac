"""One PackedModel shared by several Python threads returns exactly its serial results
(issue: 523 of 800 concurrent calls were wrong when plans shared their working buffers),
with a negative control that shares one plan between threads and must see wrong logits."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from bcnn.engine import PackedModel, get_num_threads, load, num_threads, pack, set_num_threads
from bcnn.models import create_model
from bcnn.quant import UniformQuantizer


@contextmanager
def _fast_switching() -> Iterator[None]:
    """Switch the GIL between threads often, so that calls interleave as much as they can."""
    prev = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(prev)


def _run_threads(n: int, work: Callable[[int], None]) -> None:
    """Start n threads together on work(i); re-raise the first error in this thread."""
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        start.wait()
        try:
            work(i)
        except BaseException as e:
            errors.append(e)

    ts = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    with _fast_switching():
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    if errors:
        raise errors[0]


def _inputs(shape: tuple[int, ...], k: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(k)]


def _mismatches(
    model: PackedModel, jobs: list[tuple[int, int, list[np.ndarray]]]
) -> tuple[int, int]:
    """jobs: (threads, calls per thread, inputs); all jobs' threads run at once, each call on
    a different input than its neighbours. Returns (wrong outputs, calls)."""
    serial = {id(x): model(x) for _, _, xs in jobs for x in xs}
    work: list[tuple[int, list[np.ndarray]]] = [
        (calls, xs) for threads, calls, xs in jobs for _ in range(threads)
    ]
    wrong = [0] * len(work)

    def body(i: int) -> None:
        calls, xs = work[i]
        for j in range(calls):
            x = xs[(i * 5 + j) % len(xs)]
            if not np.array_equal(model(x), serial[id(x)]):
                wrong[i] += 1

    _run_threads(len(work), body)
    return sum(wrong), sum(calls for calls, _ in work)


def _kbit_model() -> torch.nn.Module:
    """A W2A2 bcnn_cifar (bit-serial ops) with non-trivial statistics and steps."""
    torch.manual_seed(0)
    m = create_model("bcnn_cifar", width=16, depth=1, weight_bits=2, act_bits=2)
    m.train()
    with torch.no_grad():
        m(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
        g = torch.Generator().manual_seed(1)
        for mod in m.modules():
            if isinstance(mod, UniformQuantizer):
                mod.step.mul_(torch.rand(mod.step.shape, generator=g) + 0.5)
    return m.eval()


def _binary_model() -> torch.nn.Module:
    """A small 1-bit bcnn_cifar with batch-norm statistics calibrated on random images (so
    that different inputs give different logits)."""
    torch.manual_seed(0)
    m = create_model("bcnn_cifar", width=16, depth=1)
    m.train()
    with torch.no_grad():
        m(torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8))
    return m.eval()


def test_shared_pretrained_model_matches_serial_results() -> None:
    """The issue's figure: 4 threads x 200 batch-1 calls and 2 threads x 50 batch-7 calls on
    one model at once, mixed inputs: 0 wrong outputs."""
    model = load("bcnn_cifar10")
    wrong, calls = _mismatches(
        model,
        [(4, 200, _inputs((1, 3, 32, 32), 16)), (2, 50, _inputs((7, 3, 32, 32), 4, seed=1))],
    )
    assert calls == 900
    assert wrong == 0, f"{wrong} of {calls} concurrent calls differ from the serial results"


def test_shared_kbit_model_matches_serial_results() -> None:
    """Bit-serial (k-bit) ops, and an input size the other threads do not use (33 px)."""
    model = pack(_kbit_model())
    wrong, calls = _mismatches(
        model,
        [
            (3, 60, _inputs((1, 3, 32, 32), 8)),
            (1, 30, _inputs((2, 3, 33, 33), 3, seed=2)),
        ],
    )
    assert wrong == 0, f"{wrong} of {calls} concurrent calls differ from the serial results"


def test_shared_reference_backend_matches_serial_results() -> None:
    """The numpy reference executor (backend='reference') is shared the same way."""
    fast = pack(_binary_model())
    model = PackedModel(fast.graph, fast.tensors, backend="reference")
    xs = _inputs((1, 3, 24, 24), 6)
    assert len({model(x).tobytes() for x in xs}) >= 4  # the outputs tell most inputs apart
    wrong, calls = _mismatches(model, [(3, 20, xs)])
    assert wrong == 0, f"{wrong} of {calls} concurrent calls differ from the serial results"


class _OnePlan(PackedModel):
    """The engine as it was before the fix: one plan (one set of buffers) per input shape,
    shared by every calling thread."""

    def _checkout(self, key: tuple[int, ...]) -> Any:
        with self._lock:
            idle = self._plans.get(key)
            if idle:
                return idle[0]
        plan = super()._checkout(key)
        with self._lock:
            self._plans[key] = [plan]
        return plan

    def _checkin(self, key: tuple[int, ...], plan: Any) -> None:
        pass


def test_negative_control_a_shared_plan_gives_wrong_logits() -> None:
    """The concurrency test can fail: with one plan shared by the threads (the old engine),
    outputs from other threads' calls leak into results. Rounds repeat until one shows it."""
    base = load("bcnn_cifar10")
    model = _OnePlan(base.graph, base.tensors)
    xs = _inputs((1, 3, 32, 32), 16)
    wrong = 0
    for _ in range(10):
        wrong, _ = _mismatches(model, [(4, 200, xs)])
        if wrong:
            break
    assert wrong > 0, "a plan shared by 4 threads never returned a wrong output"


def test_set_precision_during_concurrent_calls() -> None:
    """Changing the weight precision while other threads call the model is safe: every call
    returns exactly the serial result at one of the two settings."""
    model = pack(_kbit_model())
    xs = _inputs((1, 3, 32, 32), 6)
    full = [model(x) for x in xs]
    model.set_precision(weight_bits=1)
    low = [model(x) for x in xs]
    model.set_precision(weight_bits=None)
    assert any(not np.array_equal(a, b) for a, b in zip(full, low, strict=True))
    bad = [0]

    def body(i: int) -> None:
        if i == 0:
            for j in range(200):
                model.set_precision(weight_bits=1 if j % 2 else None)
            return
        for j in range(100):
            k = (i + j) % len(xs)
            y = model(xs[k])
            if not (np.array_equal(y, full[k]) or np.array_equal(y, low[k])):
                bad[0] += 1

    _run_threads(3, body)
    model.set_precision(weight_bits=None)
    assert bad[0] == 0
    assert all(np.array_equal(model(x), f) for x, f in zip(xs, full, strict=True))


def test_thread_count_changes_during_concurrent_calls() -> None:
    """set_num_threads from one thread while others call (some with 2 kernel threads, whose
    parallel regions are launched one at a time): the outputs never change."""
    model = load("bcnn_cifar10")
    xs = _inputs((7, 3, 32, 32), 3)
    serial = [model(x) for x in xs]
    bad = [0]

    def body(i: int) -> None:
        if i == 0:
            for j in range(100):
                set_num_threads(2 if j % 2 else 1)
            set_num_threads(1)
            return
        with num_threads(2 if i == 1 else 1):
            for j in range(30):
                k = (i + j) % len(xs)
                if not np.array_equal(model(xs[k]), serial[k]):
                    bad[0] += 1

    prev = get_num_threads()
    try:
        _run_threads(3, body)
    finally:
        set_num_threads(prev)
    assert bad[0] == 0


def test_num_threads_context_is_per_thread() -> None:
    """num_threads(n) overrides the count for its own thread only; set_num_threads sets the
    default of every thread without an override."""
    seen: dict[str, int] = {}
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait()
        seen["other_during"] = get_num_threads()
        release.set()

    t = threading.Thread(target=other)
    t.start()
    prev = set_num_threads(1)
    try:
        with num_threads(2) as n:
            seen["own"] = get_num_threads()
            inside.set()
            release.wait()
        t.join()
        seen["own_after"] = get_num_threads()
    finally:
        set_num_threads(prev)
    assert seen["other_during"] == 1
    assert seen["own"] == n == min(2, seen["own"])  # clamped to the pool size
    assert seen["own_after"] == 1


def test_plans_are_reused_and_bounded() -> None:
    """Serial calls reuse one plan per shape; at most MAX_SHAPES shapes keep plans."""
    model = pack(create_model("bcnn_cifar", width=8, depth=1).eval())
    for _ in range(3):
        model(np.zeros((1, 3, 16, 16), np.uint8))
    assert [len(v) for v in model._plans.values()] == [1]
    for s in range(16, 16 + PackedModel.MAX_SHAPES + 2):
        model(np.zeros((1, 3, s, s), np.uint8))
    assert len(model._plans) == PackedModel.MAX_SHAPES


@pytest.mark.parametrize("callers", [1, 2])
def test_bench_concurrency_reports_both_rates(callers: int) -> None:
    from bcnn._commands._bench_concurrency import bench_concurrency

    model = pack(create_model("bcnn_cifar", width=8, depth=1).eval())
    res = bench_concurrency(model, np.zeros((1, 3, 16, 16), np.uint8), callers, seconds=0.05)
    assert res["concurrency"] == callers
    assert res["serial_calls_per_s"] > 0 and res["concurrent_calls_per_s"] > 0
    assert res["concurrency_speedup"] == pytest.approx(
        res["concurrent_calls_per_s"] / res["serial_calls_per_s"], rel=1e-2
    )


@pytest.mark.parametrize("model_name", ["bcnn_cifar10", "random"])
def test_the_compiled_runner_gives_the_step_by_step_bits(model_name: str) -> None:
    """A plan's runner (one nogil call for the hot steps, used once calls overlap) makes the
    same kernel calls as its step-by-step path: identical logits, batch 1 and 7."""
    model = load("bcnn_cifar10") if model_name == "bcnn_cifar10" else pack(_binary_model())
    size = 32 if model_name == "bcnn_cifar10" else 24
    from bcnn.engine._fastplan import _FastPlan

    for n in (1, 7):
        plan = _FastPlan(model, (n, 3, size, size))
        assert plan._runnable, "this model's hot steps should all have a compiled record"
        xs = _inputs((n, 3, size, size), 3, seed=n)
        steps = [plan(x) for x in xs]
        plan.use_runner()
        assert plan._runner is not None
        ran = [plan(x) for x in xs]
        for a, b in zip(steps, ran, strict=True):
            np.testing.assert_array_equal(a, b)
        assert not np.array_equal(ran[0], ran[1])  # the inputs are told apart


def test_overlapping_calls_switch_plans_to_the_runner() -> None:
    model = load("bcnn_cifar10")
    x = np.zeros((1, 3, 32, 32), np.uint8)
    model(x)
    assert not model._concurrent
    (plan,) = model._plans[(1, 3, 32, 32)]
    assert plan._runner is None  # single-threaded use stays step by step
    for _ in range(5):  # until two calls overlap (near-certain on the first try)
        wrong, _ = _mismatches(model, [(2, 50, _inputs((1, 3, 32, 32), 4))])
        assert wrong == 0
        if model._concurrent:
            break
    assert model._concurrent
    assert any(p._runner is not None for p in model._plans[(1, 3, 32, 32)])


_ONE_PARFOR = r"""
import numpy as np
from bcnn.engine import _kernels as K, num_threads
from bcnn.engine._kernels import _conv as C
rng = np.random.default_rng(0)
w = K.prepare_conv_weights(K.pack_weights(rng.standard_normal((64, 64, 3, 3), np.float32)), 64)
x = K.pack_sign(rng.standard_normal((8, 14, 14, 64)).astype(np.float32))
with num_threads(2):
    got = K.bconv2d(x, w, 1, 1)
assert np.array_equal(got, K.bconv2d(x, w, 1, 1))
from bcnn.engine._kernels import _stem as S
ps = K.prepare_stem_weights(K.pack_weights(rng.standard_normal((64, 24, 5, 5), np.float32)), 3, 8)
img = rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)  # 5x5 RGB: the general stem
with num_threads(2):
    got = K.stem_conv(img, ps, 1, 2)
assert np.array_equal(got, K.stem_conv(img, ps, 1, 2))
for f in (C._conv_parallel, S._stem_parallel):
    (cres,) = f.overloads.values()
    print(len(cres.metadata["parfor_diagnostics"].initial_parfors))
"""


@pytest.mark.slow
def test_the_parallel_conv_schedules_only_its_prange(tmp_path: Any) -> None:
    """The parallel conv's (and stem's) region holds one parfor, its prange over chunks. An array
    expression beside it (np.zeros of the padded input once was) becomes a parfor of its own,
    and under the conv's parallel chunk size of 1 every element a scheduled chunk: 2 threads
    then ran 0.5-0.75x one thread (measured on Zen 3). Compiled afresh (an empty cache)."""
    import os
    import subprocess

    pytest.importorskip("numba")
    from bcnn.engine._threads import max_threads

    if max_threads() < 2:
        pytest.skip("one numba thread: the serial conv runs")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", _ONE_PARFOR], env=env, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1", "1"]
