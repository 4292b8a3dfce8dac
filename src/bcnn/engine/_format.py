"""The .bcnn file: a safetensors container (no pickle) holding the packed tensors, with the
magic, the format version and the JSON graph in its metadata. See docs/format.md.

Everything read from a file is validated here, before any kernel runs: the compiled kernels
do not bounds-check, so every dtype, shape, attribute and graph reference is checked, and every
problem is reported as a one-line ``ValueError``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "READS",
    "graph_version",
    "read_bcnn",
    "validate_graph",
    "write_bcnn",
]

MAGIC = "bcnn"
FORMAT_VERSION = 3  # the newest; files are written at the lowest version that holds them
READS = (1, 2, 3)
MAX_SETS = 4096  # step lists per precision-set table (8 bits ^ 3 key elements = 512 needed)
MAX_CHANNELS = 1 << 16
MAX_KERNEL = 15
MAX_STRIDE = 16
MAX_OPS = 10_000
MAX_HEADER = 64 << 20

OPS = ("encode_conv", "conv", "binarize", "avgpool", "gap", "linear", "qstem", "qconv", "qlinear")
STEPS = ("scale", "bias", "bn", "affine", "rprelu", "add")
STEP_TENSORS = {
    "scale": ("scale",),
    "bias": ("bias",),
    "bn": ("alpha", "beta"),
    "affine": ("weight", "bias"),
    "rprelu": ("gamma", "slope", "zeta"),
    "add": (),
}


class _Invalid(ValueError):
    pass


def words(n: int) -> int:
    """uint64 words holding n bits."""
    return max(1, -(-n // 64))


def _int(d: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _Invalid(f"{where}: {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _pair(d: dict[str, Any], key: str, lo: int, hi: int, where: str) -> tuple[int, int]:
    v = d.get(key)
    if (
        not isinstance(v, list)
        or len(v) != 2
        or any(isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi for x in v)
    ):
        raise _Invalid(f"{where}: {key!r} must be two integers in [{lo}, {hi}], got {v!r}")
    return int(v[0]), int(v[1])


def _str(d: dict[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v or len(v) > 200:
        raise _Invalid(f"{where}: {key!r} must be a non-empty string, got {v!r}")
    return v


class _Checker:
    def __init__(self, graph: Any, tensors: dict[str, np.ndarray]) -> None:
        self.graph = graph
        self.tensors = tensors
        self.version = FORMAT_VERSION
        self.used: set[str] = set()
        # precision tables (version 3) may share a tensor between their step lists; a tensor
        # first referenced outside a table stays single-use
        self.in_table = False
        self.table_used: set[str] = set()
        # value name -> (kind, channels); kinds: image, stream, bits, vbits, vector
        self.kinds: dict[str, tuple[str, int]] = {}

    def tensor(
        self, op: dict[str, Any], key: str, dtype: Any, shape: tuple[int, ...], where: str
    ) -> np.ndarray:
        name = op.get(key)
        if not isinstance(name, str):
            raise _Invalid(f"{where}: {key!r} must name a tensor, got {name!r}")
        if name not in self.tensors:
            raise _Invalid(f"{where}: tensor {name!r} is missing")
        if name in self.used and not (self.in_table and name in self.table_used):
            raise _Invalid(f"{where}: tensor {name!r} is referenced twice")
        if self.in_table:
            self.table_used.add(name)
        t = self.tensors[name]
        if t.dtype != np.dtype(dtype):
            raise _Invalid(f"{where}: tensor {name!r} has dtype {t.dtype}, expected {dtype}")
        if tuple(t.shape) != shape:
            raise _Invalid(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        self.used.add(name)
        return t

    def packed(self, op: dict[str, Any], shape: tuple[int, ...], nbits: int, where: str) -> None:
        t = self.tensor(op, "weight", np.uint64, (*shape, words(nbits)), where)
        tail = words(nbits) * 64 - nbits
        if tail:
            mask = np.uint64(((1 << 64) - 1) ^ ((1 << (64 - tail)) - 1))
            if np.any(t[..., -1] & mask):
                raise _Invalid(f"{where}: packed weights have non-zero tail bits")

    def value(self, name: Any, kinds: tuple[str, ...], where: str) -> tuple[str, int]:
        if not isinstance(name, str) or name not in self.kinds:
            raise _Invalid(f"{where}: input {name!r} is not defined before this op")
        kind, c = self.kinds[name]
        if kind not in kinds:
            raise _Invalid(f"{where}: input {name!r} is a {kind}, expected {' or '.join(kinds)}")
        return kind, c

    def epilogue(self, op: dict[str, Any], channels: int, where: str) -> None:
        epi = op.get("epilogue")
        if not isinstance(epi, list) or len(epi) > 32:
            raise _Invalid(f"{where}: 'epilogue' must be a list of at most 32 steps")
        inputs = op["inputs"]
        for j, step in enumerate(epi):
            w = f"{where} epilogue[{j}]"
            if not isinstance(step, dict) or step.get("kind") not in STEPS:
                raise _Invalid(f"{w}: unknown step {step!r:.80}")
            kind = step["kind"]
            for key in STEP_TENSORS[kind]:
                self.tensor(step, key, np.float32, (channels,), w)
            if kind == "add":
                if j != len(epi) - 1:
                    raise _Invalid(f"{w}: 'add' must be the last step")
                idx = _int(step, "input", 1, 1, w)
                if len(inputs) != 2:
                    raise _Invalid(f"{w}: 'add' needs a second op input")
                _, rc = self.value(inputs[idx], ("stream",), w)
                rep = _int(step, "repeat", 1, MAX_CHANNELS, w)
                if rc * rep != channels:
                    raise _Invalid(f"{w}: residual of {rc} channels x{rep} != {channels}")
        if len(inputs) == 2 and not (epi and epi[-1].get("kind") == "add"):
            raise _Invalid(f"{where}: a second input is only allowed for a residual 'add'")

    def run(self) -> None:
        g = self.graph
        if not isinstance(g, dict):
            raise _Invalid("graph must be a JSON object")
        inp = g.get("input")
        if not isinstance(inp, dict):
            raise _Invalid("graph: 'input' must be an object")
        cin = _int(inp, "channels", 1, 4096, "graph input")
        size = inp.get("size")
        if size is not None:
            _pair(inp, "size", 1, 1 << 16, "graph input")
        ncls = _int(g, "num_classes", 1, 1 << 20, "graph")
        classes = g.get("classes")
        if classes is not None and (
            not isinstance(classes, list)
            or len(classes) != ncls
            or not all(isinstance(c, str) for c in classes)
        ):
            raise _Invalid(f"graph: 'classes' must be null or a list of {ncls} strings")
        meta = g.get("meta")
        if meta is not None and not (
            isinstance(meta, dict)
            and all(
                isinstance(k, str) and (v is None or isinstance(v, str | int | float | bool))
                for k, v in meta.items()
            )
        ):
            raise _Invalid("graph: 'meta' must be an object of strings, numbers or nulls")
        ops = g.get("ops")
        if not isinstance(ops, list) or not 1 <= len(ops) <= MAX_OPS:
            raise _Invalid(f"graph: 'ops' must be a list of 1..{MAX_OPS} ops")
        self.kinds["input"] = ("image", cin)
        for i, op in enumerate(ops):
            if not isinstance(op, dict):
                raise _Invalid(f"op {i}: must be an object")
            kind = op.get("op")
            if kind not in OPS:
                raise _Invalid(f"op {i}: unknown op {kind!r:.40}")
            where = f"op {i} ({kind})"
            _str(op, "name", where)
            ins = op.get("inputs")
            if not isinstance(ins, list) or not 1 <= len(ins) <= 2:
                raise _Invalid(f"{where}: 'inputs' must be a list of 1 or 2 names")
            out = _str(op, "output", where)
            if out in self.kinds:
                raise _Invalid(f"{where}: output {out!r} is defined twice")
            self.kinds[out] = getattr(self, "_" + kind)(op, where)
        final = g.get("output")
        if not isinstance(final, str) or final not in self.kinds:
            raise _Invalid(f"graph: 'output' {final!r} is not a defined value")
        if self.kinds[final] != ("vector", ncls):
            raise _Invalid(f"graph: output {final!r} is not a vector of {ncls} logits")
        extra = set(self.tensors) - self.used
        if extra:
            raise _Invalid(f"unexpected tensor {sorted(extra)[0]!r}")

    def _spatial(self, op: dict[str, Any], where: str) -> tuple[int, int]:
        kh, kw = _pair(op, "kernel", 1, MAX_KERNEL, where)
        _pair(op, "stride", 1, MAX_STRIDE, where)
        _pair(op, "pad", 0, MAX_KERNEL, where)
        return kh, kw

    def _encode_conv(self, op: dict[str, Any], where: str) -> tuple[str, int]:
        if op["inputs"] != ["input"]:
            raise _Invalid(f"{where}: must read 'input'")
        _, cin = self.kinds["input"]
        enc = op.get("encoder")
        if enc not in ("bitplane", "thermometer"):
            raise _Invalid(f"{where}: unknown encoder {enc!r:.40}")
        if _int(op, "in_channels", 1, 4096, where) != cin:
            raise _Invalid(f"{where}: in_channels does not match the input's {cin}")
        planes = _int(op, "planes", 1, 8 if enc == "bitplane" else 255, where)
        cout = _int(op, "out_channels", 1, MAX_CHANNELS, where)
        kh, kw = self._spatial(op, where)
        self.packed(op, (cout, kh, kw), cin * planes, where)
        pw = self.tensor(op, "plane_weights", np.float32, (planes,), where)
        if not np.all(np.isfinite(pw)):
            raise _Invalid(f"{where}: plane weights must be finite")
        self.tensor(op, "plane_thresholds", np.int32, (planes,), where)
        self.epilogue(op, cout, where)
        if len(op["inputs"]) != 1:
            raise _Invalid(f"{where}: takes one input")
        return ("stream", cout)

    def _conv(self, op: dict[str, Any], where: str) -> tuple[str, int]:
        _, c = self.value(op["inputs"][0], ("bits",), where)
        cin = _int(op, "in_channels", 1, MAX_CHANNELS, where)
        if c != cin:
            raise _Invalid(f"{where}: input has {c} channels, in_channels is {cin}")
        cout = _int(op, "out_channels", 1, MAX_CHANNELS, where)
        kh, kw = self._spatial(op, where)
        self.packed(op, (cout, kh, kw), cin, where)
        if "threshold" in op:
            self.tensor(op, "threshold", np.int32, (cout,), where)
            if op.get("epilogue") != [] or len(op["inputs"]) != 1:
                raise _Invalid(f"{where}: a thresholded conv has no epilogue and one input")
            return ("bits", cout)
        self.epilogue(op, cout, where)
        return ("stream", cout)

    def _binarize(self, op: dict[str, Any], where: str) -> tuple[str, int]:
        if len(op["inputs"]) != 1:
            raise _Invalid(f"{where}: takes one input")
        kind, c = self.value(op["inputs"][0], ("stream", "vector"), where)
        if _int(op, "channels", 1, MAX_CHANNELS, where) != c:
            raise _Invalid(f"{where}: 'channels' does not match the input's {c}")
        self.tensor(op, "threshold", np.float32, (c,), where)
        mode = self.tensor(op, "mode", np.int8, (c,), where)
        if not np.all((mode >= -1) & (mode <= 1)):
            raise _Invalid(f"{where}: 'mode' values must be -1, 0 or 1")
        return ("bits" if kind == "stream" else "vbits", c)

    def _avgpool(self, op: dict[str, Any], where: str) -> tuple[str, int]:
        if len(op["inputs"]) != 1:
            raise _Invalid(f"{where}: takes one input")
        _, c = self.value(op["inputs"][0], ("stream",), where)
        _pair(op, "kernel", 1, MAX_KERNEL, where)
        _pair(op, "stride", 1, MAX_STRIDE, where)
        if not isinstance(op.get("ceil_mode"), bool):
            raise _Invalid(f"{where}: 'ceil_mode' must be true or false")
        return ("stream", c)

    def _gap(self, op: dict[str, Any], where: str) -> tuple[str, int]:
        if len(op["inputs"]) != 1:
            raise _Invalid(f"{where}: takes one input")
        _, c = self.value(op["inputs"][0], ("stream",), where)
        return ("vector", c)

    def _linear(self, op: dict[str, Any], where: str) -> tuple[str, int]:
        if len(op["inputs"]) != 1:
            raise _Invalid(f"{where}: takes one input")
        _, c = self.value(op["inputs"][0], ("vbits",), where)
        fin = _int(op, "in_features", 1, MAX_CHANNELS * 64, where)
        if c != fin:
            raise _Invalid(f"{where}: input has {c} features, in_features is {fin}")
        fout = _int(op, "out_features", 1, 1 << 20, where)
        self.packed(op, (fout,), fin, where)
        self.epilogue(op, fout, where)
        return ("vector", fout)


class _KbitChecker(_Checker):
    """The bit-serial k-bit ops (``qstem``, ``qconv``, ``qlinear``; engine/_bitserial.py)."""

    def _bits(self, op: dict[str, Any], key: str, where: str) -> int:
        return _int(op, key, 1, 8, where)

    def _planes(self, op: dict[str, Any], shape: tuple[int, ...], nbits: int, where: str) -> None:
        """``weight``: uint64 (weight_bits, *shape, words(nbits)) with zero tail bits;
        ``weight_zero`` (version 2, BSQ's zero grid): Wb = N + 1 planes, N in 0..8."""
        zero = op.get("weight_zero", False)
        if "weight_zero" in op and (zero is not True or self.version < 2):
            raise _Invalid(
                f"{where}: 'weight_zero' must be true, in a version-2 file (got {zero!r:.20}, "
                f"version {self.version})"
            )
        wb = _int(op, "weight_bits", 1, 9 if zero else 8, where)
        t = self.tensor(op, "weight", np.uint64, (wb, *shape, words(nbits)), where)
        tail = words(nbits) * 64 - nbits
        if tail:
            mask = np.uint64(((1 << 64) - 1) ^ ((1 << (64 - tail)) - 1))
            if np.any(t[..., -1] & mask):
                raise _Invalid(f"{where}: packed weights have non-zero tail bits")

    def _square(self, op: dict[str, Any], where: str) -> None:
        kh, kw = self._spatial(op, where)
        (sh, sw), (ph, pw) = op["stride"], op["pad"]
        if sh != sw or ph != pw or ph >= min(kh, kw):
            raise _Invalid(f"{where}: needs equal strides, equal pads and pad < kernel")

    def _act(self, op: dict[str, Any], channels: int, where: str) -> None:
        self._bits(op, "act_bits", where)
        if not isinstance(op.get("act_signed"), bool):
            raise _Invalid(f"{where}: 'act_signed' must be true or false")
        st = self.tensor(op, "act_step", np.float32, (1,), where)
        if not (np.isfinite(st[0]) and st[0] > 0):
            raise _Invalid(f"{where}: 'act_step' must be finite and > 0")
        self._pre(op.get("pre"), channels, where)

    def _pre(self, pre: Any, channels: int, where: str) -> None:
        if not isinstance(pre, list) or len(pre) > 32:
            raise _Invalid(f"{where}: 'pre' must be a list of at most 32 steps")
        for j, step in enumerate(pre):
            w = f"{where} pre[{j}]"
            if not isinstance(step, dict) or step.get("kind") not in STEPS[:-1]:
                raise _Invalid(f"{w}: unknown step {step!r:.80}")
            for key in STEP_TENSORS[step["kind"]]:
                self.tensor(step, key, np.float32, (channels,), w)

    def _qstem(self, op: dict[str, Any], where: str) -> tuple[str, int]:
        if op["inputs"] != ["input"]:
            raise _Invalid(f"{where}: must read 'input'")
        _, cin = self.kinds["input"]
        if _int(op, "in_channels", 1, 4096, where) != cin:
            raise _Invalid(f"{where}: in_channels does not match the input's {cin}")
        planes = _int(op, "planes", 1, 8, where)
        cout = _int(op, "out_channels", 1, MAX_CHANNELS, where)
        self._square(op, where)
        kh, kw = op["kernel"]
        self._planes(op, (cout, kh, kw), cin * planes, where)
        self.epilogue(op, cout, where)
        self._precision(op, cin * planes, cout, False, where)
        return ("stream", cout)

    def _qconv(self, op: dict[str, Any], where: str) -> tuple[str, int]:
        _, c = self.value(op["inputs"][0], ("stream",), where)
        cin = _int(op, "in_channels", 1, MAX_CHANNELS, where)
        if c != cin:
            raise _Invalid(f"{where}: input has {c} channels, in_channels is {cin}")
        cout = _int(op, "out_channels", 1, MAX_CHANNELS, where)
        self._square(op, where)
        kh, kw = op["kernel"]
        self._act(op, cin, where)
        self._planes(op, (cout, kh, kw), cin, where)
        self.epilogue(op, cout, where)
        self._precision(op, cin, cout, True, where)
        return ("stream", cout)

    def _qlinear(self, op: dict[str, Any], where: str) -> tuple[str, int]:
        if len(op["inputs"]) != 1:
            raise _Invalid(f"{where}: takes one input")
        _, c = self.value(op["inputs"][0], ("vector",), where)
        fin = _int(op, "in_features", 1, MAX_CHANNELS * 64, where)
        if c != fin:
            raise _Invalid(f"{where}: input has {c} features, in_features is {fin}")
        fout = _int(op, "out_features", 1, 1 << 20, where)
        self._act(op, fin, where)
        self._planes(op, (fout,), fin, where)
        self.epilogue(op, fout, where)
        self._precision(op, fin, fout, True, where)
        return ("vector", fout)

    # ---- precision sets (version 3): any-precision layers (docs/format.md)
    def run(self) -> None:
        self.layers: dict[str, tuple[list[int], list[int]]] = {}
        self.key_refs: list[tuple[str, list[list[str]], list[list[int]]]] = []
        super().run()
        for where, spec, at in self.key_refs:
            allowed = []
            for layer, kind in spec:
                if layer not in self.layers:
                    raise _Invalid(f"{where}: key names unknown layer {layer!r:.80}")
                allowed.append(self.layers[layer][0 if kind == "w" else 1])
            for vals in at:
                for v, ok, (layer, kind) in zip(vals, allowed, spec, strict=True):
                    if v not in ok:
                        raise _Invalid(
                            f"{where}: set {vals} has {kind}={v} for layer {layer!r}, "
                            f"which runs at {ok}"
                        )

    def _bitlist(self, d: dict[str, Any], key: str, hi: int, where: str) -> list[int]:
        v = d.get(key)
        if (
            not isinstance(v, list)
            or not 1 <= len(v) <= 8
            or any(isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= hi for x in v)
            or v != sorted(set(v))
        ):
            raise _Invalid(
                f"{where}: {key!r} must be increasing integers in 1..{hi}, got {v!r:.60}"
            )
        return list(v)

    def _precision(self, op: dict[str, Any], cin: int, cout: int, act: bool, where: str) -> None:
        if "precision" not in op:
            return
        w = f"{where} precision"
        p = op["precision"]
        if self.version < 3:
            raise _Invalid(f"{w}: precision sets need format version 3, got {self.version}")
        if not isinstance(p, dict):
            raise _Invalid(f"{w}: must be an object")
        known = {"layer", "weight_bits", "act_bits", "act_steps", "epilogues", "pres"}
        if set(p) - known:
            raise _Invalid(f"{w}: unknown entry {sorted(set(p) - known)[0]!r:.40}")
        if "weight_zero" in op:
            raise _Invalid(f"{w}: precision sets do not apply to zero-grid weights")
        name = _str(p, "layer", w)
        if name in self.layers:
            raise _Invalid(f"{w}: layer {name!r} is defined twice")
        wb = self._bitlist(p, "weight_bits", op["weight_bits"], w)
        if wb[-1] != op["weight_bits"]:
            raise _Invalid(f"{w}: the highest weight_bits must be the op's {op['weight_bits']}")
        ab = self._bitlist(p, "act_bits", 8, w)
        if act:
            if ab[-1] != op["act_bits"]:
                raise _Invalid(f"{w}: the highest act_bits must be the op's {op['act_bits']}")
            st = self.tensor(p, "act_steps", np.float32, (len(ab),), w)
            if not (np.all(np.isfinite(st)) and np.all(st > 0)):
                raise _Invalid(f"{w}: 'act_steps' must be finite and > 0")
        elif "act_steps" in p or "pres" in p:
            raise _Invalid(f"{w}: a stem has no 'act_steps' or 'pres'")
        self.layers[name] = (wb, ab)
        self._sets(p, "epilogues", op, cout, w)
        if "pres" in p:
            self._sets(p, "pres", op, cin, w)

    def _sets(self, p: dict[str, Any], key: str, op: dict[str, Any], ch: int, where: str) -> None:
        w = f"{where} {key}"
        t = p.get(key)
        if not isinstance(t, dict) or set(t) != {"key", "at", "steps"}:
            raise _Invalid(f"{w}: must be an object of 'key', 'at' and 'steps'")
        spec, at, steps = t["key"], t["at"], t["steps"]
        if (
            not isinstance(spec, list)
            or not 1 <= len(spec) <= 4
            or not all(
                isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and e[1] in ("w", "a")
                for e in spec
            )
        ):
            raise _Invalid(f"{w}: 'key' must list 1..4 [layer, 'w' or 'a'] pairs")
        if not isinstance(at, list) or not 1 <= len(at) <= MAX_SETS:
            raise _Invalid(f"{w}: 'at' must list 1..{MAX_SETS} sets")
        for vals in at:
            if (
                not isinstance(vals, list)
                or len(vals) != len(spec)
                or any(isinstance(v, bool) or not isinstance(v, int) for v in vals)
            ):
                raise _Invalid(f"{w}: every 'at' entry must be {len(spec)} integers")
        if len({tuple(v) for v in at}) != len(at):
            raise _Invalid(f"{w}: a set is listed twice")
        if not isinstance(steps, list) or len(steps) != len(at):
            raise _Invalid(f"{w}: 'steps' must hold one step list per set")
        self.in_table = True
        try:
            for j, st in enumerate(steps):
                if key == "epilogues":
                    self.epilogue({"epilogue": st, "inputs": op["inputs"]}, ch, f"{w}[{j}]")
                else:
                    self._pre(st, ch, f"{w}[{j}]")
        finally:
            self.in_table = False
        self.key_refs.append((w, spec, at))


def graph_version(graph: dict[str, Any]) -> int:
    """The lowest format version that holds ``graph`` (3 for precision sets, 2 for
    ``weight_zero`` ops, else 1)."""
    ops = graph.get("ops", []) if isinstance(graph, dict) else []
    if any(isinstance(o, dict) and "precision" in o for o in ops):
        return 3
    return 2 if any(isinstance(o, dict) and "weight_zero" in o for o in ops) else 1


def validate_graph(
    graph: Any, tensors: dict[str, np.ndarray], version: int = FORMAT_VERSION
) -> None:
    """Raise ``ValueError`` naming the first problem of a graph + tensors pair (as a file of
    format ``version``)."""
    try:
        checker = _KbitChecker(graph, tensors)
        checker.version = int(version)
        checker.run()
    except _Invalid as e:
        raise ValueError(f"invalid bcnn model: {e}") from None
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # defensive: never crash
        raise ValueError(f"invalid bcnn model: malformed graph ({type(e).__name__}: {e})") from None


def write_bcnn(
    path: str | os.PathLike[str], graph: dict[str, Any], tensors: dict[str, Any]
) -> None:
    """Write atomically (temporary file beside ``path``, fsync, rename)."""
    from safetensors.numpy import save

    meta = {
        "format": MAGIC,
        "format_version": str(graph_version(graph)),
        "graph": json.dumps(graph, separators=(",", ":"), allow_nan=False),
    }
    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=meta)
    data = _canonical_header(data)
    atomic_write(path, lambda f: f.write(data))


