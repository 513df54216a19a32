"""Instance-level losses other than InfoNCE: VSE++'s hinges (Faghri et al., arXiv 1707.05612) and SigLIP's pairwise
sigmoid loss (Zhai et al., arXiv 2303.15343). `objectives.contrastive.loss` picks one; ContrastiveObjective runs it.

Both read L2-normalised features. Rows are this rank's pairs, columns the global batch's (`all_*_features` from
`infra.distributed.gather_with_grad`), row i's positive is column `offset + i`; each loss is a mean (hinges) or a
per-row sum over the local rows divided by their count (sigmoid), so the mean over ranks is the global batch's loss.

- Hinges, on the cosine `s` (no temperature): for image i, `[margin - s(i, i) + s(i, j)]_+` over the texts j != i,
  and for text i the same over the images; `max_violation` keeps each row's hardest negative, `sum_hinge` sums
  them. The loss is the mean over rows of image row + text row. VSE++ sums over the batch; the mean keeps the
  figure independent of the batch size.
- Sigmoid: `-sum_j log sigmoid(z_ij (t * s(i, j) + b))` with z = +1 for the positive and -1 otherwise, summed over
  every column of the row and divided by the number of rows (open_clip's `SigLipLoss`); every image-text pair of the
  global batch counts once. open_clip passes the texts around a ring of ranks; gathering them, as the other
  batch-level objectives here do, gives the same value and gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

HINGES = ("max_violation", "sum_hinge")


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 -> float32, float64 stays


def _positives(rows: int, columns: int, offset: int, device) -> torch.Tensor:
    """[rows, columns] bool, True at (i, offset + i)."""
    if offset < 0 or offset + rows > columns:
        raise ValueError(f"rows {offset}..{offset + rows} do not lie within the {columns} columns")
    mask = torch.zeros(rows, columns, dtype=torch.bool, device=device)
    mask[torch.arange(rows, device=device), offset + torch.arange(rows, device=device)] = True
    return mask


def _row_hinges(sim: torch.Tensor, positive: torch.Tensor, margin: float, kind: str) -> torch.Tensor:
    """Each row's hinge cost against its negatives, `[rows]`."""
    pos = sim[positive].unsqueeze(1)
    cost = (margin - pos + sim).clamp(min=0).masked_fill(positive, 0.0)
    return cost.max(dim=1).values if kind == "max_violation" else cost.sum(dim=1)


def hinge_loss(image_features: torch.Tensor, text_features: torch.Tensor, margin: float = 0.2,
               kind: str = "max_violation", *, all_image_features: torch.Tensor | None = None,
               all_text_features: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """VSE++'s hinge loss, both directions, mean over this rank's rows (see the module's docstring)."""
    if kind not in HINGES:
        raise ValueError(f"kind must be one of {HINGES}, got {kind!r}")
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    all_image = image_features if all_image_features is None else all_image_features
    all_text = text_features if all_text_features is None else all_text_features
    sim_image = _at_least_float32(image_features @ all_text.T)  # image rows against every text
    sim_text = _at_least_float32(text_features @ all_image.T)  # text rows against every image
    positive = _positives(sim_image.shape[0], sim_image.shape[1], offset, sim_image.device)
    return (_row_hinges(sim_image, positive, margin, kind) + _row_hinges(sim_text, positive, margin, kind)).mean()


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, *, all_text_features: torch.Tensor | None = None,
                 offset: int = 0) -> torch.Tensor:
    """SigLIP's loss for this rank's image rows against the global batch's texts (see the module's docstring)."""
    all_text = text_features if all_text_features is None else all_text_features
    logits = _at_least_float32(logit_scale * image_features @ all_text.T + logit_bias)
    signs = 2.0 * _positives(logits.shape[0], logits.shape[1], offset, logits.device).to(logits.dtype) - 1.0
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]
