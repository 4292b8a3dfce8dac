"""bcnn bench MODEL [--batch N] [--threads T] [--concurrency T] [--json]
bcnn bench --layer conv3x3|conv1x1|linear --channels C --size S [--batch N] [--threads T]
           [--wbits W --abits A] [--json]"""

from __future__ import annotations

import argparse

HELP = (
    "time a whole model (packed engine vs its float twin and the binary model in PyTorch), "
    "or one layer with --layer (binary vs float vs int8)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", help="a registered model name (random weights), checkpoint or .bcnn"
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="threads for both engines (default 1)")
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
    if args.json:
        print_json(res)
    else:
        for k, v in res.items():
            print(f"{k:>24}: {v:.4g}" if isinstance(v, float) else f"{k:>24}: {v}")
    return 0


def run(args: argparse.Namespace) -> int:
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
    )
    if args.json:
        print_json(res)
    else:
        for k, v in res.items():
            print(f"{k:>24}: {v}")
    return 0
