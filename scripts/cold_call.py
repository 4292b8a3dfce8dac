"""What a kernel call costs when its caches are cold: fixed per-call costs, hot and after other
work (docs/kernels.md, "Cold calls").

    python scripts/cold_call.py [--rounds 60] [--json FILE]

Each probe is timed right after one of these (1 thread, medians over interleaved rounds):
- ``hot``: the probe itself;
- ``float``: PyTorch's float conv3x3, 256 ch 14x14 (what ``bcnn bench --layer`` runs between);
- ``busy``: a ~4 ms numba loop on registers only (no memory traffic);
- ``read8MB``: a numpy sum over 8 MB;
- ``sleep``: ``time.sleep(0.004)``.

The probes do almost no arithmetic, so their times are the fixed costs: a 32-channel 1x1
``bconv2d_affine`` through the public wrapper, the same wrapper's checked path alone
(``_run_conv(..., check_only=True)``), ``pack_sign(channels_first=True)`` of a 32-channel 1x1
input, a compiled no-op with 1 and with 25 arguments (numba's dispatch), and ``np.empty`` of
200 KB. When ``busy`` costs about as much as ``float``, the extra time is not our data being
evicted by PyTorch's but the time elapsed (a shared core's caches, predictors and TLB).
"""

from __future__ import annotations

import argparse
import json
import time

import numba
import numpy as np
import torch
import torch.nn.functional as F

from bcnn.engine import _kernels as K
from bcnn.engine._kernels import _conv as C
from bcnn.engine._threads import set_num_threads


@numba.njit(cache=False)
def _busy(n):  # type: ignore[no-untyped-def]
    s = 1.0
    for _ in range(n):
        s = s * 1.0000001 + 1e-9
    return s


@numba.njit(cache=False)
def _noop1(a):  # type: ignore[no-untyped-def]
    return a.shape[0]


@numba.njit(cache=False)
def _noop25(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17,
            a18, a19, a20, a21, a22, a23, a24):  # type: ignore[no-untyped-def]  # fmt: skip
    return a1.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--json", help="write the medians (us) here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    set_num_threads(1)
    rng = np.random.default_rng(0)
    c = 32
    x = rng.standard_normal((1, c, 1, 1)).astype(np.float32)
    pw = K.prepare_conv_weights(K.pack_weights(rng.standard_normal((c, c, 3, 3))), c)
    sc, bi = np.ones(c, np.float32), np.zeros(c, np.float32)
    xq = K.pack_sign(x, channels_first=True)
    a25 = (1, xq, pw.blocks, c, 9 * c, 3, 3, 1, 1, 1, 1, 1, C._I00, C._F00, C._U00, sc, bi,
           C._F0, C._F0, C._F0, False, C._F00, False, C._F0, C._B0)  # fmt: skip
    probes = {
        "bconv2d_affine": lambda: K.bconv2d_affine(xq, pw, sc, bi, stride=1, padding=1),
        "checked_path_checks": lambda: C._run_conv(
            xq, pw, 1, 1, C._MODE_AFFINE, scale=sc, bias=bi, check_only=True
        ),
        "pack_sign": lambda: K.pack_sign(x, channels_first=True),
        "noop_1_arg": lambda: _noop1(xq),
        "noop_25_args": lambda: _noop25(*a25),
        "np_empty_200KB": lambda: np.empty((14, 14, 256), np.float32),
    }
    xt, wt = torch.randn(1, 256, 14, 14), torch.randn(256, 256, 3, 3)
    big = np.ones(2_000_000, np.float32)
    _busy(10)
    t0 = time.perf_counter()
    _busy(1_000_000)
    n_busy = int(1_000_000 * 4e-3 / (time.perf_counter() - t0))
    before = {
        "hot": None,
        "float": lambda: F.conv2d(xt, wt, None, padding=1),
        "busy": lambda: _busy(n_busy),
        "read8MB": lambda: big.sum(),
        "sleep": lambda: time.sleep(0.004),
    }
    for p in probes.values():
        p()
    ts: dict[str, dict[str, list[float]]] = {k: {b: [] for b in before} for k in probes}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for k, p in probes.items():
                for b, f in before.items():
                    (f or p)()
                    t = time.perf_counter()
                    p()
                    ts[k][b].append((time.perf_counter() - t) * 1e6)
    med = {k: {b: float(np.median(v)) for b, v in d.items()} for k, d in ts.items()}
    print(f"{'us, median':22s}" + "".join(f"{b:>10s}" for b in before))
    for k, d in med.items():
        print(f"{k:22s}" + "".join(f"{d[b]:10.1f}" for b in before))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "busy_iterations": n_busy, "us": med}, f, indent=1)


if __name__ == "__main__":
    main()
