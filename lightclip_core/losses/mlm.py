"""Masked language modelling enhanced by multi-level image-text fusion (LightCLIP section 1.3), training only.

The fused pass (losses/fusion.py: a second pass of the model's own text tower in which, after chosen layers, the
text attends to image-tower stage maps) reads the masked caption. The head is dense + GELU + LayerNorm + a decoder
tied to the token embedding. The mask token is a learned row kept here, outside the vocabulary, so the exported
model never sees it.

Data parallel: the pass and its loss stay on this rank's pairs, and nothing depends on how the global batch is split
over ranks. Which pairs the pass reads is a rule on each pair's global index, every pair's mask comes from a
generator keyed by (seed, global step, global index), and the loss is the sum over this rank's masked positions
divided by the global number of masked positions over the world size: the mean over ranks is the single-process
mean over every masked position of the global batch.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm
from torch import nn

from lightclip_core.infra.distributed import current_world, global_sum, row_offset
from lightclip_core.losses.base import Objective, StepContext, keyed_generator
from lightclip_core.losses.fusion import FusionBlocks
from lightclip_core.models.tokenizer import special_token_ids, trim_padding, word_mask

MASK_ROW, RANDOM_TOKEN = 0.8, 0.1  # BERT's 80/10/10: mask row / random token / unchanged


def mask_tokens(tokens: torch.Tensor, words: torch.Tensor, prob: float, num_regular_tokens: int, seed: int = 0,
                step: int = 0, sample_index: Sequence[int] | None = None,
                draw_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose `prob` of the word positions; of those 80% take the mask row, 10% a random regular token, 10% stay.

    Returns (input ids, where the mask row goes, chosen positions = the prediction targets). Random tokens are drawn
    from ids below `num_regular_tokens`, so that start/end-of-text ids never appear in the middle of a caption.
    Row b's draws come from its own generator keyed by (`seed`, `step`, `sample_index[b]`, default b), always
    `draw_length` long (default the row length) and cut to the row length: a sample is masked the same way
    whichever rank, batch position or padding length it has.
    """
    batch, length = tokens.shape
    index = range(batch) if sample_index is None else [int(i) for i in sample_index]
    if len(index) != batch:
        raise ValueError(f"sample_index has {len(index)} entries for {batch} rows")
    draw = max(length, draw_length or length)
    rolls, ids = torch.empty(batch, 2, draw), torch.empty(batch, draw, dtype=torch.long)
    for row, i in enumerate(index):  # on the host, a few microseconds per sample
        gen = keyed_generator(seed, step, i)
        torch.rand(2, draw, generator=gen, out=rolls[row])
        torch.randint(0, num_regular_tokens, (draw,), generator=gen, out=ids[row])
    rolls = rolls[:, :, :length].to(tokens.device, non_blocking=True)
    random_ids = ids[:, :length].to(tokens.device, non_blocking=True)
    chosen = (rolls[:, 0] < prob) & words
    roll = rolls[:, 1]
    use_mask_row = chosen & (roll < MASK_ROW)
    randomise = chosen & (roll >= MASK_ROW) & (roll < MASK_ROW + RANDOM_TOKEN)
    return torch.where(randomise, random_ids, tokens), use_mask_row, chosen


def selected_rows(offset: int, batch: int, fraction: float) -> list[int]:
    """This rank's rows (0-based, local) that the masked pass reads: global index g = offset + row is read when
    ceil((g + 1) * fraction) > ceil(g * fraction), which spreads ceil(fraction * B) reads evenly over a global batch
    of B (every k-th pair for fraction 1/k), whatever the split over ranks."""
    def reads(g: int) -> bool:
        return math.ceil(round((g + 1) * fraction, 9)) > math.ceil(round(g * fraction, 9))

    return [row for row in range(batch) if reads(offset + row)]


