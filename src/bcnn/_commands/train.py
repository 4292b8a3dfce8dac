"""bcnn train --model NAME --data SPEC --out DIR [...]: two-step training (see docs/training.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "train a binary CNN in two steps (or its float twin), resumable, optionally distributed"

S = argparse.SUPPRESS  # unset flags stay unset so that a config file's values survive


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML file of TrainConfig keys (flags override it)")
    p.add_argument("--model", default=S, help="registered model name (default bcnn_cifar)")
    p.add_argument("--data", default=S, help="digits | cifar10:DIR | imagefolder:DIR | synthetic")
    p.add_argument("--out", default=S, help="output folder (default runs/train)")
    p.add_argument("--steps", default=S, help="1,2 (default) | 1 | 2 | float")
    p.add_argument("--float", action="store_true", help="train the float twin (= --steps float)")
    p.add_argument("--epochs", type=int, default=S, help="epochs per step (default 10)")
    p.add_argument("--epochs1", type=int, default=S, help="epochs of step 1 (default --epochs)")
    p.add_argument("--epochs2", type=int, default=S, help="epochs of step 2 (default --epochs)")
    p.add_argument("--batch-size", type=int, default=S, help="global batch size (default 64)")
    p.add_argument("--lr", type=float, default=S, help="peak learning rate (default 2e-3)")
    p.add_argument("--lr2", type=float, default=S, help="step 2's peak lr (default --lr)")
    p.add_argument("--schedule", choices=["cosine", "linear"], default=S)
    p.add_argument("--warmup", type=float, default=S, help="warm-up fraction (default 0.05)")
    p.add_argument("--weight-decay", type=float, default=S, help="step 1 only (default 1e-5)")
    p.add_argument("--label-smoothing", type=float, default=S)
    p.add_argument("--no-clip-latent", dest="clip_latent", action="store_false", default=S)
    p.add_argument("--teacher", default=S, help="checkpoint of a float model to distil from")
    p.add_argument("--kd-alpha", type=float, default=S, help="distillation weight (0.5)")
    p.add_argument("--kd-temperature", type=float, default=S, help="softening temperature (2)")
    p.add_argument(
        "--teacher-fp32",
        dest="teacher_amp",
        action="store_false",
        default=S,
        help="run the teacher in float32 under --amp (binary teachers: bf16 flips their signs)",
    )
    p.add_argument("--seed", type=int, default=S, help="run seed: init, data order, split (0)")
    p.add_argument(
        "--split-seed", type=int, default=S, help="the validation split's seed (default: --seed)"
    )
    p.add_argument("--val-split", type=float, default=S, help="held-out fraction (0.1)")
    p.add_argument("--image-size", type=int, default=S, help="crop size for large images")
    p.add_argument("--device", default=S, help="auto | cpu | cuda (default auto)")
    p.add_argument(
        "--amp",
        choices=["auto", "on", "off"],
        default=S,
        help="bf16 autocast on CPU / AMP on CUDA (auto: CUDA only)",
    )
    p.add_argument("--workers", type=int, default=S, help="DataLoader workers (image files)")
    p.add_argument(
        "--compile",
        action="store_true",
        default=S,
        help="torch.compile the training forward (measure: scripts/bench_train.py --compile)",
    )
    p.add_argument("--save-every", type=int, default=S, help="also checkpoint every N iterations")
    p.add_argument(
        "--init",
        default=S,
        help="checkpoint to start the first step from (continue a run; step 2 alone: DIR/step1)",
    )
    p.add_argument(
        "--model-kw",
        nargs="+",
        default=S,
        metavar="K=V",
        help="model keywords, e.g. width=32 depth=1 (values parsed as YAML)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "fp8", "fp8-hybrid"],
        default=S,
        help="fp32 (default) | fp8 (E5M2, stochastic rounding, FP16 master, loss scaling) | "
        "fp8-hybrid (E4M3 forward): emulated FP8 training, see docs/fp8.md",
    )
    p.add_argument(
        "--fp8",
        nargs="+",
        default=S,
        metavar="K=V",
        help="FP8 recipe fields, e.g. loss_scaling=none stochastic_rounding=false master=fp32",
    )
    p.add_argument(
        "--bsq-alpha",
        type=float,
        default=S,
        help="BSQ: learn each layer's weight bits in step 2 with this group-Lasso weight "
        "(docs/bsq.md)",
    )
    p.add_argument("--bsq-bits", type=int, default=S, help="BSQ starting precision (default 8)")
    p.add_argument(
        "--bsq-interval",
        type=float,
        default=S,
        help="BSQ: re-quantize every N epochs, fractions allowed (default 1)",
    )
    p.add_argument(
        "--bsq-finetune", type=int, default=S, help="BSQ: fine-tuning epochs, scheme frozen (0)"
    )
    p.add_argument(
        "--bsq-finetune-mode",
        choices=["bits", "weights"],
        default=S,
        help="BSQ fine-tuning trains the float weights through the frozen grid at step 2's lr "
        "(default) or the bit variables at lr/10 (the official code)",
    )
    p.add_argument(
        "--bsq-lr", type=float, default=S, help="BSQ: peak lr of the bit variables (0.5)"
    )
    p.add_argument(
        "--bsq-grid",
        choices=["zero", "odd"],
        default=S,
        help="BSQ weight grid: zero (sign-magnitude, the paper's; default) or odd (the "
        "engine's grid: --bsq-bits is its width, binary layers allowed)",
    )
    p.add_argument(
        "--bsq-optimizer",
        choices=["sgd", "adam"],
        default=S,
        help="BSQ: bit variables by SGD on loss + alpha R (official) or Adam, R decoupled",
    )
    p.add_argument(
        "--ap-schedule",
        choices=["uniform", "layerwise", "bitmixer"],
        default=S,
        help="any-precision models (--model-kw precisions=[1,2,3,4], --steps 2): precision "
        "sampling per iteration (default bitmixer: uniform, then progressively per layer)",
    )
    p.add_argument(
        "--ap-distill",
        action="store_true",
        default=S,
        help="any-precision: distil each sampled precision from the highest (two forwards)",
    )
    p.add_argument(
        "--ap-joint",
        action="store_true",
        default=S,
        help="any-precision: run every precision each iteration and sum the losses "
        "(Any-Precision DNN; one forward per precision)",
    )
    p.add_argument(
        "--ap-loss-weights",
        nargs="+",
        default=S,
        metavar="BITS=W",
        help="any-precision, --ap-joint: weigh a precision's loss in the sum, e.g. 4=2 (others 1)",
    )
    p.add_argument(
        "--ap-private",
        nargs="+",
        type=int,
        default=S,
        metavar="BITS",
        help="any-precision: run only these precisions and train only their own parameters "
        "(batch-norm sets, activation steps); shared weights stay frozen",
    )
    p.add_argument(
        "--ap-private-planes",
        action="store_true",
        default=S,
        help="with --ap-private: the weights train too, within the low planes that only the "
        "private precisions read (every other view unchanged)",
    )
    p.add_argument("--resume", action="store_true", default=S, help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", default=S, help="no progress output")


def parse_model_kw(items: list[str], flag: str = "--model-kw") -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for it in items:
        k, eq, v = it.partition("=")
        if not eq or not k:
            raise ValueError(f"{flag} expects KEY=VALUE, got {it!r}")
        try:
            out[k.strip().replace("-", "_")] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise ValueError(f"{flag} {k}: cannot parse value {v!r}") from None
    return out


def resolve_config(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from ..train import TrainConfig, load_config_file

    flags = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    flags.pop("debug", None)
    flags.pop("command", None)
    cfg_file = flags.pop("config", None)
    if flags.pop("float", False):
        if "steps" in flags and flags["steps"] != "float":
            raise ValueError("--float conflicts with --steps")
        flags["steps"] = "float"
    if "model_kw" in flags:
        flags["model_kw"] = parse_model_kw(flags["model_kw"])
    if "fp8" in flags:
        flags["fp8"] = parse_model_kw(flags["fp8"], "--fp8")
    if "ap_loss_weights" in flags:
        flags["ap_loss_weights"] = parse_model_kw(flags["ap_loss_weights"], "--ap-loss-weights")
    base: dict[str, Any] = {}
    if cfg_file:
        base = load_config_file(cfg_file)
    elif flags.get("resume"):
        out = flags.get("out", TrainConfig.out)
        saved = Path(out) / "config.yaml"
        if saved.is_file():
            base = load_config_file(saved)
    base.pop("resume", None)
    for key in ("model_kw", "fp8"):
        if key in flags and isinstance(base.get(key), dict):
            flags[key] = {**base[key], **flags[key]}
    cfg = TrainConfig.from_dict({**base, **flags})
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from ..train import Trainer, TrainingInterrupted

    cfg = resolve_config(args)
    trainer = Trainer(cfg)
    if trainer.main:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        d = cfg.to_dict()
        d.pop("resume")
        (out / "config.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    try:
        trainer.run()
    except TrainingInterrupted as e:
        if trainer.main:
            print(f"bcnn train: {e}", file=sys.stderr)
        return 128 + e.signum
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
