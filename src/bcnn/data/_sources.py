"""Raw sources: sklearn's digits, synthetic images, CIFAR-10 python batches."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = ["CIFAR10_CLASSES", "load_cifar10_batches", "load_digits", "make_synthetic"]

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def load_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """sklearn's bundled 8x8 digits (1,797 images): values 0..16 scaled to uint8 0..255."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return x, d.target.astype(np.int64), [str(i) for i in range(10)]


def make_synthetic(
    n: int = 512, size: int = 32, channels: int = 3, classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Random uint8 images with learnable labels: each class has a smooth random template
    (4x4 upsampled); an image is 60% its class template + 40% uniform noise."""
    if n < 1 or size < 1 or channels < 1 or classes < 2:
        raise ValueError("synthetic: need n >= 1, size >= 1, channels >= 1, classes >= 2")
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (classes, channels, 4, 4))
    rep = -(-size // 4)
    templates = np.kron(coarse, np.ones((rep, rep)))[:, :, :size, :size]
    labels = rng.integers(0, classes, n).astype(np.int64)
    noise = rng.uniform(0, 255, (n, channels, size, size))
    x = np.rint(0.6 * templates[labels] + 0.4 * noise).clip(0, 255).astype(np.uint8)
    return x, labels, [f"class{i}" for i in range(classes)]


class _BatchUnpickler(pickle.Unpickler):
    """Only what CIFAR python batches need: dicts, lists, bytes and numpy arrays."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_batch(path: Path) -> dict[Any, Any]:
    try:
        data = path.read_bytes()
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except OSError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    b = _load_batch(path)
    if "data" not in b or ("labels" not in b and "fine_labels" not in b):
        raise ValueError(f"{path}: CIFAR batch without 'data'/'labels'")
    x = np.asarray(b["data"], dtype=np.uint8)
    y = np.asarray(b.get("labels", b.get("fine_labels")), dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(y) != len(x):
        raise ValueError(f"{path}: expected data (N, 3072) and N labels, got {x.shape}, {y.shape}")
    return x.reshape(-1, 3, 32, 32), y


def load_cifar10_batches(
    root: Path,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None, list[str]]:
    """``root/data_batch_1..5`` (train) and ``root/test_batch`` (the official test split).

    Also accepts ``root/cifar-10-batches-py/``. Returns (train, test or None, classes).
    """
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder not found: {root}")
    if not (root / "data_batch_1").exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    train_files = sorted(root.glob("data_batch_*"))
    if not train_files:
        raise FileNotFoundError(f"{root}: no data_batch_* files (CIFAR-10 python batches)")
    parts = [_batch_arrays(f) for f in train_files]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _batch_arrays(root / "test_batch") if (root / "test_batch").exists() else None
    classes = list(CIFAR10_CLASSES)
    meta = root / "batches.meta"
    if meta.exists():
        names = _load_batch(meta).get("label_names")
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    n_cls = int(max(train[1].max(), test[1].max() if test else 0)) + 1
    if n_cls > len(classes):
        classes += [f"class{i}" for i in range(len(classes), n_cls)]
    return train, test, classes
