""".bcnn files: validation of every field; corrupt files give a clean ValueError, never a crash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from bcnn.engine import PackedModel, load, load_any, pack
from bcnn.engine._format import read_bcnn, validate_graph
from bcnn.models import create_model, save_checkpoint


@pytest.fixture(scope="module")
def packed() -> PackedModel:
    return pack(create_model("bcnn_cifar", width=8, depth=1, num_classes=4), classes=list("abcd"))


@pytest.fixture(scope="module")
def model_file(packed: PackedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("fmt") / "m.bcnn"
    packed.save(p)
    return p


def rewrite(src: Path, dst: Path, *, graph=None, tensors=None, meta=None) -> Path:
    data = src.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    m = dict(header["__metadata__"])
    t = st_load(data)
    if graph is not None:
        m["graph"] = json.dumps(graph(json.loads(m["graph"])))
    if tensors is not None:
        t = tensors(t)
    if meta is not None:
        m = meta(m)
    dst.write_bytes(st_save(t, metadata=m))
    return dst


def test_file_header(model_file: Path) -> None:
    data = model_file.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = header["__metadata__"]
    assert meta["format"] == "bcnn" and meta["format_version"] == "1"
    graph = json.loads(meta["graph"])
    assert graph["classes"] == list("abcd")
    assert all(v["dtype"] in ("U64", "F32", "I32", "I8") for k, v in header.items() if k[0] != "_")


def test_the_same_model_gives_the_same_bytes(packed: PackedModel, tmp_path: Path) -> None:
    """The header's keys are sorted (safetensors' writer emits them in hash order, which
    differs between writes): saving one model repeatedly gives one file, which safetensors
    reads back to the same tensors and metadata, its header padded to 8 bytes."""
    files = []
    for i in range(5):
        packed.save(tmp_path / f"m{i}.bcnn")
        files.append((tmp_path / f"m{i}.bcnn").read_bytes())
    assert len(set(files)) == 1
    data = files[0]
    n = int.from_bytes(data[:8], "little")
    text = data[8 : 8 + n].decode("utf-8")
    assert n % 8 == 0 and text == text.rstrip() + " " * (len(text) - len(text.rstrip()))
    header = json.loads(text)
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(
        header["__metadata__"]
    )
    again = load(tmp_path / "m0.bcnn")
    assert json.dumps(again.graph, sort_keys=True) == json.dumps(packed.graph, sort_keys=True)
    t = st_load(data)
    assert set(t) == set(packed.tensors)
    assert all(np.array_equal(t[k], packed.tensors[k]) for k in t)


def test_size_vs_float_state_dict(tmp_path: Path) -> None:
    import torch

    model = create_model("bcnn_cifar")
    p = tmp_path / "c.bcnn"
    pack(model).save(p)
    sd = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd)
    assert sd.stat().st_size / p.stat().st_size >= 25


BAD = [
    ("version", {"meta": lambda m: {**m, "format_version": "99"}}, "format version"),
    ("magic", {"meta": lambda m: {**m, "format": "nope"}}, "magic"),
    ("json", {"meta": lambda m: {**m, "graph": "{"}}, "JSON"),
    ("op", {"graph": lambda g: {**g, "ops": [{**g["ops"][0], "op": "fft"}, *g["ops"][1:]]}}, "fft"),
    (
        "kernel",
        {"graph": lambda g: {**g, "ops": [{**g["ops"][0], "kernel": [99, 3]}, *g["ops"][1:]]}},
        "kernel",
    ),
    ("ref", {"graph": lambda g: {**g, "output": "nowhere"}}, "output"),
    (
        "order",
        {"graph": lambda g: {**g, "ops": g["ops"][1:]}},
        "not defined",
    ),
    ("classes", {"graph": lambda g: {**g, "classes": ["x"]}}, "classes"),
    (
        "missing tensor",
        {"tensors": lambda t: {k: v for k, v in t.items() if k != "stem1.weight"}},
        "missing",
    ),
    (
        "extra tensor",
        {"tensors": lambda t: {**t, "zzz": np.zeros(3, np.float32)}},
        "unexpected tensor",
    ),
    (
        "dtype",
        {"tensors": lambda t: {**t, "stem1.weight": t["stem1.weight"].astype(np.int64)}},
        "dtype",
    ),
    (
        "shape",
        {"tensors": lambda t: {**t, "stem1.weight": t["stem1.weight"][:-1].copy()}},
        "shape",
    ),
    (
        "tail bits",
        {"tensors": lambda t: {**t, "stem1.weight": t["stem1.weight"] | np.uint64(1 << 63)}},
        "tail bits",
    ),
]


@pytest.mark.parametrize(("what", "edit", "match"), BAD, ids=[b[0] for b in BAD])
def test_tampered_files_are_rejected(model_file: Path, tmp_path: Path, what, edit, match) -> None:
    bad = rewrite(model_file, tmp_path / "bad.bcnn", **edit)
    with pytest.raises(ValueError, match=match):
        load(bad)


def test_validate_graph_checks_attribute_types(packed: PackedModel) -> None:
    g = json.loads(json.dumps(packed.graph))
    g["ops"][2]["stride"] = [1, True]
    with pytest.raises(ValueError, match="stride"):
        validate_graph(g, packed.tensors)
    g = json.loads(json.dumps(packed.graph))
    g["ops"][2]["epilogue"].append({"kind": "add", "input": 1, "repeat": 1})
    with pytest.raises(ValueError, match="add"):
        validate_graph(g, packed.tensors)


def test_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "none.bcnn")
    p = tmp_path / "short.bcnn"
    p.write_bytes(b"abc")
    with pytest.raises(ValueError, match="truncated"):
        load(p)


CORRUPT_SCRIPT = r"""
import sys, numpy as np
from pathlib import Path
from bcnn.engine import load
good = Path(sys.argv[1]).read_bytes()
out = Path(sys.argv[2])
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
hlen = int.from_bytes(good[:8], "little")
results = {"value_error": 0, "ran": 0}
for i in range(80):
    b = bytearray(good)
    if i < 30:  # truncations, many inside the header
        cut = int(rng.integers(0, hlen + 16)) if i % 2 else int(rng.integers(0, len(good)))
        b = b[:cut]
    elif i < 60:  # bit flips in the header (JSON) or the size field
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, 8 + hlen))
            b[pos] ^= 1 << int(rng.integers(0, 8))
    else:  # bit flips anywhere, tensor data included
        for _ in range(int(rng.integers(1, 6))):
            pos = int(rng.integers(0, len(b)))
            b[pos] ^= 1 << int(rng.integers(0, 8))
    out.write_bytes(bytes(b))
    try:
        m = load(out)
        y = m(x)
        assert y.shape[0] == 2
        results["ran"] += 1
    except ValueError as e:
        assert str(e) and "\n" not in str(e).strip(), repr(e)
        results["value_error"] += 1
