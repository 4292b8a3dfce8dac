"""IR building blocks shared by the hand-built micro-kernels (``_llvm``, ``_lut``,
``_lut_gemv``): a counted loop with loop-carried values, and the byte-shuffle intrinsic of the
lookup-table family."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from llvmlite import ir
from numba.core import cgutils

__all__ = ["counted_loop", "pshufb"]


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
