"""Two-step training of binary CNNs, distillation, checkpoints/resume, metrics, DDP.

>>> from bcnn.train import TrainConfig, train
>>> cfg = TrainConfig(model="bcnn_cifar", data="digits", out="runs/digits", epochs=10)
>>> # model = train(cfg)   # step 1 then step 2; writes runs/digits/final.pt

Run under ``torchrun --nproc_per_node N`` for DistributedDataParallel (gloo on CPU, nccl on
CUDA): only rank 0 writes files and prints. See ``docs/training.md``.
"""

from ._config import TrainConfig, load_config_file, parse_steps
from ._evaluate import evaluate, topk_correct
from ._losses import DistillationLoss, kd_loss
from ._optim import binarised_weight_names, clip_latent_weights, lr_lambda, make_optimizer
from ._trainer import Trainer, TrainingInterrupted, resolve_device, train

__all__ = [
    "DistillationLoss",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "binarised_weight_names",
    "clip_latent_weights",
    "evaluate",
    "kd_loss",
    "load_config_file",
    "lr_lambda",
    "make_optimizer",
    "parse_steps",
    "resolve_device",
    "topk_correct",
    "train",
]
