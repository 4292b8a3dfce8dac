"""Single-layer benchmark (``bcnn bench --layer ...``, ``scripts/bench_kernels.py``).

Three implementations of one layer, all float in / float out, timed interleaved in the same
run with the same thread count (medians):

- binary: float NCHW -> sign + pack (``pack_sign(channels_first=True)``) -> XOR-popcount
  conv -> per-channel affine -> float32 NHWC (the engine's native layout; ``binary_nchw_ms``
  adds a copy to NCHW);
- float: ``torch.nn.functional.conv2d`` (``F.linear``) in float32, with bias (NCHW input;
  ``*_channels_last_ms`` time torch with channels-last tensors too, ``speedup_vs_best_*`` use
  the faster layout);
- int8: ``torch.ao.nn.quantized.Conv2d`` / ``Linear`` on the x86 (fbgemm) backend, per-channel
  int8 weights, including ``quantize_per_tensor`` of the input and ``dequantize`` of the output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["LAYERS", "bench_gemm", "bench_layer"]

LAYERS = ("conv3x3", "conv1x1", "linear")


def _interleaved_ms(
    fns: dict[str, Callable[[], Any]], repeat: int, warmup: int, threads: int = 1
) -> dict[str, float]:
    """Medians (ms). One thread: runs interleaved call by call, so a noisy shared CPU hits all
    alike. More threads: interleaved in blocks with a pause between them, because the thread
    pools of torch and numba (two OpenMP runtimes) spin after a parallel region and would
    starve each other's threads if calls alternated (oversubscription)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    if threads <= 1:
        for _ in range(repeat):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                ts[k].append((time.perf_counter() - t0) * 1e3)
    else:
        rounds = min(5, repeat)
        for i in range(rounds):
            for k, fn in fns.items():
                time.sleep(0.05)
                for _ in range(2):
                    fn()
                for _ in range(repeat * (i + 1) // rounds - repeat * i // rounds):
                    t0 = time.perf_counter()
                    fn()
                    ts[k].append((time.perf_counter() - t0) * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in ts.items()}


def _quant_engine() -> str:
    import torch

    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm"):
        if name in engines:
            return name
    raise RuntimeError(f"no x86/fbgemm quantized engine in this torch build ({engines})")


def bench_layer(
    layer: str = "conv3x3",
    channels: int = 256,
    size: int = 14,
    *,
    batch: int = 1,
    out_channels: int | None = None,
    stride: int = 1,
    threads: int = 1,
    repeat: int = 50,
    warmup: int = 5,
    seed: int = 0,
    wbits: int | None = None,
    abits: int | None = None,
) -> dict[str, Any]:
    """Time one layer three ways; returns a JSON-able dict (times in ms, medians)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ..engine import _kernels as K
    from ..engine._threads import get_num_threads, num_threads, set_num_threads

    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; known: {', '.join(LAYERS)}")
    for name, v in (("channels", channels), ("size", size), ("batch", batch)):
        if v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
    if threads < 1 or repeat < 1:
        raise ValueError("--threads and --repeat must be >= 1")
    kbit = wbits is not None or abits is not None
    if kbit:
        wbits, abits = wbits or 1, abits or 1
        if not (1 <= wbits <= 8 and 1 <= abits <= 8):
            raise ValueError(f"--wbits and --abits must be in 1..8, got {wbits}, {abits}")
        if layer == "linear":
            raise ValueError("--wbits/--abits time a conv layer (conv3x3 or conv1x1)")
    cin = channels
    cout = out_channels or channels
    rng = np.random.default_rng(seed)
    prev_torch, prev_nb = torch.get_num_threads(), get_num_threads()
    prev_qengine = torch.backends.quantized.engine
    torch.set_num_threads(threads)
    set_num_threads(threads)
    qengine = _quant_engine()
    torch.backends.quantized.engine = qengine
    try:
        scale = (rng.random(cout, dtype=np.float32) + 0.5) / np.float32(cin)
        bias = rng.standard_normal(cout).astype(np.float32)
        wt = torch.from_numpy(rng.standard_normal((cout, cin, 1, 1)).astype(np.float32))
        bt = torch.from_numpy(bias)
        if layer == "linear":
            k = 1
            x = rng.standard_normal((batch, cin)).astype(np.float32)
            w2 = wt.reshape(cout, cin)
            pw = K.prepare_dense_weights(K.pack_weights(w2.numpy()), cin)
            xt = torch.from_numpy(x)
            qlin = torch.ao.nn.quantized.Linear(cin, cout)
            wq = torch.quantize_per_channel(
                w2, w2.abs().amax(1) / 127, torch.zeros(cout, dtype=torch.long), 0, torch.qint8
            )
            qlin.set_weight_bias(wq, bt)
            qlin.scale, qlin.zero_point = 0.05, 128
            x_scale = float(np.abs(x).max()) / 127

            def run_binary() -> Any:
                return K.blinear_affine(K.pack_sign(x), pw, scale, bias)

            def run_gemm() -> Any:
                return K.blinear(xp, pw)

            def run_float() -> Any:
                return F.linear(xt, w2, bt)

            def run_int8() -> Any:
                q = torch.quantize_per_tensor(xt, x_scale, 128, torch.quint8)
                return qlin(q).dequantize()

            xp = K.pack_sign(x)
            extra = {}
            ho = wo = 1
            binary_check = np.array_equal(
                K.blinear(xp, pw),
                F.linear(torch.from_numpy(np.where(x >= 0, 1.0, -1.0).astype(np.float32)),
                         torch.where(w2 >= 0, 1.0, -1.0)).numpy(),
            )  # fmt: skip
        else:
            k = 3 if layer == "conv3x3" else 1
            pad = k // 2
            wt = torch.from_numpy(rng.standard_normal((cout, cin, k, k)).astype(np.float32))
            x = rng.standard_normal((batch, cin, size, size)).astype(np.float32)
            xt = torch.from_numpy(x)
            pw = K.prepare_conv_weights(K.pack_weights(wt.numpy()), cin)
            qconv = torch.ao.nn.quantized.Conv2d(cin, cout, k, stride=stride, padding=pad)
            wq = torch.quantize_per_channel(
                wt,
                wt.abs().amax((1, 2, 3)) / 127,
                torch.zeros(cout, dtype=torch.long),
                0,
                torch.qint8,
            )
            qconv.set_weight_bias(wq, bt)
            qconv.scale, qconv.zero_point = 0.05, 128
            x_scale = float(np.abs(x).max()) / 127
            xp = K.pack_sign(x, channels_first=True)

            def run_binary() -> Any:
                xq = K.pack_sign(x, channels_first=True)
                return K.bconv2d_affine(xq, pw, scale, bias, stride=stride, padding=pad)

            def run_gemm() -> Any:
                return K.bconv2d(xp, pw, stride, pad)

            def run_float() -> Any:
                return F.conv2d(xt, wt, bt, stride=stride, padding=pad)

            def run_int8() -> Any:
                q = torch.quantize_per_tensor(xt, x_scale, 128, torch.quint8)
                return qconv(q).dequantize()

            xt_cl = xt.contiguous(memory_format=torch.channels_last)
            wt_cl = wt.contiguous(memory_format=torch.channels_last)

            def run_float_cl() -> Any:
                return F.conv2d(xt_cl, wt_cl, bt, stride=stride, padding=pad)

            def run_int8_cl() -> Any:
                q = torch.quantize_per_tensor(xt_cl, x_scale, 128, torch.quint8)
                return qconv(q).dequantize()

            extra = {"float_cl": run_float_cl, "int8_cl": run_int8_cl}
            if kbit:
                assert wbits is not None and abits is not None
                bs_run, bs_check = _bitserial_layer(x, wt, scale, bias, wbits, abits, stride, pad)
                extra["bitserial"] = bs_run
            ho = (size + 2 * pad - k) // stride + 1
            wo = ho
            ones = F.pad(torch.from_numpy(np.where(x >= 0, 1.0, -1.0).astype(np.float32)),
                         (pad,) * 4, value=1.0)  # fmt: skip
            ref = F.conv2d(ones, torch.where(wt >= 0, 1.0, -1.0), stride=stride)
            binary_check = np.array_equal(run_gemm(), ref.numpy().transpose(0, 2, 3, 1))

        def run_binary_nchw() -> Any:
            y = run_binary()
            return np.ascontiguousarray(y.transpose(0, 3, 1, 2)) if y.ndim == 4 else y

        if threads > 1:  # the same call on one kernel thread, in the same run: the scaling

            def run_binary_1t() -> Any:
                with num_threads(1):
                    return run_binary()

            extra["binary_1t"] = run_binary_1t

        with torch.inference_mode():
            ms = _interleaved_ms(
                {
                    "binary": run_binary,
                    "float": run_float,
                    "int8": run_int8,
                    "gemm": run_gemm,
                    "binary_nchw": run_binary_nchw,
                    **extra,
                },
                repeat,
                warmup,
                threads,
            )
    finally:
        torch.set_num_threads(prev_torch)
        set_num_threads(prev_nb)
        torch.backends.quantized.engine = prev_qengine
    macs = batch * ho * wo * cout * cin * k * k
    kres: dict[str, Any] = {}
    if kbit:
        kres = {
            "wbits": wbits,
            "abits": abits,
            "bitserial_ms": ms["bitserial"],
            "bitserial_speedup_vs_float": ms["float"] / ms["bitserial"],
            "bitserial_speedup_vs_int8": ms["int8"] / ms["bitserial"],
            "bitserial_exact": bool(bs_check),
        }
    return {
        **kres,
        "layer": layer,
        "channels": cin,
        "out_channels": cout,
        "size": size if layer != "linear" else 1,
        "batch": batch,
        "stride": stride,
        "threads": threads,
        "repeat": repeat,
        "binary_ms": ms["binary"],
        "float_ms": ms["float"],
        "int8_ms": ms["int8"],
        "speedup_vs_float": ms["float"] / ms["binary"],
        "speedup_vs_int8": ms["int8"] / ms["binary"],
        "gemm_ms": ms["gemm"],
        # torch given channels_last input and weights (the faster layout for it here) and the
        # speedups against the faster of the two layouts
        "float_channels_last_ms": ms.get("float_cl"),
        "int8_channels_last_ms": ms.get("int8_cl"),
        "speedup_vs_best_float": min(ms["float"], ms.get("float_cl", ms["float"])) / ms["binary"],
        "speedup_vs_best_int8": min(ms["int8"], ms.get("int8_cl", ms["int8"])) / ms["binary"],
        "binary_nchw_ms": ms["binary_nchw"],
        "macs": macs,
        "gmacs_binary": macs / ms["binary"] / 1e6,
        "gmacs_gemm": macs / ms["gemm"] / 1e6,
        "gmacs_float": macs / ms["float"] / 1e6,
        "gmacs_int8": macs / ms["int8"] / 1e6,
        "binary_exact": bool(binary_check),
        "int8_engine": qengine,
        **(
            {  # one kernel thread against `threads`, timed in the same run
                "binary_1_thread_ms": ms["binary_1t"],
                "thread_scaling": ms["binary_1t"] / ms["binary"],
            }
            if "binary_1t" in ms
            else {}
        ),
    }


def bench_gemm(
    m: int = 196, n: int = 256, k: int = 2304, *, threads: int = 1, repeat: int = 50
) -> dict[str, Any]:
    """The binary GEMM alone on random packed rows: (m, k bits) x (n, k bits) -> int32."""
    import numpy as np

    from ..engine import _kernels as K
    from ..engine._threads import num_threads

    rng = np.random.default_rng(0)
    words = -(-k // 64)
    a = rng.integers(0, 2**63, (m, words), dtype=np.uint64)
    b = rng.integers(0, 2**63, (n, words), dtype=np.uint64)
    if k % 64:  # tail bits must be 0
        mask = np.uint64((1 << (k % 64)) - 1)
        a[:, -1] &= mask
        b[:, -1] &= mask
    pb = K.prepare_dense_weights(b, k)
    with num_threads(threads):
        ms = _interleaved_ms({"gemm": lambda: K.bgemm(a, pb)}, repeat, 5, threads)["gemm"]
    return {
        "m": m,
        "n": n,
        "k": k,
        "threads": threads,
        "gemm_ms": ms,
        "gmacs": m * n * k / ms / 1e6,
    }


def _bitserial_layer(
    x: Any, wt: Any, scale: Any, bias: Any, wbits: int, abits: int, stride: int, pad: int
) -> tuple[Callable[[], Any], bool]:
    """The k-bit layer as the engine runs it: float NCHW in -> quantize (signed odd grid, one
    step) + plane-pack -> one bit-serial bconv2d -> combine + per-channel affine -> float32
    NHWC out. Returns (run, exact): exact = its integer conv equals torch's conv of the grid
    integers (float64, border 2^k - 1)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ..engine._bitserial import (
        BitSerialConv,
        planes_from_integers,
        quantize_pack,
        quantize_reference,
    )
    from ..engine._pack import pack_signs

    hi = 2**abits - 1
    step = float(2.0 * np.abs(x).mean() / np.sqrt(hi))
    w = wt.numpy()
    sw = np.abs(w).mean(axis=(1, 2, 3), keepdims=True) * 2 / np.sqrt(2**wbits - 1)
    wi = quantize_reference(w / sw, 1.0, wbits, True)  # (O, Cin, kh, kw) odd integers
    neg = planes_from_integers(wi.transpose(0, 2, 3, 1), wbits, True)
    layer = BitSerialConv(np.stack([pack_signs(p) for p in neg]), x.shape[1], abits, True,
                          stride, pad)  # fmt: skip
    aff = (np.ascontiguousarray(scale, np.float32), np.ascontiguousarray(bias, np.float32))

    def run() -> Any:
        xp = quantize_pack(x, step, abits, True, channels_first=True)
        return layer.conv_planes(xp, x.shape[0], None, aff)

    xi = quantize_reference(x, step, abits, True).astype(np.float64)
    ref = F.conv2d(
        F.pad(torch.from_numpy(xi), (pad,) * 4, value=float(hi)),
        torch.from_numpy(wi.astype(np.float64)),
        stride=stride,
    )
    xp = quantize_pack(x, step, abits, True, channels_first=True)
    got = layer.conv_planes(xp, x.shape[0])
    exact = np.array_equal(got, ref.numpy().transpose(0, 2, 3, 1).astype(np.float32))
    return run, bool(exact)