print(results["value_error"], results["ran"])
"""


def test_corrupt_files_never_crash(model_file: Path, tmp_path: Path) -> None:
    """80 truncated or bit-flipped files: each a clean ValueError or a successful run. Run in a
    subprocess so that a segfault or a hang is a test failure, not a dead test runner."""
    r = subprocess.run(
        [sys.executable, "-c", CORRUPT_SCRIPT, str(model_file), str(tmp_path / "c.bcnn")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    errors, ran = (int(v) for v in r.stdout.split())
    assert errors + ran == 80
    assert errors >= 40  # most corruptions are detected


def test_read_bcnn_returns_validated_pair(model_file: Path, packed: PackedModel) -> None:
    graph, tensors = read_bcnn(model_file)
    assert graph == packed.graph
    for k, v in packed.tensors.items():
        np.testing.assert_array_equal(tensors[k], v)


def test_load_any(tmp_path: Path, model_file: Path) -> None:
    model = create_model("bcnn_cifar", width=8, depth=1, num_classes=4)
    ck = tmp_path / "ck.pt"
    save_checkpoint(ck, model, meta={"classes": list("wxyz")})
    a = load_any(ck)
    assert a.classes == list("wxyz")
    x = np.zeros((1, 3, 32, 32), np.uint8)
    with __import__("torch").no_grad():
        ref = model.eval()(__import__("torch").from_numpy(x)).numpy()
    np.testing.assert_allclose(a(x), ref, rtol=1e-4, atol=1e-3)
    assert load_any(model_file).classes == list("abcd")
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(model_file.read_bytes())
    assert load_any(renamed).classes == list("abcd")  # recognised by its magic
    with pytest.raises(FileNotFoundError):
        load_any(tmp_path / "nothing")


def test_checkpoint_meta_travels_into_the_file(tmp_path: Path) -> None:
    """A .bcnn keeps the data spec and split of its run, so `bcnn eval x.bcnn` finds them."""
    model = create_model("bcnn_cifar", width=8, depth=1, num_classes=4)
    ck = tmp_path / "ck.pt"
    meta = {"classes": list("wxyz"), "data": "digits", "val_split": 0.2, "seed": 3, "metrics": {}}
    save_checkpoint(ck, model, meta=meta)
    out = tmp_path / "m.bcnn"
    load_any(ck).save(out)
    assert load(out).meta == {"data": "digits", "val_split": 0.2, "seed": 3}
    graph = dict(load(out).graph)
    graph["meta"] = {"data": ["not", "a", "scalar"]}
    with pytest.raises(ValueError, match="meta"):
        validate_graph(graph, load(out).tensors)


def test_saved_files_get_the_usual_mode(tmp_path: Path) -> None:
    """Atomic writes go through mkstemp (mode 0600); the result follows the umask instead."""
    import os

    from bcnn._io import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644
