"""Any-precision BCNNs: one set of weights, any per-layer bit width at run time (Bit-Mixer).

:func:`any_precision_` turns a binary :class:`~bcnn.models.bcnn.BCNN` into a network that runs
at every precision in ``precisions``, layer by layer:

* **Nested weights**: every matrix op (stem, convolutions, classifier) stores its weights at
  ``b_max`` bits on the odd grid, ``sum_i 2^i s_i`` (a per-channel LSQ step). Its k-bit view is
  the top k planes: the nearest k-bit grid point with step ``2^(b_max-k)`` times the step
  (tests/test_kbit.py proves it exhaustively); k = 1 is the sign of the top plane, so the
  binary network is one of the views.
* **Switchable activation quantizers**: one learned step per precision
  (:class:`bcnn.quant.SwitchableQuantizer`). The stem reads exact pixel bit-planes, so its act
  bits only pick its batch-norm set.
* **Batch norm per precision** (:class:`bcnn.nn.SwitchableBatchNorm`) at every BN site
  (after the stem, after each convolution, before the classifier). Its *producer* is the layer
  before it, its *consumer* the next quantized layer. ``"switchable"`` keys a set by the
  producer's ``(w, a)``; ``"transitional"`` (Bit-Mixer's) by ``(w, a, a')``, adding the
  consumer's activation bits.

Then ``bcnn.quant.set_precision(model, weight_bits, act_bits, layers={name: (w, a)})`` sets
any mix, and every BN site follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..nn import BinaryConv2d, BinaryLinear, SwitchableBatchNorm, bn_keys
from ..quant import SwitchableQuantizer, UniformQuantizer

__all__ = ["any_precision_", "precision_layers"]


def precision_layers(model: Any) -> list[tuple[str, nn.Module]]:
    """The matrix ops of a BCNN in forward order: stem, every block's conv, the classifier."""
    out: list[tuple[str, nn.Module]] = [("stem.conv", model.stem.conv)]
    for i, blk in enumerate(model.blocks):
        out.append((f"blocks.{i}.conv", blk.conv))
    out.append(("head.fc", model.head.fc))
    return out


def any_precision_(model: Any, precisions: Sequence[int], bn: str = "transitional") -> Any:
    """In place: nested b_max-bit weights, switchable activation quantizers and a batch-norm
    set per precision (``bn``: "transitional" or "switchable") on a binary BCNN."""
    ps = tuple(sorted({int(p) for p in precisions}))
    if not ps or ps[0] < 1 or ps[-1] > 8:
        raise ValueError(f"precisions must be in 1..8, got {tuple(precisions)}")
    if not getattr(model, "binary", False):
        raise ValueError("any-precision needs the binary model (binary=True)")
    keys = bn_keys(ps, bn)
    layers = precision_layers(model)
    for name, m in layers:
        if not isinstance(m, BinaryConv2d | BinaryLinear):
            raise ValueError(f"{name}: not a binary layer ({type(m).__name__})")
        out = m.out_channels if isinstance(m, BinaryConv2d) else m.out_features
        m.weight_quantizer = UniformQuantizer(ps[-1], signed=True, channels=out)
        if name != "stem.conv":
            m.input_quantizer = SwitchableQuantizer(ps, signed=True)
        m.any_precision = ps

    def key_fn(producer: Any, consumer: Any) -> Any:
        def key() -> tuple[int, ...]:
            w, a = producer.precision
            return (w, a) if bn == "switchable" else (w, a, consumer.precision[1])

        return key

    sites: list[tuple[Any, str, int, int]] = [(model.stem, "bn", 0, 2)]
    sites += [(blk, "bn", i + 1, 2) for i, blk in enumerate(model.blocks)]
    sites.append((model.head, "norm", len(layers) - 2, 1))  # GAP(stream) -> fc
    for owner, attr, p, dims in sites:
        old = getattr(owner, attr)
        sbn = SwitchableBatchNorm(old.num_features, keys, dims=dims)
        producer, consumer = layers[p][1], layers[p + 1][1]
        sbn.bind(
            key_fn(producer, consumer),
            f"batch norm after {layers[p][0]}",
            (layers[p][0], layers[p + 1][0]),
        )
        setattr(owner, attr, sbn)
    model.precisions = ps
    model.precision_bn = bn
    return model
