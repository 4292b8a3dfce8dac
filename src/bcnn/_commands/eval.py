"""bcnn eval MODEL [--data SPEC] [--split val|train|all] [--engine torch|packed] [--json]"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import add_precision_arguments, parse_layers

HELP = "top-1/top-5 accuracy of a checkpoint, a .bcnn file or a pretrained name on a data split"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a checkpoint (.pt), a packed .bcnn file or a pretrained name")
    p.add_argument("--data", help="data spec (default: the one the model was trained on)")
    p.add_argument(
        "--split",
        choices=["val", "train", "all"],
        default="val",
        help="which split (default val: the run's held-out split)",
    )
    p.add_argument(
        "--engine",
        choices=["torch", "packed"],
        default=None,
        help="torch (default for checkpoints) or packed (default for .bcnn)",
    )
    p.add_argument("--val-split", type=float, default=None, help="default: the training run's")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the run's)")
    p.add_argument("--image-size", type=int, default=None, help="for large image folders")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu", help="torch engine: cpu | cuda | auto")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (image files)")
    add_precision_arguments(p, "evaluate")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _engine_api() -> Any:
    import bcnn.engine as engine

    return engine


def _engine_call(what: str, fn: Any, *a: Any, **kw: Any) -> Any:
    """Engine errors of any type become one-line ValueErrors (OSErrors pass through)."""
    try:
        return fn(*a, **kw)
    except (OSError, ValueError, ImportError):
        raise
    except Exception as e:
        raise ValueError(f"{what}: {type(e).__name__}: {e}") from e


def _load(args: argparse.Namespace) -> tuple[str, Any, dict[str, Any]]:
    """(engine, model or packed model, meta)."""
    from ..models import load_checkpoint, pretrained_checkpoint

    spec = args.model
    path = Path(spec)
    engine = args.engine
    shipped = None if path.exists() else pretrained_checkpoint(spec)
    if engine == "torch" and shipped is not None:  # a pretrained name with its torch checkpoint
        path = shipped
    elif path.suffix == ".bcnn" or (not path.exists() and path.suffix not in (".pt", ".pth")):
        # A packed file or a pretrained name: the engine's business.
        if engine == "torch":
            raise ValueError(f"{spec}: a packed model runs on --engine packed only")
        if path.suffix == ".bcnn" and not path.is_file():
            raise FileNotFoundError(f"packed model not found: {path}")
        packed = _engine_call(spec, _engine_api().load_any, spec)
        meta = dict(getattr(packed, "meta", None) or {})
        classes = getattr(packed, "classes", None)
        if classes and "classes" not in meta:
            meta["classes"] = list(classes)
        return "packed", packed, meta
    model, meta = load_checkpoint(path)
    if engine == "packed":
        eng = _engine_api()
        classes = meta.get("classes")
        kw: dict[str, Any] = {"meta": meta}
        if isinstance(classes, list | tuple):
            kw["classes"] = list(classes)
        return "packed", _engine_call(f"packing {path}", eng.pack, model, **kw), meta
    return "torch", model, meta


def run(args: argparse.Namespace) -> int:
    import time

    import numpy as np
    import torch

    from ..data import Loader, load_dataset
    from ..train import evaluate, resolve_device, topk_correct
    from ._common import print_json

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    engine, model, meta = _load(args)
    data = args.data or meta.get("data")
    if not data:
        raise ValueError("no --data given and the model does not record its data spec")
    val_split = args.val_split if args.val_split is not None else meta.get("val_split", 0.1)
    seed = args.seed if args.seed is not None else meta.get("seed", 0)
    image_size = args.image_size if args.image_size is not None else meta.get("image_size")
    ds = load_dataset(data, args.split, float(val_split), int(seed), image_size=image_size)
    if len(ds) == 0:
        raise ValueError(f"the {args.split} split of {data} is empty")
    loader = Loader(ds, args.batch_size, train=False, workers=args.workers)
    n_cls = len(ds.classes)
    model_cls = meta.get("classes")
    if model_cls is not None and len(model_cls) != n_cls:
        raise ValueError(f"model has {len(model_cls)} classes, {data} has {n_cls}")
    layers = parse_layers(args.layers)
    if args.weight_bits is not None or args.act_bits is not None or layers is not None:
        if engine == "torch":
            from ..quant import set_precision

            set_precision(model, args.weight_bits, args.act_bits, layers)
        else:
            _engine_call("precision", model.set_precision, args.weight_bits, args.act_bits, layers)
    t0 = time.perf_counter()
    res: dict[str, Any]
    if engine == "torch":
        device = resolve_device(args.device)
        model.to(device)
        out_features = getattr(model, "num_classes", n_cls)
        if out_features != n_cls:
            raise ValueError(f"model has {out_features} classes, {data} has {n_cls}")
        m = evaluate(model, loader, device)
        res = {"top1": m["top1"], "top5": m["top5"], "n": m["n"], "loss": m["loss"]}
    else:
        c1 = c5 = n = 0
        for x, y in loader:
            xb = np.ascontiguousarray(x.numpy())
            logits = np.asarray(_engine_call("packed inference", model, xb), dtype=np.float32)
            if logits.ndim != 2 or logits.shape[1] != n_cls:
                raise ValueError(f"model gives logits {logits.shape}, {data} has {n_cls} classes")
            t = torch.from_numpy(logits)
            c1 += topk_correct(t, y, 1)
            c5 += topk_correct(t, y, 5)
            n += len(y)
        res = {"top1": c1 / n, "top5": c5 / n, "n": n}
    seconds = time.perf_counter() - t0
    res.update(
        engine=engine,
        seconds=round(seconds, 4),
        model=str(args.model),
        data=str(data),
        split=args.split,
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        **({"layers": {k: list(v) for k, v in layers.items()}} if layers else {}),
    )
    if args.json:
        print_json(res)
    else:
        print(
            f"{args.model} on {data} ({args.split}, n={res['n']}, engine {engine}): "
            f"top1 {res['top1']:.4f}  top5 {res['top5']:.4f}  {seconds:.2f}s"
        )
    return 0
