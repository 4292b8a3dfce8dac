"""Batch norm with one set of parameters and running statistics per precision.

A network that runs at several bit widths sees a different distribution at each: the output of a
1-bit convolution is not the output of a 4-bit one. Two ways to keep one BN set per case:

* **switchable** (Any-Precision DNN, Yu et al., AAAI 2021): one set per precision ``(w, a)`` of
  the layer whose output the BN normalizes;
* **transitional** (Bit-Mixer, Bulat & Tzimiropoulos, ICCV 2021): one set per *transition*,
  ``(w, a)`` of that layer and the activation bits ``a'`` of the next layer that reads the
  result, because the distribution a BN must produce depends on who quantizes it next.

The key is read at every forward from the layers it is bound to (:meth:`bind`), so
``bcnn.quant.set_precision`` on the layers is all it takes to switch. A set that never saw a
training batch has no statistics: in eval mode it is a one-line ``ValueError``
(:class:`bcnn.quant.UntrainedPrecision`) naming the site and the sets that were trained.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from ..quant._precision import UntrainedPrecision

__all__ = ["SwitchableBatchNorm", "bn_keys"]

Key = tuple[int, ...]


def bn_keys(precisions: Sequence[int], mode: str) -> list[Key]:
    """Every key of a BN site: (w, a) pairs ("switchable") or (w, a, a_next) ("transitional")."""
    if mode not in ("switchable", "transitional"):
        raise ValueError(f"precision_bn must be 'switchable' or 'transitional', got {mode!r}")
    p = sorted(set(precisions))
    n = 2 if mode == "switchable" else 3
    return [tuple(k) for k in itertools.product(p, repeat=n)]


def _name(key: Key) -> str:
    return "_".join(str(k) for k in key)


class SwitchableBatchNorm(nn.Module):
    """``BatchNorm{1,2}d`` per key; ``key_fn()`` (set by :meth:`bind`) gives the active key."""

    def __init__(self, num_features: int, keys: Sequence[Key], dims: int = 2) -> None:
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {dims}")
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        self.keys = [tuple(k) for k in keys]
        self.sets = nn.ModuleDict({_name(k): bn(num_features) for k in self.keys})
        self.site = ""  # for error messages (set by the model)
        self._key_fn: Callable[[], Key] | None = None
        # the layers the key is read from: (producer, consumer) names (set by the model)
        self.key_layers: tuple[str, str] | None = None

    def bind(
        self, key_fn: Callable[[], Key], site: str, key_layers: tuple[str, str] | None = None
    ) -> None:
        """Read the active key from ``key_fn`` (a closure over the layers, not a submodule);
        ``key_layers``: the (producer, consumer) layer names it reads, for the packer."""
        self.__dict__["_key_fn"] = key_fn
        self.site = site
        self.key_layers = key_layers

    def key_spec(self) -> list[tuple[str, str]]:
        """What each key element is: (layer name, "w" or "a") (needs ``key_layers``)."""
        if self.key_layers is None:
            raise ValueError(f"{self.site or 'batch norm'}: not bound to named layers")
        prod, cons = self.key_layers
        spec = [(prod, "w"), (prod, "a")]
        return [*spec, (cons, "a")] if len(self.keys[0]) == 3 else spec

    def set_for(self, key: Key) -> nn.Module:
        """The batch norm of ``key`` (whatever the active key is)."""
        return self.sets[_name(tuple(key))]

    @property
    def active_key(self) -> Key:
        if self._key_fn is None:
            return self.keys[-1]
        return self._key_fn()

    def batches(self, key: Key) -> int:
        """Training batches the set of ``key`` has seen (0: no statistics)."""
        n = self.sets[_name(key)].num_batches_tracked
        assert isinstance(n, Tensor)
        return int(n)

    def active(self) -> nn.Module:
        key = self.active_key
        name = _name(key)
        if name not in self.sets:
            raise ValueError(f"{self.site or 'batch norm'}: no batch-norm set for {key}")
        m = self.sets[name]
        if not self.training and self.batches(key) == 0:
            trained = [k for k in self.keys if self.batches(k) > 0]
            raise UntrainedPrecision(
                f"{self.site or 'batch norm'}: precision {key} was never trained "
                f"(batch-norm sets with statistics: {trained or 'none'})"
            )
        return m

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.active()(x)
        return out

    def extra_repr(self) -> str:
        return f"sets={len(self.keys)}, site={self.site!r}"
