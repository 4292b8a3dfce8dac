"""bcnn search-precision MODEL --budget-bits B [--data SPEC] [--limit N] [--json]"""

from __future__ import annotations

import argparse
from typing import Any

HELP = (
    "per-layer bit widths of a precision-switchable checkpoint (any-precision, k-bit) within "
    "an average-weight-bits budget, chosen greedily on the validation split, no fine-tuning"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a torch checkpoint (.pt) of a precision-switchable model")
    p.add_argument(
        "--budget-bits",
        type=float,
        required=True,
        help="average weight bits, weighted by each layer's weight count",
    )
    p.add_argument("--data", help="data spec (default: the one the model was trained on)")
    p.add_argument("--limit", type=int, default=2000, help="validation images used (0: all)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from ..data import Loader, load_dataset
    from ..models import load_checkpoint
    from ..quant import average_bits, search_precision, set_precision
    from ._common import print_json

    if args.batch_size < 1 or args.limit < 0:
        raise ValueError("--batch-size must be >= 1 and --limit >= 0")
    model, meta = load_checkpoint(args.model)
    data = args.data or meta.get("data")
    if not data:
        raise ValueError("no --data given and the model does not record its data spec")
    ds = load_dataset(
        data, "val", float(meta.get("val_split", 0.1)), int(meta.get("seed", 0)),
        image_size=meta.get("image_size"),
    )  # fmt: skip
    n = len(ds) if args.limit == 0 else min(args.limit, len(ds))
    if n == 0:
        raise ValueError(f"the validation split of {data} is empty")
    xs, ys, got = [], [], 0  # the first n images, decoded once (the search evaluates often)
    for xb, yb in Loader(ds, args.batch_size, train=False, workers=0):
        xs.append(xb[: n - got])
        ys.append(yb[: n - got])
        got += len(xs[-1])
        if got >= n:
            break
    x, y = torch.cat(xs), torch.cat(ys)

    @torch.no_grad()
    def top1(m: Any, _: Any) -> float:
        m.eval()
        c = sum(
            int((m(x[i : i + args.batch_size]).argmax(1) == y[i : i + args.batch_size]).sum())
            for i in range(0, n, args.batch_size)
        )
        return c / n

    set_precision(model)
    full = top1(model, None)
    t0 = time.perf_counter()
    plan, acc = search_precision(model, top1, None, args.budget_bits)
    avg = average_bits(model)
    if avg > args.budget_bits + 1e-9:
        raise ValueError(
            f"no trained mix reaches {args.budget_bits:g} bits (stopped at {avg:.3f}: the "
            "lower per-layer mixes need batch-norm sets that training never visited)"
        )
    res = {
        "model": str(args.model),
        "data": str(data),
        "n": n,
        "budget_bits": args.budget_bits,
        "average_bits": round(avg, 4),
        "top1": acc,
        "top1_default": full,
        "layers": {k: list(v) for k, v in plan.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if args.json:
        print_json(res)
        return 0
    print(f"{args.model}: {n} validation images of {data}")
    print(f"default precision: top1 {full:.4f}")
    print(
        f"budget {args.budget_bits:g} bits: average {res['average_bits']:.3f} bits, "
        f"top1 {acc:.4f} ({res['seconds']:.1f}s)"
    )
    for name, (w, a) in plan.items():
        print(f"  {name}: W{w}A{a}")
    return 0
