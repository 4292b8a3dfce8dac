"""Model registry and the BCNN family.

>>> import torch
>>> from bcnn.models import create_model
>>> model = create_model("bcnn_cifar", num_classes=10)            # fully binary
>>> twin = create_model("bcnn_cifar", num_classes=10, binary=False)  # float twin
>>> model(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).shape
torch.Size([2, 10])
"""

from . import bcnn as _bcnn  # noqa: F401  (registers the family)
from ._any_precision import any_precision_, precision_layers
from ._checkpoint import (
    PRETRAINED_DIR,
    atomic_torch_save,
    load_checkpoint,
    pretrained_checkpoint,
    save_checkpoint,
)
from ._registry import create_model, list_models, register_model
from .bcnn import BCNN, BCNNBlock, BCNNDownsample, BCNNHead, BCNNStem

__all__ = [
    "BCNN",
    "PRETRAINED_DIR",
    "BCNNBlock",
    "BCNNDownsample",
    "BCNNHead",
    "BCNNStem",
    "any_precision_",
    "atomic_torch_save",
    "create_model",
    "list_models",
    "load_checkpoint",
    "precision_layers",
    "pretrained_checkpoint",
    "register_model",
    "save_checkpoint",
]
