"""bcnn predict MODEL image [image ...]"""

from __future__ import annotations

import argparse

HELP = "classify images with a packed model (top-5, with class names when known)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .bcnn file, a pretrained name, or a checkpoint (.pt)")
    p.add_argument("images", nargs="+", help="image files (jpg, png, ...)")
    p.add_argument("-k", "--top", type=int, default=5, help="how many classes to show")
    p.add_argument(
        "--no-resize", action="store_true", help="run at the image's own size (no resizing)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per image")


def _softmax(z):  # type: ignore[no-untyped-def]
    import numpy as np

    e = np.exp(z - z.max())
    return e / e.sum()


def run(args: argparse.Namespace) -> int:
    import sys

    import numpy as np

    from ..data import read_image
    from ..engine import load_any
    from ._common import print_json

    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    model = load_any(args.model)
    arrays = [
        read_image(p, channels=model.in_channels if model.in_channels in (1, 3) else None)
        for p in args.images
    ]  # every image is read (and checked) before any output
    size = model.input_size
    names = model.classes
    for path, a in zip(args.images, arrays, strict=True):
        if a.shape[0] != model.in_channels:
            raise ValueError(
                f"{path}: {a.shape[0]} channels, the model expects {model.in_channels}"
            )
        note = None
        if size is not None and tuple(a.shape[1:]) != size and not args.no_resize:
            from PIL import Image

            img = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            r = np.asarray(img, dtype=np.uint8)
            note = f"resized {a.shape[2]}x{a.shape[1]} -> {size[1]}x{size[0]}"
            a = r[None] if r.ndim == 2 else r.transpose(2, 0, 1)
        logits = model(np.ascontiguousarray(a[None]))[0]
        prob = _softmax(logits.astype(np.float64))
        order = np.argsort(-logits, kind="stable")[: args.top]
        top = [
            {
                "class": int(i),
                "name": names[i] if names else str(i),
                "logit": float(logits[i]),
                "prob": float(prob[i]),
            }
            for i in order
        ]
        if args.json:
            print_json({"image": str(path), "resized": note, "top": top})
        else:
            if note:
                print(f"{path}: note: {note} (the model's input size)", file=sys.stderr)
            print(f"{path}:")
            for t in top:
                print(f"  {t['prob'] * 100:6.2f}%  {t['name']}")
    return 0
