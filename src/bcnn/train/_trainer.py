"""The two-step trainer (step 1: binary activations, real weights; step 2: fully binary).

Output layout of ``out`` (``TrainConfig.out``)::

    config.yaml             the resolved config
    step1/checkpoint.pt     model + optimizer/scheduler/RNG/data position (a bcnn checkpoint)
    step1/metrics.csv, step1/curves.png
    step2/...               the same for step 2 (``float/`` for the float twin)
    final.pt                the trained model; meta: classes, data spec, val split/seed, metrics
    metrics.csv, curves.png all steps

Checkpoints are written atomically at the end of every epoch (and every ``save_every``
iterations, and on SIGINT/SIGTERM, after which training stops with :class:`TrainingInterrupted`).
The data order and augmentation depend only on (seed, epoch, batch), so a run resumed from any
checkpoint reaches the same weights as an unbroken run (bitwise, on a deterministic device).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import Loader, load_splits
from ..models import create_model, load_checkpoint, save_checkpoint
from ..quant import set_precision
from ._any_precision import make_any_precision_stage
from ._bsq import make_bsq_stage
from ._config import TrainConfig
from ._dist import DistInfo, all_reduce_sum, close_distributed, init_distributed
from ._evaluate import autocast_context, evaluate
from ._init import init_state
from ._losses import DistillationLoss
from ._metrics import plot_curves, write_metrics_csv
from ._optim import binarised_weight_names, clip_latent_weights, lr_lambda, make_optimizer
from ._precision import make_precision
from ._state import get_rng_state, seed_everything, set_rng_state

__all__ = ["Trainer", "TrainingInterrupted", "resolve_device", "train"]

CHECKPOINT = "checkpoint.pt"


class TrainingInterrupted(RuntimeError):
    """Raised after a SIGINT/SIGTERM once the checkpoint is safely written."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        where = f"; checkpoint saved to {checkpoint}" if checkpoint else ""
        super().__init__(f"interrupted by {name}{where}; continue with --resume")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r} (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {spec!r} (auto, cpu, cuda)")
    return dev


def _step_dir(step: str) -> str:
    return {"float": "float", "ft": "finetune"}.get(step, f"step{step}")


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, nn.Module) else model


