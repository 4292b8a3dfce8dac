"""The packed engine's start-up trims (docs/kernels.md, Start-up): numba's registries load
without SciPy's BLAS probe, the console script exits without the final garbage collections,
and the warm-up step byte-compiles the package. Each runs in a fresh interpreter."""

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
