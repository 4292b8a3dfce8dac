"""Compile (or load from numba's cache) the kernel specialisations of the shipped pretrained
models, and their plan runners (used once calls from several threads overlap), so that the
first ``bcnn predict`` after an install starts in about a second:
``python -m bcnn.engine._warm`` (the Makefile's venv step runs it). Never imports torch."""

from __future__ import annotations

import time

import numpy as np

from .._pretrained import PRETRAINED_DIR

__all__ = ["warm"]


def warm(batches: tuple[int, ...] = (1,)) -> list[str]:
    """Run every shipped ``.bcnn`` once per batch size on zero images; returns their names."""
    from . import load
    from ._fastplan import _FastPlan

    names = []
    for path in sorted(PRETRAINED_DIR.glob("*.bcnn")):
        model = load(path)
        h, w = model.input_size or (32, 32)
        for n in batches:
            x = np.zeros((n, model.in_channels, h, w), np.uint8)
            model(x)  # the step-by-step kernels (single-threaded use)
            plan = _FastPlan(model, x.shape)
            plan.use_runner()  # the compiled runner (calls from several threads)
            plan(x)
        names.append(path.stem)
    return names


if __name__ == "__main__":
    t0 = time.perf_counter()
    done = ", ".join(warm()) or "no model"
    print(f"bcnn: kernels ready for {done} ({time.perf_counter() - t0:.1f} s)")
