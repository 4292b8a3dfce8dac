"""Turn a finished training run into a shipped pretrained model and its model card.

    python scripts/make_pretrained.py RUN_DIR --name bcnn_cifar10 [--teacher TEACHER_RUN_DIR] \
        [--data imagefolder:~/.cache/bcnn/cifar10-jpeg/train] [--config configs/bcnn_cifar10.yaml]

Writes src/bcnn/pretrained/NAME.bcnn (packed), src/bcnn/pretrained/NAME.pt (the torch weights,
binary latent weights stored as their int8 signs: same outputs, 4x smaller;
for --engine torch) and docs/models/NAME.md (the card). Every figure in the card is measured
here: validation top-1 with both engines on the run's seeded split (they must agree exactly:
identical logits), the teacher's top-1 on the same split, the summary table, sizes, and batch-1
latency vs the float twin (bcnn bench, one thread). Wall times come from the runs' metrics.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from pathlib import Path

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
    ap.add_argument("--command", default=None, help="the training command, for the card")
    ap.add_argument("--teacher", default=None, help="run dir of the distillation teacher")
    ap.add_argument("--teacher-config", default="configs/bcnn_cifar10_teacher.yaml")
    ap.add_argument("--teacher-command", default=None, help="the teacher's training command")
    ap.add_argument("--machine-note", default="", help="e.g. 'shared with other jobs'")
    args = ap.parse_args()

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
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(x[i : i + 500])) for i in range(0, len(x), 500)])
    packed = pack(model, classes=meta.get("classes"), meta=meta)
    out = np.concatenate([packed(x[i : i + 500]) for i in range(0, len(x), 500)])
    ref_np = ref.numpy()
    max_diff = float(np.abs(out - ref_np).max())
    same_argmax = bool((out.argmax(1) == ref_np.argmax(1)).all())
    exact = max_diff == 0.0 and same_argmax
    if not same_argmax or max_diff > 1e-3:
        print(f"packed and torch disagree (max |diff| {max_diff}): not shipping", file=sys.stderr)
        return 1
    top1 = float((out.argmax(1) == y).mean())
    teacher_rows: list[dict[str, str]] = []
    teacher_top1 = None
    if args.teacher:
        tmodel, _ = load_checkpoint(Path(args.teacher) / "final.pt")
        with torch.no_grad():
            t_out = torch.cat(
                [tmodel(torch.from_numpy(x[i : i + 500])) for i in range(0, len(x), 500)]
            )
        teacher_top1 = float((t_out.argmax(1).numpy() == y).mean())
        with open(Path(args.teacher) / "metrics.csv") as f:
            teacher_rows = list(csv.DictReader(f))

    dest = ROOT / "src" / "bcnn" / "pretrained"
    bcnn_path, pt_path = dest / f"{args.name}.bcnn", dest / f"{args.name}.pt"
    packed.save(bcnn_path)
    keep = {k: meta[k] for k in ("classes", "data", "val_split", "seed") if k in meta}
    keep["val_top1"] = top1
    save_checkpoint(pt_path, model, keep, sign_weights=True)  # serving weights: int8 signs
    s = bcnn.summary(model, (model.in_chans, 32, 32), name=args.name)
    sd_bytes = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    speed = bench_model(str(run / "final.pt"), batch=1, threads=1, repeat=50)

    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    secs = sum(float(r["seconds"]) for r in rows)
    t_secs = sum(float(r["seconds"]) for r in teacher_rows)
    where = f"CPU only ({_machine()}, 2 cores, bf16 autocast)" + (
        f", {args.machine_note}" if args.machine_note else ""
    )
    per_step: dict[str, int] = {}
    for r in rows:
        per_step[r["step"]] = per_step.get(r["step"], 0) + 1
    cfg_file = run / "config.yaml"
    cfg = cfg_file.read_text() if cfg_file.is_file() else json.dumps(meta.get("config"), indent=1)
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
            f"two steps, {per_step.get('1', 0)} + {per_step.get('2', 0)} epochs, "
            f"{secs / 60:.0f} min wall time, {where}",
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
    if args.teacher:
        rows_md.insert(
            4,
            (
                "distillation teacher",
                f"the float twin (`{args.teacher_config}`): {len(teacher_rows)} epochs, "
                f"{t_secs / 60:.0f} min wall time, same machine; "
                f"**{100 * (teacher_top1 or 0):.2f}%** top-1 on the same split",
            ),
        )
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows_md)
    teacher_cmd = teacher_cfg = ""
    if args.teacher:
        teacher_cmd = (args.teacher_command or f"bcnn train --config {args.teacher_config}") + (
            "   # the float teacher, first\n"
        )
        t_cfg = (Path(args.teacher) / "config.yaml").read_text().strip()
        teacher_cfg = (
            f"\nResolved teacher config (`{args.teacher_config}`):\n\n```yaml\n{t_cfg}\n```\n"
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

## Reproduce
Extract `../shared/data/cifar10-train-jpeg.tar.gz` into `~/.cache/bcnn/`, then

```bash
{teacher_cmd}{args.command or "bcnn train --config " + args.config}
python scripts/make_pretrained.py {_out_of(args.config)} --name {args.name}{
        " --teacher " + _out_of(args.teacher_config) if args.teacher else ""
    }
```

Resolved training config (`{args.config}`):

```yaml
{cfg.strip()}
```
{teacher_cfg}
## Layers

```
{s}
```
"""
    (ROOT / "docs" / "models").mkdir(parents=True, exist_ok=True)
    (ROOT / "docs" / "models" / f"{args.name}.md").write_text(card)
    print(
        json.dumps(
            {"val_top1": top1, "teacher_top1": teacher_top1, "n": len(y), "max_diff": max_diff}
            | speed
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
