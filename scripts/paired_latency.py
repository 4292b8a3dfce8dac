"""Batch-1 latency of a packed model under two source trees, in paired bursts: is a change
faster or slower?

    python scripts/paired_latency.py OLD_SRC NEW_SRC [--model bcnn_cifar10] [--rounds 100]
    python scripts/paired_latency.py OLD_SRC NEW_SRC --conv 256 --size 14  # one conv3x3 layer

OLD_SRC / NEW_SRC are ``src`` folders (e.g. a ``git worktree`` of the commit before, and
``src`` of this checkout). Each runs in its own long-lived worker process (``PYTHONPATH`` set
to it, its own numba cache), which loads the model, warms up, and then times bursts of
``--calls`` calls when asked. The bursts alternate old, new, old, new, ..., and the figure is
the median of the per-round ratios new/old. A shared VM whose speed drifts within seconds (the
2-core machines of docs/kernels.md) moves both sides of a round alike, where separate runs of
a benchmark can differ by 20-60% from drift alone. Even so, on that VM whole runs of
100-150 rounds gave paired medians from 0.99 to 1.18 for one pair of trees: repeat the run and
report every median. Workers inherit the environment, so
``BCNN_KERNEL_PATH=generic`` (etc.) applies to both. Prints one line (``--json``: a file too).
Run it on a quiet machine. ``--conv C`` times one packed 3x3 conv layer instead (C in and out
channels, padding 1, ``--size`` square input, batch 1, the affine epilogue into a preallocated
output: ``bconv2d_affine``, as the bound layers of a fast plan run it; one kernel thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# the worker's setup builds ``m`` (one call) and ``x``; the shared loop warms up, then times
# bursts of calls as the parent asks
_MODEL_SETUP = """
import sys, time, numpy as np
from bcnn.engine import load
m = load(sys.argv[1])
s = int(sys.argv[2])
x = np.random.default_rng(0).integers(0, 256, (1, m.in_channels, s, s), np.uint8)
"""
_CONV_SETUP = """
import sys, time, numpy as np
from bcnn.engine import _kernels as K, set_num_threads
set_num_threads(1)
c, s = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
pw = K.prepare_conv_weights(K.pack_weights(rng.standard_normal((c, c, 3, 3)).astype(np.float32)), c)
x = K.pack_sign(rng.standard_normal((1, s, s, c)).astype(np.float32))
scale = rng.random(c).astype(np.float32)
bias = rng.standard_normal(c).astype(np.float32)
out = np.empty((1, s, s, c), np.float32)
def m(x):
    K.bconv2d_affine(x, pw, scale, bias, padding=1, out=out)
"""
_LOOP = """
for _ in range(100):
    m(x)
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    t0 = time.perf_counter()
    for _ in range(n):
        m(x)
    print((time.perf_counter() - t0) / n * 1e3, flush=True)
"""


def _start(src: Path, model: str, size: int, cache: str, conv: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(src), "NUMBA_CACHE_DIR": cache}
    code, what = (_CONV_SETUP, str(conv)) if conv else (_MODEL_SETUP, model)
    code += _LOOP
    p = subprocess.Popen(
        [sys.executable, "-c", code, what, str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),  # not a folder whose bcnn/ would shadow the source tree
    )
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        raise SystemExit(f"error: the worker for {src} did not start (see its output above)")
    return p


def _burst(p: subprocess.Popen[str], calls: int) -> float:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(f"{calls}\n")
    p.stdin.flush()
    return float(p.stdout.readline())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path, help="the src folder of the baseline")
    ap.add_argument("new", type=Path, help="the src folder of the change")
    ap.add_argument("--model", default="bcnn_cifar10", help="a .bcnn file or pretrained name")
    ap.add_argument("--conv", type=int, default=0, metavar="C",
                    help="time one 3x3 conv layer of C channels instead of a model")  # fmt: skip
    ap.add_argument("--size", type=int, default=32, help="image side (batch 1)")
    ap.add_argument("--rounds", type=int, default=100, help="paired bursts")
    ap.add_argument("--calls", type=int, default=100, help="calls per burst")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    for src in (args.old, args.new):
        if not (src / "bcnn" / "__init__.py").is_file():
            print(f"error: {src} is not a src folder holding bcnn/", file=sys.stderr)
            return 2
    if min(args.rounds, args.calls, args.size) < 1 or args.conv < 0:
        print("error: --rounds, --calls and --size must be >= 1, --conv >= 0", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as c_old, tempfile.TemporaryDirectory() as c_new:
        old = _start(args.old, args.model, args.size, c_old, args.conv)
        new = _start(args.new, args.model, args.size, c_new, args.conv)
        t_old, t_new = [], []
        for _ in range(args.rounds):
            t_old.append(_burst(old, args.calls))
            t_new.append(_burst(new, args.calls))
        for p in (old, new):
            assert p.stdin is not None
            p.stdin.close()
            p.wait()
    ratios = sorted(b / a for a, b in zip(t_old, t_new, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    row = {
        "model": f"conv3x3 {args.conv} ch" if args.conv else args.model,
        "size": args.size,
        "kernel_path_env": os.environ.get("BCNN_KERNEL_PATH", ""),
        "rounds": args.rounds,
        "calls": args.calls,
        "old_ms_median": round(statistics.median(t_old), 4),
        "new_ms_median": round(statistics.median(t_new), 4),
        "new_over_old_paired_median": round(statistics.median(ratios), 4),
        "new_over_old_p25_p75": [round(q[0], 4), round(q[2], 4)],
    }
    print(
        f"old {row['old_ms_median']} ms, new {row['new_ms_median']} ms (medians); "
        f"paired new/old {row['new_over_old_paired_median']} "
        f"[p25 {row['new_over_old_p25_p75'][0]}, p75 {row['new_over_old_p25_p75'][1]}]"
    )
    if args.json:
        args.json.write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
