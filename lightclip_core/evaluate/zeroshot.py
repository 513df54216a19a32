"""Zero-shot classification metrics of a model's logits (its classifier weights: models.clip.zero_shot_weights)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


ZERO_SHOT_KS = (1, 5)  # the top-k every evaluation reports


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def classification_metrics(logits: Any, labels: Any, num_classes: int, ks: Sequence[int] = (1, 5)) -> dict[str, Any]:
    """Top-k accuracy (`top{k}`, k capped at `num_classes`), per-class recall, its mean over the classes present
    in `labels`, per-class support and the confusion matrix (rows: true class, columns: top-1 prediction)."""
    logits, labels = _as_numpy(logits).astype(np.float64), _as_numpy(labels).astype(np.int64)
    if logits.shape != (len(labels), num_classes):
        raise ValueError(f"logits shape {logits.shape} does not match ({len(labels)}, {num_classes})")
    # Stable sort: among equal logits the lower class index ranks first, so results are reproducible.
    ranking = np.argsort(-logits, axis=1, kind="stable")
    metrics: dict[str, Any] = {}
    for k in ks:
        top = ranking[:, :min(k, num_classes)]
        metrics[f"top{k}"] = float((top == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0
    confusion = np.bincount(labels * num_classes + ranking[:, 0], minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, np.diag(confusion) / support, np.nan)
    metrics["mean_per_class_recall"] = float(np.nanmean(recall)) if (support > 0).any() else 0.0
    metrics["per_class_recall"] = [None if np.isnan(r) else float(r) for r in recall]
    metrics["support"] = support.tolist()
    metrics["confusion"] = confusion
    return metrics


def headline_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of a :func:`classification_metrics` result that become metrics: top-k at ZERO_SHOT_KS and the
    mean per-class recall."""
    return {name: float(result[name]) for name in [f"top{k}" for k in ZERO_SHOT_KS] + ["mean_per_class_recall"]}
