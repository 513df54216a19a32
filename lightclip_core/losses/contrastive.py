"""CLIP's symmetric InfoNCE loss over a batch of paired, L2-normalised embeddings.

In a data-parallel job the rows are this rank's samples and the columns the global batch (`all_*_features`, from
`gather.gather_with_grad`); row i is paired with column `offset + i`. The loss is the mean over this rank's rows,
so the mean over ranks is the loss of the global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                all_image_features: torch.Tensor | None = None, all_text_features: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-to-text logits `s * v @ U.T` and text-to-image logits `s * u @ V.T`, rows = the given features,
    columns = `all_*` (default: the same features, and the text direction is the transpose)."""
    all_image = image_features if all_image_features is None else all_image_features
    all_text = text_features if all_text_features is None else all_text_features
    logits_per_image = logit_scale * image_features @ all_text.T
    if all_image is image_features and all_text is text_features:  # the whole batch: one matrix product
        return logits_per_image, logits_per_image.T
    return logits_per_image, logit_scale * text_features @ all_image.T


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     all_image_features: torch.Tensor | None = None, all_text_features: torch.Tensor | None = None,
                     offset: int = 0) -> torch.Tensor:
    """`0.5 * [CE(I, softmax_rows(S)) + CE(I, softmax_rows(S.T))]` with the i-th image paired to the i-th text;
    over this rank's rows when the global batch's features are given (row i pairs with column `offset + i`)."""
    logits_per_image, logits_per_text = clip_logits(image_features, text_features, logit_scale, all_image_features,
                                                    all_text_features)
    labels = offset + torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
