"""bcnn bench MODEL [--batch N] [--threads T] [--concurrency T] [--isa native|avx2] [--json]
bcnn bench --layer conv3x3|conv1x1|linear --channels C --size S [--batch N] [--threads T]
           [--wbits W --abits A] [--json]"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from ._common import add_precision_arguments, parse_layers

HELP = (
    "time a whole model (packed engine vs its float twin and the binary model in PyTorch), "
    "or one layer with --layer (binary vs float vs int8)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", help="a registered model name (random weights), checkpoint or .bcnn"
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for both engines (default 1); with --layer and T > 1 the packed layer is "
        "also timed on one thread in the same run (thread_scaling)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="T",
        help="also report calls/s of T threads sharing the packed model next to one thread's "
        "(same run; keep --threads 1, see docs/serving.md)",
    )
    p.add_argument("--repeat", type=int, default=30, help="timed runs (median reported)")
    p.add_argument(
        "--size", type=int, nargs="+", metavar="N", help="input size: H W (or S for S x S)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_precision_arguments(p, "time MODEL")
    p.add_argument(
        "--isa",
        choices=("native", "avx2"),
        default="native",
        help="avx2: measure the AVX2 profile on any x86 CPU (the engine compiled for haswell, "
        "PyTorch's oneDNN, fbgemm and ATen limited to AVX2), in a subprocess",
    )
    p.add_argument(
        "--paths",
        default=None,
        metavar="P[,P]",
        help="time the same command on several kernel paths (vpopcnt, lut, generic; 'all': "
        "every path this CPU runs; with --isa avx2, those of the AVX2 profile), one subprocess "
        "each, and report them side by side",
    )
    _add_layer_arguments(p)


def _add_layer_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("single layer (instead of MODEL)")
    g.add_argument("--layer", choices=("conv3x3", "conv1x1", "linear"), help="layer kind")
    g.add_argument("--channels", type=int, default=256, help="input channels (default 256)")
    g.add_argument("--out-channels", type=int, default=None, help="default: --channels")
    g.add_argument("--stride", type=int, default=1, help="conv stride (default 1)")
    g.add_argument(
        "--wbits", type=int, default=None, help="also time the bit-serial k-bit layer (1..8)"
    )
    g.add_argument("--abits", type=int, default=None, help="activation bits of it (1..8)")


def _run_layer(args: argparse.Namespace) -> int:
    from ._bench_layer import bench_layer
    from ._common import print_json

    if args.size is not None and (len(args.size) > 2 or len(set(args.size)) != 1):
        raise ValueError("--layer takes one --size S (a square S x S input)")
    res = bench_layer(
        args.layer,
        args.channels,
        args.size[0] if args.size else 14,
        batch=args.batch,
        out_channels=args.out_channels,
        stride=args.stride,
        threads=args.threads,
        repeat=args.repeat,
        wbits=args.wbits,
        abits=args.abits,
    )
    res.update(_context())
    if args.json:
        print_json(res)
    else:
        for k, v in res.items():
            print(f"{k:>24}: {v:.4g}" if isinstance(v, float) else f"{k:>24}: {v}")
    return 0


# the environment of the AVX2 profile: numba compiles for haswell without the host's extra
# features (the name alone keeps them); PyTorch's baselines stop at AVX2: oneDNN (float conv),
# fbgemm (int8) and ATen's own vectorized kernels
AVX2_PROFILE = {
    "NUMBA_CPU_NAME": "haswell",
    "NUMBA_CPU_FEATURES": "",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}


def _in_profile(env: dict[str, str]) -> bool:
    return all(os.environ.get(k) == v for k, v in env.items())


def _without(argv: list[str], flag: str) -> list[str]:
    """argv less ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _rerun(argv: list[str], env: dict[str, str]) -> int:
    """The same bench command in a fresh interpreter with ``env`` (numba fixes its compile
    target at import, so a profile needs a new process)."""
    cmd = [sys.executable, "-m", "bcnn", *_without(argv, "--isa")]
    return subprocess.run(cmd, env={**os.environ, **env}).returncode


def _compare_paths(argv: list[str], spec: str, as_json: bool) -> int:
    """Run the command once per kernel path (BCNN_KERNEL_PATH, one process each, in turn) and
    report the results side by side, with each path's time relative to the first's."""
    from ..engine._paths import runnable_paths

    runnable = runnable_paths()
    paths = runnable if spec == "all" else [p.strip() for p in spec.split(",") if p.strip()]
    for p in paths:
        if p not in runnable:
            raise ValueError(f"--paths: {p!r} is not a kernel path this CPU runs ({runnable})")
    base = [*_without(argv, "--paths"), *([] if "--json" in argv else ["--json"])]
    results: dict[str, dict[str, object]] = {}
    for p in paths:
        env = {**os.environ, "BCNN_KERNEL_PATH": p}
        r = subprocess.run([sys.executable, "-m", "bcnn", *base], env=env, capture_output=True,
                           text=True)  # fmt: skip
        if r.returncode != 0:
            sys.stderr.write(r.stderr)
            return r.returncode
        results[p] = json.loads(r.stdout.strip().splitlines()[-1])
    key = "packed_ms" if "packed_ms" in results[paths[0]] else "binary_ms"
    first = float(results[paths[0]][key])  # type: ignore[arg-type]
    summary = {p: round(first / float(res[key]), 3) for p, res in results.items()}  # type: ignore[arg-type]
    out = {"paths": results, "figure": key, f"speed_vs_{paths[0]}": summary}
    if as_json:
        print(json.dumps(out))
    else:
        for p, res in results.items():
            print(f"{p:>8}: {key} {float(res[key]):.4f}  x{summary[p]:.2f} vs {paths[0]}")  # type: ignore[arg-type]
    return 0


def _context() -> dict[str, str]:
    """What every figure is measured on: the kernel path, the compile target's ISA, the CPU."""
    from llvmlite import binding as llvm

    from ..engine._paths import isa, kernel_path

    return {"kernel_path": kernel_path(), "isa": isa(), "cpu": llvm.get_host_cpu_name()}


def run(args: argparse.Namespace) -> int:
    argv = getattr(args, "_argv", sys.argv[1:])
    if args.isa == "avx2" and not _in_profile(AVX2_PROFILE):
        return _rerun(argv, AVX2_PROFILE)  # with --paths: every path of the AVX2 profile
    if args.paths is not None:
        return _compare_paths(argv, args.paths, args.json)
    if args.layer is not None:
        if args.model is not None:
            raise ValueError("give either MODEL or --layer, not both")
        if args.concurrency is not None:
            raise ValueError("--concurrency times a whole MODEL, not a --layer")
        return _run_layer(args)
    if args.model is None:
        raise ValueError("give a MODEL to benchmark, or --layer")
    if args.size is not None and len(args.size) not in (1, 2):
        raise ValueError("--size takes H W (or one S)")
    from ._bench_model import bench_model
    from ._common import print_json

    res = bench_model(
        args.model,
        batch=args.batch,
        threads=args.threads,
        repeat=args.repeat,
        size=(args.size[0], args.size[-1]) if args.size else None,
        concurrency=args.concurrency,
        precision=(args.weight_bits, args.act_bits, parse_layers(args.layers)),
    )
    res.update(_context())
    if args.json:
        print_json(res)
    else:
        for k, v in res.items():
            print(f"{k:>24}: {v}")
    return 0
