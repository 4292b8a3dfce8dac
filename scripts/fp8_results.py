"""FP8 training results (docs/fp8.md): runs the ablation one training at a time, then reports.

    python scripts/fp8_results.py run    [--out runs/fp8] [--only NAME...]   # resumable
    python scripts/fp8_results.py report [--out runs/fp8] [--json FILE]

Runs (``bcnn train``, each in ``OUT/<name>``; a finished run is skipped, a broken one resumed):
- digits: the float twin of bcnn_cifar, 10 epochs, FP32 vs ``--precision fp8``;
- CIFAR-10 (the 45,000 / 5,000 seeded split of the JPEG training set, ``--seed`` 0 and 1): the
  float twin at width 16, depth 1, ``EPOCHS`` epochs: FP32; FP8 RNE without loss scaling;
  + constant loss scaling; + enhanced loss scaling; + stochastic rounding; + FP16 master weights
  (= the ``fp8`` recipe); ``fp8-hybrid``; and a BCNN's two steps (1 + 1 epochs) in FP32 and fp8.

The report reads each run's ``metrics.csv`` (val top-1 of the last epoch, mean over seeds), the
fraction of nonzero gradient values that FP8 flushes to zero per layer (4 training batches
through each final model with its recipe and final loss scale) and, with ``--bench``, the
step-time overhead (scripts/bench_fp8.py, interleaved steps in one process).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DATA = "imagefolder:~/.cache/bcnn/cifar10-jpeg/train"
EPOCHS = 3
CIFAR = ["--model", "bcnn_cifar", "--data", DATA, "--val-split", "0.1", "--batch-size", "128"]
TWIN = [*CIFAR, "--float", "--model-kw", "width=16", "depth=1", "--epochs", str(EPOCHS)]
BCNN = [*CIFAR, "--model-kw", "width=16", "depth=1", "--epochs1", "1", "--epochs2", "1"]
NO_EXTRAS = ["stochastic_rounding=false", "master=fp32"]
# name -> (label, bcnn train arguments)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "fp32": ("FP32", ["--precision", "fp32"]),
    "rne": (
        "FP8 RNE, no loss scaling",
        ["--precision", "fp8", "--fp8", "loss_scaling=none", *NO_EXTRAS],
    ),
    "const": (
        "+ constant loss scaling (2^12)",
        ["--precision", "fp8", "--fp8", "loss_scaling=constant", "init_scale=4096", *NO_EXTRAS],
    ),
    "enh": (
        "+ enhanced loss scaling",
        ["--precision", "fp8", "--fp8", "loss_scaling=dynamic", *NO_EXTRAS],
    ),
    "sr": ("+ stochastic rounding", ["--precision", "fp8", "--fp8", "master=fp32"]),
    "fp8": ("+ FP16 master weights (= fp8)", ["--precision", "fp8"]),
    "hybrid": ("fp8-hybrid (E4M3 fwd)", ["--precision", "fp8-hybrid"]),
}
SEEDS = (0, 1)


def runs() -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = [
        ("digits-fp32", ["--model", "bcnn_cifar", "--data", "digits", "--float", "--epochs", "10"]),
        (
            "digits-fp8",
            [
                "--model",
                "bcnn_cifar",
                "--data",
                "digits",
                "--float",
                "--epochs",
                "10",
                "--precision",
                "fp8",
            ],
        ),
    ]
    for name, (_, args) in CONFIGS.items():
        out.append((f"cifar-{name}-s0", [*TWIN, *args, "--seed", "0"]))
    out.append(("bcnn-fp32-s0", [*BCNN, "--precision", "fp32", "--seed", "0"]))
    # seed 1 in order of priority (the FP32 / full-recipe comparison first), the BCNN in between
    for name in ("fp32", "fp8"):
        out.append((f"cifar-{name}-s1", [*TWIN, *CONFIGS[name][1], "--seed", "1"]))
    out.append(("bcnn-fp8-s0", [*BCNN, "--precision", "fp8", "--seed", "0"]))
    for name in ("rne", "hybrid", "sr", "enh", "const"):
        out.append((f"cifar-{name}-s1", [*TWIN, *CONFIGS[name][1], "--seed", "1"]))
    for prec in ("fp32", "fp8"):  # the BCNN's second seed last
        out.append((f"bcnn-{prec}-s1", [*BCNN, "--precision", prec, "--seed", "1"]))
    return out


def run_all(out: Path, only: list[str] | None) -> None:
    bcnn = str(Path(sys.executable).with_name("bcnn"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for name, args in runs():
        if only and not any(o in name for o in only):
            continue
        d = out / name
        if (d / "final.pt").exists():
            continue
        resume = ["--resume"] if d.exists() else []
        cmd = [bcnn, "train", *args, "--out", str(d), "--quiet", "--save-every", "100", *resume]
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}", flush=True)
        with open(out / f"{name}.log", "a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"    rc {rc}, {time.time() - t0:.0f} s wall", flush=True)


def read_rows(d: Path) -> list[dict[str, str]]:
    p = d / "metrics.csv"
    return list(csv.DictReader(p.open())) if p.exists() else []


def flush_fractions(d: Path, batches: int = 4) -> dict[str, dict[str, float]]:
    """Per FP8 layer: the fraction of nonzero errors / weight gradients flushed to zero, on
    ``batches`` training batches, at the run's final loss scale."""
    import torch
    import torch.nn.functional as F
    import yaml

    from bcnn.data import Loader, load_splits
    from bcnn.fp8 import FP8Training, get_recipe
    from bcnn.models import load_checkpoint

    cfg = yaml.safe_load((d / "config.yaml").read_text())
    if cfg.get("precision", "fp32") == "fp32":
        return {}
    rows = read_rows(d)
    model, _ = load_checkpoint(d / "final.pt")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    recipe = get_recipe(cfg["precision"], **{**(cfg.get("fp8") or {}), "master": "fp32"})
    fp8 = FP8Training(model, opt, recipe)
    scale = float(rows[-1]["loss_scale"]) if rows and rows[-1].get("loss_scale") else 1.0
    train, _ = load_splits(cfg["data"], cfg["val_split"], cfg["seed"])
    loader = Loader(train, cfg["batch_size"], train=True, seed=cfg["seed"], workers=0)
    torch.manual_seed(0)
    model.train()
    fp8.enable_flush_stats(True)
    for i, (x, y) in enumerate(loader.iter_from(0)):
        if i == batches:
            break
        model.zero_grad()
        (F.cross_entropy(model(x), y) * scale).backward()
    res = fp8.flush_fractions()
    fp8.close()
    return res


