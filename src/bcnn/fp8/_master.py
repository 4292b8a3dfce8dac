"""16-bit master weights with stochastic-rounding updates, for any torch optimizer.

    w_16 <- SR_16(w_16 + delta)      delta: the optimizer's update, computed in FP32

The parameters stay FP32 tensors (the model runs unchanged) whose values always lie on the FP16
(or BF16) grid; after every ``optimizer.step()`` a post-step hook rounds them back onto it,
stochastically, so updates far below the grid spacing (late in a decaying schedule) still move
the weights in expectation (Mellempudi et al. 2019; Gupta et al. 2015). The optimizer's own
state (Adam's moments) stays FP32. The optimizer object is not replaced: schedulers,
``state_dict`` and checkpoints keep working.
"""

from __future__ import annotations

import torch

from ._formats import check_rounding, get_format
from ._round import round_to_format

__all__ = ["MasterWeights"]


class MasterWeights:
    """Attach to ``optimizer``: its parameters are rounded (RNE) onto ``dtype`` (``fp16`` or
    ``bf16``) now, and after every step with ``rounding``. ``remove()`` detaches the hook."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, dtype: str = "fp16", rounding: str = "stochastic"
    ) -> None:
        self.format = get_format(dtype, ("fp16", "bf16"))
        self.rounding = check_rounding(rounding)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self._round("nearest")
        self._handle = optimizer.register_step_post_hook(lambda *_: self._round(self.rounding))

    @torch.no_grad()
    def _round(self, rounding: str) -> None:
        for p in self.params:
            if p.is_floating_point():
                p.copy_(round_to_format(p, self.format, rounding))

    def remove(self) -> None:
        self._handle.remove()
