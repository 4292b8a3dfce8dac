"""A plan's first compile on two cores: the empty-cache start of the packed engine.

numba compiles one function at a time in a process (its compiler holds a global lock), and a
plan's first call with an empty cache spends most of its time there (docs/kernels.md,
Start-up). :func:`precompile` takes the kernel calls a freshly built single-threaded plan will
make (its records: kernel and arguments), and when two or more of the kernels are in neither
this process nor numba's on-disk cache, and the machine has a second core, it compiles a share
of them in a child process (``python -m bcnn.engine._precompile``), which writes them to the
same cache, while this process compiles the rest. It then loads the child's share from the
cache. Kernels, arguments and cache are the plan's own, so the code that runs is the same as a
lazy compile's; only who compiles it changes.

When the cache holds every kernel, they are loaded without numba's registries of built-in
implementations (:func:`_load_cached`: a third of a warm start).

Nothing here is needed for correctness: if the child fails, is slow (:data:`TIMEOUT_S`) or
cannot start, the kernels are compiled in this process on first use, as without it. No child
is started with one core available, from an embedded or frozen interpreter (whose
``sys.executable`` is not a Python), or with ``BCNN_PRECOMPILE=0`` (compile in this process
only).

The split keeps each kernel in one process (two processes adding signatures of one function
to its cache index at once could lose one). Kernels go, largest first, to the side with less
estimated work (:data:`_COST`, seconds measured on a 2-core Zen 3; the child starts
:data:`_CHILD_START_S` late: its interpreter and imports).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["TIMEOUT_S", "kernel_calls", "precompile"]

TIMEOUT_S = 300.0  # the child's share is compiled here after this (it is killed)
_COST = {"conv": 5.2, "stem": 5.0, "pool": 1.2, "head": 0.8, "pack": 0.3}
_CHILD_START_S = 0.8
_CHILD = "bcnn.engine._precompile"  # python -m this
_lock = threading.Lock()  # one precompile at a time: plans built by several threads at once
# find the first one's kernels compiled when they get the lock, and start no child of their own


def kernel_calls(
    records: Sequence[tuple[str, tuple[Any, ...]] | None],
) -> list[tuple[str, Any, tuple[Any, ...]]]:
    """(group, dispatcher, numba argument types) of each distinct serial kernel call in a
    plan's records (the stem's record lacks its image: uint8 (N, C, H, W) C-contiguous)."""
    from numba import typeof, types

    from ._fused import fused_head
    from ._kernels._bound import _avgpool_pack, _conv_serial_pack_for, _stem_fast_pack_for
    from ._kernels._packing import _pack_rows_padded

    out: list[tuple[str, Any, tuple[Any, ...]]] = []
    seen: set[tuple[int, tuple[Any, ...]]] = set()
    for rec in records:
        if rec is None:
            continue
        group, args = rec
        tys: tuple[Any, ...] = tuple(typeof(a) for a in args)
        if group == "stem":
            d, tys = _stem_fast_pack_for(args[8]), (types.Array(types.uint8, 4, "C"), *tys)
        elif group == "conv":
            d = _conv_serial_pack_for(args[3])
        elif group == "pool":
            d = _avgpool_pack
        elif group == "pack":
            d = _pack_rows_padded
        elif group == "head":
            d = fused_head
        else:
            continue
        if (id(d), tys) not in seen:
            seen.add((id(d), tys))
            out.append((group, d, tys))
    return out


def _missing(d: Any, tys: tuple[Any, ...]) -> bool:
    """Whether neither this process nor numba's cache holds ``d`` for ``tys``."""
    if tys in d.overloads:
        return False
    cache = getattr(d, "_cache", None)
    try:
        key = cache._index_key(tys, d.targetctx.codegen())  # type: ignore[union-attr]
        return key not in cache._cache_file._load_index()  # type: ignore[union-attr]
    except Exception:  # no cache (NullCache) or another numba: a child could not help
        return False


def _split(jobs: list[tuple[str, Any, tuple[Any, ...]]]) -> tuple[list[Any], list[Any]]:
    """(this process's jobs, the child's): whole kernels, largest first, to the lighter side."""
    by_kernel: dict[int, list[tuple[str, Any, tuple[Any, ...]]]] = {}
    for j in jobs:
        by_kernel.setdefault(id(j[1]), []).append(j)
    groups = sorted(by_kernel.values(), key=lambda g: -sum(_COST.get(j[0], 1.0) for j in g))
    mine: list[Any] = []
    theirs: list[Any] = []
    load = [0.0, _CHILD_START_S]
    for g in groups:
        side = 0 if load[0] <= load[1] else 1
        (mine if side == 0 else theirs).extend(g)
        load[side] += sum(_COST.get(j[0], 1.0) for j in g)
    return mine, theirs


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _can_spawn() -> bool:
    """Whether ``sys.executable -m ...`` starts this Python: not an embedding host (a
    server binary) or a frozen application, whose executable would take other arguments."""
    exe = os.path.basename(sys.executable or "").lower()
    return exe.startswith(("python", "pypy")) and not getattr(sys, "frozen", False)


