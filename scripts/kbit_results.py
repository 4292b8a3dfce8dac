"""Issue 6's results table: accuracy, layer speed and the run-time precision knob for k bits.

    python scripts/kbit_results.py --data imagefolder:DIR [--width 16] [--epochs 6] [--out DIR]

1. Accuracy: the same topology (bcnn_cifar, --width/--depth) and the same budget (--epochs in
   total, --seed) at W1A1, W2A2, W4A4 (two steps of epochs/2 each) and float (the float twin,
   --epochs), top-1 on the run's fixed seeded validation split (--val-split of the data).
2. Speed: one 3x3 conv, 256 channels, 14x14, batch 1, one thread: bit-serial W1A1..W4A4 and
   W8A8 vs PyTorch float and int8 (fbgemm/x86), each measured in the same run (bcnn bench).
3. The knob: the trained W4A4 model, packed, with set_precision(weight_bits=4, 3, 2, 1):
   validation top-1 and batch-1 latency of the packed engine.

Writes OUT/kbit_results.json and prints a markdown table (README and docs/kbit.md quote it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

VARIANTS = {"W1A1": (1, 1), "W2A2": (2, 2), "W4A4": (4, 4), "float": None}
LAYER_BITS = [(1, 1), (1, 2), (2, 2), (2, 4), (4, 4), (8, 8)]


def _val(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    from bcnn.data import load_dataset

    ds = load_dataset(args.data, "val", val_split=args.val_split, seed=args.seed)
    return ds.images.numpy(), ds.labels.numpy()


def _train(args: argparse.Namespace, name: str, bits: tuple[int, int] | None) -> dict[str, Any]:
    from bcnn.models import load_checkpoint
    from bcnn.train import TrainConfig, train

    out = Path(args.out) / name
    kw: dict[str, Any] = {"width": args.width, "depth": args.depth}
    if bits is not None:
        kw.update(weight_bits=bits[0], act_bits=bits[1])
    final = out / "final.pt"
    t0 = time.perf_counter()
    if not final.is_file():
        cfg = TrainConfig(
            model="bcnn_cifar",
            data=args.data,
            out=str(out),
            steps="float" if bits is None else "1,2",
            epochs=args.epochs if bits is None else max(1, args.epochs // 2),
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            val_split=args.val_split,
            amp=args.amp,
            model_kw=kw,
            quiet=True,
            resume=out.exists(),
        )
        train(cfg)
    model, _ = load_checkpoint(final)
    x, y = _val(args)
    with torch.no_grad():  # float32, no autocast: the exact graph the packed engine reproduces
        pred = torch.cat(
            [model(torch.from_numpy(x[i : i + 256])).argmax(1) for i in range(0, len(x), 256)]
        )
    return {
        "variant": name,
        "val_top1": float((pred.numpy() == y).mean()),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "model_kw": kw,
    }


def _layer_speed(repeat: int) -> list[dict[str, Any]]:
    from bcnn._commands._bench_layer import bench_layer

    rows = []
    for w, a in LAYER_BITS:
        r = bench_layer("conv3x3", 256, 14, batch=1, threads=1, repeat=repeat, wbits=w, abits=a)
        rows.append(
            {
                "bits": f"W{w}A{a}",
                **{k: r[k] for k in r if k.endswith(("_ms", "_vs_float", "_vs_int8"))},
            }
        )
    return rows


def _knob(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bcnn.engine import load_any

    final = Path(args.out) / "W4A4" / "final.pt"
    packed = load_any(str(final))
    x, y = _val(args)
    one = x[:1]
    rows = []
    for k in (4, 3, 2, 1):
        packed.set_precision(weight_bits=k)
        pred = np.concatenate([packed(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
        packed(one)
        ts = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            packed(one)
            ts.append((time.perf_counter() - t0) * 1e3)
        rows.append(
            {
                "weight_bits": k,
                "val_top1": float((pred == y).mean()),
                "batch1_ms": float(np.median(ts)),
            }
        )
    packed.set_precision(weight_bits=None)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", required=True, help="e.g. imagefolder:~/.cache/bcnn/cifar10-jpeg/train"
    )
    ap.add_argument("--out", default="runs/kbit")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=6, help="total per variant")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-split", type=float, default=0.1)
    ap.add_argument("--amp", default="on", help="bf16 autocast on CPU (on|off)")
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()

    import platform

    res: dict[str, Any] = {
        "args": vars(args),
        "machine": platform.processor() or platform.machine(),
    }
    res["accuracy"] = [_train(args, n, b) for n, b in VARIANTS.items()]
    res["layer_speed"] = _layer_speed(args.repeat)
    res["knob"] = _knob(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kbit_results.json").write_text(json.dumps(res, indent=1))

    print(
        f"accuracy: bcnn_cifar width={args.width} depth={args.depth}, {args.epochs} epochs, "
        f"seeded {args.val_split:.0%} validation split of {args.data}"
    )
    print("| variant | val top-1 | train s |\n|---|---|---|")
    for r in res["accuracy"]:
        print(f"| {r['variant']} | {r['val_top1']:.4f} | {r['train_seconds']} |")
    print("\nconv3x3 256ch 14x14 batch 1, 1 thread")
    print("| bits | ms | vs float | vs int8 |\n|---|---|---|---|")
    for r in res["layer_speed"]:
        sf, si = r["bitserial_speedup_vs_float"], r["bitserial_speedup_vs_int8"]
        print(f"| {r['bits']} | {r['bitserial_ms']:.3f} | {sf:.2f}x | {si:.2f}x |")
    print("\nW4A4 model, packed, set_precision(weight_bits=k)")
    print("| k | val top-1 | batch-1 ms |\n|---|---|---|")
    for r in res["knob"]:
        print(f"| {r['weight_bits']} | {r['val_top1']:.4f} | {r['batch1_ms']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
