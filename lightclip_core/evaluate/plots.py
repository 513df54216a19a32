"""PNG plots for the evaluation report: training curves, per-class accuracy, confusion matrices, the WiSE-FT curve.

Figures are drawn on the Agg canvas directly (no pyplot), so plotting works headless, in worker processes and
threads, and never depends on the user's matplotlib backend.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightclip_core.infra.storage import atomic_path

_MAX_TICK_LABELS = 40  # beyond this, class names overlap into an unreadable band


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def read_train_log(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Columns of `train_log.csv` as float arrays (empty cells become NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"training log {str(path)!r} has no rows")
    return {col: np.array([float(r[col]) if r[col] not in ("", None) else np.nan for r in rows]) for col in rows[0]}


def plot_training_curves(train_log: str | os.PathLike, path: Path) -> Path:
    """Total loss, each objective's loss term, and learning rate against step."""
    log = read_train_log(train_log)
    missing = {"step", "loss", "lr"} - set(log)
    if missing:
        raise ValueError(f"training log {str(train_log)!r} lacks columns {sorted(missing)}")
    fig = Figure(figsize=(10, 4))
    loss_ax, lr_ax = fig.subplots(1, 2)
    loss_ax.plot(log["step"], log["loss"], label="loss")
    for term in sorted(k for k in log if k.endswith("_loss")):  # every objective's own loss, unweighted
        loss_ax.plot(log["step"], log[term], label=term.replace("_", " "), alpha=0.7)
    loss_ax.set(xlabel="step", ylabel="loss", title="Training loss")
    loss_ax.legend()
    lr_ax.plot(log["step"], log["lr"], color="tab:green")
    lr_ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    return _save(fig, path)


def plot_per_class_accuracy(classes: Sequence[str], recall: Sequence[float | None], title: str, path: Path) -> Path:
    """Bar chart of per-class recall (top-1 accuracy of each class); classes absent from the test set are empty."""
    values = np.array([np.nan if r is None else r for r in recall], dtype=float)
    fig = Figure(figsize=(max(6.0, 0.3 * len(classes) + 2), 4))
    ax = fig.subplots()
    ax.bar(np.arange(len(classes)), np.nan_to_num(values, nan=0.0), color="tab:blue")
    ax.axhline(np.nanmean(values) if np.isfinite(values).any() else 0.0, color="tab:red", ls="--",
               label="mean per-class recall")
    ax.set(ylim=(0, 1), ylabel="accuracy", title=title)
    _class_ticks(ax.xaxis, classes, rotation=90)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_confusion_matrix(confusion: np.ndarray, classes: Sequence[str], title: str, path: Path) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted class)."""
    confusion = np.asarray(confusion, dtype=float)
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    side = max(5.0, 0.3 * len(classes) + 3)
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    image = ax.imshow(normalised, vmin=0, vmax=1, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    _class_ticks(ax.xaxis, classes, rotation=90)
    _class_ticks(ax.yaxis, classes, rotation=0)
    return _save(fig, path)


def _class_ticks(axis: Axis, classes: Sequence[str], rotation: int) -> None:
    if len(classes) <= _MAX_TICK_LABELS:
        axis.set_ticks(np.arange(len(classes)), labels=list(classes), rotation=rotation, fontsize=8)


def plot_retrieval_recall(recalls: dict[str, dict[int, float]], path: Path) -> Path:
    """Recall at k for image-to-text and text-to-image retrieval, grouped by k; `recalls` maps a series (a direction,
    or a direction and a definition) to its recall at each k, in legend order."""
    directions = list(recalls)
    ks = sorted({k for per_k in recalls.values() for k in per_k})
    width = 0.8 / max(len(directions), 1)
    fig = Figure(figsize=(max(5.0, (0.3 * len(directions) + 0.4) * len(ks) + 4), 4))
    ax = fig.subplots()
    for i, direction in enumerate(directions):
        values = [recalls[direction].get(k, np.nan) for k in ks]
        bars = ax.bar(np.arange(len(ks)) + (i - (len(directions) - 1) / 2) * width, values, width,
                      label=direction.replace("_", " "))
        ax.bar_label(bars, fmt="%.2f", fontsize=7, rotation=90 if len(directions) > 4 else 0, padding=2)
    ax.set_xticks(np.arange(len(ks)), labels=[f"R@{k}" for k in ks])
    ax.set(ylim=(0, 1.15), ylabel="recall", title="Image-text retrieval: recall at k")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return _save(fig, path)


def plot_wise_ft(curves: dict[str, dict[float, float]], path: Path) -> Path:
    """WiSE-FT: each headline metric against the interpolation weight alpha (0: the start weights, 1: fine-tuned)."""
    fig = Figure(figsize=(7.5, 4))
    ax = fig.subplots()
    for name, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), marker="o", label=name)
    ax.set(xlim=(-0.02, 1.02), ylim=(0, 1.05), xlabel="alpha: (1 - alpha) * start + alpha * fine-tuned",
           ylabel="top-1 / R@1", title="WiSE-FT: weight interpolation between the start and the fine-tuned model")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return _save(fig, path)


def plot_similarity_heatmap(images: Sequence[np.ndarray], captions: Sequence[str], similarity: np.ndarray,
                            path: Path, max_caption: int = 48) -> Path:
    """Cosine similarity of a few test images (columns, thumbnails on top) and their captions (rows, same order):
    a model that has learned the task puts the largest value of each row on the diagonal."""
    similarity = np.asarray(similarity, dtype=float)
    n_text, n_image = similarity.shape
    fig = Figure(figsize=(3.5 + 1.0 * n_image, 1.6 + 0.6 * n_text))
    ax = fig.subplots()
    heat = ax.imshow(similarity, cmap="viridis", interpolation="nearest", aspect="equal")
    fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    for i, image in enumerate(images):  # thumbnails in the band above the matrix
        ax.imshow(image, extent=(i - 0.5, i + 0.5, -0.6, -1.6), interpolation="bilinear")
    best = similarity.argmax(axis=1)
    low, high = float(similarity.min()), float(similarity.max())
    for y in range(n_text):
        for x in range(n_image):
            bright = (similarity[y, x] - low) > 0.6 * (high - low)  # viridis is light at the top of its range
            ax.text(x, y, f"{similarity[y, x]:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if bright else "white", fontweight="bold" if x == best[y] else "normal")
    labels = [c if len(c) <= max_caption else c[:max_caption - 1] + "…" for c in captions]
    ax.set_yticks(np.arange(n_text), labels=labels, fontsize=8)
    ax.set_xticks([])
    ax.set(xlim=(-0.5, n_image - 0.5), ylim=(n_text - 0.5, -1.7),
           title="Image-text similarity on test pairs (bold: best image for each caption)")
    return _save(fig, path)