def precompile(records: Sequence[tuple[str, tuple[Any, ...]] | None]) -> int:
    """Get the kernels of ``records`` ready: when numba's cache holds them all, load them
    (:func:`_load_cached`); else load numba's registries (:func:`start_numba`) and compile
    the missing ones, a share in a child process (see the module's doc). Returns how many
    kernel signatures the child compiled (0: none was sent, or it failed and they compile
    here on first use)."""
    from ._numba_start import start_numba

    with _lock:
        calls = kernel_calls(records)
        jobs = [j for j in calls if _missing(j[1], j[2])]
        if not jobs and _load_cached(calls):
            return 0
        start_numba()  # the registries, to compile or to load numba's way (no BLAS probe)
        if not jobs or os.environ.get("BCNN_PRECOMPILE", "1") == "0":
            return 0
        if _cores() < 2 or not _can_spawn():
            return 0
        return _precompile(jobs)


# numba versions whose cache loads were checked to need only the runtime (NRT), not the
# registries: the light load is used with these only (any other: numba's own load)
_LIGHT_NUMBA = ("0.68.",)


def _load_cached(calls: Sequence[tuple[str, Any, tuple[Any, ...]]]) -> bool:
    """Load cached kernels without numba's registries. numba refreshes its CPU target before
    every cache load: it imports and installs every built-in implementation (about 0.3 s of
    a 1 s warm start), which compiling needs and loading machine code does not. Of that
    refresh, loading needs the runtime (NRT: allocation, reference counts) initialised, and
    that is all this load does before reading the cache. Any signature the cache does not
    hold after all compiles as usual (numba's compiler refreshes the registries itself).
    Returns False, having loaded nothing, with another numba or a dispatcher without a file
    cache: its kernels then load on first use, numba's way."""
    import numba

    if not numba.__version__.startswith(_LIGHT_NUMBA) or not all(
        hasattr(d._cache, "_load_overload")
        and hasattr(d._cache, "_guard_against_spurious_io_errors")
        for _, d, _ in calls
    ):
        return False
    from numba.core.runtime import rtsys

    for _, d, tys in calls:
        if tys in d.overloads:
            continue
        cache = d._cache

        def light(sig: Any, target_context: Any, cache: Any = cache) -> Any:
            rtsys.initialize(target_context)  # once per process
            with cache._guard_against_spurious_io_errors():
                return cache._load_overload(sig, target_context)

        cache.load_overload = light  # this dispatcher's cache, for this one load
        try:
            d.compile(tys)
        finally:
            del cache.load_overload
    return True


def _precompile(jobs: list[tuple[str, Any, tuple[Any, ...]]]) -> int:
    if len(jobs) < 2:
        return 0
    mine, theirs = _split(jobs)
    if not theirs:
        return 0
    payload = pickle.dumps(
        [(d.py_func.__module__, d.py_func.__name__, tys) for _, d, tys in theirs]
    )
    # the child imports what this process imported: its module search path, its numba
    # settings (the environment: cache folder, CPU target, kernel path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    except OSError:
        return 0
    ok = False
    try:
        assert child.stdin is not None
        child.stdin.write(payload)
        child.stdin.close()
        for _, d, tys in mine:
            d.compile(tys)
        ok = child.wait(timeout=TIMEOUT_S) == 0
    except (OSError, subprocess.TimeoutExpired):  # a child that died early, or hangs
        pass
    finally:  # never leave it running (also when a compile here raised)
        if child.poll() is None:
            child.kill()
        child.wait()
    for _, d, tys in theirs:
        d.compile(tys)  # a cache load when the child succeeded, else the compile itself
    return len(theirs) if ok else 0


def _main() -> int:
    """The child: compile (and so cache) each (module, function, argument types) read from
    stdin."""
    import importlib

    from ._numba_start import start_numba

    jobs = pickle.loads(sys.stdin.buffer.read())
    start_numba()
    for mod, name, tys in jobs:
        getattr(importlib.import_module(mod), name).compile(tys)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
