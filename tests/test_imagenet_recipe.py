"""The committed ImageNet recipe (configs/bcnn_imagenet*.yaml) runs end to end for a few
iterations on a tiny generated ImageFolder, so the path never rots: lazy JPEG decoding,
random-resized-crop to 224, float teacher, two binary steps distilled from it, evaluation."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bcnn.models import load_checkpoint
from bcnn.train import TrainConfig, load_config_file, train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                img = rng.integers(0, 256, (36 + 4 * i, 50, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.JPEG", format="JPEG")


def _cfg(name: str, **over) -> TrainConfig:
    d = load_config_file(CONFIGS / name)
    # Keep the recipe (model, steps, schedule, image size, distillation); shrink the run only.
    d.update(epochs=1, batch_size=2, workers=0, save_every=0, device="cpu", amp="off", quiet=True)
    d.update(over)
    return TrainConfig.from_dict(d)


def test_imagenet_recipe_runs_on_a_tiny_folder(tmp_path: Path) -> None:
    _folder(tmp_path / "data")
    data = f"imagefolder:{tmp_path / 'data'}"
    teacher = _cfg("bcnn_imagenet_teacher.yaml", data=data, out=str(tmp_path / "teacher"))
    assert teacher.model == "bcnn_imagenet" and teacher.steps == "float"
    assert teacher.image_size == 224
    train(teacher)
    student = _cfg(
        "bcnn_imagenet.yaml",
        data=data,
        out=str(tmp_path / "bcnn"),
        teacher=str(tmp_path / "teacher" / "final.pt"),
    )
    assert student.steps == "1,2" and student.kd_alpha > 0
    train(student)
    model, meta = load_checkpoint(tmp_path / "bcnn" / "final.pt")
    assert model.bcnn_config["name"] == "bcnn_imagenet" and model.bcnn_config["binary"]
    assert meta["classes"] == ["n01", "n02"]
    for step in ("step1", "step2"):
        assert (tmp_path / "bcnn" / step / "checkpoint.pt").is_file()
    logits = model(torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8))
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_cifar10_recipe_runs_on_a_tiny_folder(tmp_path: Path) -> None:
    """configs/bcnn_cifar10{_teacher,}.yaml: the shipped model's recipe, same shrinking."""
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        d = tmp_path / "data" / cls
        d.mkdir(parents=True)
        for i in range(10):
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(img).save(d / f"{i}.png")
    data = f"imagefolder:{tmp_path / 'data'}"
    teacher = _cfg("bcnn_cifar10_teacher.yaml", data=data, out=str(tmp_path / "teacher"))
    assert teacher.model == "bcnn_cifar" and teacher.steps == "float"
    train(teacher)
    student = _cfg(
        "bcnn_cifar10.yaml",
        data=data,
        out=str(tmp_path / "bcnn"),
        teacher=str(tmp_path / "teacher" / "final.pt"),
        epochs1=None,
        epochs2=None,
    )
    assert student.steps == "1,2" and student.kd_alpha > 0
    assert student.model_kw == teacher.model_kw  # the teacher is the student's float twin
    train(student)
    model, meta = load_checkpoint(tmp_path / "bcnn" / "final.pt")
    assert model.bcnn_config["binary"] and meta["val_split"] == 0.1 and meta["seed"] == 0
    logits = model(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
