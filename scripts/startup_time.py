"""Start-up time of ``bcnn predict bcnn_cifar10 IMG``: wall time of the whole command, with an
empty numba cache (every kernel compiled) and with a warm one, per kernel path.

    python scripts/startup_time.py [--repeat 3] [--profiles native avx2-lut avx2-generic]

Each run is a fresh process (``python -m bcnn predict``), timed from outside like ``time``.
"Empty" points ``NUMBA_CACHE_DIR`` at a new empty folder; "warm" reruns with the folder the
empty run filled. Profiles: ``native`` (the host's default path), ``avx2-lut`` and
``avx2-generic`` (compiled for Haswell with no extra features: the AVX2 profile of
``bcnn bench --isa avx2``). Prints a table and ``--json`` a file. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROFILES = {
    "native": {},
    "avx2-lut": {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "", "BCNN_KERNEL_PATH": "lut"},
    "avx2-generic": {
        "NUMBA_CPU_NAME": "haswell",
        "NUMBA_CPU_FEATURES": "",
        "BCNN_KERNEL_PATH": "generic",
    },
}


def _run(env: dict[str, str], img: Path) -> float:
    cmd = [sys.executable, "-m", "bcnn", "predict", "bcnn_cifar10", str(img)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell (median reported)")
    ap.add_argument("--profiles", nargs="*", default=list(PROFILES), choices=list(PROFILES))
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "img.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(img)
        for name in args.profiles:
            empty, warm = [], []
            for r in range(args.repeat):
                cache = Path(tmp) / f"cache-{name}-{r}"
                cache.mkdir()
                env = {**os.environ, **PROFILES[name], "NUMBA_CACHE_DIR": str(cache)}
                empty.append(_run(env, img))
                warm.append(_run(env, img))
            row = {
                "profile": name,
                "empty_cache_s": round(statistics.median(empty), 2),
                "warm_cache_s": round(statistics.median(warm), 2),
                "empty_runs": [round(t, 2) for t in empty],
                "warm_runs": [round(t, 2) for t in warm],
            }
            rows.append(row)
            print(
                f"{name:13s} empty cache {row['empty_cache_s']:6.2f} s   "
                f"warm cache {row['warm_cache_s']:5.2f} s   "
                f"(runs {row['empty_runs']} / {row['warm_runs']})",
                flush=True,
            )
    if args.json:
        out = {"cpu": _cpu(), "cores": os.cpu_count(), "rows": rows}
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
