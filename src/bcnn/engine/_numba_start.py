"""numba's one-time start-up cost, trimmed for the packed engine's first call.

Before numba runs (or loads from its cache) its first function in a process, it loads its
CPU target's registries of built-in implementations. One of them (``numba.np.arraymath``)
probes for a BLAS by importing ``scipy.linalg.cython_blas``, which imports the whole of
``scipy.linalg`` (about 0.15-0.3 s on a 2-core VM) only to decide how ``np.correlate`` and
``np.convolve`` are implemented in numba code. The packed engine calls neither, so
:func:`start_numba` loads the registries with that import hidden: the probe finds no BLAS and
numba uses its plain loops for those two functions in this process. Nothing else changes:
``np.dot`` and ``np.linalg`` in numba code import SciPy when they are compiled, and the
hiding ends before this function returns (``import scipy.linalg`` works as usual). When
SciPy's linear algebra is already imported, nothing is hidden. A single-threaded plan whose
kernels are all in numba's cache does not load the registries at all
(:func:`bcnn.engine._precompile._load_cached`); this runs when something must compile.

Caveat: while the registries load (once per process, a fraction of a second), another thread
importing ``scipy.linalg.cython_blas`` for the first time would see an ``ImportError``.
"""

from __future__ import annotations

import sys
import threading

__all__ = ["start_numba"]

_BLAS = "scipy.linalg.cython_blas"
_lock = threading.Lock()
_started = False


def start_numba() -> None:
    """Load numba's CPU target registries now (once per process), skipping SciPy's BLAS."""
    global _started
    if _started:
        return
    with _lock:
        if _started:
            return
        try:
            from numba.core.registry import cpu_target
        except ImportError:  # a numba without this layout: it loads lazily as usual
            _started = True
            return
        hide = "scipy.linalg" not in sys.modules and _BLAS not in sys.modules
        if hide:
            sys.modules[_BLAS] = None  # type: ignore[assignment]  # import fails fast
        try:
            cpu_target.target_context.refresh()
        finally:
            if hide and _BLAS in sys.modules and sys.modules[_BLAS] is None:
                del sys.modules[_BLAS]
        _started = True
