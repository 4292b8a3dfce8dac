"""Average the weights of any-precision checkpoints from one lineage (a "model soup") and measure
every uniform view's validation top-1 (an ablation; writes a checkpoint only with --out).

    python scripts/any_soup.py A.pt B.pt [C.pt ...] [--weights 0.5 0.5] [--out soup.pt]

The checkpoints must be the same architecture, each a fine-tune of the one before (a soup of
unrelated runs is meaningless). Every floating-point tensor of the state dict -- latent
weights, quantizer steps, every batch-norm set's affine parameters and running statistics --
becomes the weighted mean; integer tensors (batch counters, flags) are taken from the first
checkpoint. Top-1 is measured in torch (float32) on the first checkpoint's seeded validation
split at every uniform precision WkAk. One JSON line per view; ``--json`` writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _ap import top1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--weights", type=float, nargs="*", default=None, help="default: equal")
    ap.add_argument("--data", default="imagefolder:~/.cache/bcnn/cifar10-jpeg/train")
    ap.add_argument("--out", type=Path, default=None, help="save the averaged checkpoint here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n = len(args.checkpoints)
    w = args.weights or [1.0 / n] * n
    if len(w) != n or any(x < 0 for x in w) or abs(sum(w) - 1) > 1e-6:
        ap.error(f"--weights: {n} non-negative numbers summing to 1 expected, got {w}")

    from bcnn.data import load_dataset
    from bcnn.models import load_checkpoint, save_checkpoint
    from bcnn.quant import set_precision

    loaded = [load_checkpoint(p) for p in args.checkpoints]
    model, meta = loaded[0]
    if not getattr(model, "precisions", None):
        ap.error(f"{args.checkpoints[0]}: not an any-precision model")
    sds = [m.state_dict() for m, _ in loaded]
    for p, sd in zip(args.checkpoints[1:], sds[1:], strict=True):
        if sd.keys() != sds[0].keys() or any(sd[k].shape != v.shape for k, v in sds[0].items()):
            ap.error(f"{p}: not the architecture of {args.checkpoints[0]}")
    soup = {
        k: sum(wi * sd[k].double() for wi, sd in zip(w, sds, strict=True)).to(v.dtype)
        if v.is_floating_point()
        else v
        for k, v in sds[0].items()
    }
    model.load_state_dict(soup)
    if args.out is not None:
        save_checkpoint(args.out, model, {**meta, "soup": list(args.checkpoints), "weights": w})

    val = load_dataset(args.data, "val", val_split=meta["val_split"], seed=meta["seed"])
    rows = []
    for k in model.precisions:
        t0 = time.perf_counter()
        set_precision(model, weight_bits=k, act_bits=k)
        row = {
            "bits": f"W{k}A{k}",
            "val_top1": top1(model, val.images, val.labels),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    set_precision(model)
    if args.json is not None:
        out = {"checkpoints": args.checkpoints, "weights": w, "rows": rows}
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
