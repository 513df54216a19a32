"""Token-level alignment: words matched to patches by a relaxed bipartite assignment (LightCLIP section 1.2).

Patch tokens (an image-tower stage map) and word tokens (the text tower's final hidden states of the caption's own
tokens) are projected into the joint space by training-only projections and L2-normalised. Words are matched to
patches on detached features (host-side assignment); the loss is differentiable and flows through the cosines of
the matched pairs.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from lightclip_core.infra.distributed import current_world, global_sum
from lightclip_core.losses.base import Objective, StepContext
from lightclip_core.models.tokenizer import word_mask

MATCHERS = ("hungarian", "max")
LOSSES = ("cosine", "softmax")


def assign_words_to_patches(sim: np.ndarray, matcher: str = "hungarian", threshold: float | None = None,
                            patches_per_word: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Match the words of ONE pair to patches from `sim` [n_words, n_patches]; returns int64 (word_idx, patch_idx).

    "hungarian": one-to-one assignment maximising total similarity, each word's row repeated `patches_per_word`
    times; "max": each word takes its `patches_per_word` most similar patches. Pairs below `threshold` are dropped.
    """
    if matcher not in MATCHERS:
        raise ValueError(f"matcher must be one of {MATCHERS}, got {matcher!r}")
    if not isinstance(patches_per_word, (int, np.integer)) or patches_per_word < 1:
        raise ValueError(f"patches_per_word must be an integer >= 1, got {patches_per_word!r}")
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D [n_words, n_patches], got shape {sim.shape}")
    k, (n_words, n_patches) = int(patches_per_word), sim.shape
    if n_words == 0 or n_patches == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if matcher == "hungarian":
        rows, patch_idx = linear_sum_assignment(1.0 - np.repeat(sim, k, axis=0))
        word_idx = rows // k  # repeated row r belongs to word r // k
    else:
        k = min(k, n_patches)
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        word_idx, patch_idx = np.repeat(np.arange(n_words), k), top.reshape(-1)
    word_idx, patch_idx = word_idx.astype(np.int64), patch_idx.astype(np.int64)
    if threshold is not None:
        keep = sim[word_idx, patch_idx] >= threshold
        word_idx, patch_idx = word_idx[keep], patch_idx[keep]
    return word_idx, patch_idx


def match_batch(word_feats: torch.Tensor, word_mask: torch.Tensor, patch_feats: torch.Tensor,
                matcher: str = "hungarian", threshold: float | None = None,
                patches_per_word: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match every pair of a batch: word_feats [B, L, D], word_mask [B, L] bool (True = real word), patch_feats
    [B, P, D]. Similarity is computed batched on the device without gradient and copied to the host once; returns
    int64 (batch_idx, word_idx, patch_idx) on the inputs' device, word_idx in the original L positions."""
    if word_feats.ndim != 3 or patch_feats.ndim != 3 or word_mask.shape != word_feats.shape[:2] \
            or patch_feats.shape[0] != word_feats.shape[0] or patch_feats.shape[2] != word_feats.shape[2]:
        raise ValueError(f"expected word_feats [B, L, D], word_mask [B, L], patch_feats [B, P, D]; got "
                         f"{tuple(word_feats.shape)}, {tuple(word_mask.shape)}, {tuple(patch_feats.shape)}")
    with torch.no_grad():
        sim = torch.bmm(word_feats.detach(), patch_feats.detach().transpose(1, 2)).float()
        # the mask rides along as an extra column so the whole batch crosses to the host in one copy
        host = torch.cat([sim, word_mask.detach().to(sim.dtype).unsqueeze(-1)], dim=-1).cpu().numpy()
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for b in range(host.shape[0]):
        rows = np.flatnonzero(host[b, :, -1] > 0.5)
        w, p = assign_words_to_patches(host[b, rows, :-1], matcher, threshold, patches_per_word)
        out.append((np.full(len(w), b, dtype=np.int64), rows[w].astype(np.int64), p))
    idx = np.stack([np.concatenate(parts) for parts in zip(*out)]) if out else np.zeros((3, 0), dtype=np.int64)
    batch_idx, word_idx, patch_idx = torch.from_numpy(idx).to(word_feats.device).unbind(0)
    return batch_idx, word_idx, patch_idx


def token_alignment_loss(word_feats: torch.Tensor, patch_feats: torch.Tensor, batch_idx: torch.Tensor,
                         word_idx: torch.Tensor, patch_idx: torch.Tensor, loss: str = "cosine",
                         temperature: float = 0.1, normaliser: float | torch.Tensor | None = None) -> torch.Tensor:
    """Loss over matched pairs, differentiable in the features only. "cosine": mean of 1 - <w, p>; "softmax": mean
    cross-entropy of the word over all patches of its image (logits <w, p_j> / temperature), target = its match.
    `normaliser` replaces the number of pairs as the divisor of their sum (a data-parallel rank divides by its share
    of the global count, so that the mean over ranks is the global mean)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if batch_idx.numel() == 0:
        return word_feats.sum() * 0 + patch_feats.sum() * 0
    if loss == "cosine":
        per_pair = 1 - (word_feats[batch_idx, word_idx] * patch_feats[batch_idx, patch_idx]).sum(-1)
        return per_pair.mean() if normaliser is None else per_pair.sum() / normaliser
    logits = torch.bmm(word_feats, patch_feats.transpose(1, 2))[batch_idx, word_idx] / temperature  # [N, P]
    if normaliser is None:
        return F.cross_entropy(logits, patch_idx)
    return F.cross_entropy(logits, patch_idx, reduction="sum") / normaliser


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
