"""``TrainConfig``: every knob of a training run; YAML in and out; flags override files."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "load_config_file", "parse_steps"]

STEP_NAMES = ("1", "2", "float")


@dataclass
class TrainConfig:
    """A training run. ``epochs`` is per step (``epochs1``/``epochs2`` override it per step).

    Step 1 trains binary activations with real latent weights (the model built with
    ``weight_quantizer=None``); step 2 binary weights and activations, initialised from step 1.
    ``steps="float"`` trains the float twin (``binary=False``), e.g. as a distillation teacher.
    """

    model: str = "bcnn_cifar"
    data: str = "digits"
    out: str = "runs/train"
    steps: str = "1,2"
    epochs: int = 10
    epochs1: int | None = None
    epochs2: int | None = None
    batch_size: int = 64
    lr: float = 2e-3
    lr2: float | None = None  # step 2's peak learning rate (default: lr)
    schedule: str = "cosine"  # or "linear": decay to zero after the warm-up
    warmup: float = 0.05  # fraction of each step's iterations spent warming up linearly
    weight_decay: float = 1e-5  # step 1 and float only, on conv/linear weights; 0 in step 2
    label_smoothing: float = 0.0
    clip_latent: bool = True  # clamp latent weights of binarised layers to [-1, 1]
    teacher: str | None = None  # checkpoint of a float model to distil from
    kd_alpha: float = 0.5  # loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher || student)
    kd_temperature: float = 2.0
    teacher_amp: bool = True  # False: the teacher runs in float32 under --amp (a binary one)
    seed: int = 0
    # the validation split's seed (None: `seed`): other training seeds on the same split
    split_seed: int | None = None
    val_split: float = 0.1
    image_size: int | None = None  # large image folders: crop size (default 224)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto | on | off (bf16 autocast on CPU, AMP on CUDA)
    workers: int = 2  # DataLoader workers for lazily decoded image folders
    compile: bool = False  # torch.compile the training forward (eval and checkpoints: eager)
    save_every: int = 0  # also checkpoint every N iterations (0: at epoch ends only)
    init: str | None = None  # checkpoint to start the first step from (step 2 alone: DIR/step1)
    model_kw: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # fp32 | fp8 | fp8-hybrid (emulated FP8 training, docs/fp8.md)
    fp8: dict[str, Any] = field(default_factory=dict)  # bcnn.fp8.Recipe fields overridden
    # BSQ (docs/bsq.md): step 2 learns each layer's weight bits; then `bsq_finetune` epochs
    bsq_alpha: float | None = None  # weight of the bit-level group Lasso (None: no BSQ)
    bsq_bits: int = 8  # starting precision N of every layer
    bsq_interval: float = 1.0  # re-quantize (adjust precisions) every N epochs (0.25: 4x each)
    bsq_finetune: int = 0  # epochs of the fine-tuning step `ft` (scheme frozen, lr / 10)
    bsq_lr: float = 0.5  # peak lr of the bit variables (SGD, momentum 0.9: docs/bsq.md)
    bsq_optimizer: str = "sgd"  # sgd (official) | adam (group Lasso decoupled, docs/bsq.md)
    # fine-tuning trains: weights (float weights through the frozen grid, straight-through,
    # per-channel steps, at step 2's lr) | bits (the official code, at lr / 10): docs/bsq.md
    bsq_finetune_mode: str = "weights"
    # the weight grid: zero (BSQ's sign-magnitude, 0 included, N magnitude bits) | odd (the
    # engine's odd grid, bsq_bits = its width k, binary layers allowed): docs/bsq.md
    bsq_grid: str = "zero"
    # any-precision (docs/any_precision.md): model_kw precisions=[...] trains in step 2
    ap_schedule: str = "bitmixer"  # uniform | layerwise | bitmixer (uniform, then per layer)
    ap_distill: bool = False  # distil each sampled precision from the highest (2 forwards)
    ap_joint: bool = False  # every precision every iteration, losses summed (P forwards)
    # joint: a precision's loss weight in the sum, {bits: weight} (unlisted: 1)
    ap_loss_weights: dict[int, float] = field(default_factory=dict)
    # train only these precisions' own parameters (their batch-norm sets and activation steps);
    # everything shared stays frozen, so every other precision is unchanged bit for bit
    ap_private: list[int] = field(default_factory=list)
    # with ap_private: the weights train too, within the low planes no shared precision reads
    ap_private_planes: bool = False
    quiet: bool = False
    resume: bool = False

    def step_list(self) -> list[str]:
        steps = parse_steps(self.steps)
        if self.bsq_alpha is not None and self.bsq_finetune > 0:
            steps.append("ft")
        return steps

    def epochs_for(self, step: str) -> int:
        if step == "ft":
            return self.bsq_finetune
        e = {"1": self.epochs1, "2": self.epochs2}.get(step)
        return self.epochs if e is None else e

    def lr_for(self, step: str) -> float:
        if step == "ft":  # BSQ fine-tuning: a tenth of step 2's peak lr (bits), or all of it
            return self.lr_for("2") * (1.0 if self.bsq_finetune_mode == "weights" else 0.1)
        return self.lr2 if step == "2" and self.lr2 is not None else self.lr

    def validate(self) -> None:
        self.step_list()
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        ss = self.split_seed
        if ss is not None and (isinstance(ss, bool) or not isinstance(ss, int) or ss < 0):
            raise ValueError(f"split_seed must be an integer >= 0, got {ss!r}")
        for s in self.step_list():
            if self.epochs_for(s) < 0:
                raise ValueError(f"epochs must be >= 0, got {self.epochs_for(s)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be cosine or linear, got {self.schedule!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the iterations in [0, 1), got {self.warmup}")
        if not 0 <= self.val_split < 1:
            raise ValueError(f"val split must be in [0, 1), got {self.val_split}")
        if self.amp not in ("auto", "on", "off"):
            raise ValueError(f"amp must be auto, on or off, got {self.amp!r}")
        if not 0 <= self.kd_alpha <= 1 or self.kd_temperature <= 0:
            raise ValueError("kd_alpha must be in [0, 1] and kd_temperature > 0")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        self._validate_bsq()
        self._validate_any_precision()
        from ._precision import check_precision

        check_precision(self.precision, self.fp8)
        if self.precision != "fp32" and (self.amp == "on" or self.compile):
            raise ValueError(f"--precision {self.precision} runs without --amp on and --compile")

    def _validate_any_precision(self) -> None:
        from ._any_precision import AP_SCHEDULES

        if self.ap_schedule not in AP_SCHEDULES:
            raise ValueError(f"ap_schedule must be one of {AP_SCHEDULES}, got {self.ap_schedule!r}")
        self._validate_ap_private()
        if not self.model_kw.get("precisions"):
            return
        if self.step_list() != ["2"]:
            raise ValueError(
                "an any-precision model (precisions=...) trains in step 2 only: use --steps 2 "
                "(and --init a trained checkpoint of the same topology, e.g. the float twin)"
            )
        if self.bsq_alpha is not None:
            raise ValueError("--bsq-alpha and an any-precision model do not combine")
        self._validate_ap_loss_weights()

    def _validate_ap_private(self) -> None:
        if self.ap_private_planes and not self.ap_private:
            raise ValueError("ap_private_planes needs ap_private (the precisions that own them)")
        if not self.ap_private:
            return
        ps = sorted(int(p) for p in self.model_kw.get("precisions") or ())
        if not ps:
            raise ValueError("ap_private names precisions of an any-precision model")
        raw = self.ap_private if isinstance(self.ap_private, list | tuple) else [self.ap_private]
        out = []
        for k in raw:
            if isinstance(k, bool) or not isinstance(k, int) or k not in ps:
                raise ValueError(f"ap_private: {k!r} is not one of the precisions {ps}")
            out.append(k)
        self.ap_private = sorted(set(out))
        if self.ap_private_planes and ps[-1] not in self.ap_private:
            raise ValueError(
                f"ap_private_planes: every weight plane is read by the shared W{ps[-1]}; "
                f"add {ps[-1]} to ap_private"
            )

    def _validate_ap_loss_weights(self) -> None:
        if not self.ap_loss_weights:
            return
        ps = sorted(int(p) for p in self.model_kw.get("precisions") or ())
        if not ps or not self.ap_joint:
            raise ValueError("ap_loss_weights weigh the passes of --ap-joint any-precision runs")
        out: dict[int, float] = {}
        for k, w in dict(self.ap_loss_weights).items():
            try:
                bits, weight = int(k), float(w)
            except (TypeError, ValueError):
                raise ValueError(f"ap_loss_weights: {k!r}={w!r} is not bits=weight") from None
            if bits not in ps:
                raise ValueError(f"ap_loss_weights: {bits} bits is not one of the precisions {ps}")
            if self.ap_private and bits not in self.ap_private:
                raise ValueError(
                    f"ap_loss_weights: {bits} bits is not trained in this run "
                    f"(ap_private: {self.ap_private}; the others' passes do not run)"
                )
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"ap_loss_weights: {bits} bits: a weight must be >= 0, got {w}")
            out[bits] = weight
        self.ap_loss_weights = out

    def _validate_bsq(self) -> None:
        a = self.bsq_alpha
        if a is None:
            return
        if isinstance(a, bool) or not isinstance(a, int | float) or not a >= 0:
            raise ValueError(f"bsq_alpha must be a number >= 0, got {a!r}")
        if isinstance(self.bsq_bits, bool) or self.bsq_bits not in range(1, 9):
            raise ValueError(f"bsq_bits must be in 1..8, got {self.bsq_bits!r}")
        if not self.bsq_interval > 0:
            raise ValueError(f"bsq_interval must be > 0 epochs, got {self.bsq_interval}")
        if self.bsq_finetune_mode not in ("bits", "weights"):
            raise ValueError(
                f"bsq_finetune_mode must be bits or weights, got {self.bsq_finetune_mode!r}"
            )
        if self.bsq_grid not in ("zero", "odd"):
            raise ValueError(f"bsq_grid must be zero or odd, got {self.bsq_grid!r}")
        if self.bsq_optimizer not in ("sgd", "adam"):
            raise ValueError(f"bsq_optimizer must be sgd or adam, got {self.bsq_optimizer!r}")
        if not self.bsq_lr > 0:
            raise ValueError(f"bsq_lr must be > 0, got {self.bsq_lr}")
        if self.bsq_finetune < 0:
            raise ValueError(f"bsq_finetune must be >= 0 epochs, got {self.bsq_finetune}")
        if "2" not in parse_steps(self.steps):
            raise ValueError(f"BSQ trains in step 2: --steps 2 or 1,2, got {self.steps!r}")
        if self.precision != "fp32":
            raise ValueError(f"BSQ runs in fp32, not --precision {self.precision}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)


def parse_steps(steps: str) -> list[str]:
    out = [s.strip() for s in str(steps).split(",") if s.strip()]
    if not out or any(s not in STEP_NAMES for s in out):
        raise ValueError(f"steps must be '1,2', '1', '2' or 'float', got {steps!r}")
    if "float" in out and len(out) > 1:
        raise ValueError("the float twin trains alone: --steps float")
    if out not in (["1"], ["2"], ["1", "2"], ["float"]):
        raise ValueError(f"steps must be '1,2', '1', '2' or 'float', got {steps!r}")
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config (keys as ``TrainConfig`` fields; dashes allowed for underscores)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: expected a mapping of config keys")
    return {str(k).replace("-", "_"): v for k, v in d.items()}