def report(out: Path, bench: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"runs": {}, "table": [], "flush": {}, "bench": []}
    for name, _ in runs():
        rows = read_rows(out / name)
        if not rows:
            continue
        last = rows[-1]
        res["runs"][name] = {
            "val_top1": float(last["val_top1"]),
            "epochs": len(rows),
            "seconds": sum(float(r["seconds"]) for r in rows),
            "loss_scale": last.get("loss_scale") or None,
            "overflows": last.get("overflows") or None,
            "finished": (out / name / "final.pt").exists(),
        }
    for name, (label, _) in CONFIGS.items():
        accs = [
            res["runs"][f"cifar-{name}-s{s}"]["val_top1"]
            for s in SEEDS
            if f"cifar-{name}-s{s}" in res["runs"] and res["runs"][f"cifar-{name}-s{s}"]["finished"]
        ]
        if accs:
            res["table"].append(
                {"config": name, "label": label, "top1": accs, "mean": sum(accs) / len(accs)}
            )
    for name in ("rne", "const", "enh", "sr", "fp8", "hybrid"):
        d = out / f"cifar-{name}-s0"
        if (d / "final.pt").exists():
            res["flush"][name] = flush_fractions(d)
    cached = out / "bench.json"  # the last --bench figures
    if not bench and cached.exists():
        res["bench"] = json.loads(cached.read_text())
    if bench:
        script = Path(__file__).with_name("bench_fp8.py")
        for extra in (
            ["--recipe", "fp8"],
            ["--recipe", "fp8-hybrid"],
            ["--recipe", "fp8", "--binary"],
        ):
            cmd = [
                sys.executable,
                str(script),
                "--width",
                "16",
                "--depth",
                "1",
                "--steps",
                "20",
                "--json",
                *extra,
            ]
            res["bench"].append(
                json.loads(subprocess.check_output(cmd).decode().strip().splitlines()[-1])
            )
        cached.write_text(json.dumps(res["bench"]))
    return res


def markdown(res: dict[str, Any]) -> str:
    """The results as Markdown tables (docs/fp8.md)."""
    r = res["runs"]
    lines = ["| config | seed 0 | seed 1 | mean | overflows (s0) | final loss scale (s0) |"]
    lines.append("|---|---|---|---|---|---|")
    for row in res["table"]:
        s0 = r.get(f"cifar-{row['config']}-s0", {})
        accs = " | ".join(f"{100 * a:.2f}" for a in row["top1"])
        if len(row["top1"]) == 1:
            accs += " | -"
        lines.append(
            f"| {row['label']} | {accs} | **{100 * row['mean']:.2f}** | "
            f"{s0.get('overflows') or '-'} | {s0.get('loss_scale') or '-'} |"
        )
    out = ["\n".join(lines)]
    other = [k for k in r if not k.startswith("cifar-")]
    if other:
        t = ["| run | epochs | val top-1 | train seconds | overflows | final loss scale |"]
        t.append("|---|---|---|---|---|---|")
        for k in other:
            v = r[k]
            t.append(
                f"| {k} | {v['epochs']} | {100 * v['val_top1']:.2f} | {v['seconds']:.0f} | "
                f"{v['overflows'] or '-'} | {v['loss_scale'] or '-'} |"
            )
        out.append("\n".join(t))
    if res["flush"]:
        names = sorted({n for f in res["flush"].values() for n in f})
        t = ["| layer | " + " | ".join(res["flush"]) + " |"]
        t.append("|---" * (len(res["flush"]) + 1) + "|")
        for n in names:
            cells = []
            for f in res["flush"].values():
                v = f.get(n)
                cells.append(f"{100 * v['error']:.2f} / {100 * v['wgrad']:.2f}" if v else "-")
            t.append(f"| {n} | " + " | ".join(cells) + " |")
        out.append("\n".join(t))
    if res["bench"]:
        t = ["| model | recipe | FP32 ms/step | FP8 ms/step | overhead |", "|---|---|---|---|---|"]
        for b in res["bench"]:
            rec = next(k[:-3] for k in b if k.endswith("_ms") and k != "fp32_ms")
            kind = "BCNN step 2" if b["binary"] else "float twin"
            t.append(
                f"| {kind} width {b['width']}, batch {b['batch']} | {rec} | {b['fp32_ms']:.0f} | "
                f"{b[rec + '_ms']:.0f} | {b['overhead']:.2f}x |"
            )
        out.append("\n".join(t))
    return "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["run", "report"])
    ap.add_argument("--out", default="runs/fp8")
    ap.add_argument("--only", nargs="*")
    ap.add_argument(
        "--bench", action="store_true", help="report: time the emulation (else OUT/bench.json)"
    )
    ap.add_argument("--json", help="report: write the figures to this file")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.what == "run":
        run_all(out, a.only)
        return
    res = report(out, a.bench)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(markdown(res))


if __name__ == "__main__":
    main()
