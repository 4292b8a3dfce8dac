"""bcnn summary NAME_OR_CHECKPOINT [--json]"""

from __future__ import annotations

import argparse

HELP = "per-layer precision, parameters, MACs and packed size of a model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a registered model name or a checkpoint (.pt)")
    p.add_argument("--num-classes", type=int, default=None, help="for a model name")
    p.add_argument(
        "--input-size", type=int, nargs=3, metavar=("C", "H", "W"), help="default: the model's"
    )
    p.add_argument("--float", action="store_true", help="summarise the float twin of a name")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from .. import summary
    from ._common import load_torch_model, print_json

    kw = {"binary": not args.float}
    if args.num_classes is not None:
        kw["num_classes"] = args.num_classes
    model, _ = load_torch_model(args.model, **kw)
    s = summary(model, tuple(args.input_size) if args.input_size else None)
    if args.json:
        print_json(s.to_dict())
    else:
        print(s)
    return 0
