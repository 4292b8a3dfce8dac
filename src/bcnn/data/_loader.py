"""Batches for training and evaluation, deterministic in (seed, epoch) and shardable (DDP).

The order of an epoch comes from ``torch.utils.data.DistributedSampler`` (one replica when not
distributed) seeded with the run seed and ``set_epoch``; the augmentation of a batch (in-memory
datasets) or of an item (image files) is seeded from (seed, epoch, batch or index). Nothing
depends on global RNG state, so training can resume at any batch of any epoch exactly:
``iter_from(k)`` skips the first k batches without computing them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from ._datasets import ArrayDataset, ImageFileDataset

__all__ = ["Loader"]


def _mix(*xs: int) -> int:
    return int(np.random.SeedSequence([int(x) & 0xFFFFFFFF for x in xs]).generate_state(1)[0])


class _SeededItems(torch.utils.data.Sampler):
    """Yields (index, augmentation seed) pairs for :class:`ImageFileDataset`."""

    def __init__(self, idx: list[int], seed: int, epoch: int) -> None:
        self.idx, self.seed, self.epoch = idx, seed, epoch

    def __len__(self) -> int:
        return len(self.idx)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.idx:
            yield i, _mix(self.seed, self.epoch, i)


class Loader:
    """Iterate a dataset in batches of uint8 images (N, C, H, W) and int64 labels.

    ``train=True``: shuffled per epoch, augmented, incomplete last batch dropped (when at least
    one full batch exists). ``train=False``: in order, not augmented, every item exactly once
    across ranks (rank r takes items r, r + world_size, ...).
    """

    def __init__(
        self,
        dataset: ArrayDataset | ImageFileDataset,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.workers = workers
        self.epoch = 0
        if train:
            self.sampler: DistributedSampler | None = DistributedSampler(
                dataset,  # type: ignore[arg-type]
                num_replicas=world_size,
                rank=rank,
                shuffle=True,
                seed=seed,
            )
            self.drop_last = self.sampler.num_samples >= batch_size
        else:
            self.sampler = None
            self.drop_last = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _indices(self) -> list[int]:
        if self.sampler is not None:
            return list(self.sampler)
        return list(range(self.rank, len(self.dataset), self.world_size))

    def __len__(self) -> int:
        n = self.sampler.num_samples if self.sampler is not None else len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of the current epoch from batch number ``start`` on."""
        idx = self._indices()
        nb = len(self)
        idx = idx[: nb * self.batch_size] if self.drop_last else idx
        if isinstance(self.dataset, ArrayDataset):
            for b in range(start, nb):
                sel = torch.tensor(idx[b * self.batch_size : (b + 1) * self.batch_size])
                g = None
                if self.train:
                    g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, b, self.rank))
                yield self.dataset.batch(sel, self.train, g)
            return
        ds = self.dataset
        ds.train = self.train
        rest = idx[start * self.batch_size :]
        items = _SeededItems(rest, self.seed, self.epoch) if self.train else rest
        dl = DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=items,  # type: ignore[arg-type]
            num_workers=self.workers,
            pin_memory=False,
            persistent_workers=False,
        )
        yield from dl
