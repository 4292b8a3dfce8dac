"""The same `bcnn train` command under torchrun: DDP with 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from bcnn.models import load_checkpoint


def test_ddp_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "bcnn", "train", "--model", "bcnn_cifar", "--model-kw", "width=8", "depth=1",
        "--data", "synthetic:n=160,size=8,channels=1,classes=4", "--val-split", "0.2",
        "--epochs", "1", "--batch-size", "32", "--out", str(out), "--workers", "0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    # only rank 0 prints and writes
    assert r.stdout.count("saved ") == 1, r.stdout
    # 128 train images, global batch 32 = 16 per process: 4 iterations per epoch
    assert "1 epochs x 4 iterations" in r.stdout and "2 processes" in r.stdout
    model, meta = load_checkpoint(out / "final.pt")
    assert meta["metrics"]["iteration"] == 4  # 128 train images, global batch 32
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("1,1,4,")
    assert (out / "curves.png").is_file() and (out / "step2" / "checkpoint.pt").is_file()
    # the replicas stayed in sync: the val metrics in the checkpoint match a local evaluation
    from bcnn.data import Loader, load_dataset
    from bcnn.train import evaluate

    val = load_dataset(meta["data"], "val", meta["val_split"], meta["seed"])
    m = evaluate(model, Loader(val, 64, train=False))
    assert m["n"] == 32
    assert abs(m["top1"] - meta["metrics"]["val_top1"]) < 1e-9
    assert torch.isfinite(torch.tensor(m["loss"]))
