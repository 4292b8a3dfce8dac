"""Initialising a step from another run's checkpoint of the same topology.

Tensors are taken by name. Those the source lacks or holds in another shape keep the fresh
model's values when that is expected, and are named through ``log``:

* quantizer state (LSQ steps, flags): a model at another precision, or a float twin, has
  none; the steps are set from the first batch as LSQ does;
* the stem's weight: a float twin's stem reads pixels, a binary one pixel bit-planes;
* every batch-norm set of an any-precision model starts from the source's single BN (an
  any-precision source of the same sets gives its own sets).

Any other layer that does not fit means another topology: a one-line ``ValueError``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models import load_checkpoint

__all__ = ["init_state"]

_QUANTIZER_STATE = ("step", "initialized", "signed_flag")


def init_state(model: nn.Module, src: Any, what: str, log: Any = None) -> dict[str, torch.Tensor]:
    """A state dict for ``model`` from the checkpoint ``src`` (``what`` names the model in
    errors)."""
    m, _ = load_checkpoint(src)
    have = m.state_dict()
    out = dict(model.state_dict())
    fresh, bad = [], []
    for k, v in out.items():
        src_key = k
        if ".sets." in k and k not in have:  # blocks.0.bn.sets.2_2_2.weight <- blocks.0.bn.weight
            head, tail = k.split(".sets.", 1)
            src_key = f"{head}.{tail.split('.', 1)[1]}"
        t = have.get(src_key)
        if t is not None and tuple(t.shape) == tuple(v.shape):
            out[k] = t.to(v.dtype)
        elif k.rsplit(".", 1)[-1] in _QUANTIZER_STATE or k.startswith("stem.conv."):
            fresh.append(k)
        else:
            bad.append(k)
    if bad:
        raise ValueError(f"{src}: its weights do not fit {what} (first: {bad[0]})")
    if fresh and log is not None:
        shown = ", ".join(fresh[:4]) + (", ..." if len(fresh) > 4 else "")
        log(f"  kept fresh (not in {src} at this shape): {shown}")
    return out
