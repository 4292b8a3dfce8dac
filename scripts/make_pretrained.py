"""Turn a finished training run into a shipped pretrained model and its model card.

    python scripts/make_pretrained.py RUN_DIR --name bcnn_cifar10 [--config CONFIG] \
        [--teacher TEACHER_RUN_DIR --teacher-config CONFIG] [--before CONFIG=RUN_DIR ...] \
        [--data imagefolder:~/.cache/bcnn/cifar10-jpeg/train]

A recipe may run in stages (a run continued with ``init:``); ``--before`` names each earlier
stage, in order, as the committed config and the run dir it ran in.

Writes src/bcnn/pretrained/NAME.bcnn (packed), src/bcnn/pretrained/NAME.pt (the torch weights,
binary latent weights stored as their int8 signs: same outputs, 4x smaller;
for --engine torch) and docs/models/NAME.md (the card). Every figure in the card is measured
here: validation top-1 with both engines on the run's seeded split (they must agree exactly:
identical logits), every stage's and the teacher's top-1 on the same split (float32), the
summary table, sizes, and batch-1 latency vs the float twin (bcnn bench, one thread). Epochs and
wall times come from the runs' metrics.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def _machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _out_of(config: str) -> str:
    """The run directory a committed config writes to (its ``out`` key)."""
    import yaml

    return str(yaml.safe_load((ROOT / config).read_text()).get("out", "RUN_DIR"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--name", default="bcnn_cifar10")
    ap.add_argument("--data", default="imagefolder:~/.cache/bcnn/cifar10-jpeg/train")
    ap.add_argument("--config", default="configs/bcnn_cifar10.yaml")
    ap.add_argument("--teacher", default=None, help="run dir of the distillation teacher")
    ap.add_argument("--teacher-config", default="configs/bcnn_cifar10_teacher.yaml")
    ap.add_argument(
        "--before",
        action="append",
        default=[],
        metavar="CONFIG=RUN_DIR",
        help="an earlier stage of the recipe, in order (repeat)",
    )
    ap.add_argument("--machine-note", default="", help="e.g. 'shared with other jobs'")
    args = ap.parse_args()
    for b in args.before:
        if "=" not in b or not (Path(b.split("=", 1)[1]).expanduser() / "metrics.csv").is_file():
            ap.error(f"--before {b}: expected CONFIG=RUN_DIR of a finished run")

    import bcnn
    from bcnn._commands._bench_model import bench_model
    from bcnn.data import load_dataset
    from bcnn.engine import pack
    from bcnn.models import load_checkpoint, save_checkpoint

    run = Path(args.run)
    model, meta = load_checkpoint(run / "final.pt")
    meta = {**meta, "data": args.data}
    ds = load_dataset(args.data, "val", val_split=meta["val_split"], seed=meta["seed"])
    x, y = ds.images.numpy(), ds.labels.numpy()

    def logits(m: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            return torch.cat(
                [m(torch.from_numpy(x[i : i + 500])) for i in range(0, len(x), 500)]
            ).numpy()

    ref_np = logits(model)
    packed = pack(model, classes=meta.get("classes"), meta=meta)
    out = np.concatenate([packed(x[i : i + 500]) for i in range(0, len(x), 500)])
    max_diff = float(np.abs(out - ref_np).max())
    same_argmax = bool((out.argmax(1) == ref_np.argmax(1)).all())
    exact = max_diff == 0.0 and same_argmax
    if not same_argmax or max_diff > 1e-3:
        print(f"packed and torch disagree (max |diff| {max_diff}): not shipping", file=sys.stderr)
        return 1
    top1 = float((out.argmax(1) == y).mean())

    # Every stage of the recipe, in training order: float teachers first, then the binary runs.
    stages = [_stage(*b.split("=", 1)) for b in args.before]
    if args.teacher:
        stages.append(_stage(args.teacher_config, args.teacher))
    stages.append(_stage(args.config, args.run))
    stages.sort(key=lambda st: not st["float"])  # stable: keeps the order within each kind
    for st in stages:
        st["top1"] = (
            top1
            if Path(st["run"]) == run
            else float(
                (logits(load_checkpoint(Path(st["run"]) / "final.pt")[0]).argmax(1) == y).mean()
            )
        )
    teachers = [st for st in stages if st["float"]]
    students = [st for st in stages if not st["float"]]

    dest = ROOT / "src" / "bcnn" / "pretrained"
    bcnn_path, pt_path = dest / f"{args.name}.bcnn", dest / f"{args.name}.pt"
    packed.save(bcnn_path)
    keep = {k: meta[k] for k in ("classes", "data", "val_split", "seed") if k in meta}
    keep["val_top1"] = top1
    save_checkpoint(pt_path, model, keep, sign_weights=True)  # serving weights: int8 signs
    s = bcnn.summary(model, (model.in_chans, 32, 32), name=args.name)
    sd_bytes = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    speed = bench_model(str(run / "final.pt"), batch=1, threads=1, repeat=50)

    where = f"CPU only ({_machine()}, 2 cores, bf16 autocast)" + (
        f", {args.machine_note}" if args.machine_note else ""
    )

    def epochs(sts: list[dict[str, Any]], step: str) -> str:
        return " + ".join(str(st["epochs"][step]) for st in sts if st["epochs"].get(step))

    mins = lambda sts: sum(st["secs"] for st in sts) / 60  # noqa: E731
    d = s.to_dict()
    size = bcnn_path.stat().st_size
    rows_md = [
        (
            "architecture",
            f"`{model.bcnn_config['name']}` {json.dumps(model.bcnn_config['kwargs'])}",
        ),
        (
            "validation top-1",
            f"**{100 * top1:.2f}%** on our fixed seeded split: {len(y):,} images held out "
            f"(val_split={meta['val_split']}, seed={meta['seed']}) of the 50,000 CIFAR-10 "
            "training JPEGs; the official test split was not used",
        ),
        (
            "packed == torch",
            (
                f"identical logits (max abs difference {max_diff:g}) on all {len(y):,} images"
                if exact
                else f"max abs logit difference {max_diff:.2g}, identical argmax on all "
                f"{len(y):,} images"
            ),
        ),
        (
            "training",
            f"two steps: step 1 {epochs(students, '1') or 0} epochs, step 2 "
            f"{epochs(students, '2') or 0} epochs; {mins(students):.0f} min wall time, {where}",
        ),
        (
            "packed size",
            f"{size / 1024:.1f} KiB (`.bcnn`) vs {sd_bytes / 1024:.1f} KiB float32 weights: "
            f"{sd_bytes / size:.1f}x smaller; the torch weights (`.pt`, binary weights as int8 "
            f"signs) {pt_path.stat().st_size / 1024:.0f} KiB",
        ),
        (
            "batch-1 latency, 1 thread",
            f"packed {speed['packed_ms']:.3f} ms vs float twin in PyTorch "
            f"{speed['float_ms']:.3f} ms: {speed['speedup_vs_float']:.1f}x",
        ),
    ]
    if teachers:
        rows_md.insert(
            4,
            (
                "distillation teacher",
                f"the float twin: {epochs(teachers, 'float')} epochs, {mins(teachers):.0f} min "
                f"wall time, same machine; **{100 * teachers[-1]['top1']:.2f}%** top-1 on the "
                "same split",
            ),
        )
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows_md)
    stage_md = "| # | config | trains | epochs | wall time | top-1 on the split |\n"
    stage_md += "|---|---|---|---|---|---|\n" + "\n".join(
        f"| {i} | `{st['config']}` | "
        + ("float twin (teacher)" if st["float"] else f"binary, step {'+'.join(st['epochs'])}")
        + ("" if not st["init"] else ", continued")
        + f" | {sum(st['epochs'].values())} | {st['secs'] / 60:.0f} min | {100 * st['top1']:.2f}% |"
        for i, st in enumerate(stages, 1)
    )
    commands = "\n".join(f"bcnn train --config {st['config']}" for st in stages)
    script = f"python scripts/make_pretrained.py {_out_of(args.config)} --name {args.name}"
    script += f" \\\n    --config {args.config}"
    if args.teacher:
        script += f" --teacher {_out_of(args.teacher_config)}"
        script += f" --teacher-config {args.teacher_config}"
    for b in args.before:
        c = b.split("=", 1)[0]
        script += f" \\\n    --before {c}={_out_of(c)}"
    resolved = "\n".join(
        f"\n`{st['config']}` (resolved, as run):\n\n```yaml\n{st['cfg']}\n```" for st in stages
    )
    card = f"""# `{args.name}`: a fully binary CIFAR-10 BCNN

