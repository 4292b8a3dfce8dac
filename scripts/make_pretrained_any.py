"""Turn a finished any-precision training run into the shipped model and its model card.

    python scripts/make_pretrained_any.py RUN_DIR --name bcnn_cifar10_any \
        [--config configs/bcnn_cifar10_any_ft.yaml] [--data SPEC] \
        [--before CONFIG=RUN_DIR ...]

``--before`` names each earlier stage of the recipe (a run the next one continued with
``init:``), in training order; the card's recipe table lists every stage.

Writes src/bcnn/pretrained/NAME.bcnn (packed, every precision's sets), RUN_DIR/NAME.pt (the torch
weights; k-bit weights as their int8 grid integers: same outputs) and docs/models/NAME.md.
Every figure in the card is measured here, on the run's seeded validation split:

* at every uniform precision WkAk: top-1 on the packed engine, and whether its logits equal
  torch's (max |diff| over every image);
* per-layer mixes searched for latency budgets 1/4, 1/2 and 3/4 of the way from the lowest to
  the highest uniform precision
  (``search_precision`` with the packed engine's ``latency_model``, scored on
  --search-images images drawn at random), with their top-1 on the whole split (packed ==
  torch checked too);
* batch-1 latency, one thread, all interleaved round by round: the packed model at each
  uniform precision and mix, the float twin in PyTorch fp32, and the shipped fully binary
  ``bcnn_cifar10`` packed (the dedicated W1A1 model of the same topology).

Run it on a quiet machine (it times).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _ap import searched_mixes, time_all
from make_pretrained import ROOT, _machine, _out_of, _stage


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--name", default="bcnn_cifar10_any")
    ap.add_argument("--data", default="imagefolder:~/.cache/bcnn/cifar10-jpeg/train")
    ap.add_argument("--config", default="configs/bcnn_cifar10_any_ft.yaml")
    ap.add_argument("--search-images", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument(
        "--budgets",
        type=float,
        nargs="*",
        default=[0.25, 0.5, 0.75],
        help="searched mixes: latency budgets as fractions of the lowest-to-highest range",
    )
    ap.add_argument(
        "--before",
        action="append",
        default=[],
        metavar="CONFIG=RUN_DIR",
        help="an earlier stage of the recipe, in order (repeat)",
    )
    args = ap.parse_args()
    for b in args.before:
        if "=" not in b or not (Path(b.split("=", 1)[1]).expanduser() / "metrics.csv").is_file():
            ap.error(f"--before {b}: expected CONFIG=RUN_DIR of a finished run")

    import bcnn
    from bcnn.data import load_dataset
    from bcnn.engine import load, pack
    from bcnn.models import create_model, load_checkpoint, save_checkpoint
    from bcnn.quant import set_precision

    # every stage of the recipe, read first (a bad --before fails before the long work)
    stages = [_stage(*b.split("=", 1)) for b in args.before] + [_stage(args.config, args.run)]
    run = Path(args.run)
    model, meta = load_checkpoint(run / "final.pt")
    meta = {**meta, "data": args.data}
    ds = load_dataset(args.data, "val", val_split=meta["val_split"], seed=meta["seed"])
    x, y = ds.images, ds.labels
    xn = x.numpy()
    ps = tuple(model.precisions)
    packed = pack(model, classes=meta.get("classes"), meta=meta)

    def check(cfg: dict[str, Any]) -> dict[str, Any]:
        """Packed top-1 at ``cfg`` and its agreement with torch's logits."""
        set_precision(model, **cfg)
        packed.set_precision(**cfg)
        with torch.no_grad():
            ref = torch.cat([model(x[i : i + 500]) for i in range(0, len(x), 500)]).numpy()
        out = np.concatenate([packed(xn[i : i + 500]) for i in range(0, len(xn), 500)])
        set_precision(model)
        packed.set_precision()
        return {
            "val_top1": float((out.argmax(1) == y.numpy()).mean()),
            "max_diff": float(np.abs(out - ref).max()),
        }

    rows: list[dict[str, Any]] = []
    targets: list[Any] = []
    for k in ps:
        cfg = {"weight_bits": k, "act_bits": k}
        rows.append({"bits": f"W{k}A{k}", **check(cfg)})
        targets.append(("packed", packed, cfg))
    mixes = searched_mixes(
        model, packed, x, y, args.search_images, args.repeat, tuple(args.budgets)
    )
    for mix in mixes:
        cfg = {"layers": {n: tuple(v) for n, v in mix["layers"].items()}}
        rows.append({**mix, **check(cfg)})
        targets.append(("packed", packed, cfg))
    if any(r["max_diff"] != 0 for r in rows):
        print(f"packed and torch disagree: {rows}: not shipping", file=sys.stderr)
        return 1
    cfgk = model.bcnn_config["kwargs"]
    twin_kw = {k: v for k, v in cfgk.items() if k not in ("precisions", "precision_bn")}
    twin = create_model(model.bcnn_config["name"], binary=False, **twin_kw).eval()
    targets.append(("torch", twin))
    binary = load("bcnn_cifar10")
    targets.append(("packed", binary, {}))
    ms = time_all(targets, x, args.repeat)
    for r, t in zip(rows, ms, strict=False):
        r["latency_ms"] = round(t, 4)
    twin_ms, binary_ms = ms[-2], ms[-1]
    pred = np.concatenate([binary(xn[i : i + 500]).argmax(1) for i in range(0, len(xn), 500)])
    bin_top1 = float((pred == y.numpy()).mean())

    dest = ROOT / "src" / "bcnn" / "pretrained"
    # the torch serving checkpoint (4 MiB: every transition's BN set) stays in the run dir;
    # only the packed file ships
    bcnn_path, pt_path = dest / f"{args.name}.bcnn", run / f"{args.name}.pt"
    packed.save(bcnn_path)
    keep = {k: meta[k] for k in ("classes", "data", "val_split", "seed") if k in meta}
    keep["val_top1"] = {r["bits"]: r["val_top1"] for r in rows[: len(ps)]}
    save_checkpoint(pt_path, model, keep, sign_weights=True)
    s = bcnn.summary(model, (model.in_chans, 32, 32), name=args.name)

    def row_md(r: dict[str, Any]) -> str:
        spd = twin_ms / r["latency_ms"]
        if "layers" in r:
            mix = ", ".join(f"W{w}A{a}" for w, a in r["layers"].values())
            what = f"searched mix for {r['bits']} ({mix}; {r['average_weight_bits']} avg bits)"
        else:
            what = r["bits"]
        return (
            f"| {what} | **{100 * r['val_top1']:.2f}%** | {r['latency_ms']:.3f} ms | {spd:.1f}x |"
        )

    table = "| precision | val top-1 (packed) | batch-1 latency | vs float twin |\n"
    table += "|---|---|---|---|\n" + "\n".join(row_md(r) for r in rows)
    table += (
        f"\n| float twin, PyTorch fp32 (untrained: timing only) | - | {twin_ms:.3f} ms | 1.0x |"
        f"\n| `bcnn_cifar10` (dedicated fully binary W1A1, 36 + 38 epochs) | "
        f"{100 * bin_top1:.2f}% | {binary_ms:.3f} ms | {twin_ms / binary_ms:.1f}x |"
    )
    uniform_note = ""
    if mixes and all(len({tuple(v) for v in m["layers"].values()}) == 1 for m in mixes):
        uniform_note = (
            "\nEvery search chose a uniform setting: this model's per-layer mixes score below "
            "its\nuniform settings (its last stage trained uniform precisions only), and\n"
            "`search_precision` then returns the best uniform setting within the budget."
        )
    epochs = sum(sum(g["epochs"].values()) for g in stages)
    secs = sum(g["secs"] for g in stages)
    import yaml

    def taught(g: dict[str, Any]) -> str:
        c = yaml.safe_load(g["cfg"])
        if c.get("ap_private"):
            views = ", ".join(f"W{k}A{k}" for k in c["ap_private"])
            planes = (
                ", and the weights' low planes no other view reads (`ap_private_planes`)"
                if c.get("ap_private_planes")
                else ""
            )
            return (
                f"{views} alone, only its own batch-norm sets and activation steps training"
                f"{planes} (`ap_private`: every other view unchanged)"
            )
        runs = "every precision each iteration (`--ap-joint`)" if c.get("ap_joint") else ""
        if c.get("teacher"):
            fp = ", in float32" if c.get("teacher_amp") is False else ""
            return f"{runs}, distilled from `{Path(c['teacher']).stem}` (`teacher`{fp})"
        kd = "distilled from the highest precision (`--ap-distill`)"
        return f"{runs}, {kd}" if c.get("ap_distill") else runs or "one precision per iteration"

    kd = "; ".join(f"stage {i}: {taught(g)}" for i, g in enumerate(stages, 1))
    facts = "| | |\n|---|---|\n" + "\n".join(
        f"| {k} | {v} |"
        for k, v in [
            (
                "training",
                f"{epochs} step-2 epochs from the shipped `bcnn_cifar10`: {kd}; "
                "each stage's precision schedule (`ap_schedule`: `bitmixer`, uniform then "
                "per-layer, or `uniform`) in its config below; "
                f"{secs / 60:.0f} min wall time in {len(stages)} stage(s) (below), CPU only "
                f"({_machine()}, 2 cores, bf16 "
                "autocast)",
            ),
            (
                "packed size",
                f"{bcnn_path.stat().st_size / 1024:.1f} KiB (`.bcnn`: 4-bit weights once, every "
                "precision's steps and batch-norm sets); the torch weights (`.pt`, weights as "
                f"int8 grid integers) {pt_path.stat().st_size / 1024:.0f} KiB, not shipped "
                f"(written to `{_out_of(args.config)}/{args.name}.pt`)",
            ),
        ]
    )
    recipe = "| # | config | epochs | wall time | " + " | ".join(f"W{k}A{k}" for k in ps) + " |\n"
    recipe += "|---|---|---|---|" + "---|" * len(ps) + "\n"
    for i, g in enumerate(stages, 1):
        if i == len(stages):
            tops = [r["val_top1"] for r in rows[: len(ps)]]
        else:  # an earlier stage's final weights, evaluated the same way (float32 torch)
            m, _ = load_checkpoint(Path(g["run"]).expanduser() / "final.pt")
            tops = [_top1_at(m, k, x, y) for k in ps]
        accs = " | ".join(f"{100 * t:.2f}%" for t in tops)
        recipe += (
            f"| {i} | `{g['config']}` | {sum(g['epochs'].values())} | "
            f"{g['secs'] / 60:.0f} min | {accs} |\n"
        )
    train_cmds = "\n".join(f"bcnn train --config {g['config']}" for g in stages)
    before_args = "".join(
        f" \\\n    --before {g['config']}={_out_of(g['config'])}" for g in stages[:-1]
    )
    configs = "\n".join(
        f"`{g['config']}` (resolved, as run):\n\n```yaml\n{g['cfg']}\n```\n" for g in stages
    )
    card = f"""# `{args.name}`: one CIFAR-10 BCNN at any precision

`bcnn_cifar` (width {cfgk.get("width")}) trained to run at W1A1, W2A2, W3A3 and W4A4, and at any
per-layer mix, chosen at run time without re-packing (Bit-Mixer; docs/any_precision.md).
Every matrix op (the stem, every convolution, the classifier) runs at the chosen precision:
nested 4-bit weights whose top k planes are the k-bit view (k = 1: fully binary), one learned
activation step per precision, and a folded batch norm per transition between precisions
({model.precision_bn} batch norm).

```python
import bcnn.engine
model = bcnn.engine.load("{args.name}")            # offline: ships with the package
model.set_precision(weight_bits=2, act_bits=2)     # W2A2; None restores W4A4
logits = model(images_uint8_nchw)                  # (N, 3, 32, 32) uint8 -> (N, 10) float32
with model.precision(layers={{"head.fc": (4, 4)}}):  # one layer at another precision
    logits = model(images_uint8_nchw)
```
```bash
bcnn eval {args.name} --data imagefolder:DIR --engine packed --weight-bits 1 --act-bits 1
bcnn search-precision {_out_of(args.config)}/{args.name}.pt --budget-ms 1.0  # torch weights
```

Top-1 on our fixed seeded split: {len(y):,} images held out (val_split={meta["val_split"]},
seed={meta["seed"]}) of the 50,000 CIFAR-10 training JPEGs; the official test split was not
used. Packed logits equal torch's at every row (max abs difference 0 on every image). Batch-1
latency: one thread, medians of {args.repeat} interleaved rounds, {_machine()}. The searched
mixes were chosen on {args.search_images:,} images drawn at random (seed 0) from the split,
their top-1 is on all
of it.{uniform_note}

{table}

{facts}

## Recipe
The stages, in training order (a continued stage starts from the previous stage's weights,
`init:` in its config, with a fresh schedule). Top-1 per precision: each stage's final
weights in float32 torch, same split (the trainer's own figures in `metrics.csv` are
evaluated under bf16 autocast, several points lower for these low-bit views).

{recipe}

## Reproduce
Extract `../shared/data/cifar10-train-jpeg.tar.gz` into `~/.cache/bcnn/`, then

```bash
{train_cmds}
python scripts/make_pretrained_any.py {_out_of(args.config)} --name {args.name} \\
    --config {args.config}{before_args}
```

{configs}

## Layers (at the highest precision)

```
{s}
```
"""
    (ROOT / "docs" / "models" / f"{args.name}.md").write_text(card)
    res = {"rows": rows, "float_twin_ms": twin_ms, "bcnn_cifar10_ms": binary_ms,
           "bcnn_cifar10_top1": bin_top1, "machine": _machine()}  # fmt: skip
    (ROOT / "docs" / "results" / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


@torch.no_grad()
def _top1_at(model: Any, k: int, x: torch.Tensor, y: torch.Tensor) -> float:
    """float32 torch top-1 of ``model`` at WkAk."""
    from bcnn.quant import precision

    model.eval()
    with precision(model, weight_bits=k, act_bits=k):
        pred = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean())


if __name__ == "__main__":
    sys.exit(main())
