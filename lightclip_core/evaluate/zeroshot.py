"""Zero-shot classification: class embeddings from prompt templates, and the metrics of the resulting logits."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lightclip_core.models.clip import CLIP


@torch.inference_mode()
def zero_shot_weights(model: CLIP, classnames: Sequence[str], templates: Sequence[str],
                      tokenize: Callable[[list[str]], torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    """`[D, C]` classifier: per class, the mean of its normalised template embeddings, renormalised."""
    if not classnames or not templates:
        raise ValueError(f"zero-shot needs classes and templates, got {len(classnames)} and {len(templates)}")
    prompts = [template.format(name) for name in classnames for template in templates]
    device = next(model.parameters()).device
    chunks = [model.encode_text(tokenize(prompts[i:i + batch_size]).to(device), normalize=True)
              for i in range(0, len(prompts), batch_size)]
    per_template = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return F.normalize(per_template.mean(dim=1), dim=-1).T.contiguous()


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
