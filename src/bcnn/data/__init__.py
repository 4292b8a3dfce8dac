"""Datasets for bcnn: uint8 NCHW images and int64 labels.

Specs: ``digits`` (sklearn's bundled 8x8 digits, 1 channel, the embedded default),
``cifar10:DIR`` (python batches), ``imagefolder:DIR`` (one folder per class, classes sorted
alphabetically; JPEG/PNG), ``synthetic[:n=,size=,channels=,classes=]``. See
:mod:`bcnn.data._spec` for which split ``train``/``val``/``all`` picks for each.

>>> from bcnn.data import load_splits, Loader
>>> train, val = load_splits("digits", val_split=0.1, seed=0)
>>> len(train), len(val), train.image_shape
(1617, 180, (1, 8, 8))
>>> x, y = next(iter(Loader(train, 32, train=True, seed=0)))
>>> x.dtype, tuple(x.shape), y.dtype
(torch.uint8, (32, 1, 8, 8), torch.int64)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._datasets import ArrayDataset, Augment, ImageFileDataset
    from ._images import cache_dir, read_image, scan_image_folder
    from ._loader import Loader
    from ._sources import load_cifar10_batches, load_digits, make_synthetic
    from ._spec import Dataset, DataSpec, load_dataset, load_splits, parse_spec, seeded_split

# name -> submodule; loaded on first use, so that reading an image (bcnn predict on the
# packed engine) does not import torch
_WHERE = {
    "ArrayDataset": "_datasets",
    "Augment": "_datasets",
    "ImageFileDataset": "_datasets",
    "cache_dir": "_images",
    "read_image": "_images",
    "scan_image_folder": "_images",
    "Loader": "_loader",
    "load_cifar10_batches": "_sources",
    "load_digits": "_sources",
    "make_synthetic": "_sources",
    "Dataset": "_spec",
    "DataSpec": "_spec",
    "load_dataset": "_spec",
    "load_splits": "_spec",
    "parse_spec": "_spec",
    "seeded_split": "_spec",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'bcnn.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)


__all__ = [
    "ArrayDataset",
    "Augment",
    "DataSpec",
    "Dataset",
    "ImageFileDataset",
    "Loader",
    "cache_dir",
    "load_cifar10_batches",
    "load_dataset",
    "load_digits",
    "load_splits",
    "make_synthetic",
    "parse_spec",
    "read_image",
    "scan_image_folder",
    "seeded_split",
]
