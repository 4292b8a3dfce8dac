"""Truncated and bit-flipped copies of a .bcnn file, each loaded and run in a subprocess (a
segfault or a hang is then a test failure, not a dead test runner): every copy must give a
one-line ValueError or run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import sys, numpy as np
from pathlib import Path
from bcnn.engine import load
good = Path(sys.argv[1]).read_bytes(); out = Path(sys.argv[2])
seed, size, switch = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
rng = np.random.default_rng(seed)
x = rng.integers(0, 256, (2, 3, size, size), dtype=np.uint8)
hlen = int.from_bytes(good[:8], "little")
res = [0, 0]
for i in range(60):
    b = bytearray(good)
    if i < 20:  # truncations, half of them inside the header
        b = b[: int(rng.integers(0, hlen + 16)) if i % 2 else int(rng.integers(0, len(good)))]
    else:  # bit flips: in the header (JSON) first, then anywhere
        for _ in range(int(rng.integers(1, 5))):
            pos = int(rng.integers(0, 8 + hlen)) if i < 45 else int(rng.integers(0, len(b)))
            b[pos] ^= 1 << int(rng.integers(0, 8))
    out.write_bytes(bytes(b))
    try:
        m = load(out)
        m(x)
        for k in (1, 2, 3, 4) if switch else ():  # every uniform precision of the sets
            m.set_precision(weight_bits=k, act_bits=k)
            m(x)
        res[1] += 1
    except ValueError as e:
        assert str(e) and "\n" not in str(e).strip(), repr(e); res[0] += 1
print(*res)
"""


def corrupt_and_run(
    model_file: Path, tmp_path: Path, *, seed: int, size: int = 32, switch: bool = False
) -> tuple[int, int]:
    """60 corrupted copies of ``model_file`` -> (clean ValueErrors, successful runs)."""
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_file), str(tmp_path / "corrupt.bcnn"),
         str(seed), str(size), "1" if switch else "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    errors, ran = (int(v) for v in r.stdout.split())
    assert errors + ran == 60
    return errors, ran
