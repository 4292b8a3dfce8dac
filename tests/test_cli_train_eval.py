"""`bcnn train` / `bcnn eval`: config files and flags, eval reproduces the val split, errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bcnn.cli import main
from bcnn.models import load_checkpoint

DATA = "synthetic:n=120,size=8,channels=1,classes=3"
TINY = ["--model-kw", "width=8", "depth=1", "--batch-size", "32", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    cfg = tmp_path_factory.mktemp("cfg") / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": DATA, "epochs": 5, "seed": 2, "val-split": 0.25}))
    argv = ["train", "--config", str(cfg), "--out", str(out), "--epochs", "1", *TINY]
    assert main(argv) == 0
    return out


def test_train_writes_resolved_config(run_dir: Path) -> None:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["epochs"] == 1  # the flag beat the file
    assert (cfg["seed"], cfg["val_split"], cfg["data"]) == (2, 0.25, DATA)  # from the file
    assert cfg["model_kw"] == {"width": 8, "depth": 1}
    for f in ("final.pt", "metrics.csv", "curves.png", "step1/metrics.csv", "step2/checkpoint.pt"):
        assert (run_dir / f).is_file(), f


def test_eval_reproduces_the_val_split(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(run_dir / "final.pt"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    _, meta = load_checkpoint(run_dir / "final.pt")
    assert res["engine"] == "torch" and res["n"] == 30 and res["split"] == "val"
    assert set(res) >= {"top1", "top5", "n", "engine", "seconds"}
    assert res["top1"] == pytest.approx(meta["metrics"]["val_top1"], abs=1e-12)
    assert main(["eval", str(run_dir / "final.pt"), "--split", "all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 120
    assert main(["eval", str(run_dir / "final.pt"), "--data", DATA]) == 0
    assert "top1" in capsys.readouterr().out


def test_resume_uses_the_saved_config(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before, _ = load_checkpoint(run_dir / "final.pt")
    # Without the saved config this would train digits (10 classes) and fail to load.
    assert main(["train", "--out", str(run_dir), "--resume", "--quiet"]) == 0
    after, _ = load_checkpoint(run_dir / "final.pt")
    sa, sb = before.state_dict(), after.state_dict()
    assert all((sa[k] == sb[k]).all() for k in sa)  # finished steps are not retrained
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (cfg["epochs"], cfg["data"]) == (1, DATA)


def _err(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_cli_errors(tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = str(run_dir / "final.pt")
    assert "checkpoint not found" in _err(["eval", str(tmp_path / "no.pt")], capsys)
    assert "not found" in _err(["eval", ck, "--data", f"cifar10:{tmp_path / 'none'}"], capsys)
    assert "image folder not found" in _err(
        ["eval", ck, "--data", f"imagefolder:{tmp_path / 'none'}"], capsys
    )
    assert "classes" in _err(["eval", ck, "--data", "digits"], capsys)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert "not a readable checkpoint" in _err(["eval", str(bad)], capsys)
    assert "already holds a run" in _err(["train", "--out", str(run_dir), "--data", DATA], capsys)
    assert "unknown data spec" in _err(["train", "--data", "nope", "--out", str(tmp_path)], capsys)
    assert "KEY=VALUE" in _err(["train", "--model-kw", "width", "--out", str(tmp_path)], capsys)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epoch: 3\n")
    assert "unknown config keys" in _err(["train", "--config", str(cfg)], capsys)
    assert "config file not found" in _err(["train", "--config", str(tmp_path / "x")], capsys)
    assert "steps" in _err(["train", "--steps", "3", "--out", str(tmp_path / "s")], capsys)


def test_cli_corrupt_image_and_cifar(
    tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "imgs" / "a"
    root.mkdir(parents=True)
    (root / "x.jpg").write_bytes(b"not a jpeg")
    err = _err(
        ["train", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--out", str(tmp_path / "o")],
        capsys,
    )
    assert "x.jpg" in err and "not a readable image" in err
    c = tmp_path / "c"
    c.mkdir()
    (c / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8)}))
    err = _err(["eval", str(run_dir / "final.pt"), "--data", f"cifar10:{c}"], capsys)
    assert "data_batch_1" in err and "labels" in err


def test_subprocess_error_has_no_traceback(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bcnn", "eval", str(tmp_path / "missing.pt"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().startswith("bcnn eval: error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_eval_packed_engine_agrees_with_torch(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = pytest.importorskip("bcnn.engine")
    if not hasattr(engine, "pack"):
        pytest.skip("bcnn.engine has no pack() yet")
    ck = str(run_dir / "final.pt")
    assert main(["eval", ck, "--split", "all", "--json"]) == 0
    torch_res = json.loads(capsys.readouterr().out)
    assert main(["eval", ck, "--split", "all", "--engine", "packed", "--json"]) == 0
    packed_res = json.loads(capsys.readouterr().out)
    assert packed_res["engine"] == "packed" and packed_res["n"] == torch_res["n"] == 120
    assert packed_res["top1"] == torch_res["top1"] and packed_res["top5"] == torch_res["top5"]
