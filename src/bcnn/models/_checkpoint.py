"""Checkpoints: a plain dict of tensors and primitives, loadable with ``weights_only=True``.

    {"format": "bcnn-checkpoint", "version": 1,
     "config": {"name", "num_classes", "binary", "kwargs"},   # as create_model() got it
     "state_dict": {...}, "meta": {...}}                     # meta: classes, epochs, metrics...

Written atomically (temporary file in the same folder, then rename).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from .._pretrained import PRETRAINED_DIR, pretrained_file
from ._registry import create_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "PRETRAINED_DIR",
    "atomic_torch_save",
    "load_checkpoint",
    "pretrained_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "bcnn-checkpoint"
CHECKPOINT_VERSION = 1


def pretrained_checkpoint(name: str) -> Path | None:
    """The torch checkpoint shipped for a pretrained name, or None."""
    return pretrained_file(name, ".pt")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename over it."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _plain(v: Any) -> Any:
    """Tuples -> lists recursively (weights_only loading accepts both; JSON likes lists)."""
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def sign_weight_names(model: nn.Module) -> set[str]:
    """Weights that a model only reads through a 1-bit sign (``ste_sign``, ``approx_sign``,
    ``swish_sign``): their latent values beyond the sign do not change the outputs."""
    from ..quant import ApproxSign, SteSign, SwishSign

    return {
        f"{name}.weight" if name else "weight"
        for name, m in model.named_modules()
        if isinstance(getattr(m, "weight_quantizer", None), SteSign | ApproxSign | SwishSign)
        and isinstance(getattr(m, "weight", None), nn.Parameter)
    }


def grid_weight_names(model: nn.Module) -> dict[str, Any]:
    """Weights read only through an initialised signed k-bit quantizer with per-channel steps
    (k-bit and any-precision layers): {weight name: its quantizer}. A serving checkpoint
    stores them as their int8 grid integers X (the outputs depend on nothing else)."""
    from ..quant import UniformQuantizer

    out: dict[str, Any] = {}
    for name, m in model.named_modules():
        q = getattr(m, "weight_quantizer", None)
        if (
            isinstance(q, UniformQuantizer)
            and q.signed
            and q.channels
            and bool(q.initialized)
            and isinstance(getattr(m, "weight", None), nn.Parameter)
        ):
            out[f"{name}.weight" if name else "weight"] = q
    return out


def _grid_step(q: Any, w: torch.Tensor) -> torch.Tensor:
    step = q.step.detach().abs().clamp_min(1e-8)
    return step.view(-1, *([1] * (w.dim() - 1))).to(w.dtype)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    meta: dict[str, Any] | None = None,
    *,
    sign_weights: bool = False,
) -> None:
    """Save a model built by ``create_model`` (its config is read from ``model.bcnn_config``).

    ``sign_weights=True`` writes a serving checkpoint: weights read only through a sign (see
    :func:`sign_weight_names`) are stored as their int8 signs (sign(0) = +1), k-bit weights
    (:func:`grid_weight_names`) as their int8 grid integers (read back as X * step), 4x
    smaller, same outputs; fine-tuning from it restarts those latent weights on the grid."""
    config = getattr(model, "bcnn_config", None)
    if config is None:
        raise ValueError("model has no bcnn_config: build it with bcnn.models.create_model")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for k in sign_weight_names(model) if sign_weights else ():
        sd[k] = torch.where(sd[k] >= 0, 1, -1).to(torch.int8)
    grid = grid_weight_names(model) if sign_weights else {}
    for k, q in grid.items():  # k-bit weights: their grid integers (|X| <= 255)
        keep, q.keep_bits = q.keep_bits, None
        try:
            with torch.no_grad():
                x = q.integer(sd[k].float())[0]
        finally:
            q.keep_bits = keep
        sd[k] = x.round().to(torch.int16 if x.abs().max() > 127 else torch.int8)
    obj = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": _plain(config),
        "state_dict": sd,
        "meta": _plain(meta or {}),
    }
    if grid:
        obj["grid_weights"] = sorted(grid)
    atomic_torch_save(obj, path)


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint; returns ``(model in eval mode, meta)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".bcnn":
        raise ValueError(
            f"{path}: a packed .bcnn model, not a torch checkpoint (this needs the .pt it was "
            "packed from)"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a bcnn checkpoint")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {obj.get('version')!r}")
    cfg = obj["config"]
    model = create_model(
        cfg["name"], num_classes=cfg["num_classes"], binary=cfg["binary"], **cfg["kwargs"]
    )
    if cfg.get("bsq"):  # BSQ bit variables (bcnn.bsq): the structure, then the state
        from ..bsq import bsq_

        grid = cfg.get("bsq_grid", "zero")
        try:
            bsq_(model, init=False, grid=grid)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{path}: weights do not fit model {cfg['name']!r}: {first}") from None
    grid = obj.get("grid_weights") or []
    if grid:  # a serving checkpoint's grid integers X -> X * step: the same X again
        found = grid_weight_names(model)
        params = dict(model.named_parameters())
        for k in grid:
            if k not in found or k not in params:
                raise ValueError(f"{path}: {k!r} is not a k-bit weight of this model")
            with torch.no_grad():
                w = params[k]
                w.mul_(_grid_step(found[k], w))
    if cfg.get("bsq"):
        from ..bsq import check_

        try:
            check_(model)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    model.eval()
    return model, dict(obj.get("meta", {}))
