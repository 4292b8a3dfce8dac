"""The empty-cache start on two cores (bcnn.engine._precompile): a share of a new plan's
kernels compiled in a child process into numba's cache, the rest here, the same code either
way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("numba")

from bcnn.engine import _precompile as P


class _Kernel:
    """A stand-in dispatcher: records what was compiled."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.py_func = _Kernel.compile  # the child is told its module and name
        self.compiled: list[tuple[Any, ...]] = []

    def compile(self, tys: tuple[Any, ...]) -> None:
        self.compiled.append(tys)


def test_split_keeps_each_kernel_whole_and_balances_the_estimates() -> None:
    conv, stem, pool, head = (_Kernel(n) for n in ("conv", "stem", "pool", "head"))
    jobs = [
        ("conv", conv, ("a",)),
        ("conv", conv, ("b",)),  # a second signature of one kernel: never split
        ("stem", stem, ("c",)),
        ("pool", pool, ("d",)),
        ("head", head, ("e",)),
    ]
    mine, theirs = P._split(jobs)
    assert sorted(mine + theirs, key=str) == sorted(jobs, key=str)
    sides = {id(j[1]): (j in mine) for j in jobs}
    for j in jobs:
        assert (j in mine) == sides[id(j[1])]  # each kernel on one side only
    assert [j[1] for j in mine if j[1] is conv] == [conv, conv]  # the largest stays here
    assert stem in [j[1] for j in theirs]  # the next largest goes to the child
    cost = lambda side: sum(P._COST[j[0]] for j in side)  # noqa: E731
    assert abs(cost(mine) - cost(theirs) - P._CHILD_START_S) <= max(P._COST.values())


def _plan_records() -> list[Any]:
    from bcnn.engine import load
    from bcnn.engine._fastplan import _FastPlan

    m = load("bcnn_cifar10")
    plan = _FastPlan(m, (1, 3, 32, 32))
    return plan._records


def test_nothing_is_sent_when_switched_off_or_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels already compiled here, BCNN_PRECOMPILE=0, an executable that is not a Python,
    or one core: no child is started."""

    def no_child(*a: Any, **k: Any) -> Any:
        raise AssertionError("a child process was started")

    recs = _plan_records()  # built (and its kernels compiled or loaded) by this process
    monkeypatch.setattr(subprocess, "Popen", no_child)
    assert P.precompile(recs) == 0  # every kernel of the plan is in this process or cached
    monkeypatch.setattr(P, "_missing", lambda d, tys: True)
    monkeypatch.setattr(P, "_cores", lambda: 2)
    monkeypatch.setenv("BCNN_PRECOMPILE", "0")
    assert P.precompile(recs) == 0
    monkeypatch.delenv("BCNN_PRECOMPILE")
    monkeypatch.setattr(sys, "executable", "/usr/sbin/uwsgi")  # an embedding host
    assert P.precompile(recs) == 0
    monkeypatch.setattr(P, "_cores", lambda: 1)
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    assert P.precompile(recs) == 0


def test_a_failing_child_leaves_the_kernels_to_this_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child that exits non-zero (or cannot start): its share is compiled here."""
    recs = [("conv", (0,)), ("stem", (1,))]
    conv, stem = _Kernel("conv"), _Kernel("stem")
    jobs = [("conv", conv, ("i8",)), ("stem", stem, ("u8",))]
    monkeypatch.setattr(P, "kernel_calls", lambda r: jobs)
    monkeypatch.setattr(P, "_missing", lambda d, tys: True)
    monkeypatch.setattr(P, "_cores", lambda: 2)
    monkeypatch.setattr(P, "_CHILD", "bcnn.engine._no_such_module")  # the child exits 1
    assert P.precompile(recs) == 0
    assert conv.compiled == [("i8",)] and stem.compiled == [("u8",)]

    def cannot_start(*a: Any, **k: Any) -> Any:
        raise OSError("no such file")

    monkeypatch.setattr(subprocess, "Popen", cannot_start)
    assert P.precompile(recs) == 0  # then every kernel compiles lazily, on first use


_EMPTY_CACHE_RUN = """
import numpy as np
from bcnn.engine import PackedModel, load
from bcnn.engine import _fused, _precompile as P
from bcnn.engine._kernels import _bound as B
sent = []
orig = P.precompile
P.precompile = lambda recs: sent.append(orig(recs)) or sent[-1]
m = load("bcnn_cifar10")
x = np.random.default_rng(3).integers(0, 256, (2, 3, 32, 32), np.uint8)
y = m(x)
ref = PackedModel(m.graph, m.tensors, backend="reference")(x)
ks = [B._stem_fast_pack_lut, B._stem_fast_pack_pop, B._conv_serial_pack_lut,
      B._conv_serial_pack_pop, B._avgpool_pack, _fused.fused_head]
print(sent[0], int((y == ref).all()))
print(*[len(k.signatures) for k in ks])
print(sum(len(k.stats.cache_hits) for k in ks))
"""


@pytest.mark.slow
def test_an_empty_cache_compiles_a_share_in_the_child_and_loads_it(tmp_path: Path) -> None:
    """A fresh cache, one thread: the child compiles part of the plan's kernels, this
    process loads them from the cache (numba's cache hits), each kernel once, and the
    logits equal the reference plan's."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    env.pop("BCNN_PRECOMPILE", None)
    r = subprocess.run([sys.executable, "-c", _EMPTY_CACHE_RUN], env=env, capture_output=True,
                       text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    first, sigs, hits = r.stdout.split("\n")[:3]
    n_child, exact = (int(v) for v in first.split())
    assert exact == 1
    if P._cores() < 2:
        assert n_child == 0
        return
    assert n_child >= 1
    counts = [int(v) for v in sigs.split()]
    # one signature of one stem entry, one conv entry, the pool and the head
    assert counts[0] + counts[1] == 1 and counts[2] + counts[3] == 1, sigs
    assert counts[4:] == [1, 1], sigs
    assert int(hits) == n_child  # what the child compiled was loaded, not compiled again