class MLMHead(nn.Module):
    """dense + GELU + LayerNorm, then logits over the vocabulary with the token embedding as the decoder."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(hidden))), token_embedding, self.bias)


class MaskedLanguageObjective(Objective):
    """`mlm_loss`: cross-entropy at the masked positions only, predicted from the fused second text pass."""

    name = "mlm"

    def __init__(self, width: int, vocab_size: int, fusion: FusionBlocks, mask_prob: float = 0.15,
                 batch_fraction: float = 1.0, weight: float = 1.0, seed: int = 0):
        """`fusion`: the fused pass (losses/fusion.py), shared with ITM when that is on; no points: MLM without
        fusion. `batch_fraction`: the masked pass reads only ceil(fraction * B) pairs of the (shuffled) global
        batch, spread evenly over it (`selected_rows`), which bounds its cost (a second text pass) on text-heavy
        models. `seed` keys the masks together with the global step and each pair's global index."""
        super().__init__(weight)
        self.mask_prob, self.batch_fraction, self.seed = mask_prob, batch_fraction, int(seed)
        self.num_regular_tokens = min(special_token_ids()["sot"], special_token_ids()["eot"])
        self.fusion = fusion
        self.image_strides = fusion.image_strides
        self.mask_embedding = nn.Parameter(torch.empty(width).normal_(std=0.02))
        self.head = MLMHead(width, vocab_size)

    def forward(self, outputs: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor | float]:
        text = ctx.model.text
        batch = ctx.tokens.shape[0]
        offset = row_offset(batch)
        selected = selected_rows(offset, batch, self.batch_fraction)
        # a rank none of whose pairs is read still runs the pass, on one pair and without targets, so that every
        # parameter takes part in its backward (DDP waits for every parameter's gradient)
        rows = selected or [0]
        index = torch.tensor(rows, device=ctx.tokens.device)
        tokens = ctx.tokens if len(rows) == batch else ctx.tokens[index]
        inputs, use_mask_row, chosen = mask_tokens(tokens, word_mask(tokens), self.mask_prob, self.num_regular_tokens,
                                                   self.seed, ctx.step, [offset + r for r in rows],
                                                   draw_length=text.context_length)
        if not selected:
            chosen = torch.zeros_like(chosen)
        inputs, use_mask_row, chosen, tokens, index = self._rows_with_targets(
            ctx.model, inputs, use_mask_row, chosen, tokens, index)
        maps = {stride: fmap if len(index) == batch else fmap[index]
                for stride, fmap in outputs.get("image_maps", {}).items()}
        hidden = self.fusion.fused_pass(text, inputs, maps, replace=(use_mask_row, self.mask_embedding))
        logits = self.head(hidden[chosen], text.token_embedding.weight)
        targets = tokens[chosen]
        # every rank reaches this collective; this rank's share of the global count normalises its sums
        masked = global_sum(chosen.sum())
        share = masked.clamp(min=1) / current_world().world_size
        ce_logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> float32, float64 stays
        loss = F.cross_entropy(ce_logits, targets, reduction="sum") / share
        correct = (logits.argmax(dim=-1) == targets).sum()
        return {"mlm_loss": loss, "mlm_accuracy": (correct / share).detach(), "mlm_masked": masked.float()}

    @staticmethod
    def _rows_with_targets(model: nn.Module, inputs: torch.Tensor, use_mask_row: torch.Tensor, chosen: torch.Tensor,
                           tokens: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Only the rows with a chosen position, cut to the columns they use: the pass is row-wise and the loss reads
        the chosen positions only, so a row without one adds nothing, and padding after the last end-of-text
        reaches nothing where the model ignores padding (`ignores_padding`). At least one row stays, so that every
        parameter still takes part in the backward (DDP). Exact; on the embedded captions (about 10 words) at
        mask_prob 0.15 it skips about a quarter of the rows."""
        keep = chosen.any(dim=1)
        if not bool(keep.all()):
            rows = keep.nonzero().flatten() if bool(keep.any()) else keep.new_zeros(1, dtype=torch.long)
            inputs, use_mask_row, chosen, tokens, index = (t[rows] for t in (inputs, use_mask_row, chosen, tokens,
                                                                             index.to(rows.device)))
        if getattr(model, "ignores_padding", lambda: False)():
            n = trim_padding(tokens).shape[1]
            inputs, use_mask_row, chosen, tokens = (t[:, :n] for t in (inputs, use_mask_row, chosen, tokens))
        return inputs, use_mask_row, chosen, tokens, index
