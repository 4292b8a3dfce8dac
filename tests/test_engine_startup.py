"""The packed engine's start-up trims (docs/kernels.md, Start-up): cached kernels load without
numba's registries, which otherwise load without SciPy's BLAS probe, the console script exits
without the final garbage collections, and the warm-up step byte-compiles the package. Each
runs in a fresh interpreter."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def _py(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_first_call_skips_scipys_blas_and_leaves_scipy_importable() -> None:
    probe = "'scipy.linalg' in sys.modules"
    # control: numba's own registry load imports scipy.linalg (the cost being skipped)
    plain = _py(
        "import sys; from numba.core.registry import cpu_target; "
        f"cpu_target.target_context.refresh(); print({probe})"
    )
    if plain != "True":
        pytest.skip("this numba does not probe SciPy's BLAS when its registries load")
    got = _py(
        "import sys, numpy as np; from bcnn.engine import load; "
        "m = load('bcnn_cifar10'); y = m(np.zeros((1, 3, 32, 32), np.uint8)); "
        f"a = {probe}; hidden = 'scipy.linalg.cython_blas' in sys.modules; "
        "import scipy.linalg.cython_blas, scipy.linalg; "  # importable afterwards
        "print(y.shape, a, hidden, scipy.linalg.norm([3.0, 4.0]))"
    )
    assert got == "(1, 10) False False 5.0"


def test_start_numba_keeps_an_already_imported_scipy() -> None:
    got = _py(
        "import sys, scipy.linalg; from bcnn.engine._numba_start import start_numba; "
        "start_numba(); start_numba(); "
        "print(sys.modules['scipy.linalg.cython_blas'] is not None)"
    )
    assert got == "True"


def test_console_entry_runs_and_exits_with_the_commands_code(tmp_path: Path) -> None:
    """``python -m bcnn`` (the console script's ``entry``): output intact, exit codes kept."""
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    run = [sys.executable, "-m", "bcnn", "predict", "bcnn_cifar10"]
    ok = subprocess.run([*run, str(img), "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["top"]) == 5  # stdout flushed before the quick exit
    bad = subprocess.run([*run, str(tmp_path / "none.png")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "none.png" in bad.stderr


def test_warm_step_byte_compiles_the_package() -> None:
    import bcnn.cli
    from bcnn.engine._warm import compile_package

    pyc = Path(importlib.util.cache_from_source(bcnn.cli.__file__))
    pyc.unlink(missing_ok=True)  # (recompiled from source on the next import if need be)
    assert compile_package()
    assert pyc.is_file()


_LIGHT_RUN = """
import json, sys, numba, numpy as np
import bcnn.engine._precompile as P
from bcnn.engine import load, set_num_threads
{setup}
m = load("bcnn_cifar10")
x = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
y = m(x)  # one thread: the plan's serial kernels, from the cache
registries = "numba.np.arraymath" in sys.modules
blas = "scipy.linalg" in sys.modules
set_num_threads(2)
y2 = m(x)  # the parallel kernels: numba's registries load now, and whatever it must compile
s = numba.njit(lambda a: a.sum() * 2)(np.arange(4.0))  # a compile in the same process
print(json.dumps({{"registries": registries, "blas": blas, "y": y.tolist(), "y2": y2.tolist(),
                  "s": s}}))
"""


def test_cached_kernels_load_without_numbas_registries() -> None:
    """A warm start loads the plan's cached kernels with numba's runtime initialised but
    without its registries of built-in implementations (~0.3 s); the logits are the usual
    ones, and parallel kernels and new compiles in the same process still work. Control:
    with the light load switched off (another numba), the registries load, still without
    SciPy's BLAS probe."""
    import numba

    from bcnn.engine import PackedModel, load
    from bcnn.engine._precompile import _LIGHT_NUMBA

    if not numba.__version__.startswith(_LIGHT_NUMBA):
        pytest.skip(f"numba {numba.__version__}: cached kernels load numba's way")
    _py(_LIGHT_RUN.format(setup=""))  # the cache holds every kernel after this run
    light = json.loads(_py(_LIGHT_RUN.format(setup="")))
    control = json.loads(_py(_LIGHT_RUN.format(setup="P._LIGHT_NUMBA = ()")))
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    p = load("bcnn_cifar10")
    want = PackedModel(p.graph, p.tensors, backend="reference")(x)
    assert not light["registries"] and control["registries"]
    assert not light["blas"] and not control["blas"]
    for run in (light, control):
        assert np.array_equal(np.array(run["y"], np.float32), want)
        assert np.array_equal(np.array(run["y2"], np.float32), want)
        assert run["s"] == 12.0
