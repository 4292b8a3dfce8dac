"""Benchmark (not a test): images/s of one training step (forward, backward, Adam, latent
clipping) of bcnn_cifar (fully binary, step 2) vs its float twin, same batch, same machine.

    python scripts/bench_train.py [--batch-size 64] [--iters 20] [--threads N] [--amp]
    [--model bcnn_cifar] [--model-kw width=32 ...] [--compile] [--json]

--compile also times the binary step under torch.compile (what `bcnn train --compile` runs) and
reports its speed-up over the eager binary step.

Target (DESIGN.md): the binary step costs <= 1.2x the float twin's step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from bcnn.models import create_model
from bcnn.train import binarised_weight_names, clip_latent_weights, make_optimizer


def step_rate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    iters: int,
    amp: bool,
    clip: bool,
    warmup: int = 3,
    compiled: bool = False,
) -> float:
    opt = make_optimizer(model, 1e-3, 0.0)
    net = torch.compile(model) if compiled else model  # warm-up below includes compiling
    names = binarised_weight_names(model) if clip else set()
    params = [p for n, p in model.named_parameters() if n in names]
    model.train()

    def one() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if params:
            clip_latent_weights(params)

    for _ in range(warmup):
        one()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    times.sort()
    return x.shape[0] / times[len(times) // 2]  # median step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bcnn_cifar")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (both models)")
    p.add_argument("--model-kw", nargs="*", default=[])
    p.add_argument("--compile", action="store_true", help="also time the compiled binary step")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    kw = {k: int(v) for k, v in (s.split("=") for s in a.model_kw)}
    torch.manual_seed(0)
    x = torch.randint(0, 256, (a.batch_size, 3, a.size, a.size), dtype=torch.uint8)
    y = torch.randint(0, 10, (a.batch_size,))
    res = {}
    for name, binary in (("float", False), ("binary", True)):
        m = create_model(a.model, num_classes=10, binary=binary, **kw)
        res[name] = step_rate(m, x, y, a.iters, a.amp, clip=binary)
        if binary and a.compile:
            res["compiled"] = step_rate(m, x, y, a.iters, a.amp, clip=True, compiled=True)
    out = {
        "model": a.model,
        "batch_size": a.batch_size,
        "threads": torch.get_num_threads(),
        "amp_bf16": a.amp,
        "float_img_s": round(res["float"], 1),
        "binary_img_s": round(res["binary"], 1),
        "binary_step_cost_ratio": round(res["float"] / res["binary"], 3),
    }
    if a.compile:
        out["compiled_binary_img_s"] = round(res["compiled"], 1)
        out["compile_speedup"] = round(res["compiled"] / res["binary"], 3)
    if a.json:
        print(json.dumps(out))
    else:
        print(
            f"{a.model} batch {a.batch_size}, {out['threads']} threads"
            f"{', bf16 autocast' if a.amp else ''}: float twin {out['float_img_s']:.0f} img/s, "
            f"binary {out['binary_img_s']:.0f} img/s -> binary step costs "
            f"{out['binary_step_cost_ratio']:.2f}x the float step (target <= 1.2x)"
        )
        if a.compile:
            print(
                f"compiled binary {out['compiled_binary_img_s']:.0f} img/s: "
                f"{out['compile_speedup']:.2f}x the eager binary step"
            )


if __name__ == "__main__":
    main()
