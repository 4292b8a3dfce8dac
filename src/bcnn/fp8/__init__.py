"""FP8 training, emulated: 8-bit floating-point weights, activations, errors and gradients.

Mellempudi, Srinivasan, Das, Kaul, "Mixed Precision Training With 8-bit Floating Point" (2019):
E5M2 operands at every conv/linear matrix product with FP32 accumulation; round-to-nearest-even
forward, stochastic rounding for gradients; FP16 master weights with stochastic-rounding
updates; enhanced (floored dynamic) loss scaling. First conv, last FC and all norms stay FP32.

>>> import torch
>>> from bcnn.fp8 import quantize_fp8
>>> quantize_fp8(torch.tensor([0.1, -3.3]), "e5m2").tolist()
[0.09375, -3.5]

    fp8 = FP8Training(model, optimizer, "fp8", total_steps=n)   # or fp8_training(model, recipe)
    fp8.step(loss, step)                                         # instead of backward(); step()

See ``docs/fp8.md``. ``bcnn train --precision fp8|fp8-hybrid`` uses this package.
"""

from ._formats import FORMATS, Format, is_representable
from ._functional import FlushStats, FP8Spec, fp8_conv2d, fp8_linear
from ._master import MasterWeights
from ._quantize import quantize_fp8
from ._recipe import RECIPES, Recipe, get_recipe
from ._round import round_to_format
from ._scaler import LossScaler
from ._session import FP8Divergence, FP8Training
from ._swap import eligible_layers, fp8_layers, fp8_training, remove_fp8

__all__ = [
    "FORMATS",
    "RECIPES",
    "FP8Divergence",
    "FP8Spec",
    "FP8Training",
    "FlushStats",
    "Format",
    "LossScaler",
    "MasterWeights",
    "Recipe",
    "eligible_layers",
    "fp8_conv2d",
    "fp8_layers",
    "fp8_linear",
    "fp8_training",
    "get_recipe",
    "is_representable",
    "quantize_fp8",
    "remove_fp8",
    "round_to_format",
]
