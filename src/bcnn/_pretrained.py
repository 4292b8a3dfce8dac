"""Where pretrained models ship: ``src/bcnn/pretrained/<name>.bcnn`` (packed) and, if small,
``<name>.pt`` (torch weights). Torch-free, so that the packed engine can resolve a pretrained
name without importing torch."""

from __future__ import annotations

from pathlib import Path

__all__ = ["PRETRAINED_DIR", "pretrained_file"]

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


def pretrained_file(name: str, suffix: str) -> Path | None:
    """``PRETRAINED_DIR / (name + suffix)`` if that file ships, else None (also for names
    that are paths or hidden files)."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        return None
    p = PRETRAINED_DIR / f"{name}{suffix}"
    return p if p.is_file() else None