def _canonical_header(data: bytes) -> bytes:
    """The same safetensors bytes with the header's keys sorted: safetensors' writer emits
    its JSON keys in hash order, so the same model would give different files. The data
    offsets are relative to the end of the header and do not change; the header is padded
    with spaces to a multiple of 8 bytes, as safetensors does."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    raw = text.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def _reject_constant(c: str) -> float:
    raise ValueError(f"non-standard JSON constant {c}")


def read_bcnn(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and validate a .bcnn file -> (graph, tensors); ``ValueError`` if malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    data = path.read_bytes()
    where = str(path)
    if len(data) < 8:
        raise ValueError(f"{where}: not a .bcnn file (truncated: {len(data)} bytes)")
    hlen = int.from_bytes(data[:8], "little")
    if hlen > min(MAX_HEADER, len(data) - 8):
        raise ValueError(f"{where}: not a .bcnn file (bad or truncated header)")
    try:
        header = json.loads(data[8 : 8 + hlen].decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"{where}: not a .bcnn file (unreadable header)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != MAGIC:
        raise ValueError(f"{where}: not a .bcnn file (no 'bcnn' magic in the metadata)")
    version = meta.get("format_version")
    if version not in [str(v) for v in READS]:
        raise ValueError(
            f"{where}: unsupported .bcnn format version {version!r:.20} "
            f"(this bcnn reads versions {', '.join(map(str, READS))})"
        )
    try:
        graph = json.loads(meta.get("graph", ""), parse_constant=_reject_constant)
    except (TypeError, ValueError, RecursionError):
        raise ValueError(f"{where}: the graph is not valid JSON") from None
    try:
        from safetensors.numpy import load

        tensors = load(data)
    except Exception as e:  # safetensors validates offsets, dtypes and sizes itself
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{where}: corrupt tensor data ({msg})") from None
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for k, v in tensors.items():
        if v.dtype.byteorder == ">":
            tensors[k] = v.astype(v.dtype.newbyteorder("="))
    try:
        validate_graph(graph, tensors, int(version))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return graph, tensors
