"""Dataset specs (``digits``, ``cifar10:DIR``, ``imagefolder:DIR``, ``synthetic[:k=v,...]``)
and their splits.

Splits (``split="train" | "val" | "all"``):

=====================  ======================================================================
spec                   train / val
=====================  ======================================================================
``digits``             seeded split of the 1,797 images: val = ``val_split`` of them
``synthetic``          seeded split of the generated images (generated with data seed 0)
``cifar10:DIR``        official: data_batch_1..5 / test_batch (``val_split`` ignored); without
                       a test_batch, a seeded split of the training batches
``imagefolder:DIR``    official if DIR/train and DIR/val exist; if only DIR/train exists, a
                       seeded split of it; otherwise a seeded split of DIR itself
=====================  ======================================================================

``all`` is train + val. A seeded split draws a permutation with ``numpy.random.default_rng(seed)``
and holds out the first ``round(val_split * n)`` images (indices are kept sorted in each part):
the same spec, seed and val_split always give the same split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._datasets import ArrayDataset, Augment, ImageFileDataset
from ._images import cached_decode, load_cached, read_image, scan_image_folder
from ._sources import load_cifar10_batches, load_digits, make_synthetic

__all__ = ["DataSpec", "Dataset", "load_dataset", "load_splits", "parse_spec", "seeded_split"]

Dataset = ArrayDataset | ImageFileDataset
SPEC_NAMES = ("digits", "cifar10", "imagefolder", "synthetic")
SMALL_IMAGE_MAX_SIDE = 64  # image folders of images at most this big are decoded once and cached


@dataclass(frozen=True)
class DataSpec:
    name: str
    path: Path | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.name}:{self.path}"
        if self.options:
            return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options)
        return self.name


def parse_spec(spec: str | DataSpec) -> DataSpec:
    """``"digits"``, ``"cifar10:DIR"``, ``"imagefolder:DIR"``, ``"synthetic[:n=512,size=32,
    channels=3,classes=10]"``."""
    if isinstance(spec, DataSpec):
        return spec
    name, _, arg = str(spec).partition(":")
    name = name.strip().lower()
    if name not in SPEC_NAMES:
        raise ValueError(
            f"unknown data spec {spec!r}; known: digits, cifar10:DIR, imagefolder:DIR, synthetic"
        )
    if name in ("cifar10", "imagefolder"):
        if not arg:
            raise ValueError(f"data spec {name!r} needs a folder: {name}:DIR")
        return DataSpec(name, Path(arg).expanduser())
    if name == "digits":
        if arg:
            raise ValueError("data spec 'digits' takes no argument")
        return DataSpec(name)
    opts: dict[str, int] = {}
    for kv in filter(None, arg.split(",")):
        k, eq, v = kv.partition("=")
        if not eq or k not in ("n", "size", "channels", "classes"):
            raise ValueError(f"synthetic options are n=, size=, channels=, classes=; got {kv!r}")
        try:
            opts[k] = int(v)
        except ValueError:
            raise ValueError(f"synthetic option {k} must be an integer, got {v!r}") from None
    return DataSpec(name, None, tuple(sorted(opts.items())))


def seeded_split(n: int, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices), each sorted; val holds round(val_split * n) indices."""
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    perm = np.random.default_rng(seed).permutation(n)
    k = round(val_split * n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _small_augment(h: int, w: int, flip: bool) -> Augment:
    return Augment("crop", pad=max(1, min(h, w) // 8), flip=flip)


def _folder(
    root: Path, image_size: int | None, channels: int, progress: bool
) -> tuple[Dataset, bool]:
    """All images of an ImageFolder root as one dataset; True if cached in memory."""
    classes, files, labels = scan_image_folder(root)
    if image_size is None:
        arr = load_cached(root, files, channels)
        if arr is not None:
            h, w = arr.shape[2:]
            return ArrayDataset(arr, labels, classes, _small_augment(h, w, flip=True)), True
    first = read_image(files[0], channels)
    h, w = first.shape[1:]
    if max(h, w) <= SMALL_IMAGE_MAX_SIDE and image_size is None:
        x = cached_decode(root, files, (h, w), channels, progress)
        return ArrayDataset(x, labels, classes, _small_augment(h, w, flip=True)), True
    size = image_size or 224
    return ImageFileDataset(files, labels, classes, size, channels), False


def load_splits(
    spec: str | DataSpec,
    val_split: float = 0.1,
    seed: int = 0,
    *,
    image_size: int | None = None,
    progress: bool = False,
) -> tuple[Dataset, Dataset]:
    """(train, val) datasets of a spec (see the module docstring for which split is which)."""
    s = parse_spec(spec)
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    if s.name in ("digits", "synthetic"):
        if s.name == "digits":
            x, y, classes = load_digits()
            aug = _small_augment(8, 8, flip=False)  # digits are not mirror-symmetric
        else:
            x, y, classes = make_synthetic(**dict(s.options))
            aug = _small_augment(x.shape[2], x.shape[3], flip=False)
        full = ArrayDataset(x, y, classes, aug)
        tr, va = seeded_split(len(full), val_split, seed)
        return full.subset(tr), full.subset(va)
    assert s.path is not None
    if s.name == "cifar10":
        (xtr, ytr), test, classes = load_cifar10_batches(s.path)
        aug = _small_augment(32, 32, flip=True)
        full = ArrayDataset(xtr, ytr, classes, aug)
        if test is not None:
            return full, ArrayDataset(test[0], test[1], classes, aug)
        tr, va = seeded_split(len(full), val_split, seed)
        return full.subset(tr), full.subset(va)
    # imagefolder
    root = s.path
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, _ = _folder(root / "train", image_size, 3, progress)
        val, _ = _folder(root / "val", image_size, 3, progress)
        if val.classes != train.classes:
            raise ValueError(f"{root}: train/ and val/ have different class folders")
        return train, val
    base = root / "train" if (root / "train").is_dir() else root
    folder, _ = _folder(base, image_size, 3, progress)
    tr, va = seeded_split(len(folder), val_split, seed)
    return folder.subset(tr), folder.subset(va)


def load_dataset(
    spec: str | DataSpec,
    split: str = "train",
    val_split: float = 0.1,
    seed: int = 0,
    *,
    image_size: int | None = None,
    progress: bool = False,
) -> Dataset:
    """One split (``"train"``, ``"val"`` or ``"all"``) of a data spec."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be train, val or all, got {split!r}")
    train, val = load_splits(spec, val_split, seed, image_size=image_size, progress=progress)
    if split == "train":
        return train
    if split == "val":
        return val
    return _concat(train, val)


def _concat(a: Dataset, b: Dataset) -> Dataset:
    if isinstance(a, ArrayDataset) and isinstance(b, ArrayDataset):
        x = np.concatenate([a.images.numpy(), b.images.numpy()])
        y = np.concatenate([a.labels.numpy(), b.labels.numpy()])
        return ArrayDataset(x, y, a.classes, a.augment)
    if isinstance(a, ImageFileDataset) and isinstance(b, ImageFileDataset):
        return ImageFileDataset(
            a.files + b.files,
            np.concatenate([a.labels, b.labels]),
            a.classes,
            a.image_size,
            a.channels,
            a.augment,
        )
    raise ValueError("cannot concatenate datasets of different kinds")
