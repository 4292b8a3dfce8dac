"""bcnn.data: specs, splits, layouts on generated files, cache, corrupt files, augmentations."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bcnn.data import (
    ArrayDataset,
    Augment,
    ImageFileDataset,
    Loader,
    load_dataset,
    load_splits,
    parse_spec,
    read_image,
    seeded_split,
)
from bcnn.data._transforms import random_crop_flip, random_resized_crop, resize_center_crop


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("BCNN_CACHE", str(d))
    return d


def _write_folder(root: Path, classes: dict[str, int], size: int = 12, ext: str = "png") -> None:
    rng = np.random.default_rng(0)
    for c, n in classes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            a[..., 0] = 40 * list(classes).index(c)  # channel 0 encodes the class
            Image.fromarray(a).save(root / c / f"{i:03d}.{ext}")


def test_digits_split_is_seeded_disjoint_and_complete() -> None:
    tr, va = load_splits("digits", 0.1, seed=3)
    assert (len(tr), len(va)) == (1617, 180)
    assert tr.image_shape == (1, 8, 8) and tr.images.dtype == torch.uint8
    assert int(tr.images.max()) == 255 and tr.labels.dtype == torch.int64
    _, va2 = load_splits("digits", 0.1, seed=3)
    assert torch.equal(va.images, va2.images) and torch.equal(va.labels, va2.labels)
    _, va3 = load_splits("digits", 0.1, seed=4)
    assert not torch.equal(va.labels, va3.labels)
    every = load_dataset("digits", "all", 0.1, 3)
    assert len(every) == 1797
    a, b = seeded_split(100, 0.25, 0)
    assert len(b) == 25 and not set(a) & set(b) and sorted({*a, *b}) == list(range(100))
    assert tr.augment == Augment("crop", pad=1, flip=False)  # no flips for digits


def test_synthetic_spec_options() -> None:
    ds = load_dataset("synthetic:n=40,size=16,channels=1,classes=3", "all")
    assert len(ds) == 40 and ds.image_shape == (1, 16, 16) and len(ds.classes) == 3
    assert str(parse_spec("synthetic:n=40,size=16")) == "synthetic:n=40,size=16"
    with pytest.raises(ValueError, match="synthetic options"):
        parse_spec("synthetic:bogus=1")
    with pytest.raises(ValueError, match="unknown data spec"):
        parse_spec("mnist")
    with pytest.raises(ValueError, match="needs a folder"):
        parse_spec("cifar10")


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_imagefolder_small_is_cached(tmp_path: Path, _cache: Path, ext: str) -> None:
    root = tmp_path / "imgs"
    _write_folder(root, {"zebra": 3, "ant": 4, "bee": 2}, ext=ext)
    ds = load_dataset(f"imagefolder:{root}", "all", 0.0)
    assert isinstance(ds, ArrayDataset) and ds.classes == ["ant", "bee", "zebra"]
    assert ds.labels.tolist() == [0] * 4 + [1] * 2 + [2] * 3
    assert ds.image_shape == (3, 12, 12)
    assert ds.images[:, 0, 0, 0].tolist() == [40] * 4 + [80] * 2 + [0] * 3 or ext == "jpg"
    cached = list(_cache.glob("imagefolder-*.npy"))
    assert len(cached) == 1
    # The second load reads the cache: prove it by corrupting the source, unchanged mtime/size.
    f = root / "ant" / f"000.{ext}"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[: len(data) // 2] = b"\0" * (len(data) // 2)
    f.write_bytes(bytes(data))
    import os

    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = load_dataset(f"imagefolder:{root}", "all", 0.0)
    assert torch.equal(again.images, ds.images)


def test_imagefolder_train_val_layout_and_seeded_split(tmp_path: Path) -> None:
    _write_folder(tmp_path / "a" / "train", {"x": 5, "y": 5})
    _write_folder(tmp_path / "a" / "val", {"x": 2, "y": 1})
    tr, va = load_splits(f"imagefolder:{tmp_path / 'a'}", 0.5, 0)
    assert (len(tr), len(va)) == (10, 3)  # official split: val_split ignored
    _write_folder(tmp_path / "b" / "train", {"x": 5, "y": 5})
    tr, va = load_splits(f"imagefolder:{tmp_path / 'b'}", 0.2, 0)
    assert (len(tr), len(va)) == (8, 2) and tr.classes == ["x", "y"]


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    _write_folder(tmp_path / "r", {"a": 2, "b": 2})
    bad = tmp_path / "r" / "b" / "001.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"001\.png.*not a readable image"):
        load_dataset(f"imagefolder:{tmp_path / 'r'}", "all", 0.0)
    with pytest.raises(ValueError, match="not a readable image"):
        read_image(bad)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")


def test_read_image_channels(tmp_path: Path) -> None:
    g = tmp_path / "g.png"
    Image.fromarray(np.arange(20, dtype=np.uint8).reshape(4, 5), "L").save(g)
    a = read_image(g)
    assert a.shape == (1, 4, 5) and a.dtype == np.uint8 and a[0, 1, 0] == 5
    assert read_image(g, channels=3).shape == (3, 4, 5)


def test_imagefolder_large_images_decode_lazily(tmp_path: Path) -> None:
    _write_folder(tmp_path / "big", {"a": 3, "b": 3}, size=80, ext="jpg")
    tr, va = load_splits(f"imagefolder:{tmp_path / 'big'}", 0.34, 0, image_size=32)
    assert isinstance(tr, ImageFileDataset) and (len(tr), len(va)) == (4, 2)
    ld = Loader(tr, 2, train=True, seed=0)
    batches = list(ld)
    assert [tuple(x.shape) for x, _ in batches] == [(2, 3, 32, 32)] * 2
    assert batches[0][0].dtype == torch.uint8
    again = list(Loader(tr, 2, train=True, seed=0))  # same seed and epoch: same augmentation
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    x, _ = next(iter(Loader(va, 8, train=False)))
    assert tuple(x.shape) == (2, 3, 32, 32)


def _write_cifar(root: Path, n: int = 6, test: bool = True) -> None:
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in (1, 2):
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i] * n}
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(d))
    if test:
        d = {b"data": np.full((3, 3072), 7, np.uint8), b"labels": [9, 8, 7]}
        (root / "test_batch").write_bytes(pickle.dumps(d))


def test_cifar10_python_batches(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "c")
    tr, va = load_splits(f"cifar10:{tmp_path / 'c'}", 0.5, 0)
    assert (len(tr), len(va)) == (12, 3)  # the official test batch is the val split
    assert tr.image_shape == (3, 32, 32) and va.labels.tolist() == [9, 8, 7]
    assert int(va.images.max()) == 7 and tr.classes[0] == "airplane"
    assert tr.augment == Augment("crop", pad=4, flip=True)
    _write_cifar(tmp_path / "n", test=False)
    tr, va = load_splits(f"cifar10:{tmp_path / 'n'}", 0.25, 0)
    assert (len(tr), len(va)) == (9, 3)


def test_cifar10_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    root = tmp_path / "evil"
    root.mkdir()

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Boom()}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_dataset(f"cifar10:{root}")
    with pytest.raises(FileNotFoundError):
        load_dataset(f"cifar10:{tmp_path / 'none'}")


def test_random_crop_flip() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).reshape(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_crop_flip(x, 0, False, g), x)
    y = random_crop_flip(x, 0, True, torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1))
    outs = {
        random_crop_flip(x, 1, False, torch.Generator().manual_seed(s))[0].sum().item()
        for s in range(20)
    }
    assert len(outs) > 1  # offsets vary
    z = random_crop_flip(x, 1, False, torch.Generator().manual_seed(5))
    assert z.shape == x.shape and z.dtype == torch.uint8


def test_resize_transforms() -> None:
    x = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    assert tuple(resize_center_crop(x, 24).shape) == (3, 24, 24)
    y = random_resized_crop(x, 16, torch.Generator().manual_seed(0))
    assert tuple(y.shape) == (3, 16, 16) and y.dtype == torch.uint8


def test_loader_order_epochs_shards_and_skip() -> None:
    ds = load_dataset("synthetic:n=50,size=8", "all")
    ld = Loader(ds, 8, train=True, seed=0)
    assert len(ld) == 6  # last incomplete batch dropped
    e0 = [y.tolist() for _, y in ld]
    assert e0 == [y.tolist() for _, y in ld]
    ld.set_epoch(1)
    e1 = [(x, y) for x, y in ld]
    assert [y.tolist() for _, y in e1] != e0
    tail = list(ld.iter_from(4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e1[4:], tail)) and len(tail) == 2
    # eval shards: every item exactly once across ranks
    seen = []
    for r in range(3):
        for x, _ in Loader(ds, 4, train=False, rank=r, world_size=3):
            seen.extend(x.flatten(1)[:, :6].tolist())
    assert sorted(seen) == sorted(ds.images.flatten(1)[:, :6].tolist())
