"""Helpers shared by CLI subcommands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_precision_arguments", "load_torch_model", "parse_layers", "print_json"]


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


def add_precision_arguments(p: Any, what: str) -> None:
    """--weight-bits / --act-bits / --layers: the run-time precision of ``what``."""
    p.add_argument(
        "--weight-bits",
        type=int,
        default=None,
        help=f"{what} at K-bit weights, every switchable layer (any-precision and k-bit "
        "models: the top K weight planes)",
    )
    p.add_argument(
        "--act-bits",
        type=int,
        default=None,
        help=f"{what} at K-bit activations (any-precision models)",
    )
    p.add_argument(
        "--layers",
        default=None,
        metavar="JSON",
        help="per-layer overrides, e.g. '{\"blocks.2.conv\": [1, 2]}' or a JSON file (the "
        "'layers' of `bcnn search-precision --json` output works as is)",
    )


def parse_layers(text: str | None) -> dict[str, tuple[int, int]] | None:
    """``--layers``: a JSON object {layer: [w, a]} (or a file holding one, or a search
    result with a 'layers' entry) -> {layer: (w, a)}; a one-line ValueError otherwise."""
    if text is None:
        return None
    src = text
    p = Path(text)
    if not text.lstrip().startswith("{") and p.is_file():
        src = p.read_text()
    try:
        obj = json.loads(src)
    except ValueError:
        raise ValueError(f"--layers: not a JSON object or a JSON file: {text!r:.80}") from None
    if isinstance(obj, dict) and isinstance(obj.get("layers"), dict):
        obj = obj["layers"]
    if not isinstance(obj, dict) or not all(
        isinstance(v, list)
        and len(v) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) for b in v)
        for v in obj.values()
    ):
        raise ValueError('--layers: expected {"layer": [weight_bits, act_bits], ...}')
    return {str(k): (int(v[0]), int(v[1])) for k, v in obj.items()}
