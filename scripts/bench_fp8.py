"""Step-time overhead of the FP8 emulation: FP32 and FP8 training steps interleaved in one
process (the same model, batch and optimizer), medians of per-step times.

    python scripts/bench_fp8.py --width 16 --batch 128 --steps 20 [--recipe fp8] [--json]

Interleaving (fp32, fp8, fp32, fp8, ...) keeps a load change on a shared machine from landing
on one side only; rerun if the two medians look off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from bcnn.fp8 import FP8Training, get_recipe
from bcnn.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bcnn_cifar")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=None, help="blocks per stage (model default)")
    ap.add_argument("--binary", action="store_true", help="a BCNN (step 2) instead of its twin")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--recipe", default="fp8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (a.batch, 3, 32, 32)).float()
    y = torch.randint(0, 10, (a.batch,))
    runs = {}
    for name in ("fp32", a.recipe):
        kw = {"depth": a.depth} if a.depth else {}
        m = create_model(a.model, num_classes=10, binary=a.binary, width=a.width, **kw)
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        fp8 = (
            None if name == "fp32" else FP8Training(m, opt, get_recipe(a.recipe), total_steps=10**6)
        )
        runs[name] = (m, opt, fp8)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(a.steps + 2):
        for name, (m, opt, fp8) in runs.items():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x), y)
            if fp8 is None:
                loss.backward()
                opt.step()
            else:
                fp8.step(loss, i)
            if i >= 2:  # warm-up (allocations, the numba kernel's first call)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "model": a.model,
        "binary": a.binary,
        "width": a.width,
        "batch": a.batch,
        "threads": a.threads,
        "steps": a.steps,
        "fp32_ms": 1e3 * med["fp32"],
        f"{a.recipe}_ms": 1e3 * med[a.recipe],
        "overhead": med[a.recipe] / med["fp32"],
    }
    if a.json:
        print(json.dumps(res))
    else:
        print(
            f"{a.model} width {a.width} batch {a.batch}, {a.threads} thread(s), "
            f"median of {a.steps}: "
            f"fp32 {res['fp32_ms']:.1f} ms, {a.recipe} {res[f'{a.recipe}_ms']:.1f} ms "
            f"({res['overhead']:.2f}x)"
        )


if __name__ == "__main__":
    main()
