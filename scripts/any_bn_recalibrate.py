"""Re-estimate an any-precision model's batch-norm statistics after training, per uniform
precision, and compare validation top-1 before and after (an ablation: not part of any recipe).

    python scripts/any_bn_recalibrate.py runs/bcnn_cifar10_any_polish2/final.pt [--images 10000]

For each uniform precision WkAk: the batch-norm sets that precision uses (one per BN site) get
their running statistics reset and recomputed as cumulative averages over ``--images``
training-split images (drawn at random with ``--seed``, float32, no augmentation, no
gradients), as AdaBits / Any-Precision DNN calibrate theirs. Top-1 (torch, float32) is measured
on the checkpoint's own seeded validation split, before and after. Prints one JSON line per
precision and, with ``--json``, writes them to a file. Nothing is saved back to the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _ap import top1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="imagefolder:~/.cache/bcnn/cifar10-jpeg/train")
    ap.add_argument("--images", type=int, default=10000, help="calibration images (train split)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0, help="draws the calibration images")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.images < 1 or args.batch_size < 1:
        ap.error("--images and --batch-size must be positive")

    from bcnn.data import load_dataset
    from bcnn.models import load_checkpoint
    from bcnn.nn import SwitchableBatchNorm
    from bcnn.quant import set_precision

    model, meta = load_checkpoint(args.checkpoint)
    if not getattr(model, "precisions", None):
        ap.error(f"{args.checkpoint}: not an any-precision model")
    split = {"val_split": meta["val_split"], "seed": meta["seed"]}
    val = load_dataset(args.data, "val", **split)
    train = load_dataset(args.data, "train", **split)
    g = torch.Generator().manual_seed(args.seed)
    xc = train.images[torch.randperm(len(train.images), generator=g)[: args.images]]

    rows = []
    for k in model.precisions:
        t0 = time.perf_counter()
        set_precision(model, weight_bits=k, act_bits=k)
        before = top1(model, val.images, val.labels)
        bns = [m.active() for m in model.modules() if isinstance(m, SwitchableBatchNorm)]
        momenta = [b.momentum for b in bns]
        for b in bns:
            b.reset_running_stats()
            b.momentum = None  # cumulative average
        model.train()
        with torch.no_grad():
            for i in range(0, len(xc), args.batch_size):
                model(xc[i : i + args.batch_size])
        for b, m in zip(bns, momenta, strict=True):
            b.momentum = m
        after = top1(model, val.images, val.labels)
        row = {
            "bits": f"W{k}A{k}",
            "val_top1_before": before,
            "val_top1_after": after,
            "calibration_images": len(xc),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    set_precision(model)
    if args.json is not None:
        args.json.write_text(json.dumps({"checkpoint": args.checkpoint, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
