"""Compile (or load from numba's cache) the kernel specialisations of the shipped pretrained
models, and their plan runners (used once calls from several threads overlap), so that the
first ``bcnn predict`` after an install starts in about a second; and the kernels of
``bcnn.engine.pbatch`` (both products, every activation grid), so that its first call does
not compile either: ``python -m bcnn.engine._warm`` (the Makefile's venv step runs it).
It also byte-compiles the package (:func:`compile_package`). Never imports torch."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .._pretrained import PRETRAINED_DIR

__all__ = ["compile_package", "warm", "warm_pbatch"]


def compile_package() -> bool:
    """Write the ``.pyc`` files of the ``bcnn`` package. An editable install, or an environment
    with ``PYTHONDONTWRITEBYTECODE`` set, otherwise compiles every module's source again on
    every start (about 0.1 s of ``bcnn predict``). Returns whether every file compiled."""
    import compileall

    return bool(compileall.compile_dir(Path(__file__).resolve().parents[1], quiet=1))


def warm(batches: tuple[int, ...] = (1,), threads: int = 2) -> list[str]:
    """Run every shipped ``.bcnn`` once per batch size on zero images (an any-precision one at
    each uniform precision), and once at batch 8 on ``threads`` kernel threads (the parallel
    kernels, which would otherwise compile on the first multi-threaded call: about 26 s on a
    2-core Zen 3); returns their names."""
    from . import load
    from ._fastplan import _FastPlan
    from ._threads import max_threads, num_threads

    names = []
    for path in sorted(PRETRAINED_DIR.glob("*.bcnn")):
        model = load(path)
        h, w = model.input_size or (32, 32)
        for n in batches:
            x = np.zeros((n, model.in_channels, h, w), np.uint8)
            model(x)  # the step-by-step kernels (single-threaded use)
            sets = [set(w) & set(a) for w, a in model.precision_layers.values()]
            bits = sorted(set.intersection(*sets)) if sets else []
            for k in bits[:-1]:  # any-precision: the other uniform settings (W1A1's routes)
                with model.precision(weight_bits=k, act_bits=k):
                    model(x)
            plan = _FastPlan(model, x.shape)
            plan.use_runner()  # the compiled runner (calls from several threads)
            plan(x)
        if threads > 1 and max_threads() > 1:  # large enough for the layers to split
            with num_threads(threads):
                model(np.zeros((8, model.in_channels, h, w), np.uint8))
        names.append(path.stem)
    return names


def warm_pbatch() -> None:
    """Run the PrecisionBatching kernels once on a small layer: the lookup-table GEMV (fused
    linear and step by step) and the bit-serial popcount product, signed and unsigned."""
    from ._pbatch_kernels import QuantizedActs, QuantizedWeights, lut_linear, plane_dot

    rng = np.random.default_rng(0)
    w = QuantizedWeights(rng.normal(size=(8, 70)))
    bias = np.zeros(8, np.float64)
    for signed in (False, True):
        x = np.abs(rng.normal(size=(2, 70))).astype(np.float32)
        if signed:
            x[:, 0] = -1.0
        if w.has_lut:
            lut_linear(x, w, 4, 8, bias)
        for bits in (4, 8):
            a = QuantizedActs(x, bits)
            for lut in (False, True) if w.has_lut else (False,):
                plane_dot(w, 4, a, lut=lut)


if __name__ == "__main__":
    t0 = time.perf_counter()
    compile_package()
    warm_pbatch()
    done = ", ".join(warm()) or "no model"
    print(f"bcnn: kernels ready for {done} ({time.perf_counter() - t0:.1f} s)")
