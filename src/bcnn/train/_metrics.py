"""metrics.csv (one row per epoch) and curves.png (loss and accuracy per iteration and epoch)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .._io import atomic_write

__all__ = ["METRIC_COLUMNS", "plot_curves", "write_metrics_csv"]

METRIC_COLUMNS = [
    "step",
    "epoch",
    "iteration",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "seconds",
    "images_per_s",
    "loss_scale",
    "overflows",
    "avg_weight_bits",
    "bsq_reg",
]


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the whole file atomically (rows come from the checkpointed history, so a resumed
    run never duplicates or loses rows)."""
    # per-precision top-1 of any-precision runs (val_top1_w{k}a{k}) after the fixed columns
    extra = sorted({k for r in rows for k in r if k.startswith("val_top1_")})
    cols = [*METRIC_COLUMNS, *extra]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in cols})
    data = buf.getvalue().encode()
    atomic_write(path, lambda f: f.write(data))


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def plot_curves(
    path: Path, rows: list[dict[str, Any]], iters: list[tuple[str, list[list[float]]]]
) -> None:
    """Two panels (loss, accuracy): per-iteration training curves (thin) and per-epoch
    train/val points (markers) against the global iteration; steps separated by a line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    scaled = [r for r in rows if r.get("loss_scale") is not None]  # FP8 runs
    fig = Figure(figsize=(16 if scaled else 11, 4.2))
    axes = fig.subplots(1, 3 if scaled else 2)
    ax_loss, ax_acc = axes[0], axes[1]
    offset = 0
    offsets: dict[str, int] = {}
    for step, pts in iters:
        offsets[step] = offset
        if pts:
            xs = [offset + p[0] for p in pts]
            ax_loss.plot(
                xs, [p[1] for p in pts], lw=0.6, alpha=0.5, label=f"step {step} train/iter"
            )
            ax_acc.plot(xs, [p[2] for p in pts], lw=0.6, alpha=0.5, label=f"step {step} train/iter")
        last = [r["iteration"] for r in rows if str(r["step"]) == step]
        end = offset + (max(last) if last else (int(pts[-1][0]) if pts else 0))
        if offset:
            for ax in (ax_loss, ax_acc):
                ax.axvline(offset, color="grey", ls=":", lw=0.8)
        offset = end
    for step in offsets:
        er = [r for r in rows if str(r["step"]) == step]
        if not er:
            continue
        xs = [offsets[step] + r["iteration"] for r in er]
        ax_loss.plot(xs, [r["train_loss"] for r in er], "o-", ms=3, label=f"step {step} train")
        ax_acc.plot(xs, [r["train_acc"] for r in er], "o-", ms=3, label=f"step {step} train")
        val = [(x, r) for x, r in zip(xs, er) if r.get("val_top1") is not None]
        if val:
            ax_loss.plot(
                [x for x, _ in val],
                [r["val_loss"] for _, r in val],
                "s--",
                ms=3,
                label=f"step {step} val",
            )
            ax_acc.plot(
                [x for x, _ in val],
                [r["val_top1"] for _, r in val],
                "s--",
                ms=3,
                label=f"step {step} val top-1",
            )
    if scaled:
        _plot_loss_scale(axes[2], scaled, offsets)
    ax_loss.set(title="loss", xlabel="iteration")
    ax_acc.set(title="accuracy", xlabel="iteration", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=90, format="png"))


def _plot_loss_scale(ax: Any, rows: list[dict[str, Any]], offsets: dict[str, int]) -> None:
    """FP8 runs: the loss scale (log scale) and the overflow count at each epoch's end."""
    xs = [offsets.get(str(r["step"]), 0) + r["iteration"] for r in rows]
    ax.semilogy(xs, [r["loss_scale"] for r in rows], "o-", ms=3, base=2, label="loss scale")
    ax.set(title="FP8 loss scale / overflows", xlabel="iteration")
    ax2 = ax.twinx()
    ax2.plot(xs, [r.get("overflows") or 0 for r in rows], "x--", ms=3, color="C3")
    ax2.set_ylabel("overflows (total)", color="C3")
    ax.grid(alpha=0.3)