class Trainer:
    """Runs the steps of a :class:`TrainConfig`. ``teacher``: an ``nn.Module`` (overrides
    ``config.teacher``, a checkpoint path). ``run()`` returns the final model."""

    def __init__(self, config: TrainConfig, teacher: nn.Module | None = None) -> None:
        config.validate()
        self.cfg = config
        self.out = Path(config.out)
        device = resolve_device(config.device)
        self.dist: DistInfo = init_distributed(device.type)
        if device.type == "cuda" and self.dist.enabled:
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        self.amp = config.precision == "fp32" and (
            config.amp == "on" or (config.amp == "auto" and device.type == "cuda")
        )
        self.main = self.dist.is_main
        self.verbose = self.main and not config.quiet
        self.split_seed = config.seed if config.split_seed is None else config.split_seed
        self.train_set, self.val_set = load_splits(
            config.data,
            config.val_split,
            self.split_seed,
            image_size=config.image_size,
            progress=self.verbose and sys.stderr.isatty(),
        )
        self.classes = self.train_set.classes
        self.teacher = teacher
        if self.teacher is None and config.teacher:
            self.teacher, _ = load_checkpoint(config.teacher)
        if self.teacher is not None:
            self.teacher.to(self.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.criterion = DistillationLoss(
            config.kd_alpha, config.kd_temperature, config.label_smoothing
        )
        self.histories: dict[str, tuple[list[dict[str, Any]], list[list[float]]]] = {}
        self._stop: int | None = None
        if config.bsq_alpha is not None:  # fail before any output: nothing for BSQ to learn
            from ..bsq import quantizable_layers

            if not quantizable_layers(self.build_model("2")):
                raise ValueError(
                    f"--bsq-alpha: {config.model} {config.model_kw or ''} has no quantizable "
                    "layer (a conv or linear layer with a weight quantizer)"
                )

    # ----------------------------------------------------------------- setup
    def build_model(self, step: str) -> nn.Module:
        kw = dict(self.cfg.model_kw)
        kw.setdefault("in_chans", self.train_set.image_shape[0])
        if step == "1":
            kw["weight_quantizer"] = None
        return create_model(
            self.cfg.model, num_classes=len(self.classes), binary=step != "float", **kw
        )

    def loaders(self) -> tuple[Loader, Loader]:
        bs = max(1, self.cfg.batch_size // self.dist.world_size)
        kw = dict(
            seed=self.cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            workers=self.cfg.workers,
        )
        return (
            Loader(self.train_set, bs, train=True, **kw),  # type: ignore[arg-type]
            Loader(self.val_set, bs, train=False, **kw),  # type: ignore[arg-type]
        )

    def meta(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "data": str(self.cfg.data),
            "val_split": self.cfg.val_split,
            "seed": self.split_seed,  # the split's (bcnn eval re-makes it); the run's: train_config
            "image_size": self.cfg.image_size,
            "input_shape": list(self.train_set.image_shape),
            "train_config": self.cfg.to_dict(),
        }

    def _check_out_dir(self) -> None:
        if self.cfg.resume:
            return
        existing = [self.out / _step_dir(s) / CHECKPOINT for s in self.cfg.step_list()]
        existing = [p for p in existing if p.exists()]
        if existing:
            raise FileExistsError(
                f"{self.out} already holds a run ({existing[0]}): add --resume or pick a new --out"
            )

    # ----------------------------------------------------------------- run
    def run(self) -> nn.Module:
        self._check_out_dir()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        steps = self.cfg.step_list()
        init_state: dict[str, torch.Tensor] | None = None
        if steps == ["2"]:
            init_state = self._step2_init()
        elif self.cfg.init and not (
            self.cfg.resume and (self.out / _step_dir(steps[0]) / CHECKPOINT).exists()
        ):  # a resumed run continues from its own checkpoint instead
            init_state = self._load_init(Path(self.cfg.init), steps[0])
        model: nn.Module | None = None
        for step in steps:
            model = self.run_step(step, init_state)
            init_state = model.state_dict()
        assert model is not None
        last = self.histories[steps[-1]][0]
        meta = self.meta()
        meta["steps"] = steps
        meta["metrics"] = dict(last[-1]) if last else {}
        if self.main:
            save_checkpoint(self.out / "final.pt", model, meta)
            if self.verbose:
                print(f"saved {self.out / 'final.pt'}")
        close_distributed(self.dist)
        return model

    def _step2_init(self) -> dict[str, torch.Tensor] | None:
        if (self.out / "step2" / CHECKPOINT).exists() and self.cfg.resume:
            return None  # resuming step 2 itself
        src = Path(self.cfg.init) if self.cfg.init else self.out / "step1" / CHECKPOINT
        if src.exists() or self.cfg.init:
            return self._load_init(src, "2")
        if self.verbose:
            print("step 2: no step-1 weights (--init or DIR/step1): starting from scratch")
        return None

    def _load_init(self, src: Path, step: str) -> dict[str, torch.Tensor]:
        what = f"step {step} of {self.cfg.model}"
        state = init_state(self.build_model(step), src, what, print if self.verbose else None)
        if self.verbose:
            print(f"step {step}: initialised from {src}")
        return state

    def run_step(self, step: str, init_state: dict[str, torch.Tensor] | None) -> nn.Module:
        cfg = self.cfg
        sdir = self.out / _step_dir(step)
        ckpt = sdir / CHECKPOINT
        seed_everything(cfg.seed + {"1": 0, "2": 1, "float": 2, "ft": 3}[step])
        model = self.build_model(step)
        bsq = make_bsq_stage(cfg, step)
        ap = make_any_precision_stage(cfg, step)
        state: dict[str, Any] | None = None
        if cfg.resume and ckpt.exists():
            saved, meta = load_checkpoint(ckpt)
            if bsq is not None:
                bsq.structure(model)
            model.load_state_dict(saved.state_dict())
            state = meta.get("train_state")
            if state is None:
                raise ValueError(f"{ckpt}: no training state to resume from")
            self.histories[step] = (list(meta.get("history", [])), list(meta.get("iters", [])))
            if state.get("finished"):
                if self.verbose:
                    print(f"step {step}: already finished ({ckpt})")
                return model
        elif init_state is not None:
            if bsq is not None and step == "ft":
                bsq.structure(model)
            model.load_state_dict(init_state)
            if bsq is not None and step == "2":
                bsq.convert(model)  # BSQ starts from the trained weights
        elif bsq is not None:
            bsq.convert(model)
        self.histories[step] = self.histories.get(step, ([], []))
        model.to(self.device)

        bin_model = model if step == "2" else None
        if step == "1":
            ref = self.build_model("2")
            names = binarised_weight_names(ref)
        elif step == "2":
            names = binarised_weight_names(bin_model)  # type: ignore[arg-type]
        else:
            names = set()
        if ap is not None:
            ap.freeze_shared(model)  # with ap_private: only those precisions' own parameters
        clip_params = [p for n, p in model.named_parameters() if n in names and p.requires_grad]
        clip = cfg.clip_latent and bool(clip_params) and bsq is None
        if clip:
            clip_latent_weights(clip_params)
        if ap is not None:
            ap.project()  # private weight planes: every latent weight inside its cell

        train_loader, val_loader = self.loaders()
        epochs = cfg.epochs_for(step)
        per_epoch = len(train_loader)
        wd = 0.0 if step in ("2", "ft") else cfg.weight_decay
        if bsq is None:
            opt = make_optimizer(model, cfg.lr_for(step), wd)
        else:
            bsq.start(model, per_epoch)  # first: it sets which tensors train
            opt = bsq.optimizer(model, cfg.lr_for(step))
        total = epochs * per_epoch
        if ap is not None:
            ap.start(total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(total, round(cfg.warmup * total), cfg.schedule)
        )
        prec = make_precision(  # FP8: swaps layers in place, master weights on opt
            cfg.precision, cfg.fp8, model, opt, total, log=None if self.main else _quiet
        )
        start_epoch, start_batch, iteration = 0, 0, 0
        accum = [0.0, 0.0, 0.0, 0.0]  # loss sum, correct, count, seconds of this epoch
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            prec.load_state_dict(state.get("precision", {}))
            if bsq is not None:
                bsq.load_state_dict(state.get("bsq", {}), self.device)
            start_epoch, start_batch = int(state["epoch"]), int(state["batch"])
            iteration = int(state["iteration"])
            accum = [float(a) for a in state["accum"]]
            if self.verbose:
                print(f"step {step}: resuming at epoch {start_epoch + 1}, batch {start_batch}")

        net: nn.Module = model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        # torch.compile fuses the element-wise ops around the convolutions (same parameters);
        # evaluation and checkpoints keep using the eager modules.
        fwd: Callable[[Tensor], Tensor] = torch.compile(net) if cfg.compile else net
        teacher = self.teacher
        teacher_precision = (  # the teacher in float32 inside the autocast region
            contextlib.nullcontext
            if cfg.teacher_amp or not self.amp
            else lambda: torch.autocast(self.device.type, enabled=False)
        )
        if teacher is not None and cfg.compile:
            teacher = torch.compile(teacher)  # type: ignore[assignment]

        def save(epoch: int, batch: int, finished: bool) -> None:
            if not self.main:
                return
            rows, iters = self.histories[step]
            meta = self.meta()
            meta.update(
                step=step,
                history=rows,
                iters=iters,
                train_state={
                    "epoch": epoch,
                    "batch": batch,
                    "iteration": iteration,
                    "finished": finished,
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": get_rng_state(),
                    "accum": list(accum),
                    "precision": prec.state_dict(),
                    "bsq": bsq.state_dict() if bsq is not None else {},
                },
            )
            save_checkpoint(ckpt, model, meta)

        if self.verbose:
            kind = {
                "1": "binary activations, real weights",
                "2": "binary weights and activations" if bsq is None else "BSQ bit-level",
                "float": "float twin",
                "ft": "BSQ fine-tuning",
            }[step]
            print(
                f"step {step} ({kind}): {epochs} epochs x {per_epoch} iterations, "
                f"{len(self.train_set)} train / {len(self.val_set)} val images, "
                f"device {self.device}{', amp' if self.amp else ''}"
                f"{f', {self.dist.world_size} processes' if self.dist.enabled else ''}"
                f"{', distillation' if self.teacher is not None else ''}{prec.describe()}"
                f"{bsq.describe() if bsq is not None else ''}"
                f"{ap.describe() if ap is not None else ''}"
            )
        if self.main:
            sdir.mkdir(parents=True, exist_ok=True)
        log_every = max(1, per_epoch // 20)
        with self._signals():
            for epoch in range(start_epoch, epochs):
                train_loader.set_epoch(epoch)
                net.train()
                b0 = start_batch if epoch == start_epoch else 0
                if b0 == 0:
                    accum = [0.0, 0.0, 0.0, 0.0]
                window = [0.0, 0.0, 0.0]
                bar = self._bar(step, epoch, epochs, per_epoch, b0)
                t0 = time.perf_counter() - accum[3]
                for b, (x, y) in enumerate(train_loader.iter_from(b0), start=b0):
                    if bsq is not None:  # periodic re-quantization
                        bsq.before_batch(model, iteration)
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device)
                    with autocast_context(self.device, self.amp):
                        t_logits = None
                        if teacher is not None:
                            with torch.no_grad(), teacher_precision():
                                t_logits = teacher(x)
                        if ap is None:
                            logits = fwd(x)
                        else:  # one forward per precision pass; the first teaches if distilling
                            outs = []
                            for layers in ap.passes(model, iteration):
                                set_precision(model, layers=layers)
                                outs.append(fwd(x))
                    if ap is None:
                        task = loss = self.criterion(logits, y, t_logits)
                    else:
                        losses = [self.criterion(outs[0], y, t_logits)]
                        target = outs[0].detach() if ap.distill else t_logits
                        losses += [self.criterion(o, y, target) for o in outs[1:]]
                        logits, task = outs[-1], losses[-1]  # reported: the last pass
                        loss = ap.total_loss(losses)
                    penalty = bsq.penalty(model) if bsq is not None else None
                    if penalty is not None:
                        loss = task + penalty
                    opt.zero_grad(set_to_none=True)
                    prec.step(loss, opt, iteration)
                    if bsq is not None:
                        bsq.step_bits(model, opt)
                    sched.step()
                    if clip:
                        clip_latent_weights(clip_params)
                    if ap is not None:
                        ap.project()
                    iteration += 1
                    lv = float(task.detach())
                    corr = float((logits.detach().argmax(1) == y).sum())
                    accum[0] += lv * len(y)
                    accum[1] += corr
                    accum[2] += len(y)
                    accum[3] = time.perf_counter() - t0
                    window[0] += lv * len(y)
                    window[1] += corr
                    window[2] += len(y)
                    if iteration % log_every == 0 and window[2]:
                        self.histories[step][1].append(
                            [iteration, window[0] / window[2], window[1] / window[2]]
                        )
                        window = [0.0, 0.0, 0.0]
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(
                            loss=f"{accum[0] / accum[2]:.3f}",
                            acc=f"{accum[1] / accum[2]:.3f}",
                            img_s=f"{accum[2] * self.dist.world_size / max(accum[3], 1e-9):.0f}",
                        )
                    stop = self._should_stop()
                    if stop or (cfg.save_every and iteration % cfg.save_every == 0):
                        save(epoch, b + 1, False)
                    if stop:
                        if bar is not None:
                            bar.close()
                        raise TrainingInterrupted(stop, ckpt if self.main else None)
                if bar is not None:
                    bar.close()
                if bsq is not None and epoch + 1 == epochs:
                    bsq.requantize(model)  # the stage ends on canonical bits
                if ap is not None:
                    set_precision(model)  # evaluate and save at the default (highest) precision
                row = self._epoch_row(step, epoch, iteration, accum, opt, net, val_loader)
                if ap is not None and len(self.val_set):
                    row.update(
                        ap.evaluate(
                            model,
                            lambda: evaluate(
                                net, val_loader, self.device, amp=self.amp, dist_info=self.dist
                            ),
                        )
                    )
                row.update(prec.metrics())
                if bsq is not None:
                    row.update(bsq.metrics(model))
                self.histories[step][0].append(row)
                save(epoch + 1, 0, epoch + 1 == epochs)
                self._write_reports(step)
                if self.verbose:
                    self._print_row(row, epochs)
            if epochs == 0 or start_epoch >= epochs:
                save(epochs, 0, True)
                self._write_reports(step)
        prec.close()
        model.eval()
        return model

    # ----------------------------------------------------------------- helpers
    def _epoch_row(
        self,
        step: str,
        epoch: int,
        iteration: int,
        accum: list[float],
        opt: torch.optim.Optimizer,
        net: nn.Module,
        val_loader: Loader,
    ) -> dict[str, Any]:
        loss_sum, correct, count = all_reduce_sum(accum[:3], self.dist, self.device)
        seconds = accum[3]
        row: dict[str, Any] = {
            "step": step,
            "epoch": epoch + 1,
            "iteration": iteration,
            "train_loss": loss_sum / max(count, 1),
            "train_acc": correct / max(count, 1),
            "val_loss": None,
            "val_top1": None,
            "val_top5": None,
            "lr": float(opt.param_groups[0]["lr"]),
            "seconds": seconds,
            "images_per_s": count / max(seconds, 1e-9),
        }
        if len(self.val_set):
            m = evaluate(net, val_loader, self.device, amp=self.amp, dist_info=self.dist)
            row.update(val_loss=m["loss"], val_top1=m["top1"], val_top5=m["top5"])
        return row

    def _write_reports(self, step: str) -> None:
        if not self.main:
            return
        rows, iters = self.histories[step]
        sdir = self.out / _step_dir(step)
        write_metrics_csv(sdir / "metrics.csv", rows)
        order = [s for s in ("float", "1", "2", "ft") if s in self.histories]
        all_rows = [r for s in order for r in self.histories[s][0]]
        write_metrics_csv(self.out / "metrics.csv", all_rows)
        try:
            plot_curves(sdir / "curves.png", rows, [(step, iters)])
            plot_curves(
                self.out / "curves.png", all_rows, [(s, self.histories[s][1]) for s in order]
            )
        except Exception as e:  # plotting must never kill a training run
            print(f"warning: could not draw curves: {e}", file=sys.stderr)

    def _print_row(self, r: dict[str, Any], epochs: int) -> None:
        val = (
            f" | val loss {r['val_loss']:.4f} top1 {r['val_top1']:.4f} top5 {r['val_top5']:.4f}"
            if r["val_top1"] is not None
            else ""
        )
        print(
            f"step {r['step']} epoch {r['epoch']}/{epochs}: train loss {r['train_loss']:.4f} "
            f"acc {r['train_acc']:.4f}{val} | lr {r['lr']:.2e}{_bits(r)} | {r['seconds']:.1f}s "
            f"({r['images_per_s']:.0f} img/s)",
            flush=True,
        )

    def _bar(self, step: str, epoch: int, epochs: int, total: int, initial: int) -> Any:
        if not self.verbose or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(
            total=total,
            initial=initial,
            desc=f"step {step} epoch {epoch + 1}/{epochs}",
            unit="it",
            leave=False,
            dynamic_ncols=True,
        )

    def _should_stop(self) -> int:
        flag = float(self._stop or 0)
        if self.dist.enabled:
            flag = max(all_reduce_sum([flag], self.dist, self.device))
        return int(flag)

    def _signals(self) -> Any:
        trainer = self

        class _Ctx:
            def __enter__(self) -> None:
                self.prev: dict[int, Any] = {}
                if not _is_main_thread():
                    return
                for s in (signal.SIGINT, signal.SIGTERM):
                    self.prev[s] = signal.getsignal(s)
                    signal.signal(s, self.handler)

            def handler(self, signum: int, frame: Any) -> None:
                if trainer._stop is not None:  # second signal: stop now
                    raise KeyboardInterrupt
                trainer._stop = signum

            def __exit__(self, *exc: Any) -> None:
                for s, h in self.prev.items():
                    signal.signal(s, h)

        return _Ctx()


def _bits(r: dict[str, Any]) -> str:
    per = {k[len("val_top1_") :]: v for k, v in r.items() if k.startswith("val_top1_")}
    if per:  # any-precision: top-1 at each uniform precision
        return " | " + " ".join(f"{k} {v:.4f}" for k, v in per.items())
    if r.get("avg_weight_bits") is None:
        return ""
    return f" | avg weight bits {r['avg_weight_bits']:.2f}"


def _quiet(msg: str) -> None:
    pass


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(
    config: TrainConfig | None = None, *, teacher: nn.Module | None = None, **kw: Any
) -> nn.Module:
    """Train as configured (``TrainConfig`` or its fields as keywords); returns the final model.

    >>> # train(model="bcnn_cifar", data="digits", out="runs/x", epochs=5)
    """
    if config is None:
        config = TrainConfig(**kw)
    elif kw:
        raise ValueError("pass either a TrainConfig or keyword fields, not both")
    return Trainer(config, teacher=teacher).run()
