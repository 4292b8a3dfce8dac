"""Helpers shared by CLI subcommands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["load_torch_model", "print_json"]


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=None, sort_keys=False)
    sys.stdout.write("\n")


def load_torch_model(spec: str, **create_kw: Any) -> tuple[Any, dict[str, Any]]:
    """A checkpoint path or a pretrained name -> (model, meta); a registered model name ->
    (fresh model, {})."""
    from ..models import create_model, list_models, load_checkpoint, pretrained_checkpoint

    if spec in list_models():
        return create_model(spec, **create_kw), {}
    path = Path(spec)
    shipped = None if path.exists() else pretrained_checkpoint(spec)
    if shipped is not None:
        return load_checkpoint(shipped)
    if path.suffix in {".pt", ".pth"} or path.exists():
        return load_checkpoint(path)
    raise FileNotFoundError(
        f"{spec!r} is neither a checkpoint file nor a model name ({', '.join(list_models())})"
    )
