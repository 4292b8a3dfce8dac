"""Dataset objects: in-memory uint8 arrays, and lazily decoded image folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._images import read_image
from ._transforms import random_crop_flip, random_resized_crop, resize_center_crop

__all__ = ["ArrayDataset", "Augment", "ImageFileDataset"]


@dataclass(frozen=True)
class Augment:
    """Training augmentation. ``kind``: ``"crop"`` (pad + random crop, optional flip) for small
    in-memory images, ``"resized_crop"`` (random-resized-crop + flip) for large images,
    ``"none"``."""

    kind: str = "crop"
    pad: int = 4
    flip: bool = True


class ArrayDataset:
    """uint8 images (N, C, H, W) and int64 labels, in memory. Batches are gathered and augmented
    in the main process (:meth:`batch`), which is faster than per-item work for small images."""

    lazy = False

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        classes: list[str],
        augment: Augment = Augment("none"),
    ) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}"
            )
        if len(labels) != len(images):
            raise ValueError("images and labels differ in length")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.classes = list(classes)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return ArrayDataset(
            self.images[t].numpy(), self.labels[t].numpy(), self.classes, self.augment
        )

    def batch(
        self, idx: Tensor, train: bool, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        x = self.images[idx]
        if train and self.augment.kind != "none" and generator is not None:
            x = random_crop_flip(x, self.augment.pad, self.augment.flip, generator)
        return x, self.labels[idx]


class ImageFileDataset(torch.utils.data.Dataset):
    """Image files decoded per item (for large image folders, e.g. ImageNet) in DataLoader
    workers. Items are addressed by ``(index, seed)`` pairs so that the augmentation of each
    item depends only on the run seed, the epoch and the index, not on worker scheduling."""

    lazy = True

    def __init__(
        self,
        files: list[Path],
        labels: np.ndarray,
        classes: list[str],
        image_size: int = 224,
        channels: int = 3,
        augment: Augment = Augment("resized_crop"),
    ) -> None:
        self.files = list(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.augment = augment
        self.train = False

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.channels, self.image_size, self.image_size

    def subset(self, idx: np.ndarray) -> ImageFileDataset:
        idx = np.asarray(idx, dtype=np.int64)
        return ImageFileDataset(
            [self.files[i] for i in idx],
            self.labels[idx],
            self.classes,
            self.image_size,
            self.channels,
            self.augment,
        )

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[Tensor, int]:
        i, seed = item if isinstance(item, tuple) else (item, -1)
        x = torch.from_numpy(read_image(self.files[i], self.channels))
        if self.train and seed >= 0 and self.augment.kind == "resized_crop":
            g = torch.Generator().manual_seed(seed)
            x = random_resized_crop(x, self.image_size, g, flip=self.augment.flip)
        else:
            x = resize_center_crop(x, self.image_size)
        return x, int(self.labels[i])
