"""Issue 12's results: BSQ at several alphas vs uniform-precision models, same budget.

    python scripts/bsq_results.py --data imagefolder:DIR [--width 16] [--epochs 6] [--out DIR]
        [--alphas 0.3 1 3] [--uniform 2 3 4] [--bsq-bits 4] [--bsq-finetune 2]
        [--bsq-finetune-mode weights|bits] [--bsq-grid zero|odd] [--plot docs/results/bsq.png]

Every model is ``bcnn_cifar`` (--width/--depth) with 4-bit activations (--act-bits), trained
for --epochs epochs in total on the run's fixed seeded validation split:

* uniform WkA4: k-bit LSQ weights, two steps of epochs/2 (as scripts/kbit_results.py);
  with --paired, step 2 only (the rest of --epochs), from BSQ's step 1, so that the models
  of one seed differ only after their shared step 1;
* BSQ alpha: step 1 (float weights, 4-bit activations; trained once, shared by every
  alpha), then the BSQ stage (--bsq-epochs, from --bsq-bits bits) and --bsq-finetune epochs
  of fine-tuning with the scheme frozen (--bsq-finetune-mode); step 1 gets the rest of
  --epochs (by default epochs/2: the BSQ stage and the fine-tuning share the second half).

For each: validation top-1 (float32 torch; the packed model is checked to give the same
logits), average weight bits as stored (BSQ: sign + N magnitude bits per weight on the zero
grid, k on the odd grid; uniform: k),
each layer's bits, and the packed engine's batch-1 latency (one thread, median of --repeat;
all models timed in the same run, after training). Writes OUT/bsq_results.json, prints the
tables, and draws accuracy vs bits and vs latency (--plot).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _runs import run_config, train_cached


def _val(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    from bcnn.data import load_dataset

    ds = load_dataset(args.data, "val", val_split=args.val_split, seed=args.seed)
    return ds.images.numpy(), ds.labels.numpy()


def _measure(args: argparse.Namespace, name: str, final: Path) -> dict[str, Any]:
    from bcnn import summary
    from bcnn.engine import pack
    from bcnn.models import load_checkpoint

    model, _ = load_checkpoint(final)
    x, y = _val(args)
    with torch.no_grad():  # float32, no autocast: the graph the packed engine reproduces
        logits = torch.cat([model(torch.from_numpy(x[i : i + 500])) for i in range(0, len(x), 500)])
    packed = pack(model)
    plog = np.concatenate([packed(x[i : i + 500]) for i in range(0, len(x), 500)])
    s = summary(model).to_dict()
    layers = {r["name"]: r["weight_bits"] for r in s["layers"] if r["weight_bits"] is not None}
    return {
        "model": name,
        "val_top1": float((logits.argmax(1).numpy() == y).mean()),
        "packed_equals_torch": bool(np.array_equal(plog, logits.numpy())),
        "max_abs_diff": float(np.abs(plog - logits.numpy()).max()),
        "avg_weight_bits": s["avg_weight_bits"],
        "layer_weight_bits": layers,
        "bsq_bits": {r["name"]: r["bsq_bits"] for r in s["layers"] if r["bsq_bits"] is not None},
        "packed": packed,
    }


def _latencies(models: list[Any], x: np.ndarray, repeat: int, rounds: int = 5) -> list[float]:
    """Batch-1 latency (ms, one thread) of each packed model: ``rounds`` round-robin rounds of
    repeat/rounds calls each (so drifting host load hits every model alike), the median of
    the round medians."""
    from bcnn.engine import num_threads

    one = x[:1]
    per = max(1, repeat // rounds)
    meds: list[list[float]] = [[] for _ in models]
    with num_threads(1):
        for m in models:
            for _ in range(5):
                m(one)
        for _ in range(rounds):
            for i, m in enumerate(models):
                ts = []
                for _ in range(per):
                    t0 = time.perf_counter()
                    m(one)
                    ts.append((time.perf_counter() - t0) * 1e3)
                meds[i].append(float(np.median(ts)))
    return [float(np.median(v)) for v in meds]


def _means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one model trained with several seeds (names suffixed _tN) -> one row each: the
    mean top-1, bits and latency, and each seed's top-1."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(re.sub(r"_t\d+$", "", r["model"]), []).append(r)
    out = []
    for name, rs in groups.items():
        out.append(
            {
                "model": name,
                "kind": rs[0]["kind"],
                "seeds": len(rs),
                "val_top1_each": [r["val_top1"] for r in rs],
                **{
                    k: float(np.mean([r[k] for r in rs]))
                    for k in ("val_top1", "avg_weight_bits", "batch1_ms")
                },
            }
        )
    return out


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "avg_weight_bits", "average weight bits (stored)"),
        (axes[1], "batch1_ms", "packed batch-1 latency, 1 thread (ms)"),
    ):
        for kind, marker in (("uniform", "s"), ("bsq", "o")):
            pts = sorted(
                (r[key], 100 * r["val_top1"], r["model"]) for r in rows if r["kind"] == kind
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=kind)
            for px, py, name in pts:
                ax.annotate(name, (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("validation top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", required=True, help="e.g. imagefolder:~/.cache/bcnn/cifar10-jpeg/train"
    )
    ap.add_argument("--out", default="runs/bsq")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--act-bits", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=6, help="total per model")
    ap.add_argument("--uniform", type=int, nargs="*", default=[2, 3, 4], help="weight bits")
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.01, 0.02, 0.05])
    ap.add_argument("--bsq-bits", type=int, default=4, help="BSQ starting precision N")
    ap.add_argument("--bsq-lr", type=float, default=0.5)
    ap.add_argument("--bsq-optimizer", default="sgd", choices=["sgd", "adam"])
    ap.add_argument("--bsq-interval", type=float, default=0.25)
    ap.add_argument("--bsq-finetune", type=int, default=2, help="fine-tuning epochs (default 2)")
    ap.add_argument(
        "--bsq-epochs", type=int, default=None,
        help="BSQ stage epochs (default: the second half's epochs less the fine-tuning); "
        "step 1 gets the rest of --epochs",
    )  # fmt: skip
    ap.add_argument("--bsq-finetune-mode", default="weights", choices=["bits", "weights"])
    ap.add_argument(
        "--bsq-grid", default="zero", choices=["zero", "odd"],
        help="BSQ's sign-magnitude grid (zero) or the engine's odd grid (--bsq-bits = its width)",
    )  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0, help="the split's (and the runs') seed")
    ap.add_argument(
        "--train-seeds", type=int, nargs="*", default=[],
        help="also train every model with these seeds on --seed's split (run directories "
        "suffixed _tN; the table adds the mean over seeds)",
    )  # fmt: skip
    ap.add_argument(
        "--paired", action="store_true",
        help="the uniform models also start from BSQ's shared step 1 (step 2 only, the same "
        "epochs as BSQ's stage + fine-tuning): every model of a seed shares one step 1",
    )  # fmt: skip
    ap.add_argument("--val-split", type=float, default=0.1)
    ap.add_argument("--amp", default="on", help="bf16 autocast on CPU (on|off)")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--plot", default=None, help="write the figure here (PNG)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.epochs < 4 or args.epochs % 2:
        ap.error("--epochs must be even and >= 4 (two halves)")
    half = args.epochs // 2
    bsq_epochs = half - args.bsq_finetune if args.bsq_epochs is None else args.bsq_epochs
    step1_epochs = args.epochs - bsq_epochs - args.bsq_finetune
    if bsq_epochs < 1 or args.bsq_finetune < 1 or step1_epochs < 1:
        ap.error("step 1, the BSQ stage and the fine-tuning need >= 1 of --epochs each")

    root = Path(args.out)
    kw = {"width": args.width, "depth": args.depth, "act_bits": args.act_bits}
    runs: list[tuple[str, str, Any, Any]] = []  # (name, kind, config, BSQ's step 1 config)
    for seed in [args.seed, *args.train_seeds]:
        ts = "" if seed == args.seed else f"_t{seed}"  # another training seed, same split
        sk = {} if seed == args.seed else {"seed": seed, "split_seed": args.seed}
        s1 = ("bsq_step1" if step1_epochs == half else f"bsq_step1_e{step1_epochs}") + ts
        step1 = run_config(args, root / s1, steps="1", epochs=step1_epochs, model_kw=kw, **sk)
        for k in args.uniform:
            mk = {**kw, "weight_bits": k}
            if args.paired:  # step 2 only, from the step 1 BSQ starts from
                out = root / f"W{k}A{args.act_bits}_p{step1_epochs}{ts}"
                e2 = args.epochs - step1_epochs
                cfg = run_config(
                    args, out, steps="2", epochs2=e2, model_kw=mk, init=f"{step1.out}/final.pt",
                    **sk,
                )  # fmt: skip
                runs.append((f"W{k}A{args.act_bits}{ts}", "uniform", cfg, step1))
            else:
                out = root / f"W{k}A{args.act_bits}{ts}"
                cfg = run_config(args, out, steps="1,2", epochs=half, model_kw=mk, **sk)
                runs.append((f"W{k}A{args.act_bits}{ts}", "uniform", cfg, None))
        for a in args.alphas:
            ft, mode = args.bsq_finetune, args.bsq_finetune_mode
            tag = "" if (ft, mode) == (1, "bits") else f"_ft{ft}{mode[0]}"  # bsq_0.05_ft2w
            tag += "" if step1_epochs == half else f"_s{step1_epochs}"
            tag += ("" if args.bsq_grid == "zero" else f"_{args.bsq_grid}") + ts
            out = root / f"bsq_{a:g}{tag}"
            cfg = run_config(
                args, out, steps="2", epochs2=bsq_epochs, model_kw=kw,
                init=f"{step1.out}/final.pt", bsq_alpha=a, bsq_bits=args.bsq_bits,
                bsq_lr=args.bsq_lr, bsq_interval=args.bsq_interval, bsq_finetune=ft,
                bsq_optimizer=args.bsq_optimizer, bsq_finetune_mode=mode,
                bsq_grid=args.bsq_grid, **sk,
            )  # fmt: skip
            runs.append((f"BSQ a={a:g}{ts}", "bsq", cfg, step1))

    # the extra training seeds train first (the --seed runs may be cached from an earlier call)
    for name, _, cfg, step1 in sorted(runs, key=lambda r: r[2].seed == args.seed):
        if step1 is not None:
            train_cached(f"BSQ step 1 -> {name}", step1)
        train_cached(name, cfg)
    rows = []
    for name, kind, cfg, step1 in runs:
        step1_seconds = 0.0 if step1 is None else train_cached(f"BSQ step 1 -> {name}", step1)
        secs = train_cached(name, cfg)
        r = _measure(args, name, Path(cfg.out) / "final.pt")
        r.update(kind=kind, train_seconds=secs + step1_seconds, seed=cfg.seed)
        rows.append(r)
    x, _ = _val(args)
    lat = _latencies([r.pop("packed") for r in rows], x, args.repeat)  # after all training
    for r, ms in zip(rows, lat, strict=True):
        r["batch1_ms"] = ms

    means = _means(rows)
    res = {
        "args": vars(args),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "means": means,
    }
    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=1)
    (root / "bsq_results.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text)
    if args.plot:
        _plot(means, Path(args.plot))

    print(
        f"bcnn_cifar width={args.width} depth={args.depth}, A{args.act_bits}, {args.epochs} "
        f"epochs each; top-1 on the seeded {args.val_split:.0%} validation split of {args.data}"
    )
    print("| model | val top-1 | avg weight bits | batch-1 ms | packed == torch | train s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {100 * r['val_top1']:.2f}% | {r['avg_weight_bits']:.2f} | "
            f"{r['batch1_ms']:.3f} | {r['packed_equals_torch']} | {r['train_seconds']} |"
        )
    if len(means) < len(rows):
        print("\nmean over the training seeds (same split)")
        print("| model | seeds | val top-1 (each) | mean top-1 | mean avg weight bits |")
        print("|---|---|---|---|---|")
        for m in means:
            each = " / ".join(f"{100 * v:.2f}" for v in m["val_top1_each"])
            print(
                f"| {m['model']} | {m['seeds']} | {each} | {100 * m['val_top1']:.2f}% | "
                f"{m['avg_weight_bits']:.2f} |"
            )
    if args.bsq_grid == "zero":
        print("\nlearned precisions (BSQ N per layer; stored bits = N + 1, 0 for N = 0)")
    else:
        print("\nlearned precisions (odd-grid width k per layer = stored bits)")
    for r in rows:
        if r["kind"] == "bsq":
            print(f"{r['model']}: {r['bsq_bits']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
