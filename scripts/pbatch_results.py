"""PrecisionBatching results (docs/pbatch.md): post-training bit-serial layers vs PyTorch fp32
and dynamic int8, 1 thread, batch 1, measured in one run.

1. GEMV speed: 1024x1024, 4096x4096 and the LSTM gates 2048 -> 8192 at W1/W2/W4/W8 x A8,
   as drop-in modules (PBLinear.forward: torch in/out, activation quantization included),
   interleaved with the fp32 and int8 layers (medians); "hot" = one copy of each layer,
   "cold" = a rotation over enough copies that the weights come from DRAM.
2. Digits MLP 64-1024-1024-10 (sklearn digits, seeded 20% hold-out), trained in fp32, then
   pbatch'd without calibration: accuracy against the weight-bit knob, and tune_precision.
3. Character-level LSTM language model on Python's own pydoc_data/topics.py (first 90% train,
   last 10% held out): bits per character against the knob, and the time per character.

    python scripts/pbatch_results.py [--quick] [--json docs/results/pbatch_results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bcnn.engine import pbatch
from bcnn.engine._paths import isa, kernel_path
from bcnn.engine._pbatch_kernels import QuantizedActs, lut_pays
from bcnn.quant import set_precision, tune_precision


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
        flags = next(ln for ln in out.splitlines() if ln.startswith("Flags"))
    except (OSError, StopIteration):
        return platform.processor()
    isa = "AVX-512 VPOPCNTDQ" if "avx512_vpopcntdq" in flags else "AVX2" if "avx2" in flags else "?"
    return f"{name} ({isa})"


def _median_ms(fns: dict[str, Any], repeat: int, warm: bool = False) -> dict[str, float]:
    """Medians of interleaved runs (ms); ``warm``: each timed call right after an untimed
    call of the same function (its data as hot as the caches allow)."""
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeat):
        for k, fn in fns.items():
            if warm:
                fn()
            t0 = time.perf_counter()
            fn()
            ts[k].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in ts.items()}


def _int8(lin: nn.Module) -> nn.Module:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8
        )


def _rotation(models: list[Any], x: torch.Tensor) -> Any:
    """A call that runs the next model of the rotation on x."""
    it = [0]

    def call() -> None:
        it[0] = (it[0] + 1) % len(models)
        models[it[0]](x)

    return call


def _gemv_shape(k: int, o: int, cache: str, repeat: int) -> list[dict[str, Any]]:
    # hot: one copy, each timed call right after a call of the same layer (weights in cache
    # as far as they fit: fp32 4096^2 is 64 MiB, int8 16 MiB, W4 planes 8 MiB);
    # cold: enough copies that one rotation streams > 3x a 32 MiB L3 of fp32 weights
    copies = 1 if cache == "hot" else max(2, math.ceil(96 * 2**20 / (4 * k * o)))
    torch.manual_seed(0)
    fp32 = [nn.Linear(k, o) for _ in range(copies)]
    int8 = [_int8(copy.deepcopy(m)) for m in fp32]
    pbs = [pbatch(copy.deepcopy(m)) for m in fp32]
    x = torch.randn(1, k)
    rows = []
    with torch.no_grad():
        for wb in (1, 2, 4, 8):
            for p in pbs:
                set_precision(p, weight_bits=wb, act_bits=8)
            for layers in (fp32, int8, pbs):  # every copy once (caches, lazy set-up) first
                for m in layers:
                    m(x)
            t = _median_ms(
                {
                    "fp32": _rotation(fp32, x),
                    "int8": _rotation(int8, x),
                    "pb": _rotation(pbs, x),
                },
                repeat,
                warm=cache == "hot",
            )
            a = QuantizedActs(x.numpy(), 8)
            rows.append(
                {
                    "shape": f"{k}->{o}",
                    "cache": cache,
                    "bits": f"W{wb}A8",
                    "product": "lut" if lut_pays(1, 8, a.signed) else "popcount",
                    "ms": round(t["pb"], 4),
                    "fp32_ms": round(t["fp32"], 4),
                    "int8_ms": round(t["int8"], 4),
                    "vs_fp32": round(t["fp32"] / t["pb"], 2),
                    "vs_int8": round(t["int8"] / t["pb"], 2),
                }
            )
            print(rows[-1], flush=True)
    return rows


def gemv(quick: bool) -> list[dict[str, Any]]:
    shapes = [(1024, 1024), (4096, 4096)] if quick else [(1024, 1024), (4096, 4096), (2048, 8192)]
    rows = []
    for k, o in shapes:
        for cache in ("hot", "cold"):
            rows += _gemv_shape(k, o, cache, 7 if quick else 31)
    return rows


def digits_mlp(quick: bool) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    nval = len(x) // 5
    xv, yv, xt, yt = x[perm[:nval]], y[perm[:nval]], x[perm[nval:]], y[perm[nval:]]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(10 if quick else 30):
        for _ in range(0, len(xt), 64):
            b = torch.randperm(len(xt), generator=g)[:64]
            loss = nn.functional.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()

    def acc(m: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
        with torch.no_grad():
            return float((m(data[0]).argmax(1) == data[1]).float().mean())

    out: dict[str, Any] = {"val_images": nval, "fp32": acc(model, (xv, yv))}
    pb = pbatch(copy.deepcopy(model))
    for wb in (8, 6, 4, 3, 2, 1):
        set_precision(pb, weight_bits=wb, act_bits=8)
        out[f"W{wb}A8"] = acc(pb, (xv, yv))
    set_precision(pb)
    x1 = xv[:1]
    with torch.no_grad():
        t = _median_ms({"fp32": lambda: model(x1), "W8A8": lambda: pb(x1)}, 51)
    out["batch1_ms"] = {k: round(v, 4) for k, v in t.items()}
    # greedy per-layer weight bits within 0.5 points (measured on the same split: a demo of
    # the call, not an unbiased estimate)
    out["tuned"] = {k: list(v) for k, v in tune_precision(pb, acc, (xv, yv), 0.005).items()}
    out["tuned_acc"] = acc(pb, (xv, yv))
    print(out, flush=True)
    return out


class CharLM(nn.Module):
    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 64)
        self.rnn = nn.LSTM(64, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(x))
        return self.head(h)


def char_lstm(quick: bool) -> dict[str, Any]:
    import pydoc_data.topics as topics

    text = "".join(topics.topics.values())
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(ids))
    train, val = ids[:split], ids[split:]
    torch.manual_seed(0)
    hidden = 256
    model = CharLM(len(chars), hidden)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    seq, bsz = 100, 32
    steps = 150 if quick else 1500
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(train) - seq - 1, (bsz,), generator=g)
        xb = torch.stack([train[s : s + seq] for s in starts])
        yb = torch.stack([train[s + 1 : s + seq + 1] for s in starts])
        loss = nn.functional.cross_entropy(model(xb).reshape(-1, len(chars)), yb.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0:
            print(f"char-lstm step {step} loss {loss.item():.3f}", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    nval = 2000 if quick else 20000
    xv, yv = val[:nval][None], val[1 : nval + 1][None]

    def bpc(m: nn.Module) -> float:
        with torch.no_grad():
            logits = m(xv)
        return float(nn.functional.cross_entropy(logits[0], yv[0]) / math.log(2))

    out: dict[str, Any] = {
        "chars": len(text),
        "vocab": len(chars),
        "hidden": hidden,
        "train_steps": steps,
        "train_s": round(train_s, 1),
        "val_chars": nval,
        "fp32_bpc": bpc(model),
    }
    pb = pbatch(copy.deepcopy(model), skip=("emb",))
    for wb in (8, 6, 4, 3, 2):
        set_precision(pb, weight_bits=wb, act_bits=8)
        out[f"W{wb}A8_bpc"] = bpc(pb)
    set_precision(pb)
    x1 = xv[:, :1]
    with torch.no_grad():
        t = _median_ms({"fp32": lambda: model(x1), "W4A8": lambda: pb(x1)}, 51)
    out["per_char_ms"] = {k: round(v, 4) for k, v in t.items()}
    print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes and budgets")
    ap.add_argument("--only", choices=("gemv", "digits", "lstm"), default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res: dict[str, Any] = {
        "cpu": _cpu(),
        "compile_target_isa": isa(),  # the AVX2 profile: NUMBA_CPU_NAME=haswell on any CPU
        "kernel_path": kernel_path(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
        "threads": 1,
        "torch": torch.__version__,
    }
    if args.only in (None, "gemv"):
        res["gemv"] = gemv(args.quick)
    if args.only in (None, "digits"):
        res["digits_mlp"] = digits_mlp(args.quick)
    if args.only in (None, "lstm"):
        res["char_lstm"] = char_lstm(args.quick)
    if args.json:
        if args.only and args.json.exists():  # one section re-run: keep the others
            res = {**json.loads(args.json.read_text()), **res}
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
