"""Check that the packed engine reproduces the torch model on a data split.

    python scripts/check_packed.py CHECKPOINT MODEL.bcnn [--data digits] [--split val]

Runs the checkpoint in PyTorch (eval mode) and the .bcnn file with the XOR-popcount engine on
every image of the split; prints one JSON line (max |logit difference|, argmax agreement, top-1
of both) and exits 1 unless the logits agree (rtol 1e-4, atol 1e-3) with identical argmax.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from bcnn.data import load_dataset
from bcnn.engine import load
from bcnn.models import load_checkpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("packed")
    ap.add_argument("--data", default=None, help="default: the checkpoint's training data")
    ap.add_argument("--split", default="val")
    args = ap.parse_args()

    model, meta = load_checkpoint(args.checkpoint)
    packed = load(args.packed)
    ds = load_dataset(
        args.data or meta.get("data", "digits"),
        args.split,
        val_split=meta.get("val_split", 0.1),
        seed=meta.get("seed", 0),
    )
    x = ds.images.numpy()
    y = ds.labels.numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = packed(x)
    same_argmax = bool((ref.argmax(1) == out.argmax(1)).all())
    close = bool(np.allclose(out, ref, rtol=1e-4, atol=1e-3))
    report = {
        "n": len(y),
        "max_abs_diff": float(np.abs(out - ref).max()),
        "argmax_identical": same_argmax,
        "top1_torch": float((ref.argmax(1) == y).mean()),
        "top1_packed": float((out.argmax(1) == y).mean()),
        "exact": close and same_argmax,
    }
    print(json.dumps(report))
    return 0 if report["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
