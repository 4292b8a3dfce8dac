"""bcnn export MODEL -o FILE [--format onnx|qonnx] [--batch N|dynamic] [--check N]"""

from __future__ import annotations

import argparse
from typing import Any

HELP = "export a checkpoint or pretrained model to ONNX (onnxruntime) or QONNX (FINN)"


def _batch(v: str) -> int | str:
    if v == "dynamic":
        return v
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'dynamic', got {v!r}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a checkpoint (.pt), a pretrained name or a model name (random)")
    p.add_argument("-o", "--output", required=True, help="output file (.onnx)")
    p.add_argument("--format", choices=["onnx", "qonnx"], default="onnx")
    p.add_argument(
        "--batch", type=_batch, default=1, help="batch size of the graph, or 'dynamic' (default 1)"
    )
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="image height and width (default: the model's, e.g. 32 32)",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument(
        "--check",
        type=int,
        default=0,
        metavar="N",
        help="after writing, run N random images through the file and torch; report max |diff|",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _check(model: Any, path: str, fmt: str, n: int, batch: int | str, size: Any) -> dict[str, Any]:
    """Logits of the written file (onnxruntime, or qonnx's executor) vs torch on N random
    uint8 images."""
    import numpy as np
    import torch

    c = int(getattr(model, "in_chans", 3))
    h, w = size
    bs = n if batch == "dynamic" else int(batch)
    gen = torch.Generator().manual_seed(0)
    diffs, agree, total = [], 0, 0
    run = _runner(path, fmt)
    for start in range(0, n, bs):
        x = torch.randint(0, 256, (bs, c, h, w), dtype=torch.uint8, generator=gen)
        with torch.no_grad():
            ref = model(x).float().numpy()
        y = run(x.numpy())
        k = min(bs, n - start)
        diffs.append(float(np.abs(y[:k] - ref[:k]).max()))
        agree += int((y[:k].argmax(1) == ref[:k].argmax(1)).sum())
        total += k
    return {"images": total, "max_abs_diff": max(diffs), "argmax_agree": agree}


def _runner(path: str, fmt: str) -> Any:
    from ..export._graph import require

    if fmt == "onnx":
        ort = require("onnxruntime")
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {"input": x})[0]
    mw = require("qonnx.core.modelwrapper").ModelWrapper(path)
    execute = require("qonnx.core.onnx_exec").execute_onnx
    return lambda x: execute(mw, {"input": x})[mw.graph.output[0].name]


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..export import DEFAULT_OPSET, export
    from ._common import load_torch_model, print_json

    out = Path(args.output)
    if out.is_dir():
        raise ValueError(f"output is a directory: {out}")
    if args.check < 0:
        raise ValueError(f"--check must be >= 0, got {args.check}")
    model, meta = load_torch_model(args.model)
    classes = meta.get("classes")
    size = tuple(args.input_size) if args.input_size else None
    export(
        model,
        out,
        format=args.format,
        batch=args.batch,
        input_size=size,
        opset=args.opset or DEFAULT_OPSET,
        classes=list(classes) if isinstance(classes, list | tuple) else None,
    )
    res: dict[str, Any] = {"output": str(out), "format": args.format, "bytes": out.stat().st_size}
    if args.check:
        hw = size or tuple(getattr(model, "default_input_size", (0, 32, 32))[1:])
        res["check"] = _check(model.eval(), str(out), args.format, args.check, args.batch, hw)
    if args.json:
        print_json(res)
    else:
        print(f"wrote {out} ({args.format}, {res['bytes'] / 1024:.1f} KiB)")
        if "check" in res:
            ck = res["check"]
            print(
                f"check on {ck['images']} random images: max |diff| {ck['max_abs_diff']:.3g}, "
                f"argmax agrees on {ck['argmax_agree']}/{ck['images']}"
            )
    return 0
