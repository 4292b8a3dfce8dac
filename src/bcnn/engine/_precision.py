"""Run-time precision of an any-precision ``.bcnn`` (format version 3; docs/format.md).

Every op of an any-precision layer carries a ``precision`` entry: the layer's name, the weight
and activation bits it was trained for, one activation step per act bits, and its epilogue
(and ``pre``) step lists for every trained batch-norm key. A key is a list of
``[layer, "w" | "a"]`` references, e.g. Bit-Mixer's transitional key ``(w, a, a')`` is
``[[self, "w"], [self, "a"], [next layer, "a"]]``.

:class:`PrecisionTable` turns ``set_precision(weight_bits, act_bits, layers)`` into one
:class:`Selection` per op (which planes, which act step, which step lists), checking every
layer's bits and that every key the mix needs was trained, before anything changes.
Torch-free, like the rest of the packed path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PrecisionTable", "Selection", "span"]


@dataclass(frozen=True)
class Selection:
    """One op at one precision: ``weight_bits`` planes kept, ``act_bits`` (``act_index`` into
    its act steps), and the indices of its epilogue and pre step lists (-1: the op's own)."""

    weight_bits: int
    act_bits: int
    act_index: int
    epilogue: int
    pre: int


def span(allowed: tuple[int, ...] | list[int]) -> str:
    """``1..4`` for a contiguous set, else the tuple (as torch's ``set_precision`` says it)."""
    lo, hi = min(allowed), max(allowed)
    return f"{lo}..{hi}" if len(allowed) == hi - lo + 1 else str(tuple(allowed))


class _Sets:
    """A validated step-list table: key references and the index of every trained key."""

    def __init__(self, t: dict[str, Any]) -> None:
        self.spec = [(str(layer), str(kind)) for layer, kind in t["key"]]
        self.index = {tuple(int(v) for v in at): j for j, at in enumerate(t["at"])}

    def key_of(self, config: Mapping[str, tuple[int, int]]) -> tuple[int, ...]:
        return tuple(config[n][0 if k == "w" else 1] for n, k in self.spec)

    def find(self, config: Mapping[str, tuple[int, int]], layer: str, what: str) -> int:
        key = self.key_of(config)
        j = self.index.get(key)
        if j is None:
            names = ", ".join(f"{n}.{k}" for n, k in self.spec)
            raise ValueError(
                f"layer {layer!r}: the {what} for ({names}) = {key} was never trained "
                f"({len(self.index)} trained sets; pick another mix)"
            )
        return j


class PrecisionTable:
    """The precision sets of a validated graph (empty when it has none)."""

    def __init__(self, graph: dict[str, Any]) -> None:
        # layer -> (weight bits, act bits) it runs at, in op order
        self.layers: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._ops: list[tuple[str, str, _Sets, _Sets | None]] = []
        for op in graph["ops"]:
            p = op.get("precision")
            if p is None:
                continue
            self.layers[p["layer"]] = (tuple(p["weight_bits"]), tuple(p["act_bits"]))
            pre = _Sets(p["pres"]) if "pres" in p else None
            self._ops.append((op["name"], p["layer"], _Sets(p["epilogues"]), pre))

    def __bool__(self) -> bool:
        return bool(self.layers)

    def default(self) -> dict[str, tuple[int, int]]:
        """Every layer at its highest precision."""
        return {n: (w[-1], a[-1]) for n, (w, a) in self.layers.items()}

    def config(
        self,
        weight_bits: int | None,
        act_bits: int | None,
        layers: Mapping[str, tuple[int | None, int | None]] | None,
    ) -> dict[str, tuple[int, int]]:
        """{layer: (w, a)}: ``weight_bits``/``act_bits`` for all (None: each layer's
        highest), then the ``layers`` overrides (None in a pair: that layer's highest);
        a one-line ``ValueError`` names the first layer whose bits it was not trained for."""
        out: dict[str, tuple[int, int]] = {}
        for name, (ws, as_) in self.layers.items():
            out[name] = (
                ws[-1] if weight_bits is None else weight_bits,
                as_[-1] if act_bits is None else act_bits,
            )
        if layers is not None and not isinstance(layers, Mapping):
            raise ValueError(f"layers must map layer names to (w, a), got {type(layers).__name__}")
        for name, pair in (layers or {}).items():
            if name not in self.layers:
                known = ", ".join(repr(n) for n in list(self.layers)[:8])
                more = ", ..." if len(self.layers) > 8 else ""
                raise ValueError(f"unknown layer {name!r}; switchable layers: {known}{more}")
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ValueError(f"layer {name!r}: expected a (weight_bits, act_bits) pair")
            ws, as_ = self.layers[name]
            w, a = pair
            out[name] = (ws[-1] if w is None else w, as_[-1] if a is None else a)
        for name, (w, a) in out.items():
            ws, as_ = self.layers[name]
            for what, v, allowed in (("weight_bits", w, ws), ("act_bits", a, as_)):
                if isinstance(v, bool) or not isinstance(v, int) or v not in allowed:
                    raise ValueError(f"layer {name!r}: {what}={v!r} is not in {span(allowed)}")
        return out

    def select(
        self, config: Mapping[str, tuple[int, int]], strict: bool = True
    ) -> dict[str, Selection]:
        """One :class:`Selection` per op; ``ValueError`` if a key the mix needs was never
        trained (its batch norm has no statistics). ``strict=False`` (timing only) folds the
        op's own step lists for such keys instead: the same arithmetic, other numbers."""

        def find(sets: _Sets | None, layer: str, what: str) -> int:
            if sets is None:
                return -1
            if strict:
                return sets.find(config, layer, what)
            return sets.index.get(sets.key_of(config), -1)

        sel: dict[str, Selection] = {}
        for op, layer, epi, pre in self._ops:
            w, a = config[layer]
            sel[op] = Selection(
                weight_bits=w,
                act_bits=a,
                act_index=self.layers[layer][1].index(a),
                epilogue=find(epi, layer, "batch norm after it"),
                pre=find(pre, layer, "batch norm before it"),
            )
        return sel
