"""Training any-precision networks (Bit-Mixer's schedule, Any-Precision DNN's distillation).

An any-precision model (``--model-kw precisions=[1,2,3,4]``) trains in step 2. Every iteration
runs at precisions drawn at random (a generator seeded by the run's seed and the iteration,
so resumed runs draw the same):

* ``uniform``: one bit width for the whole network per iteration (Bit-Mixer's first stages),
  every precision once per round of ``len(precisions)`` iterations in a shuffled order;
* ``layerwise``: every layer its own random bit width;
* ``bitmixer`` (default): uniform for the first half of the step, then layer-wise with a
  probability that grows linearly from 0 to 1 over the second half (each layer otherwise
  keeps the iteration's network-wide width): Bit-Mixer's progressive third stage.

Weights and activations of a layer share its bit width during training. With ``distill``
each iteration also runs the highest precision, trains it on the labels, and distils the
sampled precision from its logits (detached): the recursive scheme of Any-Precision DNN, Yu
et al., AAAI 2021.

With ``joint`` (Any-Precision DNN's training) every iteration runs *every* precision, one
forward each, highest first, and sums their losses: each precision gets as many updates as a
dedicated model (at P forwards per iteration). The schedule still decides the layer-wise
mixing: pass k uses the network-wide width k, and each layer draws its own width with the
schedule's probability. With ``distill`` the highest pass (kept uniform) teaches the others.
``loss_weights`` ({bits: weight}, unlisted 1) weigh the passes' losses in the sum.

With ``private`` (a subset of the precisions) only those precisions run, and only their own
parameters train: the batch-norm sets whose key holds no other precision and their activation
quantizers' steps. Everything shared (weights, weight steps, thresholds, PReLUs, the classifier
scale) is frozen, so every other precision's outputs stay exactly as they were: a way to lift
one view without trading the others. With ``planes`` as well, the weights train too, but only
in their lowest planes, the ones no other precision reads: the k-bit view of a nested b-bit
weight is its top k planes, i.e. the cell ``[m c s, (m+1) c s)`` of ``w`` with
``c = 2^(b - j + 1)`` and ``j`` the highest precision that is not private. After every update
each latent weight is clamped back into the cell it started in (:meth:`project`), so the
j-bit view, and every lower one, stays the same bit for bit.

Validation reports top-1 at every uniform precision.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..models import precision_layers
from ..nn import SwitchableBatchNorm
from ..quant import (
    SwitchableQuantizer,
    UniformQuantizer,
    UntrainedPrecision,
    grid_limits,
    precision,
)

__all__ = ["AP_SCHEDULES", "AnyPrecisionStage", "make_any_precision_stage"]

AP_SCHEDULES = ("uniform", "layerwise", "bitmixer")


class AnyPrecisionStage:
    def __init__(
        self,
        precisions: tuple[int, ...],
        schedule: str,
        distill: bool,
        seed: int,
        joint: bool = False,
        loss_weights: dict[int, float] | None = None,
        private: tuple[int, ...] = (),
        planes: bool = False,
    ):
        if schedule not in AP_SCHEDULES:
            raise ValueError(
                f"any-precision schedule must be one of {AP_SCHEDULES}, got {schedule!r}"
            )
        self.precisions = precisions
        self.schedule = schedule
        self.distill = distill
        self.joint = bool(joint)
        self.loss_weights = {int(k): float(v) for k, v in (loss_weights or {}).items()}
        self.seed = int(seed)
        self.private = tuple(sorted({int(k) for k in private}))
        if not set(self.private) <= set(precisions):
            raise ValueError(f"private precisions {self.private} not all in {precisions}")
        if planes and not self.private:
            raise ValueError("private weight planes need private precisions (ap_private)")
        self.planes = bool(planes)
        # the precisions that run in training (evaluation reports every one)
        self.trained = self.private or self.precisions
        self.total = 1
        # (latent weight, lowest, highest value) of each weight whose low planes train
        self._cells: list[tuple[Tensor, Tensor, Tensor]] = []

    def _cell_bounds(self, model: nn.Module) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The cell of every latent weight of the precision layers in which the views of the
        non-private precisions stay the same (none when the top precision is shared)."""
        shared = [k for k in self.precisions if k not in self.private]
        top = self.precisions[-1]
        if shared and max(shared) == top:
            raise ValueError(
                f"private weight planes: the top precision {top} is shared, so every weight "
                f"plane is read by a shared view; make {top} private"
            )
        lo_grid, hi_grid = grid_limits(top, True)
        c = 2.0 ** (top - max(shared, default=top) + 1)  # the cell width, in steps
        first, last = math.floor(lo_grid / c), math.floor(hi_grid / c)  # open-ended cells
        margin = 1e-3 * c  # stay clear of the cell's edges (rounding of w / s)
        out: list[tuple[Tensor, Tensor, Tensor]] = []
        for name, m in precision_layers(model):
            q, w = m.weight_quantizer, m.weight
            assert isinstance(w, Tensor)
            if not isinstance(q, UniformQuantizer) or q.bits != top or not q.signed:
                raise ValueError(f"{name}: not a nested {top}-bit weight; no private planes")
            if not bool(q.initialized):
                raise ValueError(f"{name}: untrained weight step; private planes need --init")
            if not shared:  # every precision private: the weights are free
                out.append((w, torch.full_like(w, -math.inf), torch.full_like(w, math.inf)))
                continue
            with torch.no_grad():
                s = q.step.abs().clamp_min(1e-8).view(-1, *([1] * (w.dim() - 1)))
                cell = torch.floor(w.clamp(lo_grid * s, hi_grid * s) / s / c)
                lo = torch.where(cell <= first, -math.inf, (cell * c + margin) * s)
                hi = torch.where(cell >= last, math.inf, ((cell + 1) * c - margin) * s)
            out.append((w, lo, hi))
        return out

    @torch.no_grad()
    def project(self) -> None:
        """With ``planes``: every latent weight back into its starting cell (after a step)."""
        for w, lo, hi in self._cells:
            torch.maximum(w, lo, out=w)
            torch.minimum(w, hi, out=w)

    def freeze_shared(self, model: nn.Module) -> int:
        """With ``private``: every parameter but the private precisions' own stops training
        (``requires_grad=False``). Returns the number of parameters that still train."""
        if not self.private:
            return sum(p.numel() for p in model.parameters() if p.requires_grad)
        own: set[int] = set()
        mine = set(self.private)
        for m in model.modules():
            if isinstance(m, SwitchableBatchNorm):
                for key in m.keys:
                    if set(key) <= mine:
                        own.update(id(p) for p in m.set_for(key).parameters())
            elif isinstance(m, SwitchableQuantizer):
                for k in self.private:
                    own.update(id(p) for p in m.quantizers[str(k)].parameters())
        if self.planes:
            self._cells = self._cell_bounds(model)
            own.update(id(w) for w, _, _ in self._cells)
            self.project()  # a latent weight on a cell's edge moves inside by the margin
        n = 0
        for p in model.parameters():
            p.requires_grad_(id(p) in own)
            n += p.numel() if id(p) in own else 0
        if n == 0:
            raise ValueError(f"private precisions {self.private}: the model has no own parameters")
        return n

    def start(self, total_iterations: int) -> None:
        self.total = max(1, int(total_iterations))

    def layer_probability(self, iteration: int) -> float:
        """Chance that a layer draws its own bit width at this iteration."""
        if self.schedule == "uniform":
            return 0.0
        if self.schedule == "layerwise":
            return 1.0
        frac = iteration / self.total
        return 0.0 if frac < 0.5 else min(1.0, (frac - 0.5) / 0.5)

    def draw(
        self, model: nn.Module, iteration: int, width: int | None = None
    ) -> dict[str, tuple[int, int]]:
        """The precisions of this iteration ``{layer: (k, k)}`` (deterministic per iteration;
        ``width``: the network-wide width of a joint pass, else the iteration's own)."""
        ps = self.trained
        if width is None:
            # the network-wide width: every precision once per round of len(ps) iterations, in
            # a shuffled order (balanced: each BN set of the uniform precisions keeps training)
            rnd, pos = divmod(iteration, len(ps))
            gen = torch.Generator().manual_seed(self.seed + rnd)
            k = ps[int(torch.randperm(len(ps), generator=gen)[pos])]
        else:
            k = int(width)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + iteration) * 11 + (width or 0))
        p = self.layer_probability(iteration)
        out = {}
        for name, _ in precision_layers(model):
            own = float(torch.rand((), generator=g)) < p
            kl = ps[int(torch.randint(len(ps), (1,), generator=g))] if own else k
            out[name] = (kl, kl)
        return out

    def passes(self, model: nn.Module, iteration: int) -> list[dict[str, tuple[int, int]] | None]:
        """The forward passes of one iteration, in order (None: the default, highest,
        precision); with ``distill`` the first pass teaches the rest."""
        if self.joint:
            top, *rest = sorted(self.trained, reverse=True)
            first = self._teacher(model) if self.distill else self.draw(model, iteration, top)
            return [first] + [self.draw(model, iteration, k) for k in rest]
        drawn = self.draw(model, iteration)
        return [self._teacher(model), drawn] if self.distill else [drawn]

    def _teacher(self, model: nn.Module) -> dict[str, tuple[int, int]] | None:
        """The distilling pass: the model's highest precision (None), or with ``private``
        the highest private one, uniform (a shared view must not run in train mode)."""
        if not self.private:
            return None
        k = max(self.private)
        return {name: (k, k) for name, _ in precision_layers(model)}

    def weights(self) -> list[float] | None:
        """The loss weight of each joint pass, in ``passes``' order (None: all 1)."""
        if not self.joint or not self.loss_weights:
            return None
        return [self.loss_weights.get(k, 1.0) for k in sorted(self.trained, reverse=True)]

    def total_loss(self, losses: list[Tensor]) -> Tensor:
        """The passes' losses summed, each times its weight (:meth:`weights`)."""
        w = self.weights()
        if w is None:
            return torch.stack(losses).sum()
        return torch.stack([wi * li for wi, li in zip(w, losses, strict=True)]).sum()

    def describe(self) -> str:
        d = ", distilled from the highest" if self.distill else ""
        j = ", every precision each iteration" if self.joint else ""
        w = self.weights()
        lw = f", loss weights {dict(zip(sorted(self.trained, reverse=True), w))}" if w else ""
        pv = f", only {self.private}'s own parameters train" if self.private else ""
        pv += " (and the weights' private low planes)" if self.planes else ""
        return f", any-precision {self.precisions} ({self.schedule}{j}{d}{lw}{pv})"

    def evaluate(self, model: nn.Module, run_eval: Any) -> dict[str, float]:
        """Top-1 at every uniform precision (``run_eval()`` -> evaluate's dict)."""
        row: dict[str, float] = {}
        for k in self.precisions:
            with precision(model, weight_bits=k, act_bits=k):
                try:
                    row[f"val_top1_w{k}a{k}"] = run_eval()["top1"]
                except UntrainedPrecision:  # not drawn yet: its BN sets have no statistics
                    row[f"val_top1_w{k}a{k}"] = float("nan")
        return row


def make_any_precision_stage(cfg: Any, step: str) -> AnyPrecisionStage | None:
    ps = cfg.model_kw.get("precisions")
    if not ps or step != "2":
        return None
    return AnyPrecisionStage(
        tuple(sorted({int(p) for p in ps})),
        cfg.ap_schedule,
        cfg.ap_distill,
        cfg.seed,
        joint=cfg.ap_joint,
        loss_weights=cfg.ap_loss_weights,
        private=tuple(cfg.ap_private or ()),
        planes=cfg.ap_private_planes,
    )
