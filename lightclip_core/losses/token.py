"""The token-level objective: words matched to patches by a relaxed bipartite assignment (LightCLIP section 1.2).

Patch tokens (an image-tower stage map) and word tokens (the text tower's final hidden states of the caption's own
tokens) are projected into the joint space by training-only projections and L2-normalised. The assignment runs on
detached host copies; the loss flows through the cosines of the matched pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightclip_core.data.tokenizer import word_mask
from lightclip_core.losses.base import Objective, StepContext
from lightclip_core.losses.gather import global_sum
from lightclip_core.train.distributed import current_world
from lightclip_core.losses.token_alignment import match_batch, token_alignment_loss


class TokenAlignmentObjective(Objective):
    """`token_loss` over the matched (word, patch) pairs of every positive pair; `token_pairs`: matched pairs per
    caption, for the log.

    Data parallel: matching and loss stay on this rank's pairs; the loss is the sum over its matched pairs divided by
    the global number of pairs over the world size, so that the mean over ranks is the single-process mean."""

    name = "token"
    needs_text_hidden = True

    def __init__(self, image_channels: int, text_width: int, embed_dim: int, image_stride: int,
                 matcher: str = "hungarian", threshold: float | None = None, patches_per_word: int = 1,
                 loss: str = "softmax", temperature: float = 0.1, weight: float = 1.0):
        super().__init__(weight)
        self.image_strides = (image_stride,)
        self.patch_proj = nn.Linear(image_channels, embed_dim)
        self.word_proj = nn.Linear(text_width, embed_dim)
        self.matcher, self.threshold, self.patches_per_word = matcher, threshold, patches_per_word
        self.loss, self.temperature = loss, temperature

    def forward(self, outputs: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor | float]:
        stage = outputs["image_maps"][self.image_strides[0]]
        patches = F.normalize(self.patch_proj(stage.flatten(2).transpose(1, 2)), dim=-1)  # [B, HW, D]
        words = F.normalize(self.word_proj(outputs["text_hidden"]), dim=-1)  # [B, L, D]
        pairs = match_batch(words, word_mask(ctx.tokens), patches, self.matcher, self.threshold,
                            self.patches_per_word)
        world = current_world()
        normaliser = None
        if world.distributed:  # every rank reaches this collective, whatever its own number of pairs
            count = global_sum(len(pairs[0]), device=words.device).clamp(min=1)
            normaliser = (count / world.world_size).to(torch.promote_types(words.dtype, torch.float32))
        loss = token_alignment_loss(words, patches, *pairs, loss=self.loss, temperature=self.temperature,
                                    normaliser=normaliser)
        return {"token_loss": loss, "token_pairs": len(pairs[0]) / words.shape[0]}
