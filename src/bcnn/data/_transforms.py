"""Augmentations on uint8 tensors (no float round trip for crops and flips).

Batched (in-memory datasets): :func:`random_crop_flip` pads, crops and flips a whole batch with
per-sample offsets drawn from one ``torch.Generator``. Per item (lazy image folders):
:func:`random_resized_crop` and :func:`resize_center_crop`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_crop_flip", "random_resized_crop", "resize", "resize_center_crop"]


def random_crop_flip(x: Tensor, pad: int, flip: bool, generator: torch.Generator) -> Tensor:
    """x: uint8 (N, C, H, W). Zero-pad by ``pad``, crop H x W at a random offset per sample,
    and mirror horizontally with probability 1/2 per sample (if ``flip``)."""
    n, c, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        x = xp[
            torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
        ]
    if flip:
        m = torch.rand(n, generator=generator) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 (C, H, W) -> uint8 (C, *size), bilinear with antialiasing."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    y = F.interpolate(
        x[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True
    )[0]
    return y.round_().clamp_(0, 255).to(torch.uint8)


def resize_center_crop(x: Tensor, size: int, crop_fraction: float = 0.875) -> Tensor:
    """Eval transform: resize the shorter side to size / crop_fraction, center crop size x size."""
    _, h, w = x.shape
    short = round(size / crop_fraction)
    if h <= w:
        nh, nw = short, max(short, round(w * short / h))
    else:
        nh, nw = max(short, round(h * short / w)), short
    x = resize(x, (nh, nw))
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top : top + size, left : left + size].contiguous()


def random_resized_crop(
    x: Tensor,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> Tensor:
    """Train transform (Inception-style): a random area/aspect crop resized to size x size,
    then a horizontal flip with probability 1/2."""
    _, h, w = x.shape
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    crop = None
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        ar = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
        cw = round(math.sqrt(target * ar))
        ch = round(math.sqrt(target / ar))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            crop = (top, left, ch, cw)
            break
    if crop is None:  # fall back to a center crop of the whole image at a valid ratio
        r = w / h
        if r < ratio[0]:
            cw, ch = w, round(w / ratio[0])
        elif r > ratio[1]:
            ch, cw = h, round(h * ratio[1])
        else:
            cw, ch = w, h
        crop = ((h - ch) // 2, (w - cw) // 2, ch, cw)
    top, left, ch, cw = crop
    y = resize(x[:, top : top + ch, left : left + cw], (size, size))
    if flip and float(torch.rand(1, generator=generator)) < 0.5:
        y = y.flip(-1)
    return y.contiguous()
