"""Image files: decoding to uint8 CHW arrays, folder scanning, and the decoded-array cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .._io import atomic_write

__all__ = ["IMAGE_EXTENSIONS", "cache_dir", "read_image", "scan_image_folder"]

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".ppm",
    ".pgm",
    ".webp",
    ".gif",
    ".tif",
    ".tiff",
)
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def read_image(path: str | os.PathLike[str], channels: int | None = None) -> np.ndarray:
    """Decode an image file to a uint8 array (C, H, W).

    ``channels``: 3 (RGB), 1 (grayscale) or ``None`` (1 for grayscale files, else 3).
    A missing, corrupt or non-image file raises ``ValueError``/``FileNotFoundError`` naming it.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    try:
        with Image.open(path) as im:
            im.load()
            if channels is None:
                channels = 1 if im.mode in _GRAY_MODES else 3
            conv = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(conv, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def scan_image_folder(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """ImageFolder layout: one sub-folder per class, classes sorted alphabetically.

    Returns ``(classes, files, labels)``; files are sorted within each class. Files whose
    extension is not an image extension are ignored; hidden files and folders too.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected ROOT/<class>/<image>)")
    files: list[Path] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / c, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(Path(dirpath) / f)
                    labels.append(i)
    if not files:
        raise ValueError(f"{root}: no image files in the class folders")
    return classes, files, np.asarray(labels, dtype=np.int64)


def cache_dir() -> Path:
    """``$BCNN_CACHE`` or ``~/.cache/bcnn``."""
    env = os.environ.get("BCNN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bcnn"


def files_key(root: Path, files: list[Path], extra: str = "") -> str:
    """A cache key over the folder path and each file's relative path, mtime and size."""
    h = hashlib.sha1()
    h.update(str(root.resolve()).encode())
    h.update(extra.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    return h.hexdigest()[:20]


def decode_all(
    files: list[Path], size: tuple[int, int], channels: int, progress: bool = False
) -> np.ndarray:
    """Decode every file to (N, C, H, W) uint8; images of another size are resized to ``size``."""
    from PIL import Image

    h, w = size
    out = np.empty((len(files), channels, h, w), dtype=np.uint8)
    it = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc="decoding images", unit="img", leave=False)
    for i, f in enumerate(it):
        a = read_image(f, channels)
        if a.shape[1:] != (h, w):
            mode = "L" if channels == 1 else "RGB"
            im = Image.fromarray(a[0] if channels == 1 else a.transpose(1, 2, 0), mode)
            im = im.resize((w, h), Image.Resampling.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
            a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        out[i] = a
    return out


def _cache_path(root: Path, files: list[Path], channels: int) -> Path:
    return cache_dir() / f"imagefolder-{files_key(root, files, f'c{channels}')}.npy"


def load_cached(root: Path, files: list[Path], channels: int) -> np.ndarray | None:
    """The cached decoded array of these files (same paths, mtimes and sizes), or None."""
    path = _cache_path(root, files, channels)
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[:2] != (len(files), channels):
        return None
    return arr


def cached_decode(
    root: Path, files: list[Path], size: tuple[int, int], channels: int, progress: bool = False
) -> np.ndarray:
    """``decode_all`` through an .npy cache keyed by path + mtime + size of every file."""
    arr = load_cached(root, files, channels)
    if arr is not None and arr.shape[2:] == tuple(size):
        return arr
    arr = decode_all(files, size, channels, progress)
    path = _cache_path(root, files, channels)
    try:
        atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))
    except OSError:
        pass  # a read-only cache is not an error: we just decode again next time
    return arr
