"""The plan runner: a fast plan's serial kernel calls replayed in one compiled call.

A :class:`~bcnn.engine._fastplan._FastPlan` whose hot steps are all bound serial kernels on
fixed buffers (the BCNN family: stem, fused block convolutions, pools, the fused head) records
each step's call as (group, arguments) at build time. :func:`build_runner` groups the records
by kind and returns ``run(x)``: one ``nogil`` numba call that makes the same kernel calls in
the same order on the same arrays, so its results are the plan's, bit for bit.

Why: every return from a ``nogil`` kernel re-takes the GIL. When several threads share a model
(docs/serving.md), a thread that finds the GIL taken sleeps until it is woken, so a dozen
short kernel calls per image cost a sizeable share of the cores' time (measured on a 2-core
VM: 12 calls of 13 us per unit of work scale to 1.5-1.9x on two threads, one call of 150 us
to 1.93-1.99x). With one call per image the threads are left to the kernels.

The runner is compiled once per group layout (how many steps of each kind: one signature per
architecture) and cached on disk like the kernels. With more than one kernel thread the plan
runs its steps one by one (the parallel kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import njit

from ._fused import fused_head
from ._kernels._bound import _avgpool_pack, _conv_serial_pack, _stem_fast_pack
from ._kernels._packing import _pack_rows_padded

__all__ = ["GROUPS", "build_runner"]

GROUPS = ("stem", "conv", "pool", "pack", "head")


@njit(nogil=True, cache=True, boundscheck=False)
def _run_steps(x, kinds, stems, convs, pools, packs, heads):  # type: ignore[no-untyped-def]
    """kinds[i]: the group of step i (an index into GROUPS); each group's records are taken
    in order. A group with no step is None (its branch is pruned at compile time)."""
    i_s = i_c = i_p = i_k = i_h = 0
    for i in range(kinds.shape[0]):
        k = kinds[i]
        if k == 0:
            if stems is not None:
                a = stems[i_s]
                i_s += 1
                _stem_fast_pack(
                    x, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10],
                    a[11], a[12], a[13], a[14], a[15], a[16], a[17], a[18], a[19], a[20],
                    a[21], a[22], a[23], a[24], a[25], a[26], a[27],
                )  # fmt: skip
        elif k == 1:
            if convs is not None:
                c = convs[i_c]
                i_c += 1
                _conv_serial_pack(
                    c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10],
                    c[11], c[12], c[13], c[14], c[15], c[16], c[17], c[18], c[19], c[20],
                    c[21], c[22], c[23], c[24], c[25], c[26], c[27], c[28], c[29], c[30],
                )  # fmt: skip
        elif k == 2:
            if pools is not None:
                p = pools[i_p]
                i_p += 1
                _avgpool_pack(p[0], p[1], p[2], p[3], p[4], p[5])
        elif k == 3:
            if packs is not None:
                q = packs[i_k]
                i_k += 1
                _pack_rows_padded(q[0], q[1], q[2], q[3])
        elif k == 4:
            if heads is not None:
                h = heads[i_h]
                i_h += 1
                fused_head(h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8])


def _plain(v: Any) -> Any:
    """Scalars as Python int/bool (one numba type per position); read-only or non-contiguous
    arrays copied (constants only: the plan's buffers are writable and contiguous, so every
    buffer passed stays the plan's own)."""
    if isinstance(v, np.ndarray):
        return v if v.flags.writeable and v.flags.c_contiguous else np.ascontiguousarray(v).copy()
    if isinstance(v, bool | np.bool_):
        return bool(v)
    if isinstance(v, int | np.integer):
        return int(v)
    return v


def build_runner(
    records: list[tuple[str, tuple[Any, ...]]],
) -> Callable[[np.ndarray], None] | None:
    """``run(x)`` replaying ``records`` (x: the image, the stem's first argument), or None
    when a group's records do not share one numba type (the plan then runs step by step)."""
    if not records:
        return None
    kinds = np.array([GROUPS.index(g) for g, _ in records], np.int64)
    groups: list[tuple[Any, ...] | None] = []
    for g in GROUPS:
        rows = tuple(tuple(_plain(v) for v in a) for gg, a in records if gg == g)
        if rows and len({numba.typeof(r) for r in rows}) != 1:
            return None
        groups.append(rows or None)
    stems, convs, pools, packs, heads = groups

    def run(x: np.ndarray) -> None:
        _run_steps(x, kinds, stems, convs, pools, packs, heads)

    return run
