"""Benchmark the packed-engine kernels: the binary GEMM alone, and single layers (binary vs
PyTorch float vs PyTorch int8 x86/fbgemm, float in / float out), at 1 and 2 threads.

    python scripts/bench_kernels.py [--repeat R] [--threads 1 2] [--json]
    python scripts/bench_kernels.py --lut     # the lut path's GEMM / conv tiles vs popcount
    python scripts/bench_kernels.py --ceiling # the lut micro-kernel vs its vpshufb/vpaddb bound
    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES= python scripts/bench_kernels.py --lut  # AVX2

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

import bcnn.engine  # noqa: F401  (first: applies BCNN_KERNEL_PATH before numba is imported)
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


def bench_chain(repeat: int = 100) -> dict[str, float]:
    """The kernels chained as a batch-1 ``bcnn_cifar`` forward (random weights; the shapes and
    the order of ops of the model, every epilogue fused: stem + BN + RPReLU, blocks
    h += RPReLU(BN(conv(sign(h + b)))), widening downsamples, GAP, threshold sign, binary
    linear) against the float twin in PyTorch: what the executor can reach on these kernels."""
    import time

    import numpy as np
    import torch

    from bcnn.engine import _kernels as K
    from bcnn.models import create_model

    rng = np.random.default_rng(0)

    def vec(c: int) -> np.ndarray:
        return rng.standard_normal(c).astype(np.float32)

    def conv(cin: int, cout: int, k: int) -> K.PreparedWeights:
        return K.prepare_conv_weights(K.pack_weights(rng.standard_normal((cout, cin, k, k))), cin)

    stem = K.prepare_stem_weights(K.pack_weights(rng.standard_normal((64, 24, 3, 3))), 3, 8)
    layers = []
    c = 64
    for i, wd in enumerate((64, 128, 256)):
        if i > 0:
            layers.append(("down", vec(c), conv(c, wd, 1), vec(wd), vec(wd), (vec(wd),) * 3))
            c = wd
        for _ in range(2):
            layers.append(("block", vec(c), conv(c, c, 3), vec(c), vec(c), (vec(c),) * 3))
    head = K.prepare_dense_weights(K.pack_weights(rng.standard_normal((10, 256))), 256)
    thr, flip = vec(256), rng.random(256) < 0.5
    ssc, sbi, srp = vec(64), vec(64), (vec(64),) * 3
    hsc, hbi = vec(10), vec(10)

    def run(x: np.ndarray) -> np.ndarray:
        h = K.stem_conv_affine(x, stem, ssc, sbi, padding=1, rprelu=srp, fma=True)
        for kind, b, w, sc, bi, rp in layers:
            if kind == "block":
                xp = K.pack_sign(h, b)
                K.bconv2d_affine(xp, w, sc, bi, padding=1, rprelu=rp, residual=h, out=h, fma=True)
            else:
                a = K.avgpool2x2(h)
                h = K.bconv2d_affine(K.pack_sign(a, b), w, sc, bi, rprelu=rp, residual=a, fma=True)
        f = K.pack_threshold(K.global_avgpool(h), thr, flip)
        return K.blinear_affine(f, head, hsc, hbi)

    x = rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    twin = create_model("bcnn_cifar", binary=False).eval()
    xt = torch.from_numpy(x)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ts: dict[str, list[float]] = {"chain": [], "float_twin": []}
        with torch.inference_mode():
            for _ in range(5):
                run(x)
                twin(xt)
            for _ in range(repeat):
                t0 = time.perf_counter()
                run(x)
                t1 = time.perf_counter()
                twin(xt)
                t2 = time.perf_counter()
                ts["chain"].append(t1 - t0)
                ts["float_twin"].append(t2 - t1)
    finally:
        torch.set_num_threads(prev)
    ms = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in ts.items()}
    return {"chain_ms": ms["chain"], "float_twin_ms": ms["float_twin"],
            "speedup": ms["float_twin"] / ms["chain"]}  # fmt: skip


def bench_lut(repeat: int) -> list[dict[str, float]]:
    """The lut path's lookup-table tiles vs the popcount tiles (the words layout: VPOPCNTQ on
    a VPOPCNTDQ target, LLVM's popcount sequence elsewhere) on the same operands: the GEMMs,
    then 3x3 convolutions (stride 1, padding 1, batch 1). 1 thread, interleaved medians,
    exactness checked."""
    import functools
    import time

    import numpy as np

    from bcnn.engine import _kernels as K

    rng = np.random.default_rng(0)
    cases: list[tuple[str, int, int, int, int]] = [("gemm", m, n, k, 0) for m, n, k in GEMMS]
    cases += [("conv3x3", 14 * 14, 256, 256, 14), ("conv3x3", 16 * 16, 128, 128, 16)]
    cases += [("conv3x3", 32 * 32, 64, 64, 32)]
    rows = []
    for kind, m, n, k, size in cases:
        if kind == "gemm":
            a = rng.integers(0, 2**63, (m, k // 64), dtype=np.uint64)
            w = rng.integers(0, 2**63, (n, k // 64), dtype=np.uint64)
            pw, lw = (K.prepare_dense_weights(w, k, path=p) for p in ("generic", "lut"))
            run = functools.partial(K.bgemm, a)
            macs = m * n * k
        else:
            x = K.pack_sign(rng.standard_normal((1, size, size, k)).astype(np.float32))
            w = K.pack_weights(rng.standard_normal((n, k, 3, 3)).astype(np.float32))
            pw, lw = (K.prepare_conv_weights(w, k, path=p) for p in ("generic", "lut"))
            run = functools.partial(K.bconv2d, x, stride=1, padding=1)
            macs = m * n * k * 9
        exact = bool(np.array_equal(run(pw), run(lw)))
        ts: dict[str, list[float]] = {"popcount": [], "lut": []}
        for _ in range(repeat):
            for name, p in (("popcount", pw), ("lut", lw)):
                t0 = time.perf_counter()
                run(p)
                ts[name].append(time.perf_counter() - t0)
        med = {name: float(np.median(v)) for name, v in ts.items()}
        rows.append(
            {
                "kind": kind, "m": m, "n": n, "k": k, "exact": exact,
                "popcount_gmacs": macs / med["popcount"] / 1e9,
                "lut_gmacs": macs / med["lut"] / 1e9,
                "lut_vs_popcount": med["popcount"] / med["lut"],
                # the median of each round's ratio: robust to a VM whose speed drifts
                "lut_vs_popcount_paired": float(
                    np.median(np.array(ts["popcount"]) / np.array(ts["lut"]))
                ),
            }
        )  # fmt: skip
    return rows


def bench_lut_ceiling(repeat: int) -> dict[str, float]:
    """The lut path's throughput bound on this CPU and how close its micro-kernel comes.

    A loop of independent ``acc += vpshufb(table, acc)`` (256-bit, 8 chains) measures the
    rate of the (shuffle, byte add) pairs one lookup costs; each pair is 128 binary MACs, so
    pairs/s x 128 bounds any lookup-table kernel. The micro-kernel (2 pixels x 4 blocks of
    32 channels, 3 words per run, L1-resident operands, widening included) is timed alone.
    Both are best-of-``repeat`` rates, interleaved."""
    import time

    import numpy as np
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    from bcnn.engine._kernels import _lut_conv as L
    from bcnn.engine._kernels._ir import counted_loop, pshufb

    @intrinsic
    def pairs(typingctx, n):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            v8 = ir.VectorType(ir.IntType(8), 32)
            shuf = pshufb(builder, 32)
            tab = ir.Constant(v8, [(3 * j + 1) % 16 for j in range(32)])

            def body(i, xs):  # type: ignore[no-untyped-def]
                return [builder.add(x, builder.call(shuf, [tab, x])) for x in xs]

            init = [ir.Constant(v8, [(i + j) % 16 for j in range(32)]) for i in range(8)]
            xs = counted_loop(builder, ir.Constant(ir.IntType(64), 0), args[0], 1, init, body, "p")
            s = xs[0]
            for x in xs[1:]:
                s = builder.xor(s, x)
            return builder.zext(builder.extract_element(s, ir.Constant(ir.IntType(32), 0)),
                                ir.IntType(64))  # fmt: skip

        return types.int64(n), codegen

    @njit
    def run_pairs(n):  # type: ignore[no-untyped-def]
        return pairs(n)

    mk = L._make_mk_lut(4, False, 2)

    @njit(boundscheck=False)
    def run_mk(xp, roffs, blocks, acc, n):  # type: ignore[no-untyped-def]
        bstride = blocks.shape[1] * 32
        for _ in range(n):
            mk(xp, roffs, 0, 0, 0, 3, blocks, 0, bstride, acc, 0, 32 * 32)

    rng = np.random.default_rng(0)
    xp = rng.integers(0, 2**63, size=8, dtype=np.uint64)
    roffs = np.arange(2, dtype=np.int64) * 3
    blocks = rng.integers(0, 16, size=(4, 16 * 3, 32), dtype=np.uint8)
    acc = np.zeros(4 * 32 * 32, np.uint16)
    n_pairs, n_mk = 20_000_000, 100_000
    run_pairs(10)
    run_mk(xp, roffs, blocks, acc, 10)
    best = {"pairs": 1e9, "mk": 1e9}
    for _ in range(repeat):
        t0 = time.perf_counter()
        run_pairs(n_pairs)
        t1 = time.perf_counter()
        run_mk(xp, roffs, blocks, acc, n_mk)
        t2 = time.perf_counter()
        best["pairs"] = min(best["pairs"], t1 - t0)
        best["mk"] = min(best["mk"], t2 - t1)
    pair_rate = n_pairs * 8 / best["pairs"]
    mk_gmacs = n_mk * 4 * 32 * 2 * 3 * 64 / best["mk"] / 1e9
    return {
        "shuffle_add_pairs_g_per_s": pair_rate / 1e9,
        "ceiling_gmacs": pair_rate * 128 / 1e9,
        "microkernel_gmacs": mk_gmacs,
        "microkernel_vs_ceiling": mk_gmacs / (pair_rate * 128 / 1e9),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--asm", action="store_true", help="only check the micro-kernel's asm")
    ap.add_argument("--lut", action="store_true", help="only the lut path's tiles vs popcount")
    ap.add_argument(
        "--ceiling", action="store_true", help="only the lut micro-kernel vs its shuffle bound"
    )
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import llvmlite.binding as llvm

    target = os.environ.get("NUMBA_CPU_NAME") or "host"
    print(f"# cpu: {llvm.get_host_cpu_name()}; compile target: {target}; "
          f"load average: {os.getloadavg()}")  # fmt: skip
    if args.ceiling:
        c = bench_lut_ceiling(max(5, args.repeat // 5))
        if args.json:
            print(json.dumps({"bench": "lut_ceiling", "target": target, **c}))
        else:
            print(
                f"(vpshufb, vpaddb) pairs {c['shuffle_add_pairs_g_per_s']:.2f} G/s: lookup "
                f"bound {c['ceiling_gmacs']:.0f} G binary MAC/s; lut micro-kernel alone "
                f"{c['microkernel_gmacs']:.0f} G/s ({c['microkernel_vs_ceiling']:.0%} of it)"
            )
        return
    if args.lut:
        for r in bench_lut(args.repeat * 2):
            if args.json:
                print(json.dumps({"bench": "lut_gemm", "target": target, **r}))
            else:
                print(
                    f"{r['kind']:7s} M={r['m']:5d} N={r['n']:4d} K={r['k']:5d}: popcount "
                    f"{r['popcount_gmacs']:6.0f} G/s  lut {r['lut_gmacs']:6.0f} G/s  "
                    f"x{r['lut_vs_popcount']:.2f} (paired x{r['lut_vs_popcount_paired']:.2f})  "
                    f"exact={r['exact']}"
                )
        return
    print(f"# micro-kernel machine code (zmm instructions): {check_asm()}")
    if args.asm:
        return
    r = bench_chain(args.repeat * 2)
    if args.json:
        print(json.dumps({"bench": "bcnn_cifar_chain", **r}))
    else:
        print(
            f"bcnn_cifar-shaped kernel chain, batch 1, 1 thread: {r['chain_ms'] * 1e3:.0f} us, "
            f"float twin {r['float_twin_ms'] * 1e3:.0f} us: x{r['speedup']:.1f}"
        )
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
