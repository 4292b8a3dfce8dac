"""bcnn pack / predict / bench command lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bcnn.cli import main
from bcnn.engine import load
from bcnn.models import create_model, save_checkpoint


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    p = tmp_path / "ck.pt"
    save_checkpoint(p, create_model("bcnn_cifar", width=8, depth=1, num_classes=3),
                    meta={"classes": ["ant", "bee", "cow"]})  # fmt: skip
    return p


def test_pack_and_predict(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.bcnn"
    assert main(["pack", str(checkpoint), "-o", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bytes"] == out.stat().st_size and res["ratio"] > 1
    assert load(out).classes == ["ant", "bee", "cow"]
    img = tmp_path / "a.png"
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(img)
    assert main(["predict", str(out), str(img), "--json", "-k", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["top"]) == 2 and r["top"][0]["name"] in {"ant", "bee", "cow"}
    assert r["resized"] == "resized 24x20 -> 32x32"
    assert main(["predict", str(checkpoint), str(img)]) == 0  # a checkpoint works too


def test_cli_errors_are_one_line(checkpoint: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.bcnn"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["predict", str(bad), str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err
    assert main(["pack", str(checkpoint), "-o", str(tmp_path / "x.txt")]) == 2
    assert not (tmp_path / "x.txt").exists()


def test_bench_json(capsys) -> None:
    assert main(["bench", "bcnn_cifar", "--json", "--repeat", "1", "--size", "8", "8"]) == 0
    r = json.loads(capsys.readouterr().out)
    for k in ("packed_ms", "float_ms", "torch_binary_ms", "speedup_vs_float"):
        assert r[k] > 0
    assert r["argmax_agrees"] is True
