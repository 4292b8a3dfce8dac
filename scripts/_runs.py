"""Shared by the results scripts: a training run's config from the script's arguments, and
training it unless it already finished (a finished run is reused)."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

__all__ = ["run_config", "train_cached"]


def run_config(args: argparse.Namespace, out: Path, **kw: Any) -> Any:
    """A TrainConfig for ``bcnn_cifar`` from the script's --data/--batch-size/--lr/--seed/
    --val-split/--amp, resuming ``out`` if it exists; ``kw`` overrides."""
    from bcnn.train import TrainConfig

    base: dict[str, Any] = dict(
        model="bcnn_cifar", data=args.data, out=str(out), batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, val_split=args.val_split, amp=args.amp, quiet=True,
        resume=out.exists(),
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def train_cached(name: str, cfg: Any) -> float:
    """Train (unless done) -> the run's training seconds, summed from its metrics.csv (so a
    cached run reports the time it took when it ran)."""
    from bcnn.train import train

    if not (Path(cfg.out) / "final.pt").is_file():
        print(f"training {name} -> {cfg.out}", flush=True)
        train(cfg)
    with open(Path(cfg.out) / "metrics.csv") as f:
        return float(round(sum(float(r["seconds"]) for r in csv.DictReader(f))))
