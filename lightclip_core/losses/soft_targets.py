"""LightCLIP's progressive softened instance-level alignment (arXiv 2312.00674).

The one-hot targets of CLIP's InfoNCE loss are replaced by `(1 - eps) I + eps * Q`, where Q spreads the
softened mass over the negatives either uniformly or by a stop-gradient similarity, and eps grows over training.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightclip_core.losses.contrastive import clip_logits

SCHEDULES = ("constant", "linear", "cosine")
KINDS = ("uniform", "similarity")


def _check_eps(value: float, name: str = "eps") -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")


def eps_at(step: int, total_steps: int, schedule: str, eps_start: float, eps_end: float) -> float:
    """Softening at 0-based global `step` of `total_steps`; progress = step / max(total_steps - 1, 1) in [0, 1]."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    _check_eps(eps_start, "eps_start")
    _check_eps(eps_end, "eps_end")
    if schedule == "constant":
        return float(eps_end)
    progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    if schedule == "cosine":
        progress = (1.0 - math.cos(math.pi * progress)) / 2.0
    return float(eps_start + (eps_end - eps_start) * progress)


def uniform_targets(n: int, eps: float, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[n, n] targets with `1 - eps` on the diagonal and `eps / (n - 1)` elsewhere ([[1.0]] for n == 1)."""
    _check_eps(eps)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return torch.ones(1, 1, device=device, dtype=dtype)
    targets = torch.full((n, n), eps / (n - 1), device=device, dtype=dtype)
    targets.fill_diagonal_(1.0 - eps)
    return targets


def similarity_targets(sim: torch.Tensor, eps: float, temperature: float) -> torch.Tensor:
    """`(1 - eps) I + eps * softmax_rows(sim / temperature)` with the diagonal excluded from the softmax.

    `sim` [N, N] is detached; rows of the result sum to one. For N == 1 the target is [[1.0]].
    """
    _check_eps(eps)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be a square [N, N] matrix, got shape {tuple(sim.shape)}")
    sim = sim.detach()
    n = sim.shape[0]
    eye = torch.eye(n, device=sim.device, dtype=torch.bool)
    if n == 1:
        return eye.to(sim.dtype)
    negatives = torch.softmax((sim / temperature).masked_fill(eye, float("-inf")), dim=1)
    return (eps * negatives).masked_fill(eye, 1.0 - eps)


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def soft_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                   eps: float, kind: str = "uniform", similarity: torch.Tensor | None = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """Symmetric InfoNCE with softened targets; eps == 0 is exactly CLIP's loss.

    kind "similarity" spreads eps by `similarity` [N, N] (rows = images, detached; the text direction uses its
    transpose), defaulting to the detached student logits `s * v @ u.T`, divided by `temperature`.
    """
    _check_eps(eps)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits_per_image, logits_per_text = clip_logits(image_features, text_features, logit_scale)
    n = logits_per_image.shape[0]
    if eps == 0:
        labels = torch.arange(n, device=logits_per_image.device)
        return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
    if kind == "uniform":
        targets_image = targets_text = uniform_targets(n, eps, logits_per_image.device, logits_per_image.dtype)
    else:
        sim = logits_per_image if similarity is None else similarity
        if sim.shape != logits_per_image.shape:
            raise ValueError(f"similarity must have shape {tuple(logits_per_image.shape)}, got {tuple(sim.shape)}")
        sim = sim.detach().to(logits_per_image)
        targets_image = similarity_targets(sim, eps, temperature)
        targets_text = similarity_targets(sim.T, eps, temperature)
    return 0.5 * (_soft_cross_entropy(logits_per_image, targets_image)
                  + _soft_cross_entropy(logits_per_text, targets_text))
