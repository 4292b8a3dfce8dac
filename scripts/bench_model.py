"""Whole-model benchmark of the packed engine (not a test): batch-1 latency of `bcnn_cifar`
packed vs its float twin and the simulated binary model in PyTorch, 1 and 2 threads.

    python scripts/bench_model.py [--model bcnn_cifar] [--batch 1] [--threads 1 2] [--repeat 50]
"""

from __future__ import annotations

import argparse
import json

from bcnn._commands._bench_model import bench_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="bcnn_cifar")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=50)
    a = p.parse_args()
    for t in a.threads:
        print(json.dumps(bench_model(a.model, batch=a.batch, threads=t, repeat=a.repeat)))


if __name__ == "__main__":
    main()
