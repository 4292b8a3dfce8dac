"""IR building blocks shared by the hand-built micro-kernels (``_llvm``, ``_lut``,
``_lut_gemv``): a counted loop with loop-carried values, the byte-shuffle intrinsic of the
lookup-table family, and aligned byte constants (its tables)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from llvmlite import ir
from numba.core import cgutils

__all__ = ["aligned_bytes", "counted_loop", "pshufb"]


def counted_loop(
    builder: ir.IRBuilder,
    start: ir.Value,
    stop: ir.Value,
    step: int,
    carried: Sequence[ir.Value],
    body: Callable[[ir.Value, list[ir.Value]], list[ir.Value]],
    name: str,
) -> list[ir.Value]:
    """Emit ``for i in range(start, stop, step)`` (i64) with loop-carried values: ``body(i,
    values)`` emits one iteration and returns the next values. Returns the values after the
    loop (``carried`` itself when it runs zero times). The body must not branch."""
    i64 = ir.IntType(64)
    entry = builder.block
    loop = builder.append_basic_block(f"{name}.loop")
    done = builder.append_basic_block(f"{name}.done")
    builder.cbranch(builder.icmp_signed("<", start, stop), loop, done)

    builder.position_at_end(loop)
    i = builder.phi(i64)
    i.add_incoming(start, entry)
    phis = []
    for v in carried:
        p = builder.phi(v.type)
        p.add_incoming(v, entry)
        phis.append(p)
    new = body(i, list(phis))
    i_next = builder.add(i, ir.Constant(i64, step))
    tail = builder.block  # the body may not have added blocks, but be exact
    i.add_incoming(i_next, tail)
    for p, nv in zip(phis, new):
        p.add_incoming(nv, tail)
    builder.cbranch(builder.icmp_signed("<", i_next, stop), loop, done)

    builder.position_at_end(done)
    finals = []
    for v, nv in zip(carried, new):  # every phi first, at the top of the block
        ph = builder.phi(v.type)
        ph.add_incoming(v, entry)
        ph.add_incoming(nv, tail)
        finals.append(ph)
    return finals


def pshufb(builder: ir.IRBuilder, nbytes: int) -> ir.Function:
    """The byte shuffle ``vpshufb`` for vectors of 32 (AVX2) or 64 (AVX-512BW) bytes:
    ``out[b] = table[idx[b] & 15]`` within each 16-byte lane (0 where ``idx[b] & 128``)."""
    name = {32: "llvm.x86.avx2.pshuf.b", 64: "llvm.x86.avx512.pshuf.b.512"}[nbytes]
    v8 = ir.VectorType(ir.IntType(8), nbytes)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8, v8]), name)


def aligned_bytes(builder: ir.IRBuilder, name: str, data: np.ndarray, align: int = 64) -> ir.Value:
    """An i8 pointer to ``data``'s bytes as an internal constant of the current module, aligned
    to ``align`` bytes (one per module and name). numba's own constant arrays are aligned to
    their element (1 byte for uint8), so 32-byte table loads from them can straddle cache
    lines, each such load costing two; these cannot."""
    module = builder.module
    gv = module.globals.get(name)
    if gv is None:
        raw = bytearray(np.ascontiguousarray(data).tobytes())
        ty = ir.ArrayType(ir.IntType(8), len(raw))
        gv = ir.GlobalVariable(module, ty, name)
        gv.initializer = ir.Constant(ty, raw)
        gv.global_constant = True
        gv.linkage = "internal"
        gv.align = align
    return builder.bitcast(gv, ir.IntType(8).as_pointer())
