"""Runs the graph IR of a packed model (numpy + the numba kernels; never imports torch).

Layouts: float streams are float32 NHWC; packed bits are uint64 (N, H + 2*ph, W + 2*pw, words)
with a border of zero bits (= +1: one-padding) sized for the widest consumer; bit vectors are
uint64 (N, words); float vectors float32 (N, C).

Float arithmetic follows torch's eval-mode order step by step (batch norm as
fma(x, alpha, beta), computed in float64 then rounded once to float32), so that the residual
stream matches the torch model closely and the signs that read it agree.

A plan (buffers + bound steps) is built once per input shape and reused. Plans hold working
buffers, so a plan serves one call at a time: concurrent calls on one model each check out a plan
of their own from the model's pool (see :meth:`PackedModel.__call__` and docs/serving.md).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from ._format import read_bcnn, validate_graph, write_bcnn
from ._plan import _Plan
from ._precision import PrecisionTable

__all__ = ["PackedModel"]


class PackedModel:
    """A packed fully binary model: call it on uint8 images (N, C, H, W) for float32 logits.

    Build one with :func:`bcnn.engine.pack` or :func:`bcnn.engine.load`.
    """

    def __init__(
        self, graph: dict[str, Any], tensors: dict[str, np.ndarray], *, backend: str = "numba"
    ) -> None:
        if backend not in ("numba", "reference"):
            raise ValueError(f"backend must be 'numba' or 'reference', got {backend!r}")
        validate_graph(graph, tensors)
        self.graph = graph
        self.tensors = tensors
        self.backend = backend
        # idle plans per input shape (most recently used last); a call checks one out and
        # returns it, so concurrent calls never share working buffers
        self._plans: OrderedDict[tuple[int, ...], list[Any]] = OrderedDict()
        self._lock = threading.Lock()
        # set when two calls of one shape overlapped: plans then run through their compiled
        # runner (bcnn.engine._runner), which fewer GIL hand-offs make scale across threads
        self._concurrent = False
        # replaced as a whole (never mutated) so that a call reads one consistent setting
        self._precision: dict[str, Any] = {"weight_bits": None}
        self._table = PrecisionTable(graph)  # any-precision models' sets (else empty)
        self._settings: dict[Any, dict[str, Any]] = {}  # checked settings, by request

    # at most this many input shapes keep plans, and this many idle plans per shape (one per
    # thread that called concurrently; more are dropped when returned)
    MAX_SHAPES = 4
    MAX_IDLE_PLANS = 8

    def set_precision(
        self,
        weight_bits: int | None = None,
        act_bits: int | None = None,
        layers: Mapping[str, tuple[int | None, int | None]] | None = None,
    ) -> Any:
        """Run at another precision, without re-packing; ``None`` restores the default.

        * **Any-precision models** (a ``.bcnn`` with precision sets, packed from
          ``create_model(..., precisions=...)``): every layer at ``weight_bits`` /
          ``act_bits`` (None: its highest), then ``layers={name: (w, a)}`` overrides (names
          as :attr:`precision_layers`; None in a pair: that layer's highest). The same
          meaning as ``bcnn.quant.set_precision`` on the torch model; the logits are the
          same. Each layer keeps its top ``w`` weight planes, quantizes its input with the
          step of ``a`` bits, and folds the batch-norm set of its key. Returns the previous
          ``{layer: (w, a)}``.
        * **Other models** (k-bit and PrecisionBatching): ``weight_bits`` only, the
          PrecisionBatching knob. A k-bit layer of k > weight_bits bits drops its
          d = k - weight_bits lowest planes: W' = sum_{i >= d} 2^i s_i (the dropped part is
          in [-(2^d - 1), 2^d - 1]) with the same output scale step_x * step_w; layers of at
          most weight_bits bits are unchanged. Returns the previous ``weight_bits``.

        Everything is checked before anything changes: a bit width a layer was not trained
        for, an unknown layer, a mix whose batch-norm set was never trained, or ``act_bits``
        / ``layers`` on a model without precision sets are one-line ``ValueError``. Safe
        while other threads call the model: a call runs entirely at the setting it started
        with."""
        table = self._table
        if table:
            try:  # a setting asked for before: no re-checking (switch per request cheaply)
                key: Any = (weight_bits, act_bits, tuple(sorted((layers or {}).items())))
                setting = self._settings.get(key)
            except TypeError:  # unhashable values: checked (and refused) below
                key, setting = None, None
            if setting is None:
                config = table.config(weight_bits, act_bits, layers)
                setting = {"weight_bits": None, "layers": config, "sel": table.select(config)}
                if key is not None and len(self._settings) < 256:
                    self._settings[key] = setting
            prev = dict(self._precision.get("layers") or table.default())
            self._precision = setting
            return prev
        if act_bits is not None or layers is not None:
            what = "act_bits" if act_bits is not None else "layers"
            raise ValueError(
                f"{what}: this model has no precision sets (pack an any-precision model, "
                "create_model(..., precisions=...)); only weight_bits can change here"
            )
        if weight_bits is not None and (
            isinstance(weight_bits, bool) or not isinstance(weight_bits, int)
        ):
            raise ValueError(f"weight_bits must be an integer in 1..8 or None, got {weight_bits!r}")
        if weight_bits is not None and not 1 <= weight_bits <= 8:
            raise ValueError(f"weight_bits must be in 1..8 or None, got {weight_bits}")
        prev = self._precision["weight_bits"]
        self._precision = {"weight_bits": weight_bits}
        return prev

    @contextmanager
    def precision(
        self,
        weight_bits: int | None = None,
        act_bits: int | None = None,
        layers: Mapping[str, tuple[int | None, int | None]] | None = None,
    ) -> Iterator[PackedModel]:
        """``with model.precision(weight_bits=2, act_bits=2): ...``: :meth:`set_precision`
        for the block, the previous setting restored on exit."""
        saved = self._precision
        self.set_precision(weight_bits, act_bits, layers)
        try:
            yield self
        finally:
            self._precision = saved

    @property
    def precision_layers(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """Any-precision models: {layer: (weight bits, act bits) it can run at}; else {}."""
        return dict(self._table.layers)

    @property
    def current_precision(self) -> dict[str, tuple[int, int]]:
        """Any-precision models: the {layer: (w, a)} calls run at now; else {}."""
        return dict(self._precision.get("layers") or self._table.default())

    @property
    def in_channels(self) -> int:
        return int(self.graph["input"]["channels"])

    @property
    def input_size(self) -> tuple[int, int] | None:
        s = self.graph["input"].get("size")
        return (int(s[0]), int(s[1])) if s else None

    @property
    def num_classes(self) -> int:
        return int(self.graph["num_classes"])

    @property
    def classes(self) -> list[str] | None:
        c = self.graph.get("classes")
        return list(c) if c else None

    @property
    def meta(self) -> dict[str, Any]:
        """Where the model came from: its data spec, validation split and seed, when known."""
        return dict(self.graph.get("meta") or {})

    @property
    def nbytes(self) -> int:
        """Bytes of the packed tensors."""
        return int(sum(a.nbytes for a in self.tensors.values()))

    def __repr__(self) -> str:
        ops = [op["op"] for op in self.graph["ops"]]
        return (
            f"PackedModel(in_channels={self.in_channels}, classes={self.num_classes}, "
            f"ops={len(ops)}, {self.nbytes / 1024:.1f} KiB)"
        )

    def __call__(self, x: Any) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise ValueError(f"expected a numpy uint8 array (N, C, H, W), got {type(x).__name__}")
        if x.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (N, C, H, W), got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[0] < 1:
            raise ValueError(
                f"expected images (N, {self.in_channels}, H, W) with N >= 1, got shape {x.shape}"
            )
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"empty images: shape {x.shape}")
        key = tuple(int(d) for d in x.shape)
        plan = self._checkout(key)
        try:
            if self._concurrent:
                plan.use_runner()  # one nogil call per image once calls overlap
            setting = self._precision  # one read: the whole call runs at this setting
            plan.precision.clear()
            plan.precision.update(setting)
            return plan(np.ascontiguousarray(x))  # type: ignore[no-any-return]
        finally:
            self._checkin(key, plan)

    def _checkout(self, key: tuple[int, ...]) -> Any:
        """An idle plan for this input shape, or a new one (built outside the lock)."""
        with self._lock:
            idle = self._plans.get(key)
            if idle:
                self._plans.move_to_end(key)
                return idle.pop()
            if idle is not None:  # this shape has plans, all busy: calls overlap
                self._concurrent = True
        shape = (key[0], key[1], key[2], key[3])
        if self.backend == "numba":
            from ._fastplan import _FastPlan

            return _FastPlan(self, shape)
        return _Plan(self, shape)

    def _checkin(self, key: tuple[int, ...], plan: Any) -> None:
        with self._lock:
            idle = self._plans.get(key)
            if idle is None:
                while len(self._plans) >= self.MAX_SHAPES:
                    self._plans.popitem(last=False)
                idle = self._plans[key] = []
            else:
                self._plans.move_to_end(key)
            if len(idle) < self.MAX_IDLE_PLANS:
                idle.append(plan)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a .bcnn file atomically (see docs/format.md)."""
        write_bcnn(path, self.graph, self.tensors)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PackedModel:
        graph, tensors = read_bcnn(path)
        return cls(graph, tensors)
