"""Kernel paths: which instruction set the engine's compiled kernels use, chosen at start-up.

numba compiles every kernel for one target per process (the host CPU, or ``NUMBA_CPU_NAME``
with ``NUMBA_CPU_FEATURES``). The same kernel source becomes:

* ``vpopcnt``: targets with AVX-512 VPOPCNTDQ (Zen 4/5, Ice Lake server and later): the
  micro-kernels' ``llvm.ctpop.v8i64`` is one ``VPOPCNTQ`` per 512 binary MACs;
* ``lut``: targets with AVX2: the binary conv / dense / bit-serial tiles use ``vpshufb``
  lookup tables on nibble weights instead of popcounts (``_kernels/_lut_conv.py``); the stem
  and the other small kernels keep LLVM's popcount sequence;
* ``generic``: any target: LLVM lowers the same popcounts to its portable sequence
  (``vpshufb`` nibble tables with a ``vpsadbw`` reduction on AVX2, bit tricks elsewhere).

Chosen by default: ``vpopcnt`` where the target has VPOPCNTDQ, else ``lut`` where it has
AVX2, else ``generic`` (measured figures in docs/kernels.md).

``BCNN_KERNEL_PATH=vpopcnt|lut|generic`` forces a path (benchmarks, tests); it is applied when
``bcnn.engine`` is imported, before numba compiles anything: ``generic`` compiles for the host
without VPOPCNTDQ. A path the CPU cannot run is a one-line ``ValueError``, never an
illegal-instruction crash. :func:`kernel_path` names the active path.
"""

from __future__ import annotations

import os
import sys

__all__ = [
    "PATHS",
    "apply_kernel_path_env",
    "isa",
    "kernel_path",
    "runnable_paths",
    "target_features",
]

PATHS = ("vpopcnt", "lut", "generic")
_VPOPCNT = "avx512vpopcntdq"
# CPU names whose default features include these (for NUMBA_CPU_NAME with empty features)
_NAMED = {
    "avx2": {
        "haswell", "broadwell", "skylake", "skylake-avx512", "cascadelake", "cooperlake",
        "icelake-client", "icelake-server", "tigerlake", "alderlake", "raptorlake",
        "sapphirerapids", "znver1", "znver2", "znver3", "znver4", "znver5", "x86-64-v3",
        "x86-64-v4",
    },
    _VPOPCNT: {
        "icelake-client", "icelake-server", "tigerlake", "sapphirerapids", "znver4", "znver5",
    },
}  # fmt: skip


def _host_features() -> dict[str, bool]:
    from llvmlite import binding as llvm

    return dict(llvm.get_host_cpu_features())


def target_features() -> set[str]:
    """Features of numba's compile target: NUMBA_CPU_NAME / NUMBA_CPU_FEATURES when set (as
    numba reads them), else the host's."""
    name = os.environ.get("NUMBA_CPU_NAME", "")
    feats = os.environ.get("NUMBA_CPU_FEATURES", "")
    if "numba" in sys.modules:
        from numba.core import config

        name = getattr(config, "CPU_NAME", None) or ""
        feats = getattr(config, "CPU_FEATURES", None) or ""
    if feats:
        return {f[1:] for f in feats.split(",") if f.startswith("+")}
    if name and name != "host":
        return {f for f, cpus in _NAMED.items() if name in cpus}
    return {f for f, on in _host_features().items() if on}


def isa() -> str:
    """The compile target's relevant ISA: 'AVX-512 VPOPCNTDQ', 'AVX2' or 'baseline'."""
    f = target_features()
    return "AVX-512 VPOPCNTDQ" if _VPOPCNT in f else "AVX2" if "avx2" in f else "baseline"


def kernel_path() -> str:
    """The active kernel path: 'vpopcnt', 'lut' or 'generic' (see the module docstring)."""
    f = target_features()
    want = os.environ.get("BCNN_KERNEL_PATH", "").strip()
    if want == "lut" and "avx2" in f:
        return "lut"
    if _VPOPCNT in f:  # (a forced generic has had the feature removed at import)
        return "vpopcnt"
    return "generic" if want == "generic" or "avx2" not in f else "lut"


def runnable_paths() -> list[str]:
    """The kernel paths the compile target can run, in :data:`PATHS` order."""
    f = target_features()
    ok = {"vpopcnt": _VPOPCNT in f, "lut": "avx2" in f, "generic": True}
    return [p for p in PATHS if ok[p]]


def apply_kernel_path_env() -> None:
    """Honour ``BCNN_KERNEL_PATH`` (called when ``bcnn.engine`` is imported)."""
    want = os.environ.get("BCNN_KERNEL_PATH", "").strip()
    if not want:
        return
    if want not in PATHS:
        raise ValueError(f"BCNN_KERNEL_PATH={want!r}: unknown kernel path (use one of {PATHS})")
    have = kernel_path()
    if want == have:
        return
    if want == "vpopcnt":
        raise ValueError(
            "BCNN_KERNEL_PATH=vpopcnt: the compile target has no AVX-512 VPOPCNTDQ "
            f"(it runs {', '.join(runnable_paths())}; or unset it)"
        )
    if want == "lut":
        raise ValueError("BCNN_KERNEL_PATH=lut: the compile target has no AVX2 (use generic)")
    # generic on a VPOPCNTDQ target: the same target less that feature
    if "numba" in sys.modules:
        raise ValueError(
            "BCNN_KERNEL_PATH=generic must be set before numba is imported "
            "(numba fixes its compile target at import)"
        )
    from llvmlite import binding as llvm

    feats = os.environ.get("NUMBA_CPU_FEATURES", "")
    if not feats:
        fm = llvm.get_host_cpu_features()
        feats = fm.flatten()
        os.environ.setdefault("NUMBA_CPU_NAME", llvm.get_host_cpu_name())
    parts = [f for f in feats.split(",") if f and f[1:] != _VPOPCNT]
    os.environ["NUMBA_CPU_FEATURES"] = ",".join([*parts, "-" + _VPOPCNT])
