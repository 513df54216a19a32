"""Image-text matching with hard negatives (ALBEF, Li et al., arXiv 2107.07651), training only.

A binary head reads the fused pass (losses/fusion.py, shared with MLM) at the end-of-text position of the whole,
unmasked caption and says whether image and caption belong together. Each step it sees, for the b pairs of this
rank: every pair (matched), each image with one negative caption and each caption with one negative image (not
matched). A negative is drawn in proportion to the contrastive similarity (`softmax` of the model's scaled logits,
detached: "hard") or uniformly ("random"), never the positive itself and never a pair whose caption is identical to
the positive's (the embedded data repeats captions; such a pair matches). A row with no such candidate gets no
negative. The draws come from a generator keyed by (seed, global step, the rank's first global row).

Data parallel: negatives come from this rank's own pairs, as in ALBEF (the pass needs their stage maps); the loss is
the sum over this rank's examples divided by the global number of examples over the world size, so the mean over
ranks is the mean over every example of the step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightclip_core.infra.distributed import current_world, global_sum, row_offset
from lightclip_core.losses.base import Objective, StepContext, keyed_generator
from lightclip_core.losses.fusion import FusionBlocks

NEGATIVES = ("hard", "random")


def negative_weights(logits: torch.Tensor, same_caption: torch.Tensor, kind: str) -> torch.Tensor:
    """`[b, b]` unnormalised probabilities of drawing column j as row i's negative: `softmax_j(logits[i])` ("hard") or
    1 ("random"), zero where `same_caption[i, j]` (the diagonal included)."""
    if kind not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {kind!r}")
    weights = logits.detach().float().softmax(dim=1) if kind == "hard" else torch.ones_like(logits, dtype=torch.float)
    return weights.masked_fill(same_caption, 0.0)


def draw_negatives(weights: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows that have a candidate, one column per such row drawn in proportion to its weights), on the host."""
    weights = weights.cpu()
    rows = (weights.sum(dim=1) > 0).nonzero().flatten()
    if rows.numel() == 0:
        return rows, rows
    return rows, torch.multinomial(weights[rows], 1, generator=generator).flatten()


def _generator(seed: int, step: int, offset: int) -> torch.Generator:
    return keyed_generator("itm", seed, step, offset)


class ImageTextMatchingObjective(Objective):
    """`itm_loss`: cross-entropy of a matched / not-matched head on the fused end-of-text state; `itm_accuracy`."""

    name = "itm"

    def __init__(self, width: int, fusion: FusionBlocks, negatives: str = "hard", weight: float = 1.0,
                 seed: int = 0):
        super().__init__(weight)
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
        if not fusion.points:
            raise ValueError("image-text matching needs at least one fusion point: without one the head never "
                             "sees the image")
        self.negatives, self.seed = negatives, int(seed)
        self.fusion = fusion
        self.image_strides = fusion.image_strides
        self.head = nn.Linear(width, 2)

    def forward(self, outputs: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor | float]:
        tokens, maps = ctx.tokens, outputs["image_maps"]
        batch = tokens.shape[0]
        offset = row_offset(batch)
        same_caption = (tokens[:, None, :] == tokens[None, :, :]).all(dim=-1)
        logits = outputs["logit_scale"] * outputs["image_features"] @ outputs["text_features"].T
        gen = _generator(self.seed, ctx.step, offset)
        # image i with a negative caption j, then caption i with a negative image j (rows of the transpose)
        img_rows, neg_text = draw_negatives(negative_weights(logits, same_caption, self.negatives), gen)
        txt_rows, neg_image = draw_negatives(negative_weights(logits.T, same_caption, self.negatives), gen)
        device = tokens.device
        img_rows, neg_text, txt_rows, neg_image = (t.to(device) for t in (img_rows, neg_text, txt_rows, neg_image))
        pair_tokens = torch.cat([tokens, tokens[neg_text], tokens[txt_rows]])
        pair_maps = {s: torch.cat([m, m[img_rows], m[neg_image]]) for s, m in maps.items()
                     if s in self.image_strides}
        hidden = self.fusion.fused_pass(ctx.model.text, pair_tokens, pair_maps)
        eot = ctx.model.text.eot_positions(pair_tokens)
        scores = self.head(hidden[torch.arange(hidden.shape[0], device=device), eot])
        labels = torch.zeros(scores.shape[0], dtype=torch.long, device=device)
        labels[:batch] = 1
        # every rank reaches this collective; this rank's share of the global count normalises its sums
        share = global_sum(torch.tensor(float(scores.shape[0]), device=device)) / current_world().world_size
        loss = F.cross_entropy(scores.to(torch.promote_types(scores.dtype, torch.float32)), labels,
                               reduction="sum") / share
        correct = (scores.argmax(dim=1) == labels).sum()
        return {"itm_loss": loss, "itm_accuracy": (correct / share).detach(),
                "itm_negatives": float(img_rows.numel() + txt_rows.numel())}
