"""Check that ONNX / QONNX exports reproduce the torch model on images of a validation split.

    python scripts/check_export.py [MODEL ...] [--n 1000] [--qonnx-n 100] [--data SPEC]

MODEL: a checkpoint or a pretrained name (default ``bcnn_cifar10``). For each model, ``--n``
images of the split it was trained with (its meta: data spec, val_split, seed; the
split ``bcnn eval`` uses) run through torch (eval mode) and through onnxruntime on the ONNX
export at batch 1, 7 and dynamic (``--pick first``: the split's first images, which are
ordered by class; default ``spread``: evenly spaced over the split, every class); then
``--qonnx-n`` (picked the same way among those) run through qonnx's executor
(``qonnx.core.onnx_exec.execute_onnx``) on the QONNX export, before and after
``qonnx.util.cleanup.cleanup_model`` + ``InferShapes``. Prints one JSON line per check (max
|logit difference|, allclose(rtol 1e-4, atol 1e-4), argmax agreement) and exits 1 unless all
pass. Exports go to a temporary folder (``--keep DIR`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bcnn.data import load_dataset
from bcnn.export import to_onnx, to_qonnx
from bcnn.models import load_checkpoint, pretrained_checkpoint

RTOL = ATOL = 1e-4


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def compare(name: str, y: np.ndarray, ref: np.ndarray, **extra: Any) -> dict[str, Any]:
    r = {
        "check": name,
        "n": len(ref),
        "max_abs_diff": float(np.abs(y - ref).max()),
        "allclose": bool(np.allclose(y, ref, rtol=RTOL, atol=ATOL)),
        "argmax_agree": int((y.argmax(1) == ref.argmax(1)).sum()),
        **extra,
    }
    r["ok"] = r["allclose"] and r["argmax_agree"] == r["n"]
    print(json.dumps(r), flush=True)
    return r


def run_batches(fn: Any, x: np.ndarray, bs: int) -> np.ndarray:
    """fn on fixed-size batches; the last one is padded with zero images and cut."""
    out = []
    for i in range(0, len(x), bs):
        xb = x[i : i + bs]
        k = len(xb)
        if k < bs:
            xb = np.concatenate([xb, np.zeros((bs - k, *xb.shape[1:]), xb.dtype)])
        out.append(fn(xb)[:k])
    return np.concatenate(out)


def check_model(spec: str, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    import onnxruntime as ort
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.cleanup import cleanup_model

    path = Path(spec)
    ckpt = path if path.exists() else pretrained_checkpoint(spec)
    if ckpt is None:
        raise SystemExit(f"{spec}: neither a checkpoint nor a pretrained name")
    model, meta = load_checkpoint(ckpt)
    data = args.data or meta.get("data")
    ds = load_dataset(data, "val", meta.get("val_split", 0.1), meta.get("seed", 0))
    n = min(args.n, len(ds))
    # the split is ordered by class: "first" takes its head (few classes), "spread" takes n
    # evenly spaced images (every class)
    idx = np.arange(n) if args.pick == "first" else np.linspace(0, len(ds) - 1, n).round()
    idx = idx.astype(np.int64)
    x = ds.images[idx].numpy()
    with torch.no_grad():
        ref = np.concatenate(
            [model(torch.from_numpy(x[i : i + 250])).numpy() for i in range(0, len(x), 250)]
        )
    labels = ds.labels[idx].numpy()
    stem = Path(spec).stem
    info = {
        "model": spec,
        "config": getattr(model, "bcnn_config", None),
        "data": data,
        "split": f"val (val_split={meta.get('val_split', 0.1)}, seed={meta.get('seed', 0)}), "
        f"{len(x)} images ({args.pick}), classes {np.bincount(labels).tolist()}",
        "top1_torch": float((ref.argmax(1) == labels).mean()),
    }
    print(json.dumps(info), flush=True)
    results = []
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    for batch in (1, 7, "dynamic"):
        f = to_onnx(model, folder / f"{stem}_b{batch}.onnx", batch=batch)
        sess = ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])
        t0 = time.perf_counter()
        bs = len(x) if batch == "dynamic" else int(batch)
        y = run_batches(lambda xb, s=sess: s.run(None, {"input": xb})[0], x, bs)
        results.append(
            compare(
                f"onnxruntime batch={batch}",
                y,
                ref,
                model=stem,
                seconds=round(time.perf_counter() - t0, 2),
                bytes=f.stat().st_size,
            )
        )
    nq = min(args.qonnx_n, len(x))
    qi = np.arange(nq) if args.pick == "first" else np.linspace(0, len(x) - 1, nq).round()
    xq, refq = x[qi.astype(np.int64)], ref[qi.astype(np.int64)]
    qbs = 10
    f = to_qonnx(model, folder / f"{stem}.qonnx.onnx", batch=qbs)
    mw = ModelWrapper(str(f))
    clean = cleanup_model(ModelWrapper(str(f))).transform(InferShapes())
    for name, m in (
        ("qonnx execute_onnx", mw),
        ("qonnx execute_onnx after cleanup+InferShapes", clean),
    ):
        t0 = time.perf_counter()
        y = run_batches(
            lambda xb, m=m: execute_onnx(m, {m.graph.input[0].name: xb})[m.graph.output[0].name],
            xq,
            qbs,
        )
        ops = sorted({n.op_type for n in m.graph.node if n.domain == "qonnx.custom_op.general"})
        results.append(
            compare(
                name,
                np.asarray(y),
                refq,
                model=stem,
                qonnx_ops=ops,
                seconds=round(time.perf_counter() - t0, 2),
            )
        )
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["bcnn_cifar10"])
    ap.add_argument("--n", type=int, default=1000, help="images for onnxruntime (1000)")
    ap.add_argument("--qonnx-n", type=int, default=100, help="images for qonnx (100)")
    ap.add_argument("--data", default=None, help="default: each model's training data")
    ap.add_argument(
        "--pick",
        choices=["spread", "first"],
        default="spread",
        help="which images of the split: evenly spaced (default) or the first N",
    )
    ap.add_argument("--keep", default=None, help="write the exports here instead of a temp dir")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(json.dumps({"cpu": cpu_name(), "torch": torch.__version__}), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for spec in args.models:
            results += check_model(spec, args, folder)
    ok = all(r["ok"] for r in results)
    print(json.dumps({"all_ok": ok, "checks": len(results)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