Every matrix op of this network — the first convolution (over bit-planes of the uint8 image),
every 3x3 and 1x1 convolution, and the classifier — has 1-bit weights and 1-bit activations:
binary MACs {d["binary_macs"]:,}, float MACs {d["float_macs"]:,}. Batch norm, RPReLU, residual
adds and pooling stay in float (element-wise ops).

```python
import bcnn.engine
model = bcnn.engine.load("{args.name}")            # offline: ships with the package
logits = model(images_uint8_nchw)                # (N, 3, 32, 32) uint8 -> (N, 10) float32
```
```bash
bcnn eval {args.name} --data imagefolder:DIR --engine packed   # or --engine torch
bcnn predict {args.name} img.jpg
```

{table}

## Recipe
The stages, in training order (a "continued" stage starts from the previous stage's weights,
`init:` in its config, with a fresh schedule). Top-1 is the float32 evaluation of each stage's
final weights on the same {len(y):,}-image split, measured by the script that wrote this card.

{stage_md}

## Reproduce
Extract `../shared/data/cifar10-train-jpeg.tar.gz` into `~/.cache/bcnn/`, then

```bash
{commands}
{script}
```
{resolved}

## Layers

```
{s}
```
"""
    (ROOT / "docs" / "models").mkdir(parents=True, exist_ok=True)
    (ROOT / "docs" / "models" / f"{args.name}.md").write_text(card)
    summary = {"val_top1": top1, "n": len(y), "max_diff": max_diff}
    summary["stages"] = {st["config"]: st["top1"] for st in stages}
    print(json.dumps(summary | speed))
    return 0


def _stage(config: str, run: str) -> dict[str, Any]:
    """One training stage: its committed config, the run dir it ran in, and its metrics."""
    import yaml

    d = Path(run).expanduser()
    cfg = (d / "config.yaml").read_text().strip()
    with open(d / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    per_step: dict[str, int] = {}
    for r in rows:
        per_step[r["step"]] = per_step.get(r["step"], 0) + 1
    return {
        "config": config,
        "run": str(d),
        "cfg": cfg,
        "float": list(per_step) == ["float"],
        "init": bool(yaml.safe_load(cfg).get("init")),
        "epochs": per_step,
        "secs": sum(float(r["seconds"]) for r in rows),
    }


if __name__ == "__main__":
    sys.exit(main())
