"""bcnn search-precision MODEL (--budget-bits B | --budget-ms T) [--data SPEC] [--limit N]
[--json]"""

from __future__ import annotations

import argparse
from typing import Any

HELP = (
    "per-layer bit widths of a precision-switchable checkpoint (any-precision, k-bit) within "
    "an average-weight-bits or a packed batch-1 latency budget, chosen greedily on the "
    "validation split, no fine-tuning"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="a torch checkpoint (.pt) of a precision-switchable model, or a pretrained name",
    )
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument(
        "--budget-bits",
        type=float,
        help="average weight bits, weighted by each layer's weight count",
    )
    b.add_argument(
        "--budget-ms",
        type=float,
        help="batch-1 latency of the packed engine (ms, --threads threads), measured here "
        "(any-precision models)",
    )
    p.add_argument("--threads", type=int, default=1, help="engine threads for --budget-ms")
    p.add_argument("--data", help="data spec (default: the one the model was trained on)")
    p.add_argument(
        "--limit",
        type=int,
        default=2000,
        help="validation images used, a seeded random sample (0: all)",
    )
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def sample(ds: Any, n: int, seed: int = 0) -> Any:
    """``n`` images of ``ds`` drawn at random (seeded; all when n >= len): a split is stored in
    class order, so its first images would be one or two classes."""
    if n >= len(ds):
        return ds
    import numpy as np

    return ds.subset(np.sort(np.random.default_rng(seed).permutation(len(ds))[:n]))


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from ..data import Loader, load_dataset
    from ..models import load_checkpoint
    from ..quant import average_bits, search_precision, set_precision
    from ._common import print_json

    if args.batch_size < 1 or args.limit < 0:
        raise ValueError("--batch-size must be >= 1 and --limit >= 0")
    model, meta = load_checkpoint(_checkpoint(args.model))
    lat = packed = None
    if args.budget_ms is not None:  # time the packed model first, on a quiet process
        from ..engine import latency_model, num_threads, pack

        if not getattr(model, "precisions", None):
            raise ValueError("--budget-ms: not an any-precision model (use --budget-bits)")
        packed = pack(model)
        with num_threads(args.threads):
            lat = latency_model(packed)
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
    ds = sample(ds, n)
    xs, ys, got = [], [], 0  # the n images, decoded once (the search evaluates often)
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
    if lat is None:
        plan, acc = search_precision(model, top1, None, args.budget_bits)
        reached, unit, budget = average_bits(model), "bits", args.budget_bits
    else:
        plan, acc = search_precision(model, top1, None, cost=lat, budget=args.budget_ms)
        reached, unit, budget = lat(plan), "ms", args.budget_ms
    if reached > budget + 1e-9:
        raise ValueError(
            f"no trained mix reaches {budget:g} {unit} (stopped at {reached:.3f}: the lower "
            "per-layer mixes need batch-norm sets that training never visited)"
        )
    res: dict[str, Any] = {
        "model": str(args.model),
        "data": str(data),
        "n": n,
        "budget_bits": args.budget_bits,
        "average_bits": round(average_bits(model), 4),
        "top1": acc,
        "top1_default": full,
        "layers": {k: list(v) for k, v in plan.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if lat is not None and packed is not None:
        from ..engine import measure_ms, num_threads

        torch.set_num_threads(1)  # torch's idle threads must not spin beside the timing
        with num_threads(args.threads):
            ms, ms_top = measure_ms(packed, plan), measure_ms(packed, {})
        res.update(
            budget_ms=args.budget_ms,
            predicted_ms=round(lat(plan), 4),
            latency_ms=round(ms, 4),
            latency_ms_default=round(ms_top, 4),
            threads=args.threads,
        )
    if args.json:
        print_json(res)
        return 0
    print(f"{args.model}: {n} validation images of {data}")
    print(f"default precision: top1 {full:.4f}")
    if lat is None:
        print(
            f"budget {args.budget_bits:g} bits: average {res['average_bits']:.3f} bits, "
            f"top1 {acc:.4f} ({res['seconds']:.1f}s)"
        )
    else:
        print(
            f"budget {args.budget_ms:g} ms: packed batch-1 {res['latency_ms']:.3f} ms "
            f"(predicted {res['predicted_ms']:.3f}; all layers at the highest "
            f"{res['latency_ms_default']:.3f} ms), average {res['average_bits']:.3f} weight "
            f"bits, top1 {acc:.4f} ({res['seconds']:.1f}s)"
        )
    for name, (w, a) in plan.items():
        print(f"  {name}: W{w}A{a}")
    return 0


def _checkpoint(spec: str) -> str:
    """A checkpoint path, or a pretrained name's shipped torch checkpoint."""
    from pathlib import Path

    from ..models import pretrained_checkpoint

    if Path(spec).exists():
        return spec
    shipped = pretrained_checkpoint(spec)
    return str(shipped) if shipped is not None else spec
