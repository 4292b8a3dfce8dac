"""bcnn pack CHECKPOINT -o model.bcnn"""

from __future__ import annotations

import argparse

HELP = "pack a trained binary model into a .bcnn file for the CPU engine"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint (.pt) or a registered model name (random)")
    p.add_argument("-o", "--output", help="output .bcnn file (default: CHECKPOINT.bcnn)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def float_state_dict_bytes(model) -> int:  # type: ignore[no-untyped-def]
    """Size of the float32 state dict as torch.save writes it (without BSQ's bit variables,
    which only training needs: the layer's float weight stands for them)."""
    import io

    import torch

    skip = {
        f"{n}." if n else ""
        for n, m in model.named_modules()
        if getattr(m, "bsq", False)  # bcnn.bsq.BitQuantizer (either grid)
    }
    sd = {
        k: v.float()
        for k, v in model.state_dict().items()
        if not any(p and k.startswith(p) for p in skip)
    }
    buf = io.BytesIO()
    torch.save(sd, buf)
    return len(buf.getvalue())


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..engine import pack
    from ._common import load_torch_model, print_json

    model, meta = load_torch_model(args.checkpoint)
    out = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(".bcnn")
    if out.suffix != ".bcnn":
        raise ValueError(f"output must end in .bcnn: {out}")
    classes = meta.get("classes")
    packed = pack(
        model, classes=list(classes) if isinstance(classes, list | tuple) else None, meta=meta
    )
    packed.save(out)
    size = out.stat().st_size
    ref = float_state_dict_bytes(model)
    res = {
        "output": str(out),
        "bytes": size,
        "float_state_dict_bytes": ref,
        "ratio": round(ref / size, 2),
        "ops": len(packed.graph["ops"]),
        "classes": packed.num_classes,
    }
    if args.json:
        print_json(res)
    else:
        print(
            f"wrote {out}: {size / 1024:.1f} KiB ({ref / size:.1f}x smaller than the float "
            f"state dict, {ref / 1024:.1f} KiB); {res['ops']} ops, {packed.num_classes} classes"
        )
    return 0
