"""Benchmark the packed-engine kernels: the binary GEMM alone, and single layers (binary vs
PyTorch float vs PyTorch int8 x86/fbgemm, float in / float out), at 1 and 2 threads.

    python scripts/bench_kernels.py [--repeat R] [--threads 1 2] [--json]

All figures are medians of repeated runs; the implementations of one layer are timed in the
same run (interleaved), so compare ratios, not absolute times, on a shared machine. With more
than one thread the machine must be otherwise idle: a co-tenant on one of two cores makes
every fork-join parallel region (numba's and torch's alike) wait for a scheduler time slice.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

from bcnn._commands._bench_layer import bench_gemm, bench_layer

GEMMS = [(196, 256, 2304), (784, 128, 1152), (3136, 64, 576), (49, 512, 4608)]
LAYERS = [
    ("conv3x3", 256, 14, 1),
    ("conv3x3", 64, 32, 1),
    ("conv3x3", 128, 16, 1),
    ("conv3x3", 256, 14, 8),
    ("conv1x1", 256, 14, 1),
    ("linear", 512, 1, 1),
    ("linear", 2048, 1, 32),
]


def check_asm() -> dict[str, int]:
    """Compile a fresh (uncached) caller of the GEMM micro-kernel and count the instructions
    that matter in its machine code (zmm VPOPCNTQ: the AVX512-VPOPCNTDQ path)."""
    import re

    import numpy as np
    from numba import njit

    from bcnn.engine import _kernels as K

    @njit
    def probe(a, roffs, b, acc):  # type: ignore[no-untyped-def]
        K._mk(a, roffs, 4, 4, 1, b, 0, np.empty(0, np.int64), acc, 0)

    a = np.zeros(4 * 4, np.uint64)
    probe(a, np.arange(4, dtype=np.int64) * 4, np.zeros(4 * 32, np.uint64), np.zeros(128, np.int64))
    asm = next(iter(probe.inspect_asm().values()))
    ops = ("vpopcntq", "vpxorq", "vpaddq", "popcntq")
    return {
        op: len(re.findall(rf"\b{op}\s+%zmm" if op != "popcntq" else rf"\s{op}\s", asm))
        for op in ops
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--asm", action="store_true", help="only check the micro-kernel's asm")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import llvmlite.binding as llvm

    print(f"# cpu: {llvm.get_host_cpu_name()}; load average: {os.getloadavg()}")
    print(f"# micro-kernel machine code (zmm instructions): {check_asm()}")
    if args.asm:
        return
    for threads in args.threads:
        for m, n, k in GEMMS:
            r = bench_gemm(m, n, k, threads=threads, repeat=args.repeat * 2)
            if args.json:
                print(json.dumps({"bench": "gemm", **r}))
            else:
                print(
                    f"gemm  M={m:5d} N={n:4d} K={k:5d} threads={threads}: "
                    f"{r['gemm_ms'] * 1e3:8.1f} us  {r['gmacs']:7.0f} G binary MAC/s"
                )
    for threads in args.threads:
        for layer, c, s, b in LAYERS:
            r = bench_layer(layer, c, s, batch=b, threads=threads, repeat=args.repeat)
            if args.json:
                print(json.dumps({"bench": "layer", **r}))
            else:
                print(
                    f"{layer:8s} C={c:4d} S={s:3d} N={b:2d} threads={threads}: "
                    f"binary {r['binary_ms'] * 1e3:7.1f} us  float {r['float_ms'] * 1e3:8.1f} us"
                    f"  int8 {r['int8_ms'] * 1e3:7.1f} us  x{r['speedup_vs_float']:5.1f} float"
                    f"  x{r['speedup_vs_int8']:4.1f} int8  (gemm {r['gmacs_gemm']:5.0f} G/s,"
                    f" exact={r['binary_exact']})"
                )


if __name__ == "__main__":
    main()
