"""Issue 11's comparison: one any-precision BCNN against dedicated models, same budget.

    python scripts/any_precision_results.py --data imagefolder:DIR [--width 16] [--depth 1]
        [--epochs 8] [--float-epochs 4] [--precisions 1 2 3 4] [--out runs/ap] [--json F]

All models are ``bcnn_cifar`` (--width/--depth) on the run's fixed seeded validation split:

* a float twin, trained once (--float-epochs): the shared initialisation;
* the any-precision model (precisions --precisions, transitional batch norm, the Bit-Mixer
  schedule, --distill optional): --epochs epochs of step 2 from the float twin;
* dedicated WkAk models for k in --dedicated: --epochs epochs of step 2 from the same float
  twin (k = 1: the binary BCNN; k > 1: k-bit LSQ weights and activations);
* the negative control: today's run-time knob on the dedicated W4A4 model, its top weight
  planes kept (its activations stay at 4 bits).

Validation top-1 in float32 torch for each (the packed engine gives the same logits).
Training seconds come from each run's metrics.csv. Finished runs are reused.

With --latency (run it on a quiet machine): every model is also packed and timed at batch 1,
one thread, on the packed engine (the float twin in PyTorch fp32), all rows interleaved round
by round (medians); and per-layer mixes of the any-precision model are searched for latency
budgets 1/4, 1/2 and 3/4 of the way from its lowest to its highest uniform precision
(``search_precision`` with the packed engine's ``latency_model``; the search scores candidates
on --search-images validation images drawn at random, seed 0; the table reports all of
them). --plot writes
accuracy vs latency as a PNG.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch
from _ap import searched_mixes, time_all, top1
from _runs import run_config, train_cached


def _latency(args: Any, rows: list[dict[str, Any]], targets: list[Any], model: Any,
             packed: Any, secs: float, x: Any, y: Any) -> None:  # fmt: skip
    """Time every row; add searched mixes of the any-precision model (``searched_mixes``)."""
    for mix in searched_mixes(model, packed, x, y, args.search_images, args.repeat):
        rows.append({"model": "any-precision, searched mix", "train_seconds": secs, **mix})
        targets.append(
            ("packed", packed, {"layers": {k: tuple(v) for k, v in mix["layers"].items()}})
        )
    for r, ms in zip(rows, time_all(targets, x, args.repeat), strict=True):
        r["latency_ms"] = round(ms, 4)


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    style = {"any-precision": "o-", "any-precision, searched mix": "D",
             "dedicated": "s", "W4A4, top planes kept": "x--", "float twin": "*"}  # fmt: skip
    for name, fmt in style.items():
        pts = [(r["latency_ms"], 100 * r["val_top1"], r["bits"]) for r in rows
               if r["model"] == name]  # fmt: skip
        if not pts:
            continue
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], fmt, label=name)
        if name != "any-precision, searched mix":
            for lx, ly, b in pts:
                ax.annotate(b, (lx, ly), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 latency, ms (packed engine; float twin: PyTorch fp32), 1 thread")
    ax.set_ylabel("validation top-1, %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="runs/ap")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=8, help="step-2 epochs of every model")
    ap.add_argument("--float-epochs", type=int, default=4)
    ap.add_argument("--precisions", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--dedicated", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--schedule", default="bitmixer")
    ap.add_argument("--bn", default="transitional", choices=["transitional", "switchable"])
    ap.add_argument("--distill", action="store_true")
    ap.add_argument("--joint", action="store_true", help="every precision each iteration")
    ap.add_argument(
        "--loss-weights", nargs="*", default=[], metavar="BITS=W",
        help="--joint: weigh a precision's loss, e.g. 4=2 1=0.5 (others 1)",
    )  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-split", type=float, default=0.1)
    ap.add_argument("--amp", default="on", help="bf16 autocast on CPU (on|off)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--latency", action="store_true", help="time every row (quiet machine!)")
    ap.add_argument("--repeat", type=int, default=40, help="timed rounds (--latency)")
    ap.add_argument("--search-images", type=int, default=1000)
    ap.add_argument("--plot", default=None, help="PNG of accuracy vs latency (--latency)")
    args = ap.parse_args()

    from bcnn.data import load_dataset
    from bcnn.engine import pack
    from bcnn.models import load_checkpoint
    from bcnn.quant import set_precision

    root = Path(args.out)
    kw = {"width": args.width, "depth": args.depth}
    flt = run_config(args, root / "float", steps="float", epochs=args.float_epochs, model_kw=kw)
    rows: list[dict[str, Any]] = []
    secs = train_cached("float twin", flt)
    init = f"{flt.out}/final.pt"
    ds = load_dataset(args.data, "val", val_split=args.val_split, seed=args.seed)
    x, y = ds.images, ds.labels
    m, _ = load_checkpoint(init)
    rows.append({"model": "float twin", "bits": "fp32", "val_top1": top1(m, x, y),
                 "train_seconds": secs})  # fmt: skip
    targets: list[Any] = [("torch", m.eval())]  # what --latency times, row by row

    ps = sorted(set(args.precisions))
    tag = f"{'_joint' if args.joint else ''}{'_kd' if args.distill else ''}"
    tag += "" if args.schedule == "bitmixer" else f"_{args.schedule}"  # its own run
    weights = {int(k): float(v) for k, v in (w.split("=") for w in args.loss_weights)}
    tag += "".join(f"_w{k}x{v:g}" for k, v in sorted(weights.items()))  # e.g. _w4x2
    any_cfg = run_config(
        args, root / f"any_{args.bn}{tag}",
        steps="2", epochs=args.epochs, init=init, ap_schedule=args.schedule,
        ap_distill=args.distill, ap_joint=args.joint, ap_loss_weights=weights,
        model_kw={**kw, "precisions": ps, "precision_bn": args.bn},
    )  # fmt: skip
    secs = train_cached("any-precision", any_cfg)
    m, _ = load_checkpoint(Path(any_cfg.out) / "final.pt")
    any_model, any_secs = m, secs
    any_packed = pack(m) if args.latency else None
    for k in ps:
        set_precision(m, weight_bits=k, act_bits=k)
        rows.append({"model": "any-precision", "bits": f"W{k}A{k}",
                     "val_top1": top1(m, x, y), "train_seconds": secs})  # fmt: skip
        targets.append(("packed", any_packed, {"weight_bits": k, "act_bits": k}))

    for k in args.dedicated:
        extra = {} if k == 1 else {"weight_bits": k, "act_bits": k}
        cfg = run_config(
            args, root / f"W{k}A{k}", steps="2", epochs=args.epochs, init=init,
            model_kw={**kw, **extra},
        )  # fmt: skip
        secs = train_cached(f"dedicated W{k}A{k}", cfg)
        m, _ = load_checkpoint(Path(cfg.out) / "final.pt")
        rows.append({"model": "dedicated", "bits": f"W{k}A{k}", "val_top1": top1(m, x, y),
                     "train_seconds": secs})  # fmt: skip
        ded = pack(m.eval()) if args.latency else None
        targets.append(("packed", ded, {}))
        if k == 4:  # the negative control: drop weight planes of the dedicated W4A4 model
            for kb in (3, 2, 1):
                set_precision(m, weight_bits=kb)
                rows.append({"model": "W4A4, top planes kept", "bits": f"W{kb}A4",
                             "val_top1": top1(m, x, y), "train_seconds": secs})  # fmt: skip
                targets.append(("packed", ded, {"weight_bits": kb}))

    if args.latency:
        _latency(args, rows, targets, any_model, any_packed, any_secs, x, y)

    res = {"args": vars(args), "machine": platform.processor() or platform.machine(),
           "torch_threads": torch.get_num_threads(), "rows": rows}  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=1)
    (root / "any_precision_results.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text)
    print(
        f"bcnn_cifar width={args.width} depth={args.depth}; step 2: {args.epochs} epochs from a "
        f"float twin of {args.float_epochs}; top-1 on the seeded {args.val_split:.0%} "
        f"validation split of {args.data}"
    )
    lat = "latency_ms" in rows[0]
    print("| model | bits | val top-1 |" + (" batch-1 ms |" if lat else "") + " train s |")
    print("|---|---|---|" + ("---|" if lat else "") + "---|")
    for r in rows:
        acc, secs = 100 * r["val_top1"], r["train_seconds"]
        ms = f" {r['latency_ms']:.3f} |" if lat else ""
        print(f"| {r['model']} | {r['bits']} | {acc:.2f}% |{ms} {secs:.0f} |")
    if args.plot and lat:
        _plot(rows, args.plot)


if __name__ == "__main__":
    main()
