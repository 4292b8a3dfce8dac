"""Kernel paths (bcnn.engine.kernel_path, BCNN_KERNEL_PATH): every path this machine can run
gives the same bits as the numpy reference and a whole packed model the same logits as
torch; a path the CPU cannot run is a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bcnn.engine import kernel_path
from bcnn.engine._paths import PATHS, _host_features, runnable_paths, target_features

# run in a fresh interpreter on a given path: binary GEMMs at awkward sizes, then a
# randomized bcnn_cifar packed vs torch at 33 px, batch 1 and 7, and bit-serial W1A2 / W2A2
_PROBE = r"""
import json, sys
import numpy as np
import bcnn.engine as E
from bcnn.engine import _kernels as K
sys.path.insert(0, sys.argv[1])
from test_engine_exact import assert_exact, randomize, images, torch_logits
from bcnn.models import create_model
rng = np.random.default_rng(0)
out = {"path": E.kernel_path(), "gemm": True, "logits": True, "nibbles": True}
for m, n, k in [(1, 1, 1), (7, 63, 65), (3, 65, 130), (5, 130, 64)]:
    kw = (k + 63) // 64
    def rows(r):
        bits = rng.integers(0, 2, (r, k)).astype(bool)
        full = np.zeros((r, 64 * kw), bool); full[:, :k] = bits
        return np.packbits(full, axis=-1, bitorder="little").view("<u8").reshape(r, kw)
    a, w = rows(m), rows(n)
    ref = k - 2 * np.bitwise_count(a[:, None, :] ^ w[None]).sum(-1, dtype=np.int64)
    out["gemm"] &= bool(np.array_equal(K.bgemm(a, w, k), ref))
# the lut layout (a 3x3 conv of 9 words)
nine = K.prepare_conv_weights(np.zeros((8, 3, 3, 1), np.uint64), 64)
out["nibbles"] = nine.blocks.dtype.name == "uint8"
model = randomize(create_model("bcnn_cifar", width=8, depth=1), in_size=33)
packed = E.pack(model)
for n in (1, 7):
    x = images(n, 3, 33, 33, seed=n)
    assert_exact(packed(x), torch_logits(model, x))  # raises (the test fails) if not
from test_engine_kbit import _model, _check  # bit-serial W1A2 / W2A2 (stem, conv, head)
for wb, ab in ((1, 2), (2, 2)):
    m = _model(wb, ab)
    _check(m, E.pack(m), 33)
print(json.dumps(out))
"""


def _run(env: dict[str, str], code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )


_CLI = "import sys; from bcnn.cli import main; sys.exit(main(sys.argv[1:]))"
# a tiny layer benchmark: compiles little, runs in a second
_TINY_BENCH = ["bench", "--layer", "conv3x3", "--channels", "8", "--size", "5", "--repeat", "1"]


def _json_out(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert r.returncode == 0, r.stderr[-2000:]
    out: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def test_kernel_path_names_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    f = target_features()
    assert kernel_path() in runnable_paths()
    want = "vpopcnt" if "avx512vpopcntdq" in f else "lut" if "avx2" in f else "generic"
    assert kernel_path() == want  # the default: the fastest path the target runs
    # the profile of an AVX2-only CPU defaults to lut; generic when forced
    monkeypatch.setenv("NUMBA_CPU_NAME", "haswell")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "")
    monkeypatch.setattr("numba.core.config.CPU_NAME", "haswell", raising=False)
    monkeypatch.setattr("numba.core.config.CPU_FEATURES", "", raising=False)
    assert target_features() == {"avx2"} and kernel_path() == "lut"
    assert runnable_paths() == ["lut", "generic"]
    monkeypatch.setenv("BCNN_KERNEL_PATH", "generic")
    assert kernel_path() == "generic"


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_every_runnable_path_is_exact(path: str) -> None:
    """Every path this CPU runs, forced in a fresh interpreter (generic on a VPOPCNTDQ machine
    is compiled anew): GEMMs, a binary and two bit-serial models packed == torch."""
    if path not in runnable_paths():
        pytest.skip(f"this CPU cannot run the {path} path")
    r = _run({"BCNN_KERNEL_PATH": path}, _PROBE, str(Path(__file__).parent))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"path": path, "gemm": True, "logits": True, "nibbles": path == "lut"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BCNN_KERNEL_PATH": "avx9"}, "BCNN_KERNEL_PATH='avx9': unknown kernel path"),
        (
            {"BCNN_KERNEL_PATH": "lut", "NUMBA_CPU_NAME": "x86-64", "NUMBA_CPU_FEATURES": ""},
            "BCNN_KERNEL_PATH=lut: the compile target has no AVX2",
        ),
        (
            {"BCNN_KERNEL_PATH": "vpopcnt", "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""},
            "the compile target has no AVX-512 VPOPCNTDQ (it runs lut, generic; or unset it)",
        ),
    ],
)
def test_a_path_the_target_cannot_run_is_a_one_line_error(
    env: dict[str, str], message: str, tmp_path: Path
) -> None:
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    r = _run(env, _CLI, "predict", "bcnn_cifar10", str(img))
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.slow
def test_bench_isa_avx2_measures_the_avx2_profile() -> None:
    """`bcnn bench --isa avx2` re-runs in the AVX2 profile and says so next to its figures."""
    res = _json_out(_run({}, _CLI, *_TINY_BENCH, "--json", "--isa", "avx2"))
    assert res["kernel_path"] == "lut" and res["isa"] == "AVX2" and res["binary_exact"]


@pytest.mark.slow
def test_bench_compares_kernel_paths_in_one_run() -> None:
    res: dict[str, Any] = _json_out(_run({}, _CLI, *_TINY_BENCH, "--json", "--paths", "all"))
    want = runnable_paths()
    assert list(res["paths"]) == want and want[-1] == "generic"
    assert ("lut" in want) == ("avx2" in target_features())
    for p in want:
        assert res["paths"][p]["kernel_path"] == p and res["paths"][p]["binary_exact"]
    assert res[f"speed_vs_{want[0]}"][want[0]] == 1.0
    bad = _run({}, _CLI, *_TINY_BENCH, "--paths", "avx9")
    assert bad.returncode != 0 and "not a kernel path this CPU runs" in bad.stderr


@pytest.mark.slow
def test_bench_compares_the_avx2_profiles_paths() -> None:
    """--isa avx2 --paths all: lut against generic, both compiled for haswell."""
    if "avx2" not in _host_features():
        pytest.skip("this CPU has no AVX2")
    args = [*_TINY_BENCH, "--json", "--isa", "avx2", "--paths", "all"]
    res: dict[str, Any] = _json_out(_run({}, _CLI, *args))
    assert list(res["paths"]) == ["lut", "generic"]
    for p in ("lut", "generic"):
        r = res["paths"][p]
        assert r["kernel_path"] == p and r["isa"] == "AVX2" and r["binary_exact"]
