"""bcnn bench MODEL [--batch N] [--threads T] [--json]"""

from __future__ import annotations

import argparse

HELP = "time a whole model: packed engine vs its float twin and the binary model in PyTorch"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a registered model name (random weights), checkpoint or .bcnn")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="threads for both engines (default 1)")
    p.add_argument("--repeat", type=int, default=30, help="timed runs (median reported)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from ._bench_model import bench_model
    from ._common import print_json

    res = bench_model(
        args.model,
        batch=args.batch,
        threads=args.threads,
        repeat=args.repeat,
        size=tuple(args.size) if args.size else None,
    )
    if args.json:
        print_json(res)
    else:
        for k, v in res.items():
            print(f"{k:>24}: {v}")
    return 0
